"""SD-LoRA (Wu et al., ICLR 2025): scale and decouple LoRA into unit directions and learned magnitudes.

Per adapted target W (rows x d_in): W' = W + sum_k alpha_k D_k, D_k = B_k A_k / ||B_k A_k||_F (Frobenius norm of
the product). During task t the new (A_t, B_t) and every magnitude alpha_1..alpha_t train; old directions are
frozen. B_t starts at zero, so the current term trains unnormalised (alpha_t B_t A_t); at the end of the task it
is split into the unit direction D_t and magnitude alpha_t ||B_t A_t||_F, which is the same function.
Magnitudes start at `alpha_init` (1) and persist across tasks.

Variants (same class): SD-LoRA-RR lowers the rank of later tasks (schedule in the config); SD-LoRA-KD fits
D_t ~ sum_k beta_k D_k by least squares and, when the residual ||D_t - sum beta_k D_k||_F <= tau, drops D_t and
folds it into the old magnitudes alpha_k += alpha_t beta_k (exact up to the residual).
Directions are stored factorised (B_k scaled to make ||B_k A_k||_F = 1, and A_k), one list per target.

Magnitude granularity (`magnitudes`): `per-layer` learns one alpha per (layer, target, task). `per-task` learns
one alpha per task shared by every layer and target, as the official code does: the current task trains one
shared alpha_t times each layer's B_t A_t, and at the end of the task each layer keeps its unit direction D_t and
a frozen scale s_t = ||B_t A_t||_F, so alpha_t s_t D_t = alpha_t B_t A_t (the same function); later tasks train the
shared alpha_t. KD then fits the whole task's update (every layer's s_t D_t at once) by the old tasks' updates and
folds it with alpha_k += alpha_t beta_k, again exact up to the relative residual.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cl_serve.trainer.methods.base import Method, MomentFn, branch_key as _k, kaiming_rows
from cl_serve.trainer.sites import Site


class SDLoRA(Method):
    def __init__(self, config, sites: list[Site]):
        super().__init__(config, sites)
        self.alpha = nn.ParameterDict()  # "<k>__<id>" -> scalar magnitude of a stored direction
        self.cur_A, self.cur_B, self.cur_alpha = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.dirs: dict[str, list[str]] = {_k(s.key, t): [] for s in sites for t in s.targets}
        self.training_task = False
        self._device = torch.device("cpu")

    @property
    def per_task(self) -> bool:
        return self.config.magnitudes == "per-task"

    def _akey(self, k: str, i: str) -> str:
        """Key of the magnitude of direction i of target k (shared by the whole task with per-task magnitudes)."""
        return f"task__{i}" if self.per_task else f"{k}__{i}"

    def _cur_akey(self, k: str) -> str:
        return "task" if self.per_task else k

    # -- storage of frozen directions (registered buffers, so .to(device) moves them) ---------------------------
    def _dir(self, k: str, i: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"D__{k}__{i}__B"), getattr(self, f"D__{k}__{i}__A")

    def _scale(self, k: str, i: str) -> torch.Tensor:
        return getattr(self, f"D__{k}__{i}__s")

    def _add_dir(self, k: str, i: str, b: torch.Tensor, a: torch.Tensor, alpha: float, scale: float = 1.0) -> None:
        self.register_buffer(f"D__{k}__{i}__B", b.detach().contiguous())
        self.register_buffer(f"D__{k}__{i}__A", a.detach().contiguous())
        self.register_buffer(f"D__{k}__{i}__s", torch.tensor(float(scale), device=b.device))
        if self._akey(k, i) not in self.alpha:
            self.alpha[self._akey(k, i)] = nn.Parameter(torch.tensor(float(alpha), device=b.device))
        self.dirs[k].append(i)

    def _magnitude(self, k: str, i: str) -> torch.Tensor:
        """The effective (differentiable) magnitude of direction i of target k."""
        return self.alpha[self._akey(k, i)] * self._scale(k, i)

    def direction(self, k: str, i: str) -> torch.Tensor:
        """The unit-norm direction D (rows x d_in)."""
        b, a = self._dir(k, i)
        return b @ a

    @property
    def _dev(self) -> torch.device:
        for site in self.sites.values():
            for t in site.targets:
                k = _k(site.key, t)
                if self.dirs[k]:
                    return self._dir(k, self.dirs[k][0])[0].device
        return self._device

    # -- life cycle ----------------------------------------------------------------------------------------------
    def begin_task(self, task: int, moments: MomentFn) -> None:
        r = self.config.rank_for(task)
        dev = self._dev
        for site in self.sites.values():
            for t in site.targets:
                k = _k(site.key, t)
                self.cur_A[k] = nn.Parameter(kaiming_rows(r, site.d_in, dev))
                self.cur_B[k] = nn.Parameter(torch.zeros(site.d_out(t), r, device=dev))
                if self._cur_akey(k) not in self.cur_alpha:
                    self.cur_alpha[self._cur_akey(k)] = nn.Parameter(torch.tensor(float(self.config.alpha_init), device=dev))
        self.training_task = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        if not self.training_task:
            return []
        return list(self.cur_A.values()) + list(self.cur_B.values()) + list(self.cur_alpha.values()) + list(self.alpha.values())

    def site_delta(self, site: Site, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for t in site.targets:
            k = _k(site.key, t)
            a_parts, b_parts = [], []
            for i in self.dirs[k]:
                b, a = self._dir(k, i)
                a_parts.append(a)
                b_parts.append(b * self._magnitude(k, i))
            if self.training_task:
                a_parts.append(self.cur_A[k])
                b_parts.append(self.cur_B[k] * self.cur_alpha[self._cur_akey(k)])
            if a_parts:
                out[t] = (x @ torch.cat(a_parts).T) @ torch.cat(b_parts, dim=1).T
        return out

    def end_task(self, task: int, moments: MomentFn) -> dict[str, Any]:
        kept = folded = empty = 0
        residuals = []
        i_new = f"t{task}"
        with torch.no_grad():
            new = {}  # k -> (unit B, A, ||B A||_F)
            for site in self.sites.values():
                for t in site.targets:
                    k = _k(site.key, t)
                    a, b = self.cur_A[k].detach(), self.cur_B[k].detach()
                    norm = float((b @ a).norm())
                    if norm < 1e-12:  # nothing learned on this target: no direction to keep
                        empty += 1
                        continue
                    new[k] = (b / norm, a, norm)
            if self.per_task:
                alpha_t = float(self.cur_alpha["task"]) if new else 0.0
                fold = None
                if self.config.distill and new and any(self.dirs.values()):
                    beta, resid = self._fit_task(new)
                    residuals.append(resid)
                    if resid <= self.config.kd_tau:
                        fold = beta
                if fold is not None:
                    for j, bj in fold.items():
                        self.alpha[f"task__{j}"].data += alpha_t * bj
                    folded = len(new)
                else:
                    for k, (b_unit, a, norm) in new.items():
                        self._add_dir(k, i_new, b_unit, a, alpha_t, scale=norm)
                    kept = len(new)
            else:
                for k, (b_unit, a, norm) in new.items():
                    magnitude = float(self.cur_alpha[k]) * norm
                    if self.config.distill and self.dirs[k]:
                        beta, resid = self._fit(k, b_unit, a)
                        residuals.append(resid)
                        if resid <= self.config.kd_tau:
                            for i, bk in zip(self.dirs[k], beta.tolist()):
                                self.alpha[f"{k}__{i}"].data += magnitude * bk
                            folded += 1
                            continue
                    self._add_dir(k, i_new, b_unit, a, magnitude)
                    kept += 1
        self.cur_A, self.cur_B, self.cur_alpha = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.training_task = False
        self.tasks_done = task + 1
        summary = {"rank": self.config.rank_for(task), "directions_kept": kept, "directions_folded": folded,
                   "empty_directions": empty}
        if residuals:
            summary["kd_residual_min"] = min(residuals)
            summary["kd_residual_max"] = max(residuals)
        return summary

    @staticmethod
    def _inner(b1, a1, b2, a2) -> torch.Tensor:
        """<b1 a1, b2 a2>_F without forming the products."""
        return ((b1.T @ b2) * (a1 @ a2.T)).sum()

    def _fit_task(self, new: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[dict[str, float], float]:
        """Per-task magnitudes: least squares of the new task's whole update (s_t D_t over every layer) on the old
        tasks' updates; returns {old task id: beta} and the residual relative to the new update's norm."""
        tasks = sorted({i for ids in self.dirs.values() for i in ids}, key=lambda i: int(i[1:]))

        def update(i):  # k -> (scaled B, A) of old task i's update per unit alpha
            return {k: (self._dir(k, i)[0].double() * float(self._scale(k, i)), self._dir(k, i)[1].double())
                    for k, ids in self.dirs.items() if i in ids}

        old = [update(i) for i in tasks]
        cur = {k: (b.double() * n, a.double()) for k, (b, a, n) in new.items()}

        def dot(u, v):
            return sum((self._inner(*u[k], *v[k]) for k in u.keys() & v.keys()), torch.zeros((), dtype=torch.float64))

        g = torch.stack([torch.stack([dot(u, v) for v in old]) for u in old]).cpu()
        rhs = torch.stack([dot(u, cur) for u in old]).cpu()
        beta = torch.linalg.lstsq(g, rhs.unsqueeze(1)).solution.squeeze(1)
        own = dot(cur, cur).cpu()
        sq = own - 2 * beta @ rhs + beta @ g @ beta
        return dict(zip(tasks, beta.tolist())), float(sq.clamp_min(0).sqrt() / own.sqrt())

    def _fit(self, k: str, b_new: torch.Tensor, a_new: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Least squares beta for D_new ~ sum beta_j D_j, and the residual Frobenius norm (all in float64)."""
        factors = [tuple(x.double() for x in self._dir(k, i)) for i in self.dirs[k]]
        bn, an = b_new.double(), a_new.double()

        inner = self._inner
        g = torch.stack([torch.stack([inner(*f1, *f2) for f2 in factors]) for f1 in factors])
        rhs = torch.stack([inner(*f, bn, an) for f in factors])
        beta = torch.linalg.lstsq(g.cpu(), rhs.cpu().unsqueeze(1)).solution.squeeze(1).to(g.device)
        sq = inner(bn, an, bn, an) - 2 * beta @ rhs + beta @ g @ beta
        return beta, float(sq.clamp_min(0).sqrt())

    # -- merge and persistence ---------------------------------------------------------------------------------
    def merged_delta(self, site: Site, target: str) -> torch.Tensor | None:
        k = _k(site.key, target)
        total = None
        with torch.no_grad():
            for i in self.dirs[k]:
                d = self._magnitude(k, i) * self.direction(k, i)
                total = d if total is None else total + d
            if self.training_task:
                d = self.cur_alpha[self._cur_akey(k)] * (self.cur_B[k] @ self.cur_A[k])
                total = d if total is None else total + d
        return total

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.training_task:
            raise RuntimeError("cannot save SD-LoRA state in the middle of a task")
        out = {}
        for site in self.sites.values():
            for t in site.targets:
                k = _k(site.key, t)
                for n, i in enumerate(self.dirs[k]):
                    b, a = self._dir(k, i)
                    base = f"sdlora.{site.key}.{t}.{n:03d}.{i}"
                    out[f"{base}.B"], out[f"{base}.A"] = b, a
                    out[f"{base}.scale"] = self._scale(k, i).detach().reshape(1)
                    if not self.per_task:
                        out[f"{base}.alpha"] = self.alpha[f"{k}__{i}"].detach().reshape(1)
        if self.per_task:
            for key, p in self.alpha.items():
                out[f"sdlora.alpha.{key}"] = p.detach().reshape(1)
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], tasks_done: int) -> None:
        for site in self.sites.values():
            for t in site.targets:
                k = _k(site.key, t)
                prefix = f"sdlora.{site.key}.{t}."
                entries = sorted({name[len(prefix):].rsplit(".", 1)[0] for name in tensors if name.startswith(prefix)})
                for entry in entries:  # "NNN.tK", in stored order
                    i = entry.split(".", 1)[1]
                    base = prefix + entry
                    alpha = tensors[f"sdlora.alpha.{self._akey(k, i)}" if self.per_task else f"{base}.alpha"]
                    scale = tensors.get(f"{base}.scale", torch.ones(1))
                    self._add_dir(k, i, tensors[f"{base}.B"].to(self._device), tensors[f"{base}.A"].to(self._device),
                                  float(alpha[0]), float(scale[0]))
        self.tasks_done = tasks_done

    def magnitudes(self) -> dict[str, float]:
        return {name: float(p.detach()) for name, p in self.alpha.items()}

    def describe(self) -> dict[str, Any]:
        counts = [len(v) for v in self.dirs.values()]
        return {"tasks_done": self.tasks_done, "directions_min": min(counts), "directions_max": max(counts)}
