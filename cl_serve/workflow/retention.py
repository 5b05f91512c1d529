"""`cl-serve prune`: remove old versions so a store that learns every week does not grow for ever.

Which versions go: those outside the `keep` newest and, with `older_than`, created before that long ago (both
rules must hold when both are given). Which never go: the live version; the newest version (version numbers are
never reused, so a server that has a version loaded can never meet a different version of that number); and, unless
allowed explicitly, the canary's candidate (the newest version above the live one that the release gate refused)
and the newest rollback target (the newest version below the live one that the gate passed). A version whose
manifest cannot be read has no age: only `keep` removes it.

A dry run by default (it prints the plan and changes nothing); `apply=True` (`--yes`) removes, under the writer's
lock, each version invisible first and its files after (`Store.remove_version`), so a crash leaves no version that
a reader would load half-deleted. Servers follow by themselves: they serve what they have loaded and move to the
live version, which is never removed.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cl_serve.base.errors import StoreError, UserError
from cl_serve.store.open_store import open_store

_UNITS = {"m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str) -> timedelta:
    """"90m", "12h", "30d", "8w" -> a timedelta; UserError otherwise."""
    match = re.fullmatch(r"\s*([0-9]{1,6})\s*([mhdw])\s*", text or "")
    if not match:
        raise UserError(f"--older-than takes a number and a unit, m, h, d or w (e.g. 30d), got {text!r}")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def _created(text: str | None) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def protected_versions(versions: list[int], manifests: dict[int, Any], live: int | None) -> dict[int, str]:
    """version -> why it stays whatever the rules say."""
    keep = {max(versions): "newest (numbers are never reused)"} if versions else {}
    if live is not None:
        keep[live] = "live"
        above = [v for v in versions if v > live and v in manifests and manifests[v].gate is not None
                 and not manifests[v].gate.passed]
        if above:
            keep.setdefault(max(above), "canary candidate")
        below = [v for v in versions if v < live and v in manifests
                 and (manifests[v].gate is None or manifests[v].gate.passed)]
        if below:
            keep.setdefault(max(below), "newest rollback target")
    return keep


def plan(store, keep: int | None, older_than: timedelta | None, allow: set[str], now: datetime | None = None
         ) -> dict[str, Any]:
    """{"remove": [versions], "kept": {version: reason}} for the store as it is now."""
    if keep is None and older_than is None:
        raise UserError("say what to remove: --keep N (keep the N newest) and/or --older-than DURATION")
    if keep is not None and keep < 1:
        raise UserError("--keep must be at least 1")
    versions = store.versions()
    manifests = {}
    for v in versions:
        try:
            manifests[v] = store.manifest(v)
        except StoreError:
            pass
    live = store.current()
    guarded = {v: why for v, why in protected_versions(versions, manifests, live).items()
               if why.split(" (")[0] not in allow}
    cutoff = (now or datetime.now(timezone.utc)) - older_than if older_than is not None else None
    newest = set(sorted(versions)[-keep:]) if keep is not None else set()
    remove, kept = [], {}
    for v in versions:
        if v in guarded:
            kept[v] = guarded[v]
        elif v in newest:
            kept[v] = f"one of the {keep} newest"
        elif cutoff is not None and v not in manifests:
            kept[v] = "unreadable manifest: age unknown (only --keep removes it)"
        elif cutoff is not None and (_created(manifests[v].created_at) or cutoff) >= cutoff:
            kept[v] = "newer than --older-than"
        else:
            remove.append(v)
    return {"remove": remove, "kept": kept, "live": live}


def prune(root: str | Path, *, keep: int | None = None, older_than: str | None = None, apply: bool = False,
          allow: tuple[str, ...] = (), wait: bool = False) -> dict[str, Any]:
    """Plan (and with `apply`, carry out) the removal; returns the plan with `removed` and `bytes_freed`."""
    store = open_store(root)
    store.config()
    age = parse_duration(older_than) if older_than is not None else None
    with store.lock(wait=wait):
        result = plan(store, keep, age, set(allow))
        result.update(applied=apply, removed=[], bytes_freed=0)
        if apply:
            store.clean_stale_temporaries()  # leftovers of an earlier, interrupted prune or publish
            for v in result["remove"]:
                result["bytes_freed"] += store.remove_version(v)
                result["removed"].append(v)
            result["bytes_freed"] += store.sweep_shared()  # content no kept version shares any more
    return result
