"""Baseline: one plain LoRA branch (B zero-initialised, A kaiming) fine-tuned task after task.

Nothing protects old tasks, so it shows how much a naive adapter forgets (the lower bound in benchmarks, and the
reference the InfLoRA tests compare against).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cl_serve.trainer.methods.base import Method, MomentFn, branch_key as _k, kaiming_rows
from cl_serve.trainer.sites import Site


class SeqLoRA(Method):
    def __init__(self, config, sites: list[Site]):
        super().__init__(config, sites)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        self._device = torch.device("cpu")

    def begin_task(self, task: int, moments: MomentFn) -> None:
        if len(self.A):
            return
        for site in self.sites.values():
            for t in site.targets:
                k = _k(site.key, t)
                self.A[k] = nn.Parameter(kaiming_rows(self.config.rank, site.d_in, self._device))
                self.B[k] = nn.Parameter(torch.zeros(site.d_out(t), self.config.rank, device=self._device))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.A.values()) + list(self.B.values())

    def site_delta(self, site: Site, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not len(self.A):
            return {}
        return {t: (x @ self.A[_k(site.key, t)].T) @ self.B[_k(site.key, t)].T for t in site.targets}

    def end_task(self, task: int, moments: MomentFn) -> dict[str, Any]:
        self.tasks_done = task + 1
        return {}

    def merged_delta(self, site: Site, target: str) -> torch.Tensor | None:
        if not len(self.A):
            return None
        k = _k(site.key, target)
        return (self.B[k] @ self.A[k]).detach()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.A:
            out[f"seqlora.{name}.A"], out[f"seqlora.{name}.B"] = self.A[name].detach(), self.B[name].detach()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], tasks_done: int) -> None:
        for name in {n.split(".")[1] for n in tensors if n.startswith("seqlora.")}:
            self.A[name] = nn.Parameter(tensors[f"seqlora.{name}.A"].to(self._device).clone())
            self.B[name] = nn.Parameter(tensors[f"seqlora.{name}.B"].to(self._device).clone())
        self.tasks_done = tasks_done
