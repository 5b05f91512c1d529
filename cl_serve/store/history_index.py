"""The store's history index, `history.json`: one small summary per version (`version_summary`), so listing the
history costs the same few reads with 200 versions as with 2 (on a bucket: the versions listing, CURRENT and this
object) instead of one manifest read per version.

Writers rewrite it under the lock after every change to the set of versions (publish, prune). It is a cache, never
the truth: a version is what the store lists (its manifest), so a version missing from the index (a crash between a
publish and the index write, a store written before the index existed) is summarised from its manifest, and an index
entry for a version the store no longer lists is ignored; the next writer rewrites the index.
"""
from __future__ import annotations

import json
from typing import Any

from cl_serve.base.errors import StoreError
from cl_serve.contract.store_schema import version_summary
from cl_serve.store.backends import atomic_write_text

INDEX = "history.json"
FORMAT = 1


class HistoryIndex:
    """Reads and (under the writer's lock) rewrites a store's history.json."""

    def __init__(self, store):
        self.store = store
        self.path = store.root / INDEX

    def read(self) -> dict[int, dict[str, Any]]:
        """The index's rows by version; {} when it is missing or unreadable."""
        self.store.backend.refresh(INDEX)
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:
                return {}
            return {int(v): row for v, row in data["versions"].items() if isinstance(row, dict)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def summaries(self, numbers: list[int]) -> dict[int, dict[str, Any]]:
        """The summary of each version in `numbers` (listed versions): from the index, else from its manifest, else
        {"error": why} for a version whose manifest cannot be read."""
        index = self.read()
        out = {}
        for v in numbers:
            if v in index:
                out[v] = index[v]
                continue
            try:
                out[v] = version_summary(self.store.manifest(v))
            except StoreError as e:
                out[v] = {"error": str(e)}
        return out

    def write(self) -> None:
        """Rewrite the index for the versions the store lists now (the writer holds the lock)."""
        listed = self.store.versions()
        rows = {v: row for v, row in self.summaries(listed).items() if "error" not in row}
        atomic_write_text(self.path, json.dumps({"format": FORMAT, "versions": {str(v): r for v, r in rows.items()}}))
        self.store.backend.put(INDEX)
