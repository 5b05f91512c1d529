"""The model store on object storage (s3://bucket/prefix, gs://..., any fsspec URL), with the local store's
guarantees.

An `ObjectBackend` (the `cl_serve.store.backends.StoreBackend` of a bucket prefix) mirrors what the store reads
into a local cache directory ($CL_SERVE_CACHE, else ~/.cache/cl-serve/<hash of the URL>), where the one `Store`
verifies, loads and stages writes; the backend moves objects between the cache and the bucket. How each guarantee
holds:

* A version becomes visible only when complete: its files are uploaded first and `manifest.json` last, and
  readers list only versions whose manifest exists. Readers verify every file's sha256; a cached copy is used only
  while the object's identity (S3 ETag, GCS generation: one HEAD request) is the one it was downloaded with, so an
  object rewritten in the bucket is downloaded again and judged, never masked by the cache.
* CURRENT is written last, by one PUT (atomic on S3 and GCS).
* One writer at a time: a lease object `.lock` created with a conditional PUT (`If-None-Match: *` on S3,
  `ifGenerationMatch=0` on GCS, both through fsspec's `mode="create"`). Object stores have no advisory locks and
  no atomic rename; a conditional create is the one atomic primitive both offer, so it is the lock. The lease
  names its holder and an expiry ($CL_SERVE_LEASE_S, default 60 s) that a thread of the holder renews every third
  of it; a lease past its expiry (a writer that died) is taken over; the holder deletes it when done.
* A crashed writer leaves at most a version prefix without a manifest (invisible, removed by the next writer)
  or a stale lease (taken over once it expires: within a minute by default).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from cl_serve.base.errors import StoreError
from cl_serve.store.backends import BLOBS, VERSION_NAME, LocalBackend, fault_point, vname


def cache_root() -> Path:
    """Where local copies of remote objects live: $CL_SERVE_CACHE, else ~/.cache/cl-serve."""
    return Path(os.environ.get("CL_SERVE_CACHE") or Path.home() / ".cache" / "cl-serve")


def open_filesystem(url: str, error: type[Exception] = StoreError) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL; `error` with the extra to install when its backend is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise error(f"cannot open {url}: {e} (s3:// needs `pip install cl-serve[s3]`, gs:// "
                    "`cl-serve[gcs]`)") from None


def object_identity(info: dict) -> str:
    """What changes whenever an object is rewritten (S3 ETag, GCS generation), from fsspec's info."""
    return str(info.get("ETag") or info.get("generation") or info.get("etag") or info.get("mtime")
               or info.get("size"))


def lease_seconds() -> float:
    return float(os.environ.get("CL_SERVE_LEASE_S", 60))


class ObjectBackend:
    def __init__(self, url: str, cache_dir: str | Path | None = None):
        self.url = url.rstrip("/")
        self.name = self.url
        self.fs, self.remote = open_filesystem(self.url)
        self.cache = LocalBackend(Path(cache_dir or cache_root()) / hashlib.sha256(self.url.encode()).hexdigest()[:16])
        self.root = self.cache.root
        self._lease_token: str | None = None
        self._renewer: threading.Thread | None = None
        self._renew_stop = threading.Event()

    def path(self, *parts: str) -> str:
        """The bucket path of a store-relative path."""
        return "/".join([self.remote, *parts])

    def _glob(self, *parts: str) -> list[str]:
        """A listing of the bucket as it is now (fsspec caches listings, which other writers make stale)."""
        self.fs.invalidate_cache()
        return self.fs.glob(self.path(*parts))

    def _identity(self, rel: str) -> str | None:
        """What changes whenever the object is rewritten (S3 ETag, GCS generation), or None if it is missing."""
        try:
            return object_identity(self.fs.info(self.path(rel)))
        except FileNotFoundError:
            return None

    def _marker(self, rel: str) -> Path:
        """Where the cache remembers the identity of the object its copy of `rel` came from."""
        local = self.root / rel
        return local.with_name(f".{local.name}.id")

    # -- reading -------------------------------------------------------------------------------------------------
    def fetch(self, rel: str) -> bool:
        """Download one object to the same relative path in the cache (atomically), remembering its identity;
        False (and no cached copy left) if it is missing."""
        local = self.root / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.tmp")
        identity = self._identity(rel)
        try:
            self.fs.get_file(self.path(rel), str(tmp))
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            local.unlink(missing_ok=True)  # a copy of an object the bucket no longer has
            return False
        os.replace(tmp, local)
        self._marker(rel).write_text(identity or "")
        return True

    def refresh(self, rel: str) -> None:
        """Keep the cached copy while its identity is the bucket object's (one HEAD request), else download."""
        local = self.root / rel
        marker = self._marker(rel)
        if local.is_file() and marker.is_file() and marker.read_text() == (self._identity(rel) or "-"):
            return
        self.fetch(rel)

    def versions(self) -> list[int]:
        """Versions with a manifest, from one flat listing of versions/ (a LIST request per 1,000 objects; a glob of
        versions/*/manifest.json would list every version's prefix: a request per version)."""
        self.fs.invalidate_cache()
        base = self.path("versions") + "/"
        found = []
        for key in self.fs.find(base):
            parts = key[len(base):].split("/") if key.startswith(base) else []
            if len(parts) == 2 and parts[1] == "manifest.json" and VERSION_NAME.fullmatch(parts[0]):
                found.append(int(parts[0]))
        return sorted(found)

    def taken(self) -> list[int]:
        numbers = [int(p.rstrip("/").split("/")[-1]) for p in self._glob("versions", "*")
                   if VERSION_NAME.fullmatch(p.rstrip("/").split("/")[-1])]
        return numbers + self.cache.versions()

    def read_current(self) -> bytes | None:
        try:
            return self.fs.cat_file(self.path("CURRENT"))[:64]
        except FileNotFoundError:
            return None

    # -- writing -------------------------------------------------------------------------------------------------
    def put(self, rel: str) -> None:
        self.fs.put_file(str(self.root / rel), self.path(rel))
        self._marker(rel).write_text(self._identity(rel) or "")

    def delete(self, rel: str) -> None:
        self.fs.rm_file(self.path(rel))

    def commit_version(self, staging: Path, v: int, names: list[str]) -> Path:
        """Into place in the cache, then every file uploaded and manifest.json last: the version is visible from
        the moment its manifest is."""
        final = self.cache.commit_version(staging, v, names)
        rel = f"versions/{vname(v)}"
        for name in names:
            self.put(f"{rel}/{name}")
        fault_point("remote-before-manifest")
        self.put(f"{rel}/manifest.json")
        fault_point("remote-before-current")
        return final

    def write_current(self, data: bytes) -> None:
        self.fs.pipe_file(self.path("CURRENT"), data)  # one PUT

    def share(self, path: Path, digest: str) -> None:
        """One object per content, blobs/<sha256>, uploaded unless the bucket already holds one of that size (the
        name is the content's hash; readers verify every byte they load); the cache keeps one copy too."""
        rel = f"{BLOBS}/{digest}"
        try:
            info = self.fs.info(self.path(rel))
        except FileNotFoundError:
            info = None
        if info is None or int(info.get("size", -1)) != path.stat().st_size:
            self.fs.put_file(str(path), self.path(rel))
            info = self.fs.info(self.path(rel))
        self.cache.share(path, digest)
        self._marker(rel).write_text(object_identity(info))

    def fetch_shared(self, rel: str, digest: str) -> None:
        """A shared file of a version: the cache's copy of blobs/<sha256>, kept while it is the bucket's object
        (one HEAD, as for every file) and downloaded once otherwise; the version's cached directory links to it."""
        self.refresh(f"{BLOBS}/{digest}")
        blob, local = self.root / BLOBS / digest, self.root / rel
        if not blob.is_file():
            local.unlink(missing_ok=True)  # not in the bucket: the store reports the version's file missing
            return
        if local.is_file() and os.path.samefile(local, blob):
            return
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            os.link(blob, tmp)
        except OSError:
            shutil.copyfile(blob, tmp)
        os.replace(tmp, local)

    def blobs(self) -> dict[str, int]:
        try:
            listing = self.fs.ls(self.path(BLOBS), detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {o["name"].rstrip("/").split("/")[-1]: int(o.get("size") or 0) for o in listing
                if o.get("type") != "directory"}

    def delete_blob(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(BLOBS, digest))
        self.cache.delete_blob(digest)

    def remove_version(self, v: int) -> int:
        """manifest.json first (a version is listed by its manifest: invisible from that DELETE on), then the rest
        of the prefix, then the local cached copy."""
        prefix = self.path("versions", vname(v))
        size = sum(int(o.get("size") or 0) for o in self.fs.ls(prefix, detail=True, refresh=True)
                   if o.get("type") != "directory")
        self.fs.rm_file(f"{prefix}/manifest.json")
        fault_point("prune-after-hide")
        with contextlib.suppress(FileNotFoundError):  # nothing left: every other file was shared content
            self.fs.rm(prefix, recursive=True)
        self.fs.invalidate_cache(prefix)
        shutil.rmtree(self.root / "versions" / vname(v), ignore_errors=True)
        return size

    @contextlib.contextmanager
    def lock(self, wait: bool = False, timeout: float | None = None,
             hint: str = "retry later or pass --wait") -> Iterator[None]:
        """The bucket's lease, then the cache directory's flock (for local processes sharing the cache)."""
        self._acquire_lease(wait, timeout, hint)
        try:
            with self.cache.lock(wait=True, timeout=timeout, hint=hint):
                yield
        finally:
            self._release_lease()

    def _acquire_lease(self, wait: bool, timeout: float | None, hint: str) -> None:
        lease = self.path(".lock")
        deadline = None if timeout is None else time.monotonic() + timeout
        token = uuid.uuid4().hex
        while True:
            try:
                self.fs.pipe_file(lease, self._lease_body(token), mode="create")
                self._lease_token = token
                self._renew_stop.clear()
                self._renewer = threading.Thread(target=self._renew, name="cl-serve-lease", daemon=True)
                self._renewer.start()
                return
            except Exception as e:  # the conditional PUT failed: someone holds the lease (or the store is down)
                try:
                    held = json.loads(self.fs.cat_file(lease))
                except FileNotFoundError:
                    continue  # released in between: try again
                except Exception:
                    raise StoreError(f"cannot take the writer lease on {self.url}: {type(e).__name__}: {e}") from None
                if held.get("expires_at", 0) < time.time():
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(lease)  # a dead writer's lease: take it over
                    continue
                if not wait or (deadline is not None and time.monotonic() > deadline):
                    raise StoreError(f"store {self.url} is locked by another writer ({held.get('holder')}, "
                                     f"lease until {time.strftime('%H:%M:%S', time.localtime(held['expires_at']))}"
                                     f"); {hint}") from None
                time.sleep(1.0)

    @staticmethod
    def _lease_body(token: str) -> bytes:
        return json.dumps({"holder": f"pid {os.getpid()} on {socket.gethostname()}", "token": token,
                           "expires_at": time.time() + lease_seconds()}).encode()

    def _renew(self) -> None:
        """Push the lease's expiry forward while this writer works (a third of the lease at a time)."""
        while not self._renew_stop.wait(lease_seconds() / 3):
            token = self._lease_token
            with contextlib.suppress(Exception):
                if token and json.loads(self.fs.cat_file(self.path(".lock"))).get("token") == token:
                    self.fs.pipe_file(self.path(".lock"), self._lease_body(token))

    def _release_lease(self) -> None:
        self._renew_stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        lease = self.path(".lock")
        with contextlib.suppress(Exception):
            if json.loads(self.fs.cat_file(lease)).get("token") == self._lease_token:
                self.fs.rm_file(lease)
        self._lease_token = None

    def clean(self, listed: dict[int, set[str]]) -> list[str]:
        """Remove files a crashed re-export uploaded but never switched to (whatever the manifest does not list),
        and version prefixes that never got their manifest (a crashed upload)."""
        removed = []
        for v, names in listed.items():
            for obj in self.fs.ls(self.path("versions", vname(v)), detail=False, refresh=True):
                leaf = obj.rstrip("/").split("/")[-1]
                if leaf != "manifest.json" and leaf not in names:
                    self.fs.rm_file(obj)
                    removed.append(f"{self.url}/versions/{vname(v)}/{leaf}")
        complete = set(self.versions())
        for prefix in self._glob("versions", "*"):
            leaf = prefix.rstrip("/").split("/")[-1]
            if VERSION_NAME.fullmatch(leaf) and int(leaf) not in complete:
                self.fs.rm(prefix, recursive=True)
                removed.append(f"{self.url}/versions/{leaf}")
        return removed
