"""`--method none`: no branches at all. The backbone stays exactly as loaded, so only the head learns; this makes
a head alone (e.g. the analytic head on frozen features) a first-class baseline and a cheap production option."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cl_serve.trainer.methods.base import Method, MomentFn
from cl_serve.trainer.sites import Site


class Frozen(Method):
    def begin_task(self, task: int, moments: MomentFn) -> None:
        pass

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def site_delta(self, site: Site, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def end_task(self, task: int, moments: MomentFn) -> dict[str, Any]:
        self.tasks_done = task + 1
        return {}

    def merged_delta(self, site: Site, target: str) -> torch.Tensor | None:
        return None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], tasks_done: int) -> None:
        self.tasks_done = tasks_done
