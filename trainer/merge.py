"""Fold every branch into the frozen weights: the served model is a plain timm ViT, no gating, no task id.

Adapted weights become W + delta (each target's rows), the head is the concatenation of all task blocks in class
order. `build_plain_model` loads that state into `timm.create_model(...)` with strict key checking, so anything
that consumes a plain timm checkpoint can consume a merged version.
"""
from __future__ import annotations

import torch

from trainer.backbone import BackboneSpec, create_model
from trainer.learner import Learner


@torch.no_grad()
def merged_state_dict(learner: Learner) -> dict[str, torch.Tensor]:
    """The plain timm state dict (fp32, CPU) whose logits equal the learner's."""
    state = {}
    for k, v in learner.backbone.state_dict().items():
        state[k.replace(".base.", ".")] = v.detach().float().cpu().clone()
    for site in learner.sites:
        w = state[f"{site.key}.weight"]
        for t, s, e in site.rows:
            d = learner.method.merged_delta(site, t)
            if d is not None:
                w[s:e] += d.detach().float().cpu()
    state.pop("head.weight", None)
    state.pop("head.bias", None)
    state["head.weight"] = torch.cat([h.weight.detach().float().cpu() for h in learner.heads])
    state["head.bias"] = torch.cat([h.bias.detach().float().cpu() for h in learner.heads])
    return {k: v.contiguous() for k, v in state.items()}


def build_plain_model(spec: BackboneSpec, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain timm model (eval mode) carrying a merged state dict."""
    model = create_model(spec, num_classes=state["head.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    return model.eval()
