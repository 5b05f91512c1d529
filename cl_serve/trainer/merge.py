"""Fold every branch into the frozen weights: the served model is a plain timm ViT, no gating, no task id.

Adapted weights become W + delta (each target's rows); the head is the head strategy's plain module. For linear
heads (task-local, aligned, analytic with projection 0) `build_plain_model` loads the state into
`timm.create_model(...)` with strict key checking, so anything that consumes a plain timm checkpoint can consume
a merged version. The analytic head with a random projection is two layers, stored as `head.0.weight` (M x d)
and `head.2.weight` (C x M): set `model.head = nn.Sequential(nn.Linear(d, M, bias=False), nn.ReLU(),
nn.Linear(M, C, bias=False))` before the strict load (`plain_head` does exactly that).
"""
from __future__ import annotations

import torch
from torch import nn

from cl_serve.trainer.backbone import BackboneSpec, create_model
from cl_serve.trainer.learner import Learner


@torch.no_grad()
def merged_body_state(learner: Learner) -> dict[str, torch.Tensor]:
    """The backbone's state dict (fp32, CPU, no head) with every branch folded into its weights."""
    adapted = tuple(f"{key}." for key in learner.adapted_layers)
    state = {k: v.detach().float().cpu().clone() for k, v in learner.backbone.state_dict().items()
             if not k.startswith(("head.", *adapted))}
    for key, layer in learner.adapted_layers.items():
        state[f"{key}.weight"] = layer.merged_weight()
        if layer.base.bias is not None:
            state[f"{key}.bias"] = layer.base.bias.detach().float().cpu().clone()
    return state


@torch.no_grad()
def merged_state_dict(learner: Learner) -> dict[str, torch.Tensor]:
    """The plain model's state dict (fp32, CPU) whose logits equal the learner's."""
    state = merged_body_state(learner)
    for k, v in learner.head.plain_module().state_dict().items():
        state[f"head.{k}"] = v.detach().float().cpu()
    return {k: v.contiguous() for k, v in state.items()}


def plain_head(state: dict[str, torch.Tensor]) -> nn.Module:
    """The head module a merged state dict describes: a Linear, or Linear-ReLU-Linear (random projection)."""
    if "head.weight" in state:
        w = state["head.weight"]
        return nn.Linear(w.shape[1], w.shape[0], bias="head.bias" in state)
    p, w = state["head.0.weight"], state["head.2.weight"]
    return nn.Sequential(nn.Linear(p.shape[1], p.shape[0], bias=False), nn.ReLU(),
                         nn.Linear(w.shape[1], w.shape[0], bias=False))


def num_classes(state: dict[str, torch.Tensor]) -> int:
    return state["head.weight"].shape[0] if "head.weight" in state else state["head.2.weight"].shape[0]


def build_plain_model(spec: BackboneSpec, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain timm model (eval mode) carrying a merged state dict."""
    model = create_model(spec, num_classes=num_classes(state))
    if "head.weight" not in state:
        model.head = plain_head(state)
    model.load_state_dict(state, strict=True)
    return model.eval()
