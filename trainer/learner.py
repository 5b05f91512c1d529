"""The learner: frozen timm ViT + a method's low-rank branches + one growing classifier head.

The head holds one linear block per task (classes in label order); a task trains only its own block and its
loss only sees its own logits; inference takes the argmax over all seen classes. `state()` / `from_state()`
round-trip everything needed to learn the next task (learner.safetensors), the backbone weights excepted.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from trainer.backbone import BackboneSpec, load_backbone
from trainer.methods import build_method, method_config_from_dict
from trainer.sites import find_sites, wrap_sites


class Learner(nn.Module):
    def __init__(self, spec: BackboneSpec, backbone_weights: dict[str, torch.Tensor], method_config):
        super().__init__()
        self.spec = spec
        self.method_config = method_config
        self.backbone = load_backbone(spec, backbone_weights)
        self.sites = find_sites(self.backbone, method_config.targets)
        self.method = build_method(method_config, self.sites)
        self.wrappers = wrap_sites(self.backbone, self.sites, self.method.site_delta)
        self.heads = nn.ModuleList()
        self.labels: list[str] = []
        self.task_sizes: list[int] = []
        self.task_summaries: list[dict[str, Any]] = []

    # -- structure ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def to_device(self, device: torch.device | str) -> "Learner":
        self.to(device)
        self.method._device = torch.device(device)
        return self

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    def add_head(self, class_names: list[str]) -> nn.Linear:
        head = nn.Linear(self.backbone.num_features, len(class_names)).to(self.device)
        self.heads.append(head)
        self.labels.extend(class_names)
        self.task_sizes.append(len(class_names))
        return head

    def task_slice(self, task: int) -> slice:
        start = sum(self.task_sizes[:task])
        return slice(start, start + self.task_sizes[task])

    # -- forward -------------------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return torch.cat([h(f) for h in self.heads], dim=1)

    @torch.no_grad()
    def second_moments(self, batches) -> dict[str, torch.Tensor]:
        """One pass of the current model over `batches` (normalised inputs): C = E[x x^T] at every site."""
        for w in self.wrappers.values():
            w.start_recording()
        try:
            for x in batches:
                self.features(x)
        finally:
            out = {k: w.stop_recording() for k, w in self.wrappers.items()}
        return out

    # -- persistence --------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.method.state_tensors().items()}
        for i, h in enumerate(self.heads):
            tensors[f"head.{i}.weight"] = h.weight.detach().cpu().contiguous()
            tensors[f"head.{i}.bias"] = h.bias.detach().cpu().contiguous()
        meta = {"labels": self.labels, "task_sizes": self.task_sizes, "method": self.method_config.model_dump(),
                "tasks_done": self.method.tasks_done, "task_summaries": self.task_summaries}
        return tensors, {"cl_serve_learner": json.dumps(meta)}

    @classmethod
    def from_state(cls, spec: BackboneSpec, backbone_weights, tensors: dict[str, torch.Tensor],
                   metadata: dict[str, str]) -> "Learner":
        meta = json.loads(metadata["cl_serve_learner"])
        learner = cls(spec, backbone_weights, method_config_from_dict(meta["method"]))
        learner.method.load_state(tensors, meta["tasks_done"])
        start = 0
        for i, n in enumerate(meta["task_sizes"]):
            head = learner.add_head(meta["labels"][start:start + n])
            head.weight.data.copy_(tensors[f"head.{i}.weight"])
            head.bias.data.copy_(tensors[f"head.{i}.bias"])
            head.requires_grad_(False)
            start += n
        learner.task_summaries = meta.get("task_summaries", [])
        return learner
