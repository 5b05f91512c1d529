"""Commands on the versions a store already holds, without torch: the release policy, promote, rollback, and
`status` (what the store holds, verified, and what a server would serve). `cl-serve status`, `rollback`,
`promote` and `policy` therefore start without importing the training stack."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cl_serve.contract.store_schema import ReleasePolicy, describe_error, summary_state, version_summary
from cl_serve.base.errors import StoreError, UserError
from cl_serve.store.history_index import HistoryIndex
from cl_serve.store.open_store import open_store
from cl_serve.store.remote_inputs import is_url, local_copy


def set_policy(root: str | Path, *, gate_data: str | Path | None = None, max_drop: float | None = None,
               min_new_accuracy: float | None = None, off: bool = False) -> ReleasePolicy:
    """Change the store's release policy (only the fields given); `off` removes the gate."""
    store = open_store(root)
    store.config()
    with store.lock():
        current = store.policy()
        update: dict[str, Any] = {"gate_data": None} if off else {}
        if gate_data is not None:
            check_readable_folder(local_copy(gate_data))  # a folder that cannot be read is refused now
            update["gate_data"] = str(gate_data).rstrip("/") if is_url(gate_data) else str(Path(gate_data).resolve())
        if max_drop is not None:
            update["max_drop"] = max_drop
        if min_new_accuracy is not None:
            update["min_new_accuracy"] = min_new_accuracy
        try:
            policy = ReleasePolicy(**{**current.model_dump(), **update})
        except ValidationError as e:
            raise UserError(f"invalid policy: {describe_error(e)}") from None
        store.set_policy(policy)
    return policy


def promote(root: str | Path, version: int, wait: bool = False) -> dict[str, Any]:
    """Make a version live by hand (a candidate the gate refused, or any verified version)."""
    rollback(root, version, wait=wait)
    m = open_store(root).manifest(version)
    return {"version": version, "gate": None if m.gate is None else m.gate.model_dump()}


def rollback(root: str | Path, version: int, wait: bool = False) -> int:
    """Point CURRENT at an existing (verified) version; the server swaps to it. Also repairs a broken CURRENT."""
    store = open_store(root)
    store.config()
    with store.lock(wait=wait):
        store.set_current(version)
    return version


def _row(v: int, summary: dict[str, Any], current: int | None) -> dict[str, Any]:
    """One version as `status` lists it, from its summary."""
    if "error" in summary:
        return {"version": v, "live": v == current, "state": "broken", "error": summary["error"]}
    keep = ("parent", "task", "classes", "new_classes", "created_at", "test_accuracy", "onnx", "gate")
    return {"version": v, "live": v == current, **{k: summary.get(k) for k in keep},
            "state": summary_state(summary, live=v == current)}


def status(root: str | Path, fast: bool = False) -> dict[str, Any]:
    """What the store holds and what a server started on it would serve.

    Every version is verified (sha256 of each listed file; `fast` reads the history index and the live manifest
    only, and says so: the same few reads with 200 versions as with 2). A
    version is `ok`, or `broken` with the reason; `serving` is the version a server would load (the live one, if it
    verifies and has an ONNX file), or None with the reason and the fix; `healthy` is False when it is None while
    versions exist or when CURRENT itself is broken.
    """
    store = open_store(root)
    cfg = store.config()
    try:
        current, current_error = store.current(), None
    except StoreError as e:
        current, current_error = None, str(e)
    listed = store.versions()
    if fast:  # the history index: a few reads whatever the number of versions; only the live manifest is read
        versions = [_row(v, s, current) for v, s in HistoryIndex(store).summaries(listed).items()]
        by_version = {}
        if current is not None:
            try:
                by_version[current] = store.manifest(current)
            except StoreError:
                pass
    else:
        versions, by_version = [], {}
        for v in listed:
            try:
                m = store.verified(v).manifest
                by_version[v] = m
                versions.append(_row(v, version_summary(m), current))
            except StoreError as e:
                versions.append(_row(v, {"error": str(e)}, current))
    live = by_version.get(current)
    serving: dict[str, Any] = {"version": None}
    if current_error:
        serving["reason"] = current_error
    elif current is None:
        serving["reason"] = "no version is live yet: publish one with `cl-serve add-task`"
    elif live is None:
        serving["reason"] = f"live version {current} is broken: a server refuses it; {store.fix_hint()}"
    elif live.onnx_file() is None:
        serving["reason"] = (f"live version {current} has no ONNX file (published with --no-export); "
                             f"run `cl-serve export --store {store.name} --version {current}`")
    else:
        serving = {"version": current}
    healthy = current_error is None and (serving["version"] is not None or not versions)
    return {"store": store.name, "method": cfg.method.model_dump(exclude_none=True), "head": cfg.head.model_dump(),
            "backbone": cfg.backbone.model_dump(),
            "preprocessing": cfg.preprocessing.model_dump(), "current": current, "current_error": current_error,
            "verified": not fast, "serving": serving, "healthy": healthy, "policy": store.policy().model_dump(),
            "tasks": len(live.tasks) if live else 0, "classes": len(live.labels) if live else 0,
            "versions": versions}


def check_readable_folder(root: str | Path) -> None:
    """An ImageFolder's classes can be listed (the trainer's own scan, imported only here: it needs torch)."""
    from cl_serve.trainer.data import scan_image_folder

    scan_image_folder(root)
