"""Which store a path or URL names: a local directory (`cl_serve.store.Store`) or an object-store prefix
(`cl_serve.object_store.MirroredStore`). Kept outside both modules so that neither imports the other's user."""
from __future__ import annotations

from pathlib import Path

from cl_serve.object_store import MirroredStore
from cl_serve.store import Store


def open_store(root: str | Path) -> Store:
    """A store by path, or by URL (s3://bucket/prefix, gs://..., any fsspec URL) for object storage."""
    if "://" in str(root):
        return MirroredStore(str(root))
    return Store(root)
