"""Loading versions for a replica, and remembering the ones that cannot be served.

`VersionLoader.load(v)` verifies and loads a version (`cl_serve.serving.model.load_version`); a version that fails
is refused with its reason, tied to a stamp of its files (name, size, modification time), and not tried again until
one of those files changes: a restored file is picked up without a restart.
"""
from __future__ import annotations

import threading
from typing import Callable

from cl_serve.base.errors import StoreError
from cl_serve.serving.model import LoadedModel, load_version
from cl_serve.serving.settings import SessionSettings
from cl_serve.store.model_store import Store


class VersionRefused(Exception):
    """`version` cannot be served; the message says why (already refused, or failed now)."""

    def __init__(self, version: int, reason: str):
        super().__init__(reason)
        self.version, self.reason = version, reason


class VersionLoader:
    """Verifies and loads versions of one store; keeps the refusals (version -> reason) and their file stamps."""

    def __init__(self, store: Store, session: SessionSettings | None = None,
                 on_refused: Callable[[int], None] | None = None, precision: str = "fp32"):
        self.store = store
        self.session, self.precision = session, precision
        self.on_refused = on_refused or (lambda version: None)
        self.refused: dict[int, str] = {}
        self._stamps: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def stamp(self, version: int) -> tuple:
        """What a refusal is tied to: every file of the version with its size and modification time, so restoring
        any file (not only the manifest) makes the version worth trying again."""
        d = self.store.version_dir(version)
        try:
            stats = ((p.name, p.stat()) for p in d.iterdir() if p.is_file())
            return tuple(sorted((name, st.st_mtime_ns, st.st_size) for name, st in stats))
        except OSError:
            return ()

    def refusal(self, version: int) -> str | None:
        """Why `version` was refused, or None. A refusal lapses as soon as any of the version's files changes."""
        if version not in self.refused:
            return None
        if self._stamps.get(version) != self.stamp(version):
            self.refused.pop(version, None)
            self._stamps.pop(version, None)
            return None
        return self.refused[version]

    def load(self, version: int) -> LoadedModel:
        """Load `version` verified; VersionRefused (recorded) when it cannot be served."""
        with self._lock:
            known = self.refusal(version)
            if known is not None:
                raise VersionRefused(version, known)
            stamp = self.stamp(version)
            try:
                return load_version(self.store, version, self.session, self.precision)
            except StoreError as e:
                self.refused[version], self._stamps[version] = str(e), stamp
                self.on_refused(version)
                raise VersionRefused(version, str(e)) from None
