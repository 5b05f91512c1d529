"""`--method none`: no branches at all. The backbone stays exactly as loaded, so only the head learns; this makes
a head alone (e.g. the analytic head on frozen features) a first-class baseline and a cheap production option."""
from __future__ import annotations

from typing import Any

from torch import nn

from cl_serve.trainer.methods.base import Method, MomentFn
from cl_serve.trainer.sites import AdaptedLinear, Site


class Frozen(Method):
    def make_layer(self, base: nn.Linear, site: Site) -> AdaptedLinear:
        return AdaptedLinear(base, site)  # never called: `none` has no targets

    def begin_task(self, task: int, moments: MomentFn) -> None:
        pass

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def end_task(self, task: int, moments: MomentFn) -> dict[str, Any]:
        self.tasks_done = task + 1
        return {}
