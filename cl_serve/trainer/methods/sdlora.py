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

Each adapted layer (`SDLoRALinear`) holds its targets' directions (factorised B, A, scale, task, and with
per-layer magnitudes its alpha) and the current task's branch. Per-task magnitudes couple every layer, so they
live on the method (`TaskMagnitudes`), and each layer reads them through a reference it is given.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cl_serve.trainer.methods.base import Method, MomentFn, kaiming_rows
from cl_serve.trainer.sites import AdaptedLinear, Site


class Direction(nn.Module):
    """One frozen unit direction D = B A of one target (||B A||_F = 1), its scale s and the task that learned it;
    with per-layer magnitudes also its trainable alpha (effective magnitude alpha * s)."""

    def __init__(self, b: torch.Tensor, a: torch.Tensor, scale: float, task: int, alpha: float | None):
        super().__init__()
        self.register_buffer("B", b.detach().contiguous())
        self.register_buffer("A", a.detach().contiguous())
        self.register_buffer("scale", torch.tensor(float(scale), device=b.device))
        self.register_buffer("task", torch.tensor(int(task), device=b.device))
        self.alpha = nn.Parameter(torch.tensor(float(alpha), device=b.device)) if alpha is not None else None

    @property
    def task_id(self) -> int:
        return int(self.task)

    def unit(self) -> torch.Tensor:
        return self.B @ self.A


class Branch(nn.Module):
    """The current task's trainable branch of one target: B A (B zero-initialised), with its own alpha when
    magnitudes are per layer."""

    def __init__(self, rows: int, d_in: int, rank: int, alpha: float | None, device):
        super().__init__()
        self.A = nn.Parameter(kaiming_rows(rank, d_in, device))
        self.B = nn.Parameter(torch.zeros(rows, rank, device=device))
        self.alpha = nn.Parameter(torch.tensor(float(alpha), device=device)) if alpha is not None else None


class TaskMagnitudes(nn.Module):
    """Per-task magnitudes shared by every layer and target: `alpha["t<k>"]` for finished task k, `current` for
    the task being learned."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.ParameterDict()
        self.register_parameter("current", None)


class SDLoRALinear(AdaptedLinear):
    def __init__(self, base: nn.Linear, site: Site, shared: TaskMagnitudes | None):
        super().__init__(base, site)
        self.directions = nn.ModuleDict({t: nn.ModuleList() for t in site.targets})
        self.current = nn.ModuleDict()  # target -> Branch, during a task
        object.__setattr__(self, "shared", shared)  # owned by the method (it couples layers): not registered here

    def magnitude(self, d: Direction) -> torch.Tensor:
        """The effective (differentiable) magnitude of a direction."""
        alpha = d.alpha if self.shared is None else self.shared.alpha[f"t{d.task_id}"]
        return alpha * d.scale

    def current_alpha(self, target: str) -> torch.Tensor:
        return self.current[target].alpha if self.shared is None else self.shared.current

    def begin(self, rank: int, alpha_init: float) -> None:
        alpha = alpha_init if self.shared is None else None
        for t in self.site.targets:
            self.current[t] = Branch(self.site.d_out(t), self.site.d_in, rank, alpha, self.device)

    def add_direction(self, target: str, b_unit, a, scale: float, task: int, alpha: float | None) -> None:
        self.directions[target].append(Direction(b_unit, a, scale, task, alpha if self.shared is None else None))

    def trainable(self) -> list[nn.Parameter]:
        """The current branches (A, B, per-layer alpha) and every direction's per-layer alpha."""
        out = [p for br in self.current.values() for p in br.parameters()]
        if self.shared is None:
            out += [d.alpha for ds in self.directions.values() for d in ds]
        return out

    def delta(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for t in self.site.targets:
            a_parts = [d.A for d in self.directions[t]]
            b_parts = [d.B * self.magnitude(d) for d in self.directions[t]]
            if t in self.current:
                a_parts.append(self.current[t].A)
                b_parts.append(self.current[t].B * self.current_alpha(t))
            if a_parts:
                out[t] = (x @ torch.cat(a_parts).T) @ torch.cat(b_parts, dim=1).T
        return out

    @torch.no_grad()
    def merged_delta(self, target: str) -> torch.Tensor | None:
        total = None
        for d in self.directions[target]:
            part = self.magnitude(d) * d.unit()
            total = part if total is None else total + part
        if target in self.current:
            br = self.current[target]
            part = self.current_alpha(target) * (br.B @ br.A)
            total = part if total is None else total + part
        return total

    @torch.no_grad()
    def fit(self, target: str, b_new: torch.Tensor, a_new: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Least squares beta for D_new ~ sum beta_j D_j over this target's directions, and the residual
        Frobenius norm (float64)."""
        factors = [(d.B.double(), d.A.double()) for d in self.directions[target]]
        bn, an = b_new.double(), a_new.double()
        g = torch.stack([torch.stack([inner(*f1, *f2) for f2 in factors]) for f1 in factors])
        rhs = torch.stack([inner(*f, bn, an) for f in factors])
        beta = torch.linalg.lstsq(g.cpu(), rhs.cpu().unsqueeze(1)).solution.squeeze(1).to(g.device)
        sq = inner(bn, an, bn, an) - 2 * beta @ rhs + beta @ g @ beta
        return beta, float(sq.clamp_min(0).sqrt())

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for t in self.site.targets:
            prefix = f"directions.{t}."
            for n in sorted({int(k[len(prefix):].split(".")[0]) for k in tensors if k.startswith(prefix)}):
                get = lambda field: tensors.get(f"{prefix}{n}.{field}")
                alpha = get("alpha")
                self.add_direction(t, get("B"), get("A"), float(get("scale")), int(get("task")),
                                   None if alpha is None else float(alpha))


def inner(b1, a1, b2, a2) -> torch.Tensor:
    """<b1 a1, b2 a2>_F without forming the products."""
    return ((b1.T @ b2) * (a1 @ a2.T)).sum()


class SDLoRA(Method):
    def __init__(self, config, sites: list[Site]):
        super().__init__(config, sites)
        self.shared = TaskMagnitudes() if self.per_task else None
        self.training_task = False

    @property
    def per_task(self) -> bool:
        return self.config.magnitudes == "per-task"

    def make_layer(self, base: nn.Linear, site: Site) -> SDLoRALinear:
        return SDLoRALinear(base, site, self.shared)

    @property
    def in_task(self) -> bool:
        return self.training_task

    def _targets(self):
        """(layer, target) for every adapted target, in site order."""
        return [(layer, t) for layer in self.layers.values() for t in layer.site.targets]

    # -- life cycle ----------------------------------------------------------------------------------------------
    def begin_task(self, task: int, moments: MomentFn) -> None:
        for layer in self.layers.values():
            layer.begin(self.config.rank_for(task), self.config.alpha_init)
        if self.shared is not None and self.shared.current is None:
            self.shared.current = nn.Parameter(torch.tensor(float(self.config.alpha_init), device=self.device))
        self.training_task = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        if not self.training_task:
            return []
        out = [p for layer in self.layers.values() for p in layer.trainable()]
        if self.shared is not None:
            out += [self.shared.current] + list(self.shared.alpha.values())
        return out

    def end_task(self, task: int, moments: MomentFn) -> dict[str, Any]:
        kept = folded = empty = 0
        residuals = []
        with torch.no_grad():
            new = {}  # (layer, target) -> (unit B, A, ||B A||_F)
            for layer, t in self._targets():
                br = layer.current[t]
                a, b = br.A.detach(), br.B.detach()
                norm = float((b @ a).norm())
                if norm < 1e-12:  # nothing learned on this target: no direction to keep
                    empty += 1
                    continue
                new[(layer, t)] = (b / norm, a, norm)
            if self.shared is not None:
                alpha_t = float(self.shared.current) if new else 0.0
                fold = None
                if self.config.distill and new and self.shared.alpha:
                    beta, resid = self._fit_task(new)
                    residuals.append(resid)
                    if resid <= self.config.kd_tau:
                        fold = beta
                if fold is not None:
                    for j, bj in fold.items():
                        self.shared.alpha[f"t{j}"].data += alpha_t * bj
                    folded = len(new)
                elif new:
                    self.shared.alpha[f"t{task}"] = nn.Parameter(torch.tensor(alpha_t, device=self.device))
                    for (layer, t), (b_unit, a, norm) in new.items():
                        layer.add_direction(t, b_unit, a, norm, task, None)
                    kept = len(new)
            else:
                for (layer, t), (b_unit, a, norm) in new.items():
                    magnitude = float(layer.current[t].alpha) * norm
                    if self.config.distill and len(layer.directions[t]):
                        beta, resid = layer.fit(t, b_unit, a)
                        residuals.append(resid)
                        if resid <= self.config.kd_tau:
                            for d, bk in zip(layer.directions[t], beta.tolist()):
                                d.alpha.data += magnitude * bk
                            folded += 1
                            continue
                    layer.add_direction(t, b_unit, a, 1.0, task, magnitude)
                    kept += 1
        for layer in self.layers.values():
            layer.current = nn.ModuleDict()
        if self.shared is not None:
            self.shared.current = None
        self.training_task = False
        self.tasks_done = task + 1
        summary = {"rank": self.config.rank_for(task), "directions_kept": kept, "directions_folded": folded,
                   "empty_directions": empty}
        if residuals:
            summary["kd_residual_min"] = min(residuals)
            summary["kd_residual_max"] = max(residuals)
        return summary

    def _fit_task(self, new: dict) -> tuple[dict[int, float], float]:
        """Per-task magnitudes: least squares of the new task's whole update (s_t D_t over every layer) on the old
        tasks' updates; returns {old task: beta} and the residual relative to the new update's norm."""
        tasks = sorted({d.task_id for layer, t in self._targets() for d in layer.directions[t]})

        def update(task):  # (layer, target) -> (scaled B, A) of an old task's update per unit alpha
            return {(layer, t): (d.B.double() * float(d.scale), d.A.double())
                    for layer, t in self._targets() for d in layer.directions[t] if d.task_id == task}

        old = [update(i) for i in tasks]
        cur = {k: (b.double() * n, a.double()) for k, (b, a, n) in new.items()}

        def dot(u, v):
            return sum((inner(*u[k], *v[k]) for k in u.keys() & v.keys()), torch.zeros((), dtype=torch.float64))

        g = torch.stack([torch.stack([dot(u, v) for v in old]) for u in old]).cpu()
        rhs = torch.stack([dot(u, cur) for u in old]).cpu()
        beta = torch.linalg.lstsq(g, rhs.unsqueeze(1)).solution.squeeze(1)
        own = dot(cur, cur).cpu()
        sq = own - 2 * beta @ rhs + beta @ g @ beta
        return dict(zip(tasks, beta.tolist())), float(sq.clamp_min(0).sqrt() / own.sqrt())

    # -- persistence ---------------------------------------------------------------------------------------------
    def load_method_state(self, tensors: dict[str, torch.Tensor]) -> None:
        prefix = "shared.alpha."
        for name, value in tensors.items():
            if self.shared is None or not name.startswith(prefix):
                raise ValueError(f"unexpected SD-LoRA method state {name!r}")
            self.shared.alpha[name[len(prefix):]] = nn.Parameter(value.reshape(()).float().to(self.device).clone())

    def magnitudes(self) -> dict[str, float]:
        """Every learned magnitude: per task ("t<k>"), or per layer, target and task ("<site>.<target>.t<k>")."""
        if self.shared is not None:
            return {name: float(p.detach()) for name, p in self.shared.alpha.items()}
        return {f"{layer.site.key}.{t}.t{d.task_id}": float(d.alpha.detach())
                for layer, t in self._targets() for d in layer.directions[t]}

    def directions(self) -> dict[str, list[Direction]]:
        """The stored directions of every target, keyed "<site>.<target>"."""
        return {f"{layer.site.key}.{t}": list(layer.directions[t]) for layer, t in self._targets()}

    def describe(self) -> dict[str, Any]:
        counts = [len(layer.directions[t]) for layer, t in self._targets()]
        return {"tasks_done": self.tasks_done, "directions_min": min(counts), "directions_max": max(counts)}
