"""Where a store's objects live: the backend protocol `Store` is written against, and the local-directory backend.

A backend knows how to list, fetch, put and delete a store's objects, how to make a staged version visible in one
step, how to write CURRENT, and how to keep out a second writer. Everything else (verification, the manifest
rules, the order of a publish, crash clean-up) is `cl_serve.store.model_store.Store`, once, for every backend. Reads always
go through a local directory (`root`): the store itself here, a verified cache for object storage
(`cl_serve.store.object_backend.ObjectBackend`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Iterator, Protocol

from cl_serve.contract.store_schema import utc_now
from cl_serve.base.atomic_files import atomic_write_text, fsync_dir  # noqa: F401  (re-exported)
from cl_serve.base.errors import StoreError

VERSION_NAME = re.compile(r"[0-9]{1,9}")
PRUNED_PREFIX = ".pruned-"  # a version being removed: versions/.pruned-NNNN-xxxx, invisible, deleted next
BLOBS = "blobs"  # files kept once per content: blobs/<sha256> (cl_serve.store.model_store)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fault_point(name: str) -> None:
    """Crash-test hook: CL_SERVE_FAULT=<name> kills this process with SIGKILL at that point of a publish."""
    if os.environ.get("CL_SERVE_FAULT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def vname(v: int) -> str:
    return f"{v:04d}"


class StoreBackend(Protocol):
    """What `Store` needs from where the objects live. `rel` is a path relative to the store ("store.json",
    "versions/0003/model.onnx")."""

    name: str  # how the store is named to users (a path, a URL)
    root: Path  # the local directory every read goes through

    def fetch(self, rel: str) -> bool:
        """Make the local copy of `rel` the store's current object; False when the store has no such object."""

    def refresh(self, rel: str) -> None:
        """Like fetch, but keep a local copy that is known to be the current object (version files, backbone)."""

    def put(self, rel: str) -> None:
        """Make the local file `rel` the store's object (after it was written atomically under `root`)."""

    def delete(self, rel: str) -> None:
        """Remove the store's object `rel` (its local copy is removed by the caller)."""

    def versions(self) -> list[int]:
        """The complete versions (those a reader may see), ascending."""

    def taken(self) -> list[int]:
        """Every version number in use, complete or not (the next version is one past the largest)."""

    def commit_version(self, staging: Path, v: int, names: list[str]) -> Path:
        """Make the staged, hashed version directory visible as version v (manifest.json last); returns its local
        directory."""

    def read_current(self) -> bytes | None:
        """CURRENT's first bytes, or None when there is none."""

    def write_current(self, data: bytes) -> None:
        """Replace CURRENT in one step."""

    def lock(self, wait: bool, timeout: float | None, hint: str) -> contextlib.AbstractContextManager[None]:
        """Exclusive writer access for the block; StoreError ending in `hint` when another writer has it."""

    def clean(self, listed: dict[int, set[str]]) -> list[str]:
        """Remove what crashed writers left in the store beyond `root` (listed: each version's manifest files)."""

    def remove_version(self, v: int) -> int:
        """Make version `v` invisible to readers in one step, then delete its files; returns the bytes freed (not
        counting shared content, which the sweep frees). A crash between the two leaves files no reader lists, which
        the next writer's clean-up removes."""

    def share(self, path: Path, digest: str) -> None:
        """Keep the bytes of the local file `path` (sha256 `digest`) once in the store's blob area, whatever the
        number of versions that hold them (before the version that lists them becomes visible)."""

    def fetch_shared(self, rel: str, digest: str) -> None:
        """Make the local file `rel` the shared bytes `digest` (a reader; nothing when it is already there)."""

    def blobs(self) -> dict[str, int]:
        """Every shared content in the store: sha256 -> size."""

    def delete_blob(self, digest: str) -> None:
        """Remove one shared content (the sweep, under the writer's lock, once no version lists it)."""


class LocalBackend:
    """The store is a local directory: writes are atomic renames, one writer holds an flock on `.lock`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.name = str(self.root)

    def fetch(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def refresh(self, rel: str) -> None:
        pass  # files are read where they are

    def put(self, rel: str) -> None:
        pass  # already in place, written atomically

    def delete(self, rel: str) -> None:
        pass

    def versions(self) -> list[int]:
        d = self.root / "versions"
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if VERSION_NAME.fullmatch(p.name) and p.is_dir())

    def taken(self) -> list[int]:
        return self.versions()

    def commit_version(self, staging: Path, v: int, names: list[str]) -> Path:
        fsync_dir(staging)
        fault_point("before-rename")
        final = self.root / "versions" / vname(v)
        os.rename(staging, final)
        fsync_dir(final.parent)
        return final

    def read_current(self) -> bytes | None:
        path = self.root / "CURRENT"
        if path.is_symlink():  # refused without reading (or printing) what it points at
            raise StoreError("broken store: CURRENT is a symbolic link; it must be a file the store writes")
        try:
            return path.read_bytes()[:64]
        except FileNotFoundError:
            return None

    def write_current(self, data: bytes) -> None:
        atomic_write_text(self.root / "CURRENT", data.decode())

    @contextlib.contextmanager
    def lock(self, wait: bool = False, timeout: float | None = None,
             hint: str = "retry later or pass --wait") -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
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
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing releases the flock

    def clean(self, listed: dict[int, set[str]]) -> list[str]:
        return []

    def remove_version(self, v: int) -> int:
        final = self.root / "versions" / vname(v)
        size = sum(st.st_size for st in (p.lstat() for p in final.rglob("*")) if st.st_nlink == 1
                   and stat.S_ISREG(st.st_mode))  # shared files are other names of a blob: freed by the sweep
        hidden = final.with_name(f"{PRUNED_PREFIX}{vname(v)}-{uuid.uuid4().hex[:8]}")
        os.rename(final, hidden)  # gone from versions() at once: only NNNN directories are versions
        fsync_dir(hidden.parent)
        fault_point("prune-after-hide")
        shutil.rmtree(hidden)
        return size

    def share(self, path: Path, digest: str) -> None:
        """`path` becomes another name (a hard link) of blobs/<digest>: the first version with these bytes puts
        them there, later ones link to them. A blob whose bytes do not match its name is replaced, never linked.
        On a filesystem without hard links the version keeps its own copy."""
        blob = self.root / BLOBS / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        tmp = None
        try:
            if blob.is_file() and sha256_file(blob) == digest:
                tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
                os.link(blob, tmp)
                os.replace(tmp, path)
                fsync_dir(path.parent)
            else:
                tmp = blob.with_name(f".{digest}.{uuid.uuid4().hex[:8]}.tmp")
                os.link(path, tmp)
                os.replace(tmp, blob)
                fsync_dir(blob.parent)
        except OSError:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def fetch_shared(self, rel: str, digest: str) -> None:
        pass  # the version's directory holds the file (a hard link of the blob)

    def blobs(self) -> dict[str, int]:
        d = self.root / BLOBS
        return {p.name: p.stat().st_size for p in d.iterdir() if not p.name.startswith(".")} if d.is_dir() else {}

    def delete_blob(self, digest: str) -> None:
        (self.root / BLOBS / digest).unlink(missing_ok=True)
