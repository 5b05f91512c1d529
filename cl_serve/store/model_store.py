"""The model store: the only hand-off between the trainer (any writer) and the server.

    STORE/store.json                  format version, backbone spec, method + head + settings, preprocessing
    STORE/backbone/                   model.safetensors (base weights) and card.json
    STORE/versions/NNNN/              learner.safetensors, model.onnx + weights-<sha256>.bin, manifest.json
    STORE/blobs/<sha256>              each large file's bytes, once for every version that holds them
    STORE/CURRENT                     the live version id ("0003"), replaced atomically

A version is staged in `versions/.tmp-*`, fsynced, hashed into its manifest and made visible in one step by the
backend (a rename here, manifest-last on object storage); CURRENT moves last, so a crash at any point leaves the
previous version live and the store readable (stale staging is removed by the next writer). One writer at a time
(the backend's lock). Every manifest lists the sha256 of its files; `verified(v)` checks them once per Store
object and returns a `VerifiedVersion` that later steps take instead of checking again. Files of at least
`SHARED_MIN_BYTES` are shared content: kept once per sha256 in blobs/ (hard links into the version here, one object
per hash on a bucket), listed in the manifest's `shared`, and deleted by `sweep_shared` once no version lists them.
Where the objects live is the backend's business (`cl_serve.store.backends`); this class is the same for all of
them. Stdlib + pydantic.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pydantic import ValidationError

from cl_serve.contract.store_schema import (FORMAT_VERSION, Manifest, ReleasePolicy,
                                            StoreConfig, describe_error)
from cl_serve.base.errors import StoreError
from cl_serve.store.history_index import HistoryIndex
from cl_serve.store.backends import (BLOBS, PRUNED_PREFIX, LocalBackend, StoreBackend, atomic_write_text, fault_point,
                                     sha256_file, vname)

__all__ = ["LOCK_HINTS", "Manifest", "Store", "StoreConfig", "VerifiedVersion", "VersionWriter", "atomic_write_text",
           "fault_point", "sha256_file", "vname"]

# What the user of each writing command can do when another writer holds the store's lock.
LOCK_HINTS = {"add-task": "retry later or pass --wait", "rollback": "retry later or pass --wait",
              "promote": "retry later or pass --wait", "policy": "retry later",
              "prune": "retry later or pass --wait",
              "export": "retry when it has finished (`cl-serve status` shows the store)"}
SHARED_MIN_BYTES = 4096  # files at least this large are kept once per content (blobs/<sha256>)
CURRENT_FORMAT = re.compile(rb"[0-9]{1,9}\n?")  # CURRENT: ASCII digits, one optional newline


def settle_file(path: Path) -> None:
    """A new file of a version made readable by a server running as another user and durable on disk."""
    os.chmod(path, 0o644)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@dataclass(frozen=True)
class VerifiedVersion:
    """A version whose manifest parsed and whose every listed file matched its sha256 when it was made: pass it
    along instead of verifying again."""

    number: int
    manifest: Manifest
    path: Path  # its local directory


class VersionWriter:
    """A version being written: put files into `.path`, then `Store.publish` makes it visible."""

    def __init__(self, store: "Store", version: int):
        self.store, self.version = store, version
        self.path = store.versions_dir / f".tmp-{vname(version)}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.path.mkdir(parents=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class Store:
    def __init__(self, root: str | Path | StoreBackend):
        self.backend: StoreBackend = LocalBackend(root) if isinstance(root, (str, Path)) else root
        self.root = self.backend.root
        self.versions_dir = self.root / "versions"
        self.backbone_dir = self.root / "backbone"
        self.current_path = self.root / "CURRENT"
        self.config_path = self.root / "store.json"
        self.lock_path = self.root / ".lock"
        self.policy_path = self.root / "policy.json"
        self._locked = 0  # nesting depth of lock() on this object
        self._hashed: dict[tuple, str] = {}  # (file, size, mtime, inode) -> sha256, for this object's life

    @property
    def name(self) -> str:
        """How the store is named to users (a path here, a URL for object storage)."""
        return self.backend.name

    def __str__(self) -> str:
        return self.name

    # -- creation and configuration ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.backend.fetch("store.json")

    def create(self, config: StoreConfig) -> None:
        """Write store.json (the backbone files must already be under backbone/). Refuses an existing store."""
        if self.exists():
            raise StoreError(f"{self.name} already holds a store (store.json exists); use another --store")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        for p in sorted(self.backbone_dir.iterdir()) if self.backbone_dir.is_dir() else []:
            if p.is_file() and not p.name.startswith("."):
                self.backend.put(f"backbone/{p.name}")
        atomic_write_text(self.config_path, config.model_dump_json(indent=2))
        self.backend.put("store.json")  # last: the store exists once store.json does

    def config(self) -> StoreConfig:
        if not self.exists():
            raise StoreError(f"no model store at {self.name} (run `cl-serve init --store {self.name} ...` first)")
        try:
            cfg = StoreConfig.model_validate_json(self.config_path.read_text())
        except (ValidationError, ValueError, OSError) as e:
            raise StoreError(f"broken store: {self.config_path} is unreadable: {describe_error(e)}") from e
        if cfg.format_version != FORMAT_VERSION:
            raise StoreError(f"store format {cfg.format_version} is not supported (this cl-serve reads {FORMAT_VERSION})")
        return cfg

    def policy(self) -> ReleasePolicy:
        """The release policy (no gate when the store has none)."""
        if not self.backend.fetch("policy.json"):
            return ReleasePolicy()
        try:
            return ReleasePolicy.model_validate_json(self.policy_path.read_text())
        except (ValidationError, ValueError, OSError) as e:
            raise StoreError(f"broken store: {self.policy_path} is unreadable: {describe_error(e)}; "
                             "set it again with `cl-serve policy`") from e

    def set_policy(self, policy: ReleasePolicy) -> None:
        """Write policy.json atomically (callers hold the writer lock)."""
        atomic_write_text(self.policy_path, policy.model_dump_json(indent=2))
        self.backend.put("policy.json")

    def backbone_weights_path(self) -> Path:
        return self.backbone_dir / "model.safetensors"

    def verify_backbone(self, config: StoreConfig | None = None) -> None:
        """The backbone weights match store.json's sha256 (`config`: store.json when the caller has read it)."""
        for name in ("model.safetensors", "card.json"):
            self.backend.refresh(f"backbone/{name}")
        path = self.backbone_weights_path()
        if not path.is_file():
            raise StoreError(f"broken store: backbone weights {path} are missing")
        if self._sha256(path) != (config or self.config()).backbone_sha256:
            raise StoreError(f"broken store: backbone weights {path} do not match their sha256 in store.json")

    # -- versions ------------------------------------------------------------------------------------------------
    def versions(self) -> list[int]:
        return self.backend.versions()

    def version_dir(self, v: int) -> Path:
        return self.versions_dir / vname(v)

    def current(self) -> int | None:
        """The live version, or None before the first one; a CURRENT naming a missing version is an error."""
        try:
            raw = self.backend.read_current()
        except OSError as e:
            raise StoreError(f"broken store: {self.current_path} is unreadable ({e.strerror or e}); "
                             f"{self.fix_hint()}") from None
        except StoreError as e:
            raise StoreError(f"{e}; {self.fix_hint()}") from None
        if raw is None:
            return None
        if not CURRENT_FORMAT.fullmatch(raw):
            raise StoreError(f"broken store: CURRENT holds {raw[:20]!r}, not a version number; {self.fix_hint()}")
        v = int(raw)
        if v not in self.versions():
            raise StoreError(f"broken store: CURRENT names version {v}, which does not exist; {self.fix_hint()}")
        return v

    def fix_hint(self) -> str:
        """How to repair a broken CURRENT: roll back to the newest version that verifies."""
        good = self.latest_valid()
        if good is None:
            return "no version verifies: publish one with `cl-serve add-task`"
        return f"make a version live with `cl-serve rollback --store {self.name} --version {good}`"

    def latest_valid(self) -> int | None:
        """The newest version whose manifest and files verify (None if none does)."""
        for v in reversed(self.versions()):
            try:
                self.verified(v)
                return v
            except StoreError:
                continue
        return None

    def verified_or_live(self, version: int | None) -> VerifiedVersion:
        """`version` verified, or the live one when None; StoreError when the store has no version yet."""
        v = version if version is not None else self.current()
        if v is None:
            raise StoreError("the store has no version yet")
        return self.verified(v)

    def manifest(self, v: int) -> Manifest:
        """A version's manifest, parsed but not verified (`verified` checks its files). One read of the manifest
        (a version exists when its manifest does: the listing's own test); the store is listed only to say which
        versions exist when this one does not."""
        d = self.version_dir(v)
        if d.is_symlink():  # a version is a directory the store wrote, never a link to one elsewhere
            raise StoreError(f"broken version {v}: {d.name} is a symbolic link, not a directory of the store")
        if v < 1 or not self.backend.fetch(f"versions/{vname(v)}/manifest.json"):
            have = ", ".join(map(str, self.versions())) or "none"
            raise StoreError(f"version {v} does not exist in {self.name} (versions: {have})")
        try:
            return Manifest.model_validate_json((d / "manifest.json").read_text())
        except (ValidationError, ValueError, OSError) as e:
            raise StoreError(f"broken version {v}: manifest.json unreadable: {describe_error(e)}") from e

    def verified(self, v: int) -> VerifiedVersion:
        """The version with every listed file checked against its sha256 (each file hashed once per Store object
        while its size, mtime and inode stay the same)."""
        m = self.manifest(v)
        d = self.version_dir(v)
        if not m.files:
            raise StoreError(f"broken version {v}: manifest.json lists no files")
        for name, digest in m.files.items():
            rel = f"versions/{vname(v)}/{name}"
            if name in m.shared:
                self.backend.fetch_shared(rel, digest)  # kept once per content, under its hash
            else:
                self.backend.refresh(rel)  # object storage: a rewritten object is fetched again
            p = d / name
            if not p.is_file():
                raise StoreError(f"broken version {v}: {name} is missing")
            if self._sha256(p) != digest:
                raise StoreError(f"broken version {v}: {name} does not match its sha256 in manifest.json")
        return VerifiedVersion(v, m, d)

    @staticmethod
    def _file_key(path: Path) -> tuple:
        """What identifies a file's bytes for the hash memo: its path, size, mtime and inode."""
        st = path.stat()
        return str(path), st.st_size, st.st_mtime_ns, st.st_ino

    def _sha256(self, path: Path) -> str:
        key = self._file_key(path)
        if key not in self._hashed:
            self._hashed[key] = sha256_file(path)
        return self._hashed[key]

    # -- writing -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, wait: bool = False, timeout: float | None = None,
             hint: str = "retry later or pass --wait") -> Iterator[None]:
        """Exclusive writer lock; fails at once (or waits with `wait`) when another writer holds it. Re-entrant on
        this object (a command locks, the steps it calls lock again); `hint` ends the "locked" message."""
        if self._locked:
            self._locked += 1
            try:
                yield
            finally:
                self._locked -= 1
            return
        with self.backend.lock(wait, timeout, hint):
            self._locked = 1
            try:
                self.clean_stale_temporaries()
                yield
            finally:
                self._locked = 0

    def clean_stale_temporaries(self) -> list[str]:
        """Remove what crashed writers left (called under the lock): unfinished version directories, temporary
        files (`.NAME.*.tmp`, `.NAME.tmp.partial`) in the store root, backbone/, blobs/ and every version, files a
        manifest does not list (a re-export killed before or after its manifest switch), and whatever the backend
        keeps beyond them. Shared content no version lists is the sweep's (`sweep_shared`, run by prune). Returns
        what was removed."""
        removed: list[str] = []

        def rm(p: Path) -> None:
            removed.append(str(p.relative_to(self.root)))
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()

        versions = self.versions()
        dirs = [self.root, self.backbone_dir, self.root / BLOBS]
        if self.versions_dir.is_dir():
            for p in [*self.versions_dir.glob(".tmp-*"), *self.versions_dir.glob(f"{PRUNED_PREFIX}*")]:
                rm(p)
            dirs += [self.version_dir(v) for v in versions]
        for d in dirs:
            if d.is_dir():
                for p in d.glob(".*.tmp*"):  # also an exporter's `.X.tmp.partial` files
                    rm(p)
        listed = {}
        for v in versions:
            try:
                listed[v] = set(self.manifest(v).files)
            except StoreError:
                continue  # a broken version is left as it is, for a person to look at
            for p in self.version_dir(v).iterdir():  # a re-export's files that never got switched to
                if not p.name.startswith(".") and p.name != "manifest.json" and p.name not in listed[v]:
                    rm(p)
        return removed + self.backend.clean(listed)

    def remove_version(self, v: int) -> int:
        """Delete version `v` (under the writer's lock; never the live one): invisible first, files after (see the
        backend). Returns the bytes freed."""
        if not self._locked:
            raise StoreError("removing a version needs the store's writer lock")
        if v == self.current():
            raise StoreError(f"version {v} is live; make another version live before removing it")
        if v not in self.versions():
            raise StoreError(f"version {v} does not exist in {self.name}")
        freed = self.backend.remove_version(v)
        HistoryIndex(self).write()
        d = str(self.version_dir(v))
        self._hashed = {k: h for k, h in self._hashed.items() if not str(k[0]).startswith(d)}
        return freed

    def sweep_shared(self) -> int:
        """Delete the shared content no version lists (under the writer's lock: prune runs it after removing
        versions; a crashed publish's uploads go too); returns the bytes freed. Nothing is deleted while a
        version's manifest cannot be read, since what it lists is then unknown."""
        if not self._locked:
            raise StoreError("sweeping shared content needs the store's writer lock")
        listed: set[str] = set()
        for v in self.versions():
            try:
                m = self.manifest(v)
            except StoreError:
                return 0
            listed |= {m.files[n] for n in m.shared}
        freed = 0
        for digest, size in self.backend.blobs().items():
            if digest not in listed:
                self.backend.delete_blob(digest)
                freed += size
        return freed

    def share_if_large(self, path: Path, digest: str) -> bool:
        """Keep a new file of a version as shared content when it is at least SHARED_MIN_BYTES (before the
        manifest that lists it is written); True when it is."""
        if path.stat().st_size < SHARED_MIN_BYTES:
            return False
        self.backend.share(path, digest)
        return True

    def new_version(self) -> VersionWriter:
        return VersionWriter(self, max(self.backend.taken() + [0]) + 1)

    def publish(self, writer: VersionWriter, manifest: Manifest, make_current: bool = True) -> VerifiedVersion:
        """Hash the files, write manifest.json, make the version visible, then move CURRENT."""
        files, shared = {}, []
        for p in sorted(writer.path.iterdir()):
            if p.name != "manifest.json":
                settle_file(p)
                files[p.name] = self._sha256(p)
                if self.share_if_large(p, files[p.name]):
                    shared.append(p.name)
        fault_point("publish-after-share")
        manifest = manifest.model_copy(update={"files": files, "version": writer.version, "shared": shared})
        with open(writer.file("manifest.json"), "w") as f:
            f.write(manifest.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        own = [n for n in sorted(files) if n not in shared]  # the files the version's own directory holds
        final = self.backend.commit_version(writer.path, writer.version, own)
        for name, digest in files.items():  # the same bytes under their final name: no second hashing
            self._hashed[self._file_key(final / name)] = digest
        fault_point("before-current")
        handle = VerifiedVersion(writer.version, manifest, final)
        if make_current:
            self.set_current(handle)
        HistoryIndex(self).write()  # after the version is visible: a crash before leaves it summarised from its manifest
        return handle

    def set_current(self, version: int | VerifiedVersion) -> None:
        """Make a version live (verified first unless a VerifiedVersion is given). Used by publish and rollback."""
        handle = version if isinstance(version, VerifiedVersion) else self.verified(version)
        self.backend.write_current((vname(handle.number) + "\n").encode())
