"""Learner files written before adapter state moved onto the adapted layers (format 1) read as format 2.

Format 1 kept each method's tensors under names the method built by hand (`inflora.<site>.<target>.delta`,
`sdlora.<site>.<target>.<NNN>.t<k>.B`, `seqlora.<site with _>__<target>.A`); format 2 stores each layer's
`adapter_state()` under its site key and the method's own state under `method.` (see methods/base.py). The
mapping is exact: a store's learner.safetensors from before the change loads, learns its next task and merges to
the same weights (tests/test_learner_format.py writes format-1 files of every method family). Files are
upgraded on read; the next version written is format 2.
"""
from __future__ import annotations

import torch

from cl_serve.trainer.sites import Site

CURRENT = 2


def upgrade(tensors: dict[str, torch.Tensor], family: str, sites: list[Site], version: int
            ) -> dict[str, torch.Tensor]:
    """The format-2 tensors of a learner file of `version` (heads' tensors pass through unchanged)."""
    if version == CURRENT:
        return tensors
    if version != 1:
        raise ValueError(f"learner file format {version} is newer than this cl-serve reads ({CURRENT}): upgrade "
                         "cl-serve")
    mine = {"inflora": "inflora.", "sdlora": "sdlora.", "seq-lora": "seqlora."}.get(family)
    out = {k: v for k, v in tensors.items() if mine is None or not k.startswith(mine)}
    if family == "inflora":
        out.update(_inflora(tensors, sites))
    elif family == "sdlora":
        out.update(_sdlora(tensors, sites))
    elif family == "seq-lora":
        out.update(_seqlora(tensors, sites))
    return out


def _inflora(tensors, sites):
    out = {}
    for s in sites:
        old = f"inflora.{s.key}."
        out[f"{s.key}.B"] = tensors[old + "B_last"]
        out[f"{s.key}.memory"] = tensors[old + "memory"]
        out[f"{s.key}.memory_is_complement"] = tensors[old + "memory_is_complement"].reshape(1).bool()
        for t in s.targets:
            out[f"{s.key}.folded.{t}"] = tensors[f"{old}{t}.delta"]
    return out


def _sdlora(tensors, sites):
    out = {}
    for name, value in tensors.items():  # per-task magnitudes: sdlora.alpha.task__t<k>
        if name.startswith("sdlora.alpha.task__"):
            out["method.shared.alpha." + name[len("sdlora.alpha.task__"):]] = value.reshape(())
    for s in sites:
        for t in s.targets:
            prefix = f"sdlora.{s.key}.{t}."
            entries = sorted({k[len(prefix):].rsplit(".", 1)[0] for k in tensors if k.startswith(prefix)})
            for n, entry in enumerate(entries):  # "NNN.t<k>" in stored order
                task = int(entry.split(".", 1)[1][1:])
                old, new = prefix + entry, f"{s.key}.directions.{t}.{n}."
                out[new + "B"], out[new + "A"] = tensors[old + ".B"], tensors[old + ".A"]
                out[new + "scale"] = tensors.get(old + ".scale", torch.ones(1)).reshape(())
                out[new + "task"] = torch.tensor(task)
                if old + ".alpha" in tensors:
                    out[new + "alpha"] = tensors[old + ".alpha"].reshape(())
    return out


def _seqlora(tensors, sites):
    out = {}
    for s in sites:
        for t in s.targets:
            old = f"seqlora.{s.key.replace('.', '_')}__{t}."
            if old + "A" in tensors:
                out[f"{s.key}.A.{t}"], out[f"{s.key}.B.{t}"] = tensors[old + "A"], tensors[old + "B"]
    return out
