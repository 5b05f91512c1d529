"""The learner: frozen timm ViT + a method's low-rank branches + a classifier head over every seen class.

While a task trains, the learner holds a plain linear *block* for that task's classes: the training loss only
sees the block's logits (the adapter's signal, identical for every head). When the task ends, the head strategy
(`cl_serve.trainer.heads`) takes the block and the features of the task's training images and updates the logits over
all seen classes; inference takes the argmax of the head. `state()` / `from_state()` round-trip everything needed
to learn the next task (learner.safetensors), the backbone weights excepted.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

import torch
from torch import nn

from cl_serve.trainer.backbone import BackboneSpec, load_backbone
from cl_serve.trainer.token_path import prefix_tokens, suffix_features
from cl_serve.trainer import learner_format
from cl_serve.trainer.heads import build_head, head_config_from_dict
from cl_serve.trainer.methods import build_method, method_config_from_dict
from cl_serve.trainer.sites import find_sites, first_adapted_block


class Learner(nn.Module):
    def __init__(self, spec: BackboneSpec, backbone_weights: dict[str, torch.Tensor], method_config,
                 head_config=None):
        super().__init__()
        self.spec = spec
        self.method_config = method_config
        self.head_config = head_config if head_config is not None else head_config_from_dict(None)
        self.backbone = load_backbone(spec, backbone_weights)
        self.sites = find_sites(self.backbone, method_config.targets, getattr(method_config, "blocks", None))
        self.method = build_method(method_config, self.sites)
        self.adapted_layers = self.method.attach(self.backbone)  # each adapted nn.Linear becomes the method's layer
        self.head = build_head(self.head_config, self.backbone.num_features)
        self.block: nn.Linear | None = None  # the current task's training block
        self.labels: list[str] = []
        self.task_summaries: list[dict[str, Any]] = []

    # -- structure ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def to_device(self, device: torch.device | str) -> "Learner":
        self.to(device)
        return self

    @property
    def task_sizes(self) -> list[int]:
        return self.head.task_sizes

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    def add_block(self, class_names: list[str]) -> nn.Linear:
        """Start a task: a fresh linear block for its classes (trained with the adapter, then given to the head)."""
        if self.block is not None:
            raise RuntimeError("a task is already in progress")
        self.block = nn.Linear(self.backbone.num_features, len(class_names)).to(self.device)
        self.labels.extend(class_names)
        return self.block

    def finish_head(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """End a task: the head learns the new classes from their features; the block is handed over."""
        if self.block is None:
            raise RuntimeError("no task in progress")
        self.block.requires_grad_(False)
        summary = self.head.end_task(features, labels, self.block)
        self.block = None
        return summary

    @property
    def split(self) -> int:
        """Number of leading transformer blocks that carry no branch (their output can be cached)."""
        return first_adapted_block(self.sites)

    def adapts(self, task: int) -> bool:
        """Whether 0-based `task` learns branches (False: the backbone stays as it is, only the head learns)."""
        limit = getattr(self.method_config, "adapt_tasks", None)
        return bool(self.sites) and (limit is None or task < limit)

    # -- forward -------------------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the frozen leading blocks (see `split`)."""
        return prefix_tokens(self.backbone, x, self.split)

    def suffix(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features from `prefix` tokens: the adapted blocks, the norm and the pooling."""
        return suffix_features(self.backbone, tokens, self.split)

    def block_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The current task's logits only (the training loss)."""
        return self.block(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if self.block is None:
            return self.head(f)
        return torch.cat([self.head(f), self.block(f)], dim=1)

    @torch.no_grad()
    def feature_pass(self, batches: Iterable[torch.Tensor], moments: bool = False, tokens: bool = False
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """One no-grad pass over `batches` (normalised inputs, or `prefix` tokens with `tokens`): the features (CPU,
        fp32) and, with `moments`, C = E[x x^T] at every adapted site (InfLoRA's subspace design and memory)."""
        forward = self.suffix if tokens else self.features
        if moments:
            for w in self.adapted_layers.values():
                w.start_recording()
        feats = []
        try:
            for x in batches:
                # a copy: pooling by class token returns a view that would keep the batch's whole token tensor
                # alive (50 KB an image for a ViT-S/16's tokens at 224 px, not the 1.5 KB of its features)
                feats.append(forward(x).float().cpu().clone())
        finally:
            cs = {k: w.stop_recording() for k, w in self.adapted_layers.items()} if moments else None
        return (torch.cat(feats) if feats else torch.zeros(0, self.backbone.num_features)), cs

    # -- persistence --------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        if self.block is not None:
            raise RuntimeError("cannot save the learner in the middle of a task")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.method.state_tensors().items()}
        tensors.update(self.head.state_tensors())
        meta = {"labels": self.labels, "task_sizes": self.task_sizes, "method": self.method_config.model_dump(),
                "head": self.head_config.model_dump(), "tasks_done": self.method.tasks_done,
                "format": learner_format.CURRENT,
                "task_summaries": self.task_summaries}
        return tensors, {"cl_serve_learner": json.dumps(meta)}

    @classmethod
    def from_state(cls, spec: BackboneSpec, backbone_weights, tensors: dict[str, torch.Tensor],
                   metadata: dict[str, str]) -> "Learner":
        meta = json.loads(metadata["cl_serve_learner"])
        learner = cls(spec, backbone_weights, method_config_from_dict(meta["method"]),
                      head_config_from_dict(meta.get("head")))
        tensors = learner_format.upgrade(tensors, learner.method_config.family, learner.sites, meta.get("format", 1))
        learner.method.load_state(tensors, meta["tasks_done"])
        learner.head.load_state(tensors, meta["task_sizes"])
        learner.labels = list(meta["labels"])
        learner.task_summaries = meta.get("task_summaries", [])
        return learner
