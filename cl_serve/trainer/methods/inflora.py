"""InfLoRA (Liang & Li, CVPR 2024): interference-free low-rank branches designed from the data.

Per adapted layer W (rows x d_in) and task t, the branch is A_t B_t with B_t (r x d_in) designed before training
and frozen, A_t (rows x r) zero-initialised and the only trained weight. B_t = the top-r left singular vectors
of the task's input second moment C projected off the DualGPM memory (C - M M^T C, or Q Q^T C when the memory
holds the complement basis Q), transposed and scaled by 1/sqrt(3). Its rows are orthogonal to span(M), so
training A_t cannot change the layer's output on old tasks' input subspace. After training, a second pass gives
C again and the memory keeps the fewest new directions that bring the captured energy to
eps_t = eps_0 + (1 - eps_0) t / T; past d_in / 2 directions it switches to the (smaller) complement basis.
Finished branches are frozen, so they are folded at once into one dense delta per target.
Each adapted layer (`InfLoRALinear`) holds its B, its memory and its folded deltas; the method only runs the
schedule (rank, threshold) over every layer.
(The paper names the frozen matrix A and the trained one B; we follow DESIGN.md's names.)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cl_serve.trainer.methods.base import Method, MomentFn
from cl_serve.trainer.sites import AdaptedLinear, Site, TargetTensors


def _orthonormal(m: torch.Tensor) -> torch.Tensor:
    if m.shape[1] == 0:
        return m
    q, _ = torch.linalg.qr(m)
    return q


class InfLoRALinear(AdaptedLinear):
    """One adapted layer: the last designed B (r x d_in), the memory basis (float64; `memory_is_complement`: it
    holds Q, the complement, instead of M), each target's folded delta and, during a task, each target's A."""

    def __init__(self, base: nn.Linear, site: Site):
        super().__init__(base, site)
        dev = base.weight.device
        self.register_buffer("B", torch.zeros(0, site.d_in, device=dev))
        self.register_buffer("memory", torch.zeros(site.d_in, 0, dtype=torch.float64, device=dev))
        self.register_buffer("memory_is_complement", torch.zeros(1, dtype=torch.bool, device=dev))
        self.folded = TargetTensors({t: torch.zeros(site.d_out(t), site.d_in, device=dev) for t in site.targets})
        self.A = nn.ParameterDict()  # current task only: rows x r per target
        self.has_folded = False  # skips the folded matmul while nothing is folded (the first task)

    @property
    def training_task(self) -> bool:
        return len(self.A) > 0

    def protected_basis(self) -> torch.Tensor:
        """Orthonormal basis M (d_in x m) of the old tasks' input subspace, whatever the memory stores."""
        if not bool(self.memory_is_complement[0]):
            return self.memory
        u, _, _ = torch.linalg.svd(self.memory, full_matrices=True)
        return u[:, self.memory.shape[1]:]

    def project_off_memory(self, mat: torch.Tensor) -> torch.Tensor:
        """Remove from mat's columns their component in the protected subspace."""
        m = self.memory.to(mat.device, mat.dtype)
        if m.shape[1] == 0:
            return mat
        if bool(self.memory_is_complement[0]):
            return m @ (m.T @ mat)
        return mat - m @ (m.T @ mat)

    def design(self, c: torch.Tensor, rank: int, b_scale: float) -> float:
        """B from the task's input second moment off the memory; fresh zero A per target. Returns B's overlap
        with the protected subspace (0 up to rounding)."""
        c = c.double().cpu()
        u, _, _ = torch.linalg.svd(self.project_off_memory(c), full_matrices=False)
        b = self.project_off_memory(u[:, :rank])  # exact orthogonality even for null singular directions
        m = self.protected_basis().cpu()
        overlap = float((b.T @ m.to(b.dtype)).norm()) if m.shape[1] else 0.0
        self.B = (b.T * b_scale).float().to(self.device)
        for t in self.site.targets:
            self.A[t] = nn.Parameter(torch.zeros(self.site.d_out(t), b.shape[1], device=self.device))
        return overlap

    @torch.no_grad()
    def fold(self) -> None:
        """Freeze the task's branch: add A B to each target's folded delta."""
        for t in self.site.targets:
            self.folded[t] = self.folded[t] + self.A[t] @ self.B
        self.A = nn.ParameterDict()
        self.has_folded = True

    def update_memory(self, c: torch.Tensor, eps: float) -> None:
        """Keep the fewest new directions of C that bring the captured energy to eps (DualGPM)."""
        c = c.double().cpu()
        d = c.shape[0]
        mem, complement = self.memory.cpu(), bool(self.memory_is_complement[0])
        total = (torch.linalg.svdvals(c) ** 2).sum()
        if total <= 0:
            return
        if not complement:
            hat = c - mem @ (mem.T @ c) if mem.shape[1] else c
            u, s, _ = torch.linalg.svd(hat, full_matrices=False)
            captured = float((total - (s ** 2).sum()) / total)
            k = 0
            for frac in ((s ** 2) / total).tolist():
                if captured >= eps:
                    break
                captured += frac
                k += 1
            if k:
                mem = _orthonormal(torch.cat([mem, u[:, :k]], dim=1))[:, :d]
            if mem.shape[1] > d / 2:  # cheaper to keep the complement
                full, _, _ = torch.linalg.svd(mem, full_matrices=True)
                mem, complement = full[:, mem.shape[1]:], True
        else:
            hat = mem @ (mem.T @ c)
            u, s, _ = torch.linalg.svd(hat, full_matrices=False)
            remaining = float((s ** 2).sum() / total)  # energy still outside the protected space
            k = 0
            for frac in ((s ** 2) / total).tolist():
                if remaining < 1.0 - eps:
                    break
                remaining -= frac
                k += 1
            if k:
                rest = mem - u[:, :k] @ (u[:, :k].T @ mem)
                ur, _, _ = torch.linalg.svd(rest, full_matrices=False)
                mem = ur[:, : mem.shape[1] - k]
        self.memory = mem.to(self.device)
        self.memory_is_complement = torch.tensor([complement], device=self.device)

    def delta(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.has_folded and not self.training_task:
            return {}
        xb = x @ self.B.T if self.training_task else None
        out = {}
        for t in self.site.targets:
            d = x @ self.folded[t].T if self.has_folded else None
            if xb is not None:
                cur = xb @ self.A[t].T
                d = cur if d is None else d + cur
            out[t] = d
        return out

    def merged_delta(self, target: str) -> torch.Tensor | None:
        if not self.has_folded and not self.training_task:
            return None
        d = self.folded[target].detach().clone()
        if self.training_task:
            d = d + self.A[target].detach() @ self.B
        return d

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.B, self.memory = tensors["B"], tensors["memory"]
        self.memory_is_complement = tensors["memory_is_complement"].reshape(1).bool()
        for t in self.site.targets:
            self.folded[t] = tensors[f"folded.{t}"]
        self.has_folded = any(bool(self.folded[t].any()) for t in self.site.targets)


class InfLoRA(Method):
    def __init__(self, config, sites: list[Site]):
        super().__init__(config, sites)
        self.training_task = False
        self.last_overlap = 0.0

    def make_layer(self, base: nn.Linear, site: Site) -> InfLoRALinear:
        return InfLoRALinear(base, site)

    @property
    def in_task(self) -> bool:
        return self.training_task

    def begin_task(self, task: int, moments: MomentFn) -> None:
        cs = moments()
        self.last_overlap = max((layer.design(cs[key], self.config.rank, self.config.b_scale)
                                 for key, layer in self.layers.items()), default=0.0)
        self.training_task = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.A.values()] if self.training_task else []

    def end_task(self, task: int, moments: MomentFn) -> dict[str, Any]:
        for layer in self.layers.values():
            layer.fold()
        self.training_task = False
        self.tasks_done = task + 1
        eps = self.config.threshold(task)
        cs = moments()  # second pass, with the task's branch folded in
        for key, layer in self.layers.items():
            layer.update_memory(cs[key], eps)
        return {"b_memory_overlap": self.last_overlap, "threshold": eps,
                "memory_dims": {k: layer.protected_basis().shape[1] for k, layer in self.layers.items()}}

    def describe(self) -> dict[str, Any]:
        dims = [layer.protected_basis().shape[1] for layer in self.layers.values()]
        return {"tasks_done": self.tasks_done, "memory_dims_min": min(dims), "memory_dims_max": max(dims)}
