"""Feature drift between two backbones, estimated on the current task's images, and moved onto stored statistics.

When a task's branches change the backbone, every statistic a head kept about earlier classes (means, covariances,
the analytic head's sums) describes features the model no longer computes. No old image is kept, so the drift is
estimated from the images at hand: the current task's training images go through the backbone before and after
the update, and a ridge regression fits the affine map f_after ~= A f_before + b (least squares with a small
penalty on A - I, relative to the features' energy: directions the current task does not cover are left in place). Stored class means then move to A mu + b and covariances to A S A^T.

This follows the idea of semantic drift compensation (Yu et al., "Semantic Drift Compensation for Class-Incremental
Learning", CVPR 2020: estimate old classes' drift from current data) with a global linear map in place of SDC's
locally weighted mean shifts, because a linear map also moves second moments, which the analytic and aligned heads
need. The map's fit on held-out rows of the current task is reported so a user can see when it is poor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DriftMap:
    """f_after ~= f_before @ A.T + b, fitted on the current task's features."""

    A: torch.Tensor  # (d, d) float64
    b: torch.Tensor  # (d,) float64
    fit_r2: float  # share of the after-features' variance the map explains on held-out rows
    shift: float  # mean ||f_after - f_before|| / mean ||f_before||: how far the features moved

    def means(self, mu: torch.Tensor) -> torch.Tensor:
        return mu.double() @ self.A.T + self.b

    def covariance(self, cov: torch.Tensor) -> torch.Tensor:
        return self.A @ cov.double() @ self.A.T

    def summary(self) -> dict[str, float]:
        return {"fit_r2": round(self.fit_r2, 4), "relative_shift": round(self.shift, 4)}


def fit_drift(before: torch.Tensor, after: torch.Tensor, ridge: float = 1e-3, holdout: float = 0.2,
              seed: int = 0) -> DriftMap:
    """Ridge fit of the affine map before -> after (rows: the same images). `ridge` is relative to the mean
    squared feature norm, so it does not depend on the features' scale."""
    if before.shape != after.shape or before.ndim != 2 or before.shape[0] < 2:
        raise ValueError(f"drift needs the same images' features before and after, got {tuple(before.shape)} and "
                         f"{tuple(after.shape)}")
    x, y = before.double().cpu(), after.double().cpu()
    n, d = x.shape
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_fit = max(1, min(n - 1, int(n * (1 - holdout))))
    fit, val = order[:n_fit], order[n_fit:]

    def solve(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mx, my = x[rows].mean(0), y[rows].mean(0)
        xc, yc = x[rows] - mx, y[rows] - my
        lam = ridge * float((xc ** 2).sum()) / d
        eye = torch.eye(d, dtype=torch.float64)
        # the penalty pulls A towards the identity, not towards 0: directions the current task's features do not
        # cover (where earlier classes may live) are assumed not to move, rather than to collapse
        a = eye + torch.linalg.solve(xc.T @ xc + lam * eye, xc.T @ (yc - xc)).T
        return a, my - mx @ a.T

    a, b = solve(fit)
    resid = y[val] - (x[val] @ a.T + b)
    r2 = 1.0 - float((resid ** 2).sum()) / max(float(((y[val] - y[val].mean(0)) ** 2).sum()), 1e-12)
    a, b = solve(torch.arange(n))  # the map used: every row
    shift = float((y - x).norm(dim=1).mean() / x.norm(dim=1).mean().clamp_min(1e-12))
    return DriftMap(a, b, r2, shift)
