"""The model store: the only hand-off between the trainer (any writer) and the server.

    STORE/store.json                  format version, backbone spec, method + head + settings, preprocessing
    STORE/backbone/                   model.safetensors (base weights) and card.json
    STORE/versions/NNNN/              learner.safetensors, merged.safetensors, model.onnx, manifest.json
    STORE/CURRENT                     the live version id ("0003"), replaced atomically

A version is written into `versions/.tmp-*`, fsynced, and renamed into place only when complete; CURRENT moves
last, so a crash at any point leaves the previous version live and the store readable (stale temporary
directories are removed by the next writer). Writers hold an exclusive `flock` on STORE/.lock for the whole
add-task. Every manifest lists the sha256 of its files; readers verify them. Pure stdlib + pydantic.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from pydantic import ValidationError

from cl_serve.contract.store_schema import (FORMAT_VERSION, Manifest, ReleasePolicy, StoreConfig, describe_error,
                                            utc_now)
from cl_serve.errors import StoreError

# What the user of each writing command can do when another writer holds the store's lock.
LOCK_HINTS = {"add-task": "retry later or pass --wait", "rollback": "retry later or pass --wait",
              "promote": "retry later or pass --wait", "policy": "retry later",
              "export": "retry when it has finished (`cl-serve status` shows the store)"}
CURRENT_FORMAT = re.compile(rb"[0-9]{1,9}\n?")  # CURRENT: ASCII digits, one optional newline


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def fault_point(name: str) -> None:
    """Crash-test hook: CL_SERVE_FAULT=<name> kills this process with SIGKILL at that point of a publish."""
    if os.environ.get("CL_SERVE_FAULT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def vname(v: int) -> str:
    return f"{v:04d}"


class VersionWriter:
    """A version being written: put files into `.path`, then `Store.publish` renames it into place."""

    def __init__(self, store: "Store", version: int):
        self.store, self.version = store, version
        self.path = store.versions_dir / f".tmp-{vname(version)}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.path.mkdir(parents=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.backbone_dir = self.root / "backbone"
        self.current_path = self.root / "CURRENT"
        self.config_path = self.root / "store.json"
        self.lock_path = self.root / ".lock"
        self.policy_path = self.root / "policy.json"

    @property
    def name(self) -> str:
        """How the store is named to users (a path here, a URL for object storage)."""
        return str(self.root)

    # -- creation and configuration ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.config_path.is_file()

    def create(self, config: StoreConfig) -> None:
        """Write store.json (the backbone files must already be under backbone/). Refuses an existing store."""
        if self.exists():
            raise StoreError(f"{self.name} already holds a store (store.json exists); use another --store")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, config.model_dump_json(indent=2))

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
        if not self.policy_path.exists():
            return ReleasePolicy()
        try:
            return ReleasePolicy.model_validate_json(self.policy_path.read_text())
        except (ValidationError, ValueError, OSError) as e:
            raise StoreError(f"broken store: {self.policy_path} is unreadable: {describe_error(e)}; "
                             "set it again with `cl-serve policy`") from e

    def set_policy(self, policy: ReleasePolicy) -> None:
        """Write policy.json atomically (callers hold the writer lock)."""
        atomic_write_text(self.policy_path, policy.model_dump_json(indent=2))

    def backbone_weights_path(self) -> Path:
        return self.backbone_dir / "model.safetensors"

    def verify_backbone(self) -> None:
        path = self.backbone_weights_path()
        if not path.is_file():
            raise StoreError(f"broken store: backbone weights {path} are missing")
        if sha256_file(path) != self.config().backbone_sha256:
            raise StoreError(f"broken store: backbone weights {path} do not match their sha256 in store.json")

    # -- versions ------------------------------------------------------------------------------------------------
    def versions(self) -> list[int]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.versions_dir.iterdir()
                      if re.fullmatch(r"[0-9]{1,9}", p.name) and p.is_dir())

    def version_dir(self, v: int) -> Path:
        return self.versions_dir / vname(v)

    def current(self) -> int | None:
        """The live version, or None before the first one; a CURRENT naming a missing version is an error."""
        try:
            raw = self._read_current()
        except OSError as e:
            raise StoreError(f"broken store: {self.current_path} is unreadable ({e.strerror or e}); "
                             f"{self.fix_hint()}") from None
        if raw is None:
            return None
        if not CURRENT_FORMAT.fullmatch(raw):
            raise StoreError(f"broken store: CURRENT holds {raw[:20]!r}, not a version number; {self.fix_hint()}")
        v = int(raw)
        if v not in self.versions():
            raise StoreError(f"broken store: CURRENT names version {v}, which does not exist; {self.fix_hint()}")
        return v

    def _read_current(self) -> bytes | None:
        """CURRENT's first bytes, or None when there is none (a backend hook)."""
        if self.current_path.is_symlink():  # refused without reading (or printing) what it points at
            raise StoreError(f"broken store: CURRENT is a symbolic link; it must be a file the store writes; "
                             f"{self.fix_hint()}")
        try:
            return self.current_path.read_bytes()[:64]
        except FileNotFoundError:
            return None

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
                self.manifest(v, verify=True)
                return v
            except StoreError:
                continue
        return None

    def manifest(self, v: int, verify: bool = True) -> Manifest:
        """A version's manifest; with verify, every listed file's sha256 is checked."""
        d = self.version_dir(v)
        if not d.is_dir():
            have = ", ".join(map(str, self.versions())) or "none"
            raise StoreError(f"version {v} does not exist in {self.name} (versions: {have})")
        if d.is_symlink():  # a version is a directory the store wrote, never a link to one elsewhere
            raise StoreError(f"broken version {v}: {d.name} is a symbolic link, not a directory of the store")
        try:
            m = Manifest.model_validate_json((d / "manifest.json").read_text())
        except (ValidationError, ValueError, OSError) as e:
            raise StoreError(f"broken version {v}: manifest.json unreadable: {describe_error(e)}") from e
        if verify:
            if not m.files:
                raise StoreError(f"broken version {v}: manifest.json lists no files")
            for name, digest in m.files.items():
                p = d / name
                if not p.is_file():
                    raise StoreError(f"broken version {v}: {name} is missing")
                if sha256_file(p) != digest:
                    raise StoreError(f"broken version {v}: {name} does not match its sha256 in manifest.json")
        return m

    # -- writing -----------------------------------------------------------------------------------------------
    _held: dict[str, int] = {}  # lock files this process holds -> nesting depth (the lock is re-entrant)

    @staticmethod
    @contextlib.contextmanager
    def _nested(key: str) -> Iterator[None]:
        """A lock this process already holds, taken once more."""
        Store._held[key] += 1
        try:
            yield
        finally:
            Store._held[key] -= 1

    @contextlib.contextmanager
    def lock(self, wait: bool = False, timeout: float | None = None,
             hint: str = "retry later or pass --wait") -> Iterator[None]:
        """Exclusive writer lock; fails at once (or waits with `wait`) when another writer holds it.

        Re-entrant within one process (the CLI takes it before importing torch; the pipeline takes it again).
        `hint` ends the "locked" message: what the command's user can do about it.
        """
        key = os.path.abspath(self.lock_path)
        if key in Store._held:
            with Store._nested(key):
                yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    if not wait or (deadline is not None and time.monotonic() > deadline):
                        raise StoreError(f"store {self.name} is locked by another writer ({holder}); {hint}") from None
                    time.sleep(0.2)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} since {utc_now()}".encode(), 0)
            Store._held[key] = 1
            self.clean_stale_temporaries()
            yield
        finally:
            Store._held.pop(key, None)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing releases the flock

    def clean_stale_temporaries(self) -> list[str]:
        """Remove what crashed writers left (called under the lock): unfinished version directories, temporary
        files (`.NAME.*.tmp`, `.NAME.tmp.partial`) in the store root, backbone/ and every version, and ONNX files a manifest no longer lists
        (a re-export killed after its manifest switch). Returns what was removed."""
        removed: list[str] = []

        def rm(p: Path) -> None:
            removed.append(str(p.relative_to(self.root)))
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()

        dirs = [self.root, self.backbone_dir]
        if self.versions_dir.is_dir():
            for p in self.versions_dir.glob(".tmp-*"):
                rm(p)
            dirs += [self.version_dir(v) for v in self.versions()]
        for d in dirs:
            if d.is_dir():
                for p in d.glob(".*.tmp*"):  # also an exporter's `.X.tmp.partial` files
                    rm(p)
        for v in self.versions():
            try:
                listed = set(self.manifest(v, verify=False).files)
            except StoreError:
                continue  # a broken version is left as it is, for a person to look at
            for p in self.version_dir(v).glob("model*.onnx"):
                if p.name not in listed:
                    rm(p)
        return removed

    def new_version(self) -> VersionWriter:
        existing = self.versions()
        return VersionWriter(self, (existing[-1] + 1) if existing else 1)

    def publish(self, writer: VersionWriter, manifest: Manifest, make_current: bool = True) -> int:
        """Hash the files, write manifest.json, rename the directory into place, then move CURRENT."""
        files = {}
        for p in sorted(writer.path.iterdir()):
            if p.name != "manifest.json":
                os.chmod(p, 0o644)  # readable by a server running as another user
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                files[p.name] = sha256_file(p)
        manifest = manifest.model_copy(update={"files": files, "version": writer.version})
        with open(writer.file("manifest.json"), "w") as f:
            f.write(manifest.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(writer.path)
        fault_point("before-rename")
        final = self.version_dir(writer.version)
        os.rename(writer.path, final)
        _fsync_dir(self.versions_dir)
        fault_point("before-current")
        if make_current:
            self.set_current(writer.version)
        return writer.version

    def set_current(self, v: int) -> None:
        """Make `v` live (verified first). Used by publish and rollback."""
        self.manifest(v, verify=True)
        atomic_write_text(self.current_path, vname(v) + "\n")

    def switch_onnx(self, v: int, source: Path, info: dict[str, Any], fp16: bool = False) -> str:
        """Attach a re-exported ONNX file to version `v` without ever rewriting a file in place.

        The new bytes get a new, content-addressed name; then manifest.json is replaced atomically (it is the one
        switch: before it the old file is served, after it the new one, and both manifests verify); only then is
        the old file removed. A crash at any point leaves the version verifiable; a leftover unlisted file is
        removed by the next writer. Returns the new file name (unchanged when the bytes are identical).
        """
        d = self.version_dir(v)
        m = self.manifest(v, verify=True)
        digest = sha256_file(source)
        old = m.onnx_file(fp16)
        if old is not None and m.files[old] == digest:
            source.unlink()
            return old
        name = f"model{'.fp16' if fp16 else ''}.{digest[:12]}.onnx"
        os.chmod(source, 0o644)
        with open(source, "rb") as f:
            os.fsync(f.fileno())
        os.replace(source, d / name)
        _fsync_dir(d)
        fault_point("export-before-manifest")
        files = {k: h for k, h in m.files.items() if k != old}
        files[name] = digest
        key = "onnx_fp16" if fp16 else "onnx"
        m = m.model_copy(update={key: {**info, "file": name}, "files": files})
        atomic_write_text(d / "manifest.json", m.model_dump_json(indent=2))
        fault_point("export-before-cleanup")
        if old is not None and old != name:
            with contextlib.suppress(FileNotFoundError):
                (d / old).unlink()
            _fsync_dir(d)
        return name
