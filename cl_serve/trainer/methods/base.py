"""The interface every continual-learning method implements; the training loop, head, store and CLI only
talk to this, never to a method by name.

Life of a task: `begin_task` (e.g. InfLoRA designs its B from the data's input second moments), training of
`trainable_parameters()` with the learner's forward (each adapted layer asks `site_delta` for its targets'
extra outputs), then `end_task` (memory update, folding). `merged_delta` gives the weight update to add to the
frozen W, `state_tensors` / `load_state` save and restore everything needed to learn the next task.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn

from cl_serve.trainer.sites import Site

# Runs one no-grad pass of the current model over the task's images and returns {site key: C = E[x x^T]}.
MomentFn = Callable[[], dict[str, torch.Tensor]]


class Method(nn.Module, ABC):
    def __init__(self, config, sites: list[Site]):
        super().__init__()
        self.config = config
        self.sites = {s.key: s for s in sites}
        self.tasks_done = 0

    @property
    def name(self) -> str:
        return self.config.name

    # ---- task life cycle -------------------------------------------------------------------------------------
    @abstractmethod
    def begin_task(self, task: int, moments: MomentFn) -> None:
        """Prepare the branches of 0-based task `task` (parameters created on the method's device)."""

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the parameters this task trains (the head block is the learner's business)."""

    @abstractmethod
    def site_delta(self, site: Site, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra output of each target of `site` for input x (..., d_in) -> {target: (..., rows)}."""

    @abstractmethod
    def end_task(self, task: int, moments: MomentFn) -> dict[str, Any]:
        """Finish the task (freeze, fold, update memory); returns a JSON-able summary for the manifest."""

    def skip_task(self, task: int) -> dict[str, Any]:
        """Task `task` learns no branch (past the config's `adapt_tasks`): the backbone stays as it is."""
        self.tasks_done = task + 1
        return {"adapted": False}

    # ---- merging and persistence ------------------------------------------------------------------------------
    @abstractmethod
    def merged_delta(self, site: Site, target: str) -> torch.Tensor | None:
        """The (rows x d_in) weight update that equals this target's branches, or None if it has none."""

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to continue learning (saved in learner.safetensors)."""

    @abstractmethod
    def load_state(self, tensors: dict[str, torch.Tensor], tasks_done: int) -> None:
        """Restore from `state_tensors()` output after `tasks_done` finished tasks."""

    def describe(self) -> dict[str, Any]:
        """Small JSON summary of the learned state (for status / manifests)."""
        return {"tasks_done": self.tasks_done}

    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return getattr(self, "_device", torch.device("cpu"))


def module_key(site_key: str) -> str:
    """A site's module path as a parameter or buffer name (which may not contain dots)."""
    return site_key.replace(".", "_")


def branch_key(site_key: str, target: str) -> str:
    """Parameter-dict key of one (site, target) pair."""
    return f"{module_key(site_key)}__{target}"


def kaiming_rows(rows: int, cols: int, device) -> torch.Tensor:
    """nn.Linear's default init for a (rows x cols) weight (kaiming uniform, a = sqrt 5)."""
    w = torch.empty(rows, cols, device=device)
    nn.init.kaiming_uniform_(w, a=5 ** 0.5)
    return w
