"""Baseline: one plain LoRA branch (B zero-initialised, A kaiming) fine-tuned task after task.

Nothing protects old tasks, so it shows how much a naive adapter forgets (the lower bound in benchmarks, and the
reference the InfLoRA tests compare against). Each adapted layer (`SeqLoRALinear`) holds its targets' A and B.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cl_serve.trainer.methods.base import Method, MomentFn, kaiming_rows
from cl_serve.trainer.sites import AdaptedLinear, Site


class SeqLoRALinear(AdaptedLinear):
    def __init__(self, base: nn.Linear, site: Site):
        super().__init__(base, site)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()  # per target: r x d_in, rows x r

    def begin(self, rank: int) -> None:
        """Create the branch once; later tasks keep training it."""
        if len(self.A):
            return
        for t in self.site.targets:
            self.A[t] = nn.Parameter(kaiming_rows(rank, self.site.d_in, self.device))
            self.B[t] = nn.Parameter(torch.zeros(self.site.d_out(t), rank, device=self.device))

    def delta(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: (x @ self.A[t].T) @ self.B[t].T for t in self.A}

    def merged_delta(self, target: str) -> torch.Tensor | None:
        return (self.B[target] @ self.A[target]).detach() if target in self.A else None

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for t in self.site.targets:
            if f"A.{t}" in tensors:
                self.A[t] = nn.Parameter(tensors[f"A.{t}"].clone())
                self.B[t] = nn.Parameter(tensors[f"B.{t}"].clone())


class SeqLoRA(Method):
    def make_layer(self, base: nn.Linear, site: Site) -> SeqLoRALinear:
        return SeqLoRALinear(base, site)

    def begin_task(self, task: int, moments: MomentFn) -> None:
        for layer in self.layers.values():
            layer.begin(self.config.rank)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in list(layer.A.values()) + list(layer.B.values())]

    def end_task(self, task: int, moments: MomentFn) -> dict[str, Any]:
        self.tasks_done = task + 1
        return {}
