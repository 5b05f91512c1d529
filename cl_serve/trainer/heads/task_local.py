"""`task-local` head (the papers' default): the concatenation of the per-task blocks, each trained alone on its
own task's logits and frozen afterwards. Logits of different tasks are never calibrated against each other."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cl_serve.trainer.heads.base import Head, linear


class TaskLocalHead(Head):
    def __init__(self, config, dim: int):
        super().__init__(config, dim)
        self.register_buffer("weight", torch.zeros(0, dim))
        self.register_buffer("bias", torch.zeros(0))

    def end_task(self, features: torch.Tensor, labels: torch.Tensor, block: nn.Linear) -> dict[str, Any]:
        n_new = self._check(features, labels, block)
        self.weight = torch.cat([self.weight, block.weight.detach().to(self.weight)])
        self.bias = torch.cat([self.bias, block.bias.detach().to(self.bias)])
        self.task_sizes.append(n_new)
        return {}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)

    def plain_module(self) -> nn.Module:
        return linear(self.weight.float().cpu(), self.bias.float().cpu())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "weight" not in tensors:  # learner state written before heads were pluggable: one entry per task block
            n = len(self.task_sizes)
            tensors = {"weight": torch.cat([tensors[f"{i}.weight"] for i in range(n)]) if n else torch.zeros(0, self.dim),
                       "bias": torch.cat([tensors[f"{i}.bias"] for i in range(n)]) if n else torch.zeros(0)}
        self.weight, self.bias = tensors["weight"].float(), tensors["bias"].float()

    def per_class_bytes(self) -> int:
        return (self.dim + 1) * 4
