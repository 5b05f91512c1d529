"""What a replica tells about the store's history: its versions with their state, a page at a time, newest first
(GET /v1/versions and the page), and the newest candidate above the served version (for the canary). Reads the
manifests of the page only, never hashes a file; a row names at most NEW_LABELS_SHOWN of its task's new classes
(and their count), so a response stays small with thousands of classes."""
from __future__ import annotations

import time
from typing import Any, Callable

from cl_serve.base.errors import StoreError
from cl_serve.contract.store_schema import Manifest, version_state
from cl_serve.store.model_store import Store

NEW_LABELS_SHOWN = 20
PAGE_DEFAULT, PAGE_MAX = 50, 200


def version_row(v: int, m: Manifest, current: int | None, serving: int | None, refused: str | None) -> dict[str, Any]:
    """One version as GET /v1/versions lists it: parent, task, classes, accuracies, gate decision and `state` in the
    store's one vocabulary (live, published, candidate, broken)."""
    test = m.metrics.test.per_task if m.metrics.test else []
    gate = m.gate
    row: dict[str, Any] = {
        "version": v, "live": v == current, "serving": v == serving,
        "parent": m.parent, "task": m.task_index, "created_at": m.created_at,
        "classes": len(m.labels), "new_classes": len(m.tasks[-1].labels) if m.tasks else 0,
        "new_labels": m.tasks[-1].labels[:NEW_LABELS_SHOWN] if m.tasks else [],
        "method": m.method.name, "head": m.head.name,
        "per_task_accuracy": {str(t.task): t.accuracy for t in (gate.tasks if gate else []) if t.accuracy is not None}
        or {str(t.task): t.accuracy for t in test},
        "accuracy_source": "gate" if gate else ("test" if test else None),
        "gate": None if not gate else {"passed": gate.passed, "reasons": gate.reasons},
        "state": version_state(live=v == current, gate=gate, error=refused)}
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
        rows = []
        for v in numbers[:limit]:
            try:
                m = self.store.manifest(v)
            except StoreError as e:
                rows.append({"version": v, "live": v == current, "serving": v == serving, "error": str(e),
                             "state": version_state(live=v == current, gate=None, error=str(e))})
                continue
            rows.append(version_row(v, m, current, serving, self.refusal(v)))
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
