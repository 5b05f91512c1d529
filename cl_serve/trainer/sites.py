"""Adapted sites: the frozen linear layers of a ViT that receive low-rank branches, and their wrapper.

A target names a row block of one linear layer: timm fuses the query, key and value projections into
`attn.qkv`, so "q", "k", "v" are its three row thirds; "proj", "fc1", "fc2" are whole layers. One `Site` is a
linear layer with the targets it carries (its input, and so its input second moment, is shared by them).
`AdaptedLinear` computes `W x + b` plus its adapter's extra output on each target's rows; each method subclasses
it to hold that adapter's tensors on the layer. It can record the uncentred second moment of its inputs for
InfLoRA's subspace design.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cl_serve.contract.method_settings import TARGETS

@dataclass(frozen=True)
class Site:
    """One adapted linear layer: state-dict key of its weight's module, input width, target row ranges."""

    key: str  # e.g. "blocks.3.attn.qkv"
    block: int  # index of the transformer block it belongs to
    d_in: int
    rows: tuple[tuple[str, int, int], ...]  # (target, start, stop), sorted by start

    @property
    def targets(self) -> list[str]:
        return [t for t, _, _ in self.rows]

    def d_out(self, target: str) -> int:
        return next(e - s for t, s, e in self.rows if t == target)


def _linear(block: nn.Module, path: str) -> nn.Linear:
    lin = block.get_submodule(path)
    return lin.base if isinstance(lin, AdaptedLinear) else lin


def target_layers(block: nn.Module, target: str) -> list[tuple[str, int | None]]:
    """The (linear layer path, row third or None) a target lives in within one transformer block: timm's fused
    `attn.qkv` thirds, or EVA's separate `attn.q_proj` / `k_proj` / `v_proj`; SwiGLU's split first layer
    (`mlp.fc1_g` and `mlp.fc1_x`) carries "fc1" twice."""
    path, third = TARGETS[target]
    names = {n for n, m in block.named_modules() if isinstance(m, (nn.Linear, AdaptedLinear))}
    if path in names:
        return [(path, third)]
    if third is not None and f"attn.{target}_proj" in names:
        return [(f"attn.{target}_proj", None)]
    split = [(f"{path}_{part}", None) for part in ("g", "x") if f"{path}_{part}" in names]
    if split:
        return split
    raise ValueError(f"adapter target {target!r}: this backbone's blocks have no {path} layer "
                     f"(linear layers: {', '.join(sorted(names))})")


def find_sites(model: nn.Module, targets: list[str], last_blocks: int | None = None) -> list[Site]:
    """The sites of every transformer block (or of the last `last_blocks` only) for the requested targets, in block
    order."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown adapter target(s) {unknown}; choose from {sorted(TARGETS)}")
    depth = len(model.blocks)
    if last_blocks is not None and last_blocks > depth:
        raise ValueError(f"cannot adapt the last {last_blocks} blocks: the backbone has {depth}")
    first = depth - last_blocks if last_blocks else 0
    sites = []
    for b, block in enumerate(model.blocks):
        if b < first:
            continue
        by_layer: dict[str, list[tuple[str, int, int]]] = {}
        for t in targets:
            for path, third in target_layers(block, t):
                lin = _linear(block, path)
                n = lin.out_features
                s, e = (0, n) if third is None else (third * n // 3, (third + 1) * n // 3)
                by_layer.setdefault(path, []).append((t, s, e))
        for path, rows in by_layer.items():
            lin = _linear(block, path)
            sites.append(Site(key=f"blocks.{b}.{path}", block=b, d_in=lin.in_features, rows=tuple(sorted(rows, key=lambda r: r[1]))))
    return sites


class TargetTensors(nn.Module):
    """One buffer per target name ("q", "fc1", ...): `tt[t]` reads, `tt[t] = x` replaces; saved as `<name>.<t>`."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None):
        super().__init__()
        for t, x in (tensors or {}).items():
            self.register_buffer(t, x)

    def __getitem__(self, target: str) -> torch.Tensor:
        return self._buffers[target]

    def __setitem__(self, target: str, value: torch.Tensor) -> None:
        self.register_buffer(target, value)

    def __iter__(self):
        return iter(self._buffers)


class AdaptedLinear(nn.Module):
    """A frozen nn.Linear plus its own adapter state: y = W x + b + [delta_t(x) on target t's rows].

    Each method subclasses it (PEFT's shape: the adapted layer holds its tensors, so `state_dict()`, `.to()` and
    naming come from torch) and implements `delta`, `merged_delta` and `load_adapter_state`. This base class adds
    nothing (`--method none`) and can record the uncentred second moment of its inputs (InfLoRA's design)."""

    def __init__(self, base: nn.Linear, site: Site):
        super().__init__()
        self.base = base
        self.site = site
        self.moment: torch.Tensor | None = None  # running sum of x x^T while recording
        self.count = 0

    @property
    def device(self) -> torch.device:
        return self.base.weight.device

    # -- what a method's layer implements -----------------------------------------------------------------------
    def delta(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra output of each target for input x (..., d_in) -> {target: (..., rows)}; {} when there is none."""
        return {}

    def merged_delta(self, target: str) -> torch.Tensor | None:
        """The (rows x d_in) weight update that equals this target's branches, or None if it has none."""
        return None

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Rebuild the adapter from `adapter_state()` output (shapes may differ from a fresh layer's)."""
        if tensors:
            raise ValueError(f"{type(self).__name__} keeps no adapter state, got {sorted(tensors)[:3]}")

    # -- shared by every method ----------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Everything this layer learned (its state dict without the frozen base layer)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W with every target's delta added to its rows (fp32, CPU): the plain layer's weight."""
        w = self.base.weight.detach().float().cpu().clone()
        for t, s, e in self.site.rows:
            d = self.merged_delta(t)
            if d is not None:
                w[s:e] += d.detach().float().cpu()
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.moment is not None:
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            self.moment += flat.T @ flat
            self.count += flat.shape[0]
        deltas = self.delta(x)
        if not deltas:
            return out
        pieces, pos = [], 0
        for t, s, e in self.site.rows:
            if t not in deltas:
                continue
            if s > pos:
                pieces.append(out[..., pos:s])
            pieces.append(out[..., s:e] + deltas[t])
            pos = e
        if pos < out.shape[-1]:
            pieces.append(out[..., pos:])
        return torch.cat(pieces, dim=-1)

    def start_recording(self) -> None:
        self.moment = torch.zeros(self.site.d_in, self.site.d_in, device=self.device)
        self.count = 0

    def stop_recording(self) -> torch.Tensor:
        """C = (1/n) sum x x^T over all tokens seen since start_recording."""
        c = self.moment / max(self.count, 1)
        self.moment, self.count = None, 0
        return c


def first_adapted_block(sites: list[Site]) -> int:
    """Index of the first transformer block that carries a site (every block before it stays frozen)."""
    return min((s.block for s in sites), default=0)


def wrap_sites(model: nn.Module, sites: list[Site], make) -> dict[str, AdaptedLinear]:
    """Replace each site's nn.Linear in place by `make(linear, site)` (an AdaptedLinear); returns {site key: layer}."""
    wrappers = {}
    for site in sites:
        parent_path, _, name = site.key.rpartition(".")
        parent = model.get_submodule(parent_path)
        lin = getattr(parent, name)
        if isinstance(lin, AdaptedLinear):
            lin = lin.base
        w = make(lin, site)
        setattr(parent, name, w)
        if hasattr(parent, "qkv_bias_separate"):
            # EVA and BEiT add their q/v biases with F.linear(x, qkv.weight, bias), which would bypass the adapted
            # layer; their own switch computes the same sum as qkv(x) + bias, through the layer
            parent.qkv_bias_separate = True
        wrappers[site.key] = w
    return wrappers
