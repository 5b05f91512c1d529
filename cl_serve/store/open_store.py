"""Which store a path or URL names: a local directory, or an object-store prefix (`cl_serve.store.object_backend`), both
behind the one `cl_serve.store.model_store.Store`. Kept outside both modules so that neither imports the other's user."""
from __future__ import annotations

from pathlib import Path

from cl_serve.store.object_backend import ObjectBackend
from cl_serve.store.model_store import Store


def open_store(root: str | Path | Store, cache_dir: str | Path | None = None) -> Store:
    """A store by path, or by URL (s3://bucket/prefix, gs://..., any fsspec URL) for object storage; an already
    opened Store is returned as it is (a command hands its opened, locked store to the steps it runs)."""
    if isinstance(root, Store):
        return root
    if "://" in str(root):
        return Store(ObjectBackend(str(root), cache_dir))
    return Store(root)
