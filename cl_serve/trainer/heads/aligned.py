"""`aligned` head: classifier alignment (SLCA; the official InfLoRA+CA, `methods/inflora_ca1.py`).

After each task every new class's feature mean and covariance are computed with the current model on the eval
view of its training images (never the images themselves) and kept in the learner state. The head is the per-task
blocks concatenated, then, from the second task on, the *whole* head is retrained on features sampled from every
seen class's Gaussian, as the official recipe does: `epochs` epochs of SGD (momentum, weight decay, cosine over
the epochs), `samples_per_class` fresh samples per class per epoch in shuffled batches, class means scaled by
0.9 + 0.1 (t + 1) / (T + 1) (older tasks' means shrink a little, t = the class's task, T = the current one), and
logits divided by the mean of the per-task logit norms and by a temperature before the cross-entropy. Serving
uses the plain logits.

Covariance forms (state per class at width d, fp32): `full` keeps d x d (4 d^2 bytes: 0.6 MB at d = 384, 2.4 MB at
d = 768); `lowrank` keeps the top-k eigenpairs plus the diagonal of the residual (4 (d k + k + d) bytes: 27 KB at
d = 384, k = 16), sampled as mu + U sqrt(lambda) z1 + sqrt(residual) z2.

Deviations from the official code, and why: the task of a class is its real task (the official code assumes equal
task sizes: class // last task size); the covariance shrinkage is added once, at sampling time, for both forms;
samples are drawn with a seeded generator so a run is reproducible.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cl_serve.trainer.heads.base import Head, linear


class AlignedHead(Head):
    def __init__(self, config, dim: int):
        super().__init__(config, dim)
        k = config.cov_rank if config.covariance == "lowrank" else 0
        self.register_buffer("weight", torch.zeros(0, dim))
        self.register_buffer("bias", torch.zeros(0))
        self.register_buffer("means", torch.zeros(0, dim))
        if config.covariance == "full":
            self.register_buffer("covs", torch.zeros(0, dim, dim))
        else:
            self.register_buffer("eigvecs", torch.zeros(0, dim, k))
            self.register_buffer("eigvals", torch.zeros(0, k))
            self.register_buffer("residual", torch.zeros(0, dim))
        self._cov_keys = ["covs"] if config.covariance == "full" else ["eigvecs", "eigvals", "residual"]

    # -- statistics ------------------------------------------------------------------------------------------------
    def _class_stats(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        f = f.double()
        mean = f.mean(0)
        cov = torch.cov(f.T) if f.shape[0] > 1 else torch.zeros(self.dim, self.dim, dtype=torch.float64)
        out = {"means": mean}
        if self.config.covariance == "full":
            out["covs"] = cov
        else:
            vals, vecs = torch.linalg.eigh(cov)  # ascending
            k = min(self.config.cov_rank, self.dim)
            vals, vecs = vals.flip(0)[:k].clamp_min(0), vecs.flip(1)[:, :k]
            resid = (torch.diagonal(cov) - (vecs ** 2) @ vals).clamp_min(0)
            out.update(eigvecs=vecs, eigvals=vals, residual=resid)
        return {k: v.float() for k, v in out.items()}

    def _sampler(self, c: int):
        """A function n -> (n, d) samples of class c's Gaussian (mean unscaled)."""
        shrink = self.config.shrinkage
        if self.config.covariance == "full":
            cov = self.covs[c].double() + shrink * torch.eye(self.dim, dtype=torch.float64)
            chol = torch.linalg.cholesky(cov + 1e-9 * torch.eye(self.dim, dtype=torch.float64)).float()
            return lambda n, g: torch.randn(n, self.dim, generator=g) @ chol.T
        u = self.eigvecs[c] * self.eigvals[c].sqrt()
        sd = (self.residual[c] + shrink).sqrt()
        return lambda n, g: torch.randn(n, u.shape[1], generator=g) @ u.T + torch.randn(n, self.dim, generator=g) * sd

    # -- life cycle ----------------------------------------------------------------------------------------------------
    def end_task(self, features: torch.Tensor, labels: torch.Tensor, block: nn.Linear) -> dict[str, Any]:
        n_new = self._check(features, labels, block)
        f = features.detach().float().cpu()
        stats = [self._class_stats(f[labels.cpu() == c]) for c in range(n_new)]
        for key in ["means", *self._cov_keys]:
            setattr(self, key, torch.cat([getattr(self, key), torch.stack([s[key] for s in stats]).to(self.means)]))
        self.weight = torch.cat([self.weight, block.weight.detach().to(self.weight)])
        self.bias = torch.cat([self.bias, block.bias.detach().to(self.bias)])
        self.task_sizes.append(n_new)
        if len(self.task_sizes) == 1:  # the official code aligns from the second task on
            return {"aligned": False}
        loss = self._align()
        return {"aligned": True, "alignment_loss": loss}

    def _align(self) -> float:
        cfg, sizes = self.config, self.task_sizes
        T = len(sizes) - 1
        task_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        scale = 0.9 + 0.1 * (task_of.float() + 1) / (T + 1)
        samplers = [self._sampler(c) for c in range(self.num_classes)]
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + T)
        w = nn.Parameter(self.weight.detach().cpu().clone())
        b = nn.Parameter(self.bias.detach().cpu().clone())
        opt = torch.optim.SGD([w, b], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
        means = self.means.cpu()
        bounds = torch.cumsum(torch.tensor([0] + sizes), 0).tolist()
        last = 0.0
        for _ in range(cfg.epochs):
            n = cfg.samples_per_class
            x = torch.cat([means[c] * scale[c] + samplers[c](n, gen) for c in range(self.num_classes)])
            y = torch.arange(self.num_classes).repeat_interleave(n)
            order = torch.randperm(len(y), generator=gen)
            total, batches = 0.0, 0
            for i in range(0, len(y), cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                logits = F.linear(x[idx], w, b)
                norms = torch.stack([logits[:, s:e].norm(dim=1) + 1e-7 for s, e in zip(bounds[:-1], bounds[1:])], 1)
                loss = F.cross_entropy(logits / norms.mean(1, keepdim=True) / cfg.temperature, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, batches = total + float(loss.detach()), batches + 1
            sched.step()
            last = total / max(batches, 1)
        self.weight = w.detach().to(self.weight)
        self.bias = b.detach().to(self.bias)
        return last

    # -- inference and persistence -----------------------------------------------------------------------------------
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)

    def plain_module(self) -> nn.Module:
        return linear(self.weight.float().cpu(), self.bias.float().cpu())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ["weight", "bias", "means", *self._cov_keys]}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for k in ["weight", "bias", "means", *self._cov_keys]:
            if k not in tensors:
                raise KeyError(f"aligned head state lacks {k!r} (was the store made with another --cov?)")
            setattr(self, k, tensors[k].float())

    def per_class_bytes(self) -> int:
        d, k = self.dim, self.config.cov_rank
        cov = d * d if self.config.covariance == "full" else d * k + k + d
        return 4 * (d + 1 + d + cov)  # head row + bias, mean, covariance form


