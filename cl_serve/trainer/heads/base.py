"""The interface every classifier head implements, independent of the adapter method.

The adapter decides the features; the head decides how classes of different tasks compete. While a task trains,
the learner trains a plain linear *block* for the task's classes (cross-entropy on that task's logits only: the
adapter's training signal, the same for every head). When the task ends, `end_task` receives that block and the
pre-logit features of the task's training images (eval view, current model) and updates the head over all seen
classes. `plain_module` is what the merged model carries (still one graph, no gating); `state_tensors` /
`load_state` round-trip everything needed to continue (class statistics, sums: never images).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class Head(nn.Module, ABC):
    def __init__(self, config, dim: int):
        super().__init__()
        self.config = config
        self.dim = dim
        self.task_sizes: list[int] = []

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def num_classes(self) -> int:
        return sum(self.task_sizes)

    @abstractmethod
    def end_task(self, features: torch.Tensor, labels: torch.Tensor, block: nn.Linear) -> dict[str, Any]:
        """Learn the new task's classes: features (N, d) fp32, labels (N,) 0..n_new-1, the trained block."""

    @abstractmethod
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over every class seen so far, in label order."""

    @abstractmethod
    def plain_module(self) -> nn.Module:
        """A plain torch module computing `forward` (what the merged model and its ONNX export carry)."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the head's state (names without prefix)."""

    @abstractmethod
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from `tensors()` output (after `task_sizes` is set)."""

    @property
    def tracks_drift(self) -> bool:
        """Whether `transport` should be called when the backbone moves (it needs the features before the update)."""
        return False

    def transport(self, drift) -> dict[str, Any]:
        """The backbone moved (`drift`: a cl_serve.trainer.heads.drift.DriftMap fitted on the current task): move what the
        head stores about earlier classes. Heads that store no feature statistics have nothing to move."""
        return {"transported": False, "reason": f"the {self.name} head keeps no feature statistics"}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"head.{k}": v.detach().cpu().contiguous() for k, v in self.tensors().items()}

    def load_state(self, tensors: dict[str, torch.Tensor], task_sizes: list[int]) -> None:
        self.task_sizes = list(task_sizes)
        self.load_tensors({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})

    def state_bytes(self) -> dict[str, int]:
        """Bytes of learner state the head keeps: in all, and per class (what grows with every new class)."""
        total = sum(t.numel() * t.element_size() for t in self.tensors().values())
        return {"total": total, "per_class": self.per_class_bytes()}

    @abstractmethod
    def per_class_bytes(self) -> int:
        """State bytes added by one more class."""

    def _check(self, features: torch.Tensor, labels: torch.Tensor, block: nn.Linear) -> int:
        n_new = block.out_features
        if features.ndim != 2 or features.shape[1] != self.dim or features.shape[0] != labels.shape[0]:
            raise ValueError(f"head expects (N, {self.dim}) features with N labels, got {tuple(features.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_new):
            raise ValueError("labels must be local class indices of the new task")
        return n_new


def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear carrying the given weight (rows = outputs) and bias."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.requires_grad_(False)
