"""What a replica tells about the store's history: its versions with their state, a page at a time, newest first
(GET /v1/versions and the page), and the newest candidate above the served version (for the canary). A page
reads the store's listing, CURRENT and its history index (cl_serve.store.history_index), not one manifest per
version, and never hashes a file; a row names at most NEW_LABELS_SHOWN of its task's new classes (and their
count), so a response stays small with thousands of classes and hundreds of versions."""
from __future__ import annotations

import time
from typing import Any, Callable

from cl_serve.base.errors import StoreError
from cl_serve.contract.store_schema import summary_state
from cl_serve.store.history_index import HistoryIndex
from cl_serve.store.model_store import Store

PAGE_DEFAULT, PAGE_MAX = 50, 200


def version_row(v: int, summary: dict[str, Any], current: int | None, serving: int | None,
                refused: str | None) -> dict[str, Any]:
    """One version as GET /v1/versions lists it: its summary (parent, task, classes, accuracies, gate decision)
    and `state` in the store's one vocabulary (live, published, candidate, broken)."""
    row: dict[str, Any] = {"version": v, "live": v == current, "serving": v == serving, **summary}
    row["state"] = summary_state(summary, live=v == current, error=refused)
    if refused is not None:
        row["error"] = refused
    return row


class VersionHistory:
    """The store's versions as one replica sees them; `refusal(v)` says whether this replica refused a version."""

    def __init__(self, store: Store, refusal: Callable[[int], str | None], poll_interval_s: float):
        self.store, self.refusal, self.poll_interval_s = store, refusal, poll_interval_s
        self._candidate: tuple[float, int | None] = (float("-inf"), None)  # (when looked up, newest candidate)

    def page(self, serving: int | None, limit: int = PAGE_DEFAULT, before: int | None = None) -> dict[str, Any]:
        """Up to `limit` versions below `before` (all when None), newest first; an unreadable one is `broken` with
        its error. `next_before` continues the listing (None on the last page)."""
        try:
            current = self.store.current()
        except StoreError:
            current = None
        every = self.store.versions()
        numbers = sorted((v for v in every if before is None or v < before), reverse=True)
        summaries = HistoryIndex(self.store).summaries(numbers[:limit])  # the index: not a read per version
        rows = [version_row(v, summaries[v], current, serving, self.refusal(v)) for v in numbers[:limit]]
        more = len(numbers) > limit
        return {"versions": rows, "live": current, "total": len(every),
                "next_before": rows[-1]["version"] if more and rows else None}

    def newest_candidate(self, serving: int | None) -> int | None:
        """The newest version above `serving` that the release gate refused (a candidate), looked up at most once
        per poll interval (a few manifest reads)."""
        checked, found = self._candidate
        if time.monotonic() - checked < self.poll_interval_s:
            return found
        found = None
        try:
            for v in sorted((v for v in self.store.versions() if v > (serving or 0)), reverse=True):
                if self.refusal(v) is not None:
                    continue
                gate = self.store.manifest(v).gate
                if gate is not None and not gate.passed:
                    found = v
                    break
        except StoreError:
            found = None
        self._candidate = (time.monotonic(), found)
        return found
