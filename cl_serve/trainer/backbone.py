"""Build the frozen timm Vision Transformer that every task adapts, and read its preprocessing.

Three sources: a local `.safetensors` checkpoint (its `card.json` or safetensors metadata name `timm_model` and
`timm_kwargs`), timm's own pretrained weights (needs internet), or random initialisation (tests, the demo's
self-pretrained backbone). The classifier head is always dropped: learners grow their own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cl_serve.contract.preprocessing import Preprocessing
from cl_serve.contract.store_schema import BackboneSpec
from cl_serve.trainer.errors import BackboneError
from cl_serve.trainer.token_path import token_path

def create_model(spec: BackboneSpec, num_classes: int = 0) -> torch.nn.Module:
    """A randomly initialised timm model of the spec's architecture (weights are loaded by the caller)."""
    import timm

    try:
        model = timm.create_model(spec.timm_model, pretrained=False, **spec.build_kwargs(num_classes))
    except Exception as e:  # timm raises RuntimeError / TypeError for unknown names or kwargs
        raise BackboneError(f"cannot build timm model {spec.timm_model!r} with {spec.timm_kwargs}: {e}") from e
    if not hasattr(model, "blocks") or not hasattr(model, "num_features"):
        raise BackboneError(f"{spec.timm_model!r} is not a Vision Transformer with `blocks` (only ViTs are supported)")
    token_path(model)  # a family we cannot split into embedding, blocks and head is refused here, with one line
    return model


def backbone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights without any classifier head, fp32 and contiguous (safetensors-ready)."""
    return {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


def load_backbone(spec: BackboneSpec, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The frozen feature extractor (head = Identity), eval mode, weights from `state`."""
    model = create_model(spec, num_classes=0)
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=False)
    if missing or unexpected:
        raise BackboneError(f"backbone weights do not fit {spec.timm_model}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval().requires_grad_(False)
    return model


def _checkpoint_card(path: Path) -> dict[str, Any]:
    card_path = path.parent / "card.json"
    if card_path.is_file():
        return json.loads(card_path.read_text())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    card = {k: v for k, v in meta.items()}
    for key in ("timm_kwargs", "mean", "std", "input_size"):
        if isinstance(card.get(key), str):
            card[key] = json.loads(card[key])
    return card


def preprocessing_from_card(card: dict[str, Any], model: torch.nn.Module) -> Preprocessing:
    """Preprocessing from a checkpoint card, falling back to the timm model's pretrained_cfg."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # what the model takes (timm_kwargs)
    input_size = card.get("input_size") or (list(built) if built else None) or cfg.get("input_size") or [3, 224, 224]
    side = int(input_size[-1]) if isinstance(input_size, (list, tuple)) else int(input_size)
    # Cards describe small-image checkpoints trained without a resize margin: crop_pct 1.0 unless stated.
    crop_pct = float(card.get("crop_pct", 1.0))
    return Preprocessing.from_crop_pct(side, crop_pct, card.get("mean", cfg.get("mean", (0.5,) * 3)),
                                       card.get("std", cfg.get("std", (0.5,) * 3)),
                                       card.get("interpolation", cfg.get("interpolation", "bicubic")))


def from_checkpoint(path: str | Path) -> tuple[BackboneSpec, dict[str, torch.Tensor], Preprocessing, dict]:
    """Read a local checkpoint: (spec, fp32 backbone weights, preprocessing, card)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        raise BackboneError(f"checkpoint {path} is not a .safetensors file")
    card = _checkpoint_card(path)
    if "timm_model" not in card:
        raise BackboneError(f"{path}: no timm_model in card.json or safetensors metadata; say which timm ViT it is")
    spec = BackboneSpec(timm_model=card["timm_model"], timm_kwargs=card.get("timm_kwargs", {}), source="checkpoint")
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model = load_backbone(spec, state)
    return spec, backbone_state(model), preprocessing_from_card(card, model), card


def from_timm(name: str, pretrained: bool, kwargs: dict[str, Any] | None = None, seed: int = 0):
    """timm's own weights (pretrained=True downloads them) or a random init drawn from `seed` (the same weights on
    every run and machine): (spec, weights, preprocessing, card)."""
    import timm

    kwargs = dict(kwargs or {})
    try:
        with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's random state
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=pretrained, **{**kwargs, "num_classes": 0})
    except Exception as e:
        hint = " (pretrained weights need internet access to the model hub)" if pretrained else ""
        raise BackboneError(f"cannot create timm model {name!r}{hint}: {e}") from e
    spec = BackboneSpec(timm_model=name, timm_kwargs=kwargs, source="pretrained" if pretrained else "random",
                        seed=None if pretrained else seed)
    cfg = model.pretrained_cfg or {}
    side = int(kwargs.get("img_size", cfg.get("input_size", (3, 224, 224))[-1]))
    crop_pct = float(cfg.get("crop_pct", 0.9)) if pretrained else 1.0
    prep = Preprocessing.from_crop_pct(side, crop_pct, cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3),
                                       cfg.get("interpolation", "bicubic"))
    card = {"timm_model": name, "timm_kwargs": kwargs, "source": spec.source, "seed": spec.seed}
    return spec, backbone_state(model), prep, card
