"""The interface every continual-learning method implements; the training loop, head, store and CLI only
talk to this, never to a method by name.

A method has two parts. Its *layer* (a subclass of `sites.AdaptedLinear`, one per adapted linear layer) holds
that layer's adapter tensors and computes its extra output and its merged delta weight. The *method* object
matches sites, swaps in its layers (`attach`) and keeps only what couples layers: the task schedule, InfLoRA's
threshold, SD-LoRA's per-task magnitudes and its distillation fit.

Life of a task: `begin_task` (e.g. InfLoRA designs each layer's B from the data's input second moments),
training of `trainable_parameters()` with the learner's forward, then `end_task` (memory update, folding).
`state_tensors` / `load_state` save and restore everything needed to learn the next task: each layer's
`adapter_state()` under its site key, and the method's own state dict under `method.`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn

from cl_serve.trainer.sites import AdaptedLinear, Site, wrap_sites

# Runs one no-grad pass of the current model over the task's images and returns {site key: C = E[x x^T]}.
MomentFn = Callable[[], dict[str, torch.Tensor]]

METHOD_PREFIX = "method."


class Method(nn.Module, ABC):
    def __init__(self, config, sites: list[Site]):
        super().__init__()
        self.config = config
        self.sites = {s.key: s for s in sites}
        self.tasks_done = 0
        self.layers: dict[str, AdaptedLinear] = {}  # a plain dict: the layers are registered on the backbone

    @property
    def name(self) -> str:
        return self.config.name

    # ---- structure -------------------------------------------------------------------------------------------
    @abstractmethod
    def make_layer(self, base: nn.Linear, site: Site) -> AdaptedLinear:
        """This method's adapted layer for one site, wrapping its frozen nn.Linear."""

    def attach(self, model: nn.Module) -> dict[str, AdaptedLinear]:
        """Swap every site's nn.Linear in `model` for this method's layer; returns {site key: layer}."""
        self.layers = wrap_sites(model, list(self.sites.values()), self.make_layer)
        return self.layers

    @property
    def device(self) -> torch.device:
        for layer in self.layers.values():
            return layer.device
        return torch.device("cpu")

    # ---- task life cycle -------------------------------------------------------------------------------------
    @abstractmethod
    def begin_task(self, task: int, moments: MomentFn) -> None:
        """Prepare the branches of 0-based task `task` (parameters created on each layer's device)."""

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the parameters this task trains (the head block is the learner's business)."""

    @abstractmethod
    def end_task(self, task: int, moments: MomentFn) -> dict[str, Any]:
        """Finish the task (freeze, fold, update memory); returns a JSON-able summary for the manifest."""

    def skip_task(self, task: int) -> dict[str, Any]:
        """Task `task` learns no branch (past the config's `adapt_tasks`): the backbone stays as it is."""
        self.tasks_done = task + 1
        return {"adapted": False}

    @property
    def in_task(self) -> bool:
        """Whether a task's branches are being trained (state cannot be saved then)."""
        return False

    # ---- persistence -----------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to continue learning (saved in learner.safetensors): `<site key>.<name>` for each
        layer's adapter state, `method.<name>` for the method's own."""
        if self.in_task:
            raise RuntimeError(f"cannot save {self.name} state in the middle of a task")
        out = {f"{key}.{name}": t for key, layer in self.layers.items() for name, t in layer.adapter_state().items()}
        out.update({METHOD_PREFIX + name: t for name, t in self.state_dict().items()})
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], tasks_done: int) -> None:
        """Restore from `state_tensors()` output after `tasks_done` finished tasks."""
        self.load_method_state({k[len(METHOD_PREFIX):]: v for k, v in tensors.items() if k.startswith(METHOD_PREFIX)})
        for key, layer in self.layers.items():
            prefix = key + "."
            layer.load_adapter_state({k[len(prefix):]: v.to(layer.device) for k, v in tensors.items()
                                      if k.startswith(prefix)})
        self.tasks_done = tasks_done

    def load_method_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the method's own state (its state dict); methods without any keep the default."""
        if tensors:
            raise ValueError(f"{self.name} keeps no method-level state, got {sorted(tensors)[:3]}")

    def describe(self) -> dict[str, Any]:
        """Small JSON summary of the learned state (for status / manifests)."""
        return {"tasks_done": self.tasks_done}


def kaiming_rows(rows: int, cols: int, device) -> torch.Tensor:
    """nn.Linear's default init for a (rows x cols) weight (kaiming uniform, a = sqrt 5)."""
    w = torch.empty(rows, cols, device=device)
    nn.init.kaiming_uniform_(w, a=5 ** 0.5)
    return w
