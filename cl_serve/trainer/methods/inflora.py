"""InfLoRA (Liang & Li, CVPR 2024): interference-free low-rank branches designed from the data.

Per adapted layer W (rows x d_in) and task t, the branch is A_t B_t with B_t (r x d_in) designed before training
and frozen, A_t (rows x r) zero-initialised and the only trained weight. B_t = the top-r left singular vectors
of the task's input second moment C projected off the DualGPM memory (C - M M^T C, or Q Q^T C when the memory
holds the complement basis Q), transposed and scaled by 1/sqrt(3). Its rows are orthogonal to span(M), so
training A_t cannot change the layer's output on old tasks' input subspace. After training, a second pass gives
C again and the memory keeps the fewest new directions that bring the captured energy to
eps_t = eps_0 + (1 - eps_0) t / T; past d_in / 2 directions it switches to the (smaller) complement basis.
Finished branches are frozen, so they are folded at once into one dense delta per target.
(The paper names the frozen matrix A and the trained one B; we follow DESIGN.md's names.)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cl_serve.trainer.methods.base import Method, MomentFn, branch_key, module_key
from cl_serve.trainer.sites import Site


def _orthonormal(m: torch.Tensor) -> torch.Tensor:
    if m.shape[1] == 0:
        return m
    q, _ = torch.linalg.qr(m)
    return q


class InfLoRA(Method):
    def __init__(self, config, sites: list[Site]):
        super().__init__(config, sites)
        self.A = nn.ParameterDict()  # current task, per (site, target): rows x r
        for s in sites:
            self.register_buffer(f"B__{module_key(s.key)}", torch.zeros(0, s.d_in))  # last designed B (r x d_in)
            self.register_buffer(f"mem__{module_key(s.key)}", torch.zeros(s.d_in, 0, dtype=torch.float64))
            for t in s.targets:
                self.register_buffer(f"fold__{branch_key(s.key, t)}", torch.zeros(s.d_out(t), s.d_in))
        self.mem_kind = {s.key: "remove" for s in sites}  # "remove": basis M of the protected space; "retain": Q
        self.training_task = False
        self.last_overlap = 0.0

    # -- helpers -----------------------------------------------------------------------------------------------
    def _buf(self, kind: str, key: str, target: str | None = None) -> torch.Tensor:
        return getattr(self, f"{kind}__" + (branch_key(key, target) if target else module_key(key)))

    def _set(self, kind: str, key: str, value: torch.Tensor, target: str | None = None) -> None:
        setattr(self, f"{kind}__" + (branch_key(key, target) if target else module_key(key)), value)

    def protected_basis(self, key: str) -> torch.Tensor:
        """Orthonormal basis M (d_in x m) of the old tasks' input subspace, whatever the memory stores."""
        m = self._buf("mem", key)
        if self.mem_kind[key] == "remove":
            return m
        u, _, _ = torch.linalg.svd(m, full_matrices=True)
        return u[:, m.shape[1]:]

    def _project_off_memory(self, key: str, mat: torch.Tensor) -> torch.Tensor:
        """Remove from mat's columns their component in the protected subspace."""
        m = self._buf("mem", key).to(mat.device, mat.dtype)
        if m.shape[1] == 0:
            return mat
        if self.mem_kind[key] == "remove":
            return mat - m @ (m.T @ mat)
        return m @ (m.T @ mat)

    # -- life cycle ----------------------------------------------------------------------------------------------
    def begin_task(self, task: int, moments: MomentFn) -> None:
        cs = moments()
        r = self.config.rank
        overlap = 0.0
        for key, site in self.sites.items():
            c = cs[key].double().cpu()
            u, _, _ = torch.linalg.svd(self._project_off_memory(key, c), full_matrices=False)
            b = u[:, :r]  # d_in x r
            b = self._project_off_memory(key, b)  # exact orthogonality even for null singular directions
            m = self.protected_basis(key).cpu()
            if m.shape[1]:
                overlap = max(overlap, float((b.T @ m).norm()))
            dev = self._buf("fold", key, site.targets[0]).device
            self._set("B", key, (b.T * self.config.b_scale).float().to(dev))
            for t in site.targets:
                self.A[branch_key(key, t)] = nn.Parameter(torch.zeros(site.d_out(t), b.shape[1], device=dev))
        self.training_task = True
        self.last_overlap = overlap

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.A.values()) if self.training_task else []

    def site_delta(self, site: Site, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        key = site.key
        if self.tasks_done == 0 and not self.training_task:
            return out
        xb = x @ self._buf("B", key).T if self.training_task else None
        for t in site.targets:
            d = x @ self._buf("fold", key, t).T if self.tasks_done else None
            if xb is not None:
                cur = xb @ self.A[branch_key(key, t)].T
                d = cur if d is None else d + cur
            out[t] = d
        return out

    def end_task(self, task: int, moments: MomentFn) -> dict[str, Any]:
        with torch.no_grad():
            for key, site in self.sites.items():
                b = self._buf("B", key)
                for t in site.targets:
                    a = self.A[branch_key(key, t)]
                    self._set("fold", key, self._buf("fold", key, t) + a @ b, t)
        self.A = nn.ParameterDict()
        self.training_task = False
        self.tasks_done = task + 1
        eps = self.config.threshold(task)
        cs = moments()  # second pass, with the task's branch folded in
        for key in self.sites:
            self._update_memory(key, cs[key].double().cpu(), eps)
        return {"b_memory_overlap": self.last_overlap, "threshold": eps,
                "memory_dims": {k: self.protected_basis(k).shape[1] for k in self.sites}}

    def _update_memory(self, key: str, c: torch.Tensor, eps: float) -> None:
        d = c.shape[0]
        mem, kind = self._buf("mem", key).cpu(), self.mem_kind[key]
        total = (torch.linalg.svdvals(c) ** 2).sum()
        if total <= 0:
            return
        if kind == "remove":
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
                mem, kind = full[:, mem.shape[1]:], "retain"
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
        self._set("mem", key, mem.to(self._buf("mem", key).device))
        self.mem_kind[key] = kind

    # -- merge and persistence ---------------------------------------------------------------------------------
    def merged_delta(self, site: Site, target: str) -> torch.Tensor | None:
        d = self._buf("fold", site.key, target).clone()
        if self.training_task:
            d = d + self.A[branch_key(site.key, target)].detach() @ self._buf("B", site.key)
        return d if self.tasks_done or self.training_task else None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.training_task:
            raise RuntimeError("cannot save InfLoRA state in the middle of a task")
        out = {}
        for key, site in self.sites.items():
            out[f"inflora.{key}.B_last"] = self._buf("B", key)
            out[f"inflora.{key}.memory"] = self._buf("mem", key)
            out[f"inflora.{key}.memory_is_complement"] = torch.tensor([self.mem_kind[key] == "retain"])
            for t in site.targets:
                out[f"inflora.{key}.{t}.delta"] = self._buf("fold", key, t)
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], tasks_done: int) -> None:
        for key, site in self.sites.items():
            dev = self._buf("fold", key, site.targets[0]).device
            self._set("B", key, tensors[f"inflora.{key}.B_last"].to(dev))
            self._set("mem", key, tensors[f"inflora.{key}.memory"].to(dev))
            self.mem_kind[key] = "retain" if bool(tensors[f"inflora.{key}.memory_is_complement"][0]) else "remove"
            for t in site.targets:
                self._set("fold", key, tensors[f"inflora.{key}.{t}.delta"].to(dev), t)
        self.tasks_done = tasks_done

    def describe(self) -> dict[str, Any]:
        dims = [self.protected_basis(k).shape[1] for k in self.sites]
        return {"tasks_done": self.tasks_done, "memory_dims_min": min(dims), "memory_dims_max": max(dims)}
