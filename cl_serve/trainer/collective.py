"""How one training worker talks to the others in a multi-worker run: sharding and the few reductions.

`Local` is the single-process case and changes nothing. `TorchDistributed` runs over torch.distributed (gloo on
CPU, NCCL on GPU; Ray Train sets the process group up): worker r takes images r, r + W, r + 2W, ... of every
pass; gradients are summed weighted by each worker's share of the global batch (the mean over the global batch,
as one process computes it); InfLoRA's input second moments are averaged weighted by images; features for the
head are gathered back into the original order, so every head sees exactly the single-process features.
"""
from __future__ import annotations

import torch


class Local:
    """One process: no sharding, no communication."""

    rank, world = 0, 1

    def shard(self, n: int) -> torch.Tensor:
        return torch.arange(n)

    def sync_gradients(self, params: list[torch.nn.Parameter], n_local: int, n_global: int) -> None:
        pass

    def mean_moments(self, cs: dict[str, torch.Tensor] | None, n_local: int) -> dict[str, torch.Tensor] | None:
        return cs

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        return local


class TorchDistributed(Local):
    """The default torch.distributed process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def shard(self, n: int) -> torch.Tensor:
        return torch.arange(self.rank, n, self.world)

    def sync_gradients(self, params: list[torch.nn.Parameter], n_local: int, n_global: int) -> None:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.mul_(n_local / max(n_global, 1))
            self.dist.all_reduce(p.grad)

    def mean_moments(self, cs: dict[str, torch.Tensor] | None, n_local: int) -> dict[str, torch.Tensor] | None:
        if cs is None:
            return None
        total = torch.tensor([float(n_local)])
        self.dist.all_reduce(total)
        out = {}
        for key in sorted(cs):
            c = cs[key] * (n_local / total.item())
            self.dist.all_reduce(c)
            out[key] = c
        return out

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        size = -(-n // self.world)  # every shard padded to the largest
        padded = torch.zeros((size, *local.shape[1:]), dtype=local.dtype)
        padded[:len(local)] = local.cpu()
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        self.dist.all_gather(parts, padded)
        out = torch.zeros((n, *local.shape[1:]), dtype=local.dtype)
        for r, part in enumerate(parts):
            rows = torch.arange(r, n, self.world)
            out[rows] = part[:len(rows)]
        return out.to(local.device)
