"""Hot swap: keep a replica's model on the store's live version.

`ModelWatcher` polls the store's CURRENT on a thread (and accepts a pinned version); a new version is verified
(sha256 of every file), its session created and warmed up by the `VersionLoader`, and only then is the single
`model` reference replaced, so a request that already holds the old model finishes on it. A version that fails to
load is refused, the old one keeps serving, and `status()` says why. The polling reads CURRENT only; the history
(`list_versions`, the canary's candidate) is `VersionHistory`'s.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from cl_serve.base.errors import StoreError
from cl_serve.serving.history import VersionHistory
from cl_serve.serving.model import BadInput, LoadedModel
from cl_serve.serving.settings import SessionSettings
from cl_serve.serving.version_loader import VersionLoader, VersionRefused
from cl_serve.store.open_store import open_store

log = logging.getLogger("cl_serve")


class ModelWatcher:
    """Keeps `self.model` on the store's live version (or a pinned one), swapping atomically."""

    def __init__(self, store_root: str, poll_interval_s: float = 1.0, session: SessionSettings | None = None,
                 on_event: Callable[[str, int], None] | None = None, precision: str = "fp32"):
        self.store = open_store(store_root)
        self.on_event = on_event or (lambda kind, version: None)  # ("swap"|"refused"|"tick", version): metrics
        self.loader = VersionLoader(self.store, session, on_refused=lambda v: self.on_event("refused", v),
                                    precision=precision)
        self.history = VersionHistory(self.store, self.loader.refusal, poll_interval_s)
        self.model: LoadedModel | None = None
        self.pinned: int | None = None
        self.last_error: str | None = None
        self.store_error: str | None = None  # CURRENT unreadable or broken (the reason includes the fix)
        self.fix_hint: str | None = None  # computed once per refusal: which version to roll back to
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self.swaps = 0
        self.check()
        self._thread = threading.Thread(target=self._loop, name="cl-serve-watcher", daemon=True)
        self._thread.start()

    @property
    def poll_interval_s(self) -> float:
        return self.history.poll_interval_s

    @poll_interval_s.setter
    def poll_interval_s(self, value: float) -> None:
        self.history.poll_interval_s = value

    @property
    def refused(self) -> dict[int, str]:
        return self.loader.refused

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.check()
                if self.model is not None:
                    self.on_event("tick", self.model.version)
            except Exception as e:  # never let the watcher die
                self.last_error = f"watcher: {type(e).__name__}: {e}"
                log.exception("watcher iteration failed")

    def wanted_version(self) -> int | None:
        return self.pinned if self.pinned is not None else self.store.current()

    def check(self) -> None:
        """One poll: load the wanted version if it differs from the served one."""
        try:
            want = self.wanted_version()
        except StoreError as e:
            self.last_error = self.store_error = str(e)
            return
        self.store_error = None
        if want is None and self.model is not None:  # CURRENT was deleted under a serving replica
            self.store_error = (f"broken store: CURRENT is missing; version {self.model.version} keeps serving; "
                                f"{self.store.fix_hint()}")
            return
        if want is None or (self.model is not None and self.model.version == want):
            return
        self.load(want)

    def load(self, version: int) -> bool:
        """Load and swap to `version`; on failure keep the old model and record why (not retried until the
        version's files change)."""
        with self._swap_lock:
            if self.refusal(version) is not None:
                return False
            try:
                new = self.loader.load(version)
            except VersionRefused as e:
                self.last_error = f"refused version {version}: {e.reason}"
                self.fix_hint = self.store.fix_hint()
                log.warning(self.last_error)
                return False
            self.model = new  # the swap: one reference assignment; in-flight batches keep the old object
            self.swaps += 1
            self.last_error = None
            log.info("serving version %d", version)
            self.on_event("swap", version)
            return True

    def refusal(self, version: int) -> str | None:
        return self.loader.refusal(version)

    def load_pinned(self, version: int) -> LoadedModel:
        """Load an explicit version (`POST /classify?version=N`, a canary's candidate), verified like any other;
        the deployment keeps what this returns in Serve's per-replica model cache (`@serve.multiplexed`).
        BadInput 404 for a version the store does not have, 409 for one that cannot be served."""
        if version not in self.store.versions():
            raise BadInput(404, f"version {version} does not exist")
        try:
            return self.loader.load(version)
        except VersionRefused as e:
            raise BadInput(409, f"version {version} cannot be served: {e.reason}") from None

    def newest_candidate(self) -> int | None:
        return self.history.newest_candidate(self.model.version if self.model is not None else None)

    def list_versions(self, limit: int = 50, before: int | None = None) -> dict[str, Any]:
        """A page of the store's versions, newest first (VersionHistory.page)."""
        return self.history.page(self.model.version if self.model is not None else None, limit, before)

    def unavailable_reason(self) -> str | None:
        """Why nothing is served (None when a model is): what a request or /healthz tells the operator."""
        if self.model is not None:
            return None
        if self.store_error:
            return self.store_error
        want = self.pinned
        if want is None:
            try:
                want = self.store.current()
            except StoreError as e:
                return str(e)
        if want is None:
            return "no model version is live yet: publish one with `cl-serve add-task`"
        if want in self.refused:
            return f"live version {want} cannot be served ({self.refused[want]}); {self.fix_hint}"
        return f"version {want} is loading"

    def status(self) -> dict[str, Any]:
        m = self.model
        try:
            live = self.store.current()
        except StoreError as e:
            live = None
            self.store_error = str(e)
        return {"ready": m is not None, "version": m.version if m else None, "store_current": live,
                "store_error": self.store_error, "reason": self.unavailable_reason(),
                "pinned": self.pinned, "last_error": self.last_error,
                "refused_versions": {str(k): v for k, v in self.refused.items()}, "swaps": self.swaps,
                "onnx_file": m.onnx_file if m else None, "providers": m.session.get_providers() if m else None,
                "watcher_alive": self.alive}
