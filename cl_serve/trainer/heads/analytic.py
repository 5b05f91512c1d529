"""`analytic` head (RanPAC, NeurIPS 2023): a closed-form ridge classifier over every task's features.

h = ReLU(f W_rand) with a fixed seeded Gaussian W_rand (d x M), or h = f when M = 0. The head keeps the streaming
sums G = sum h h^T (M x M) and Q = sum h y^T (M x C, y one-hot) over every task's training features (float64), and
after each task sets W = (G + lambda I)^-1 Q. lambda is searched, as in the official code, over 10^-8..10^8 by
fitting on the first 80 % of a seeded shuffle of the *current task's* features and taking the lowest mean squared
error on the other 20 % (never test data). On a frozen backbone the head after T tasks is the ridge classifier
fitted on all T tasks at once. The merged model's head is two layers for M > 0 (Linear(d, M, no bias), ReLU,
Linear(M, C, no bias)) and one plain Linear (zero bias) for M = 0.

Drift: with `drift = "transport"` the head also keeps each class's feature mean and count and the pooled within-class
scatter S = sum (f - mu_c)(f - mu_c)^T (d x d); when a later task moves the backbone, `transport` moves them with the
fitted map (cl_serve.trainer.heads.drift) and rebuilds G and Q for the earlier classes from them: exactly for
M = 0 (G = S + sum n_c mu_c mu_c^T, Q_c = n_c mu_c), and for M > 0 from min(n_c, `drift_samples`) seeded samples of
N(mu_c, S / N) per class pushed through the projection and weighted to n_c. The current task's sums stay exact.
With `drift = "ignore"` (the default: transport did not close the gap in our measurements, see docs/design.md) the
old sums stay as they were computed (exact on a frozen backbone, stale otherwise).

Fitting streams: G and Q are sums over STREAM_ROWS expanded rows at a time (Q by index_add, never a dense one-hot
matrix), and lambda is chosen from the split's own sums (an eigendecomposition of the fit part's G), so a task's
fit takes O(M^2 + M C) memory and O(N M^2 + M^3 + M^2 C) time, whatever its number of images N; below M fit
images the expanded rows themselves are used (thin SVD, cheaper there). Both give the same lambda.

State: W_rand (4 d M bytes) and G (8 M^2 bytes) are fixed-size; each class adds one column of Q (8 M bytes) and one
row of W (4 M bytes); with transport, also S (8 d^2 bytes, fixed) and each class's mean and count (8 d + 8 bytes).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cl_serve.trainer.heads.base import Head, linear
from cl_serve.trainer.heads.drift import DriftMap

STREAM_ROWS = 4096  # expanded rows (h) made at a time: 8 * STREAM_ROWS * M bytes


class AnalyticHead(Head):
    def __init__(self, config, dim: int):
        super().__init__(config, dim)
        m = config.projection
        width = m if m > 0 else dim
        gen = torch.Generator().manual_seed(config.seed)
        self.register_buffer("w_rand", torch.randn(dim, m, generator=gen) if m > 0 else torch.zeros(dim, 0))
        self.register_buffer("G", torch.zeros(width, width, dtype=torch.float64))
        self.register_buffer("Q", torch.zeros(width, 0, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(0, width))
        self.register_buffer("class_means", torch.zeros(0, dim, dtype=torch.float64))
        self.register_buffer("class_counts", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("scatter", torch.zeros(dim, dim, dtype=torch.float64))
        self.ridge: float | None = None

    @property
    def width(self) -> int:
        return self.G.shape[0]

    def expand(self, features: torch.Tensor) -> torch.Tensor:
        """h: the random-feature expansion the ridge regression runs on."""
        if self.config.projection == 0:
            return features
        return F.relu(features @ self.w_rand.to(features.dtype))

    def _split(self, n: int, task_number: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RanPAC's seeded split of the current (1-based `task_number`) task's images: (fit, held-out) indices."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed * 104_729 + task_number)
        order = torch.randperm(n, generator=gen)
        n_fit = int(n * (1 - cfg.val_fraction))
        if n_fit < 1 or n_fit >= n:
            raise ValueError("the analytic head needs at least 2 training images to choose its ridge parameter")
        return order[:n_fit], order[n_fit:]

    def _sums(self, features: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, n_new: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """sum h h^T and sum h y^T over `rows`, STREAM_ROWS expanded rows at a time (y one-hot: an index_add, never
        a dense (images x classes) matrix)."""
        G = torch.zeros(self.width, self.width, dtype=torch.float64)
        Q = torch.zeros(self.width, n_new, dtype=torch.float64)
        for i in range(0, len(rows), STREAM_ROWS):
            r = rows[i:i + STREAM_ROWS]
            h = self.expand(features[r].detach().cpu().double())
            G.addmm_(h.T, h)
            Q.index_add_(1, labels[r].cpu(), h.T)
        return G, Q

    def _losses_small(self, features, labels, fit, held, n_new) -> list[tuple[float, float]]:
        """(lambda, held-out MSE) from the expanded rows themselves (thin SVD), when the task has fewer images than
        the head's width: every lambda costs two small products instead of an M x M solve."""
        h, y = self.expand(features.detach().cpu().double()), F.one_hot(labels.cpu(), n_new).double()
        hf, yf, hv, yv = h[fit], y[fit], h[held], y[held]
        # With h_fit = U S V^T: (h_fit^T h_fit + lam I)^-1 = V diag(1 / (s^2 + lam)) V^T + (I - V V^T) / lam
        _, sv, vt = torch.linalg.svd(hf, full_matrices=False)
        q = hf.T @ yf
        a, vq, hq = hv @ vt.T, vt @ q, hv @ q
        out = []
        for lam in self._lambdas():
            pred = a @ (vq / (sv ** 2 + lam).unsqueeze(1)) + (hq - a @ vq) / lam
            out.append((lam, float(((pred - yv) ** 2).mean())))
        return out

    @staticmethod
    def _losses_from_sums(G_fit, Q_fit, G_val, Q_val, n_val: int, lambdas: list[float]) -> list[tuple[float, float]]:
        """(lambda, held-out MSE) from the split's sums alone, O(M^2 C) whatever the number of images.

        With G_fit = V diag(s) V^T, B = V^T Q_fit, E = V^T Q_val, K = V^T G_val V and d = 1 / (s + lambda), the
        held-out predictions P = h_val V diag(d) B give ||P||^2 = d^T ((B B^T) * K) d and <P, Y> = sum d (B * E);
        the MSE is (||P||^2 - 2 <P, Y> + n_val) / (n_val C) for one-hot Y."""
        s, V = torch.linalg.eigh(G_fit)
        s = s.clamp_min(0)
        B, E = V.T @ Q_fit, V.T @ Q_val
        W = (B @ B.T) * (V.T @ G_val @ V)
        cross = (B * E).sum(1)
        out = []
        for lam in lambdas:
            d = 1.0 / (s + lam)
            sq = float(d @ W @ d)
            out.append((lam, (sq - 2 * float(d @ cross) + n_val) / (n_val * Q_fit.shape[1])))
        return out

    def _lambdas(self) -> list[float]:
        return [10.0 ** e for e in range(self.config.ridge_min_exp, self.config.ridge_max_exp + 1)]

    def end_task(self, features: torch.Tensor, labels: torch.Tensor, block: nn.Linear) -> dict[str, Any]:
        """Add the task's sums to G and Q, choose lambda on the task's own held-out split, solve. Memory: the
        features (4 N d bytes, the caller's) plus O(M^2 + M C) whatever N; the expanded rows are made
        STREAM_ROWS at a time (below the head's width, the rows of the small task itself)."""
        n_new = self._check(features, labels, block)
        if self.tracks_drift:
            self._keep_class_stats(features.detach().double().cpu(), labels.cpu(), n_new)
        fit, held = self._split(len(labels), len(self.task_sizes) + 1)
        G_fit, Q_fit = self._sums(features, labels, fit, n_new)
        G_val, Q_val = self._sums(features, labels, held, n_new)
        self.G = self.G + G_fit + G_val
        self.Q = torch.cat([self.Q, Q_fit + Q_val], dim=1)
        self.task_sizes.append(n_new)
        if len(fit) < self.width:
            losses = self._losses_small(features, labels, fit, held, n_new)
        else:
            losses = self._losses_from_sums(G_fit, Q_fit, G_val, Q_val, len(held), self._lambdas())
        self.ridge = min(losses, key=lambda r: r[1])[0]
        self.solve(self.ridge)
        return {"ridge": self.ridge}

    def _keep_class_stats(self, f: torch.Tensor, labels: torch.Tensor, n_new: int) -> None:
        means, counts = [], []
        for c in range(n_new):
            fc = f[labels == c]
            mu = fc.mean(0) if len(fc) else torch.zeros(self.dim, dtype=torch.float64)
            self.scatter = self.scatter + (fc - mu).T @ (fc - mu)
            means.append(mu)
            counts.append(float(len(fc)))
        self.class_means = torch.cat([self.class_means, torch.stack(means)])
        self.class_counts = torch.cat([self.class_counts, torch.tensor(counts, dtype=torch.float64)])

    @property
    def tracks_drift(self) -> bool:
        return self.config.drift == "transport"

    def transport(self, drift: DriftMap) -> dict[str, Any]:
        """Move the earlier classes' statistics onto the new backbone's features and rebuild G and Q from them."""
        if self.config.drift == "ignore" or self.num_classes == 0:
            return {"transported": False, "reason": f"drift = {self.config.drift}" if self.num_classes else
                    "no earlier classes"}
        if self.class_means.shape[0] != self.num_classes:
            return {"transported": False, "reason": "this learner was saved before the head kept class means "
                                                    "(no statistics to move)"}
        self.class_means = drift.means(self.class_means)
        self.scatter = drift.covariance(self.scatter)
        n = self.class_counts
        if self.config.projection == 0:
            self.G = self.scatter + (self.class_means * n[:, None]).T @ self.class_means
            self.Q = (self.class_means * n[:, None]).T.contiguous()
            return {"transported": True, **drift.summary()}
        eye = torch.eye(self.dim, dtype=torch.float64)
        cov = self.scatter / max(float(n.sum()), 1.0)
        chol = torch.linalg.cholesky(cov + 1e-6 * float(torch.diagonal(cov).mean().clamp_min(1e-12)) * eye)
        gen = torch.Generator().manual_seed(self.config.seed * 6151 + len(self.task_sizes))
        G = torch.zeros_like(self.G)
        Q = torch.zeros_like(self.Q)
        for c in range(self.num_classes):
            k = int(min(max(n[c].item(), 1), self.config.drift_samples))
            x = self.class_means[c] + torch.randn(k, self.dim, generator=gen, dtype=torch.float64) @ chol.T
            h = self.expand(x.float()).double()
            w = float(n[c]) / k
            G += w * h.T @ h
            Q[:, c] = w * h.sum(0)
        self.G, self.Q = G, Q
        return {"transported": True, **drift.summary()}

    def solve(self, ridge: float) -> None:
        eye = torch.eye(self.width, dtype=torch.float64)
        self.weight = torch.linalg.solve(self.G + ridge * eye, self.Q).T.float().contiguous()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.expand(features) @ self.weight.T

    def plain_module(self) -> nn.Module:
        out = linear(self.weight.float().cpu(), None if self.config.projection else torch.zeros(self.weight.shape[0]))
        if self.config.projection == 0:
            return out
        return nn.Sequential(linear(self.w_rand.T.float().cpu(), None), nn.ReLU(), out)

    def tensors(self) -> dict[str, torch.Tensor]:
        ridge = torch.tensor([self.ridge if self.ridge is not None else float("nan")], dtype=torch.float64)
        out = {"w_rand": self.w_rand, "G": self.G, "Q": self.Q, "weight": self.weight, "ridge": ridge}
        if self.tracks_drift:
            out.update(class_means=self.class_means, class_counts=self.class_counts, scatter=self.scatter)
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors["G"].shape != self.G.shape:
            raise ValueError(f"analytic head state has width {tensors['G'].shape[0]}, the config says {self.width}")
        self.w_rand, self.G, self.Q = tensors["w_rand"].float(), tensors["G"].double(), tensors["Q"].double()
        self.weight = tensors["weight"].float()
        if "class_means" in tensors:  # kept only with transport (and not by learners saved before it)
            self.class_means = tensors["class_means"].double()
            self.class_counts = tensors["class_counts"].double()
            self.scatter = tensors["scatter"].double()
        r = float(tensors["ridge"][0])
        self.ridge = None if r != r else r

    def per_class_bytes(self) -> int:
        return 8 * self.width + 4 * self.width + (8 * self.dim + 8 if self.tracks_drift else 0)
