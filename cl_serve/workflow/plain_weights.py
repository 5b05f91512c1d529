"""A version's plain weights written on demand (`cl-serve export --safetensors PATH`): versions do not store them
(they are the backbone merged with the version's adapters and head, recomputed from `learner.safetensors`), so a
user who wants the plain timm model asks for it. Nothing in the store changes."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cl_serve.store.model_store import StoreConfig
from cl_serve.store.open_store import open_store
from cl_serve.workflow.pipeline import merged_weights


def merged_metadata(cfg: StoreConfig, labels: list[str], state: dict[str, torch.Tensor]) -> dict[str, str]:
    """What a merged-weights file says about itself: the timm model and kwargs to build, the labels, the head."""
    return {"timm_model": cfg.backbone.timm_model, "timm_kwargs": json.dumps(cfg.backbone.timm_kwargs),
            "labels": json.dumps(labels), "head": "linear" if "head.weight" in state else "random-projection"}


def save_merged(root: str | Path, version: int | None, out: str | Path) -> dict[str, Any]:
    """Write a version's plain weights to `out` (safetensors; strict keys for timm.create_model, see
    docs/store.md). Nothing in the store changes."""
    store = open_store(root)
    handle = store.verified_or_live(version)
    state = merged_weights(store, handle.number)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(state, str(tmp), metadata=merged_metadata(store.config(), list(handle.manifest.labels), state))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"version": handle.number, "file": str(out), "bytes": out.stat().st_size}
