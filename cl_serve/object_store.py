"""The model store on object storage (s3://bucket/prefix, gs://..., any fsspec URL), with the local store's
guarantees.

A `MirroredStore` keeps the store under a bucket prefix and mirrors what it reads into a local cache directory
($CL_SERVE_CACHE, else ~/.cache/cl-serve/<hash of the URL>), where the ordinary `Store` code verifies, loads and
writes; only the hooks that touch the bucket differ. How each guarantee holds:

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
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from cl_serve.errors import StoreError
from cl_serve.store import Manifest, Store, StoreConfig, VersionWriter, fault_point, vname

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


class MirroredStore(Store):
    def __init__(self, url: str, cache_dir: str | Path | None = None):
        self.url = url.rstrip("/")
        self.fs, self.remote = open_filesystem(self.url)
        super().__init__(Path(cache_dir or cache_root()) / hashlib.sha256(self.url.encode()).hexdigest()[:16])
        self._lease_token: str | None = None
        self._renewer: threading.Thread | None = None
        self._renew_stop = threading.Event()

    @property
    def name(self) -> str:
        return self.url

    def _glob(self, *parts: str) -> list[str]:
        """A listing of the bucket as it is now (fsspec caches listings, which other writers make stale)."""
        self.fs.invalidate_cache()
        return self.fs.glob(self._r(*parts))

    def _r(self, *parts: str) -> str:
        return "/".join([self.remote, *parts])

    def _identity(self, rel: str) -> str | None:
        """What changes whenever the object is rewritten (S3 ETag, GCS generation), or None if it is missing."""
        try:
            return object_identity(self.fs.info(self._r(rel)))
        except FileNotFoundError:
            return None

    def _fetch(self, rel: str) -> bool:
        """Download one object to the same relative path in the cache (atomically), remembering its identity;
        False if it is missing."""
        local = self.root / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.tmp")
        identity = self._identity(rel)
        try:
            self.fs.get_file(self._r(rel), str(tmp))
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            return False
        os.replace(tmp, local)
        local.with_name(f".{local.name}.id").write_text(identity or "")
        return True

    def _fresh_copy(self, rel: str) -> None:
        """Make the cached copy the bucket's current object: download it unless the identities match."""
        local = self.root / rel
        marker = local.with_name(f".{local.name}.id")
        if local.is_file() and marker.is_file() and marker.read_text() == (self._identity(rel) or "-"):
            return
        self._fetch(rel)

    def _upload(self, local: Path, rel: str) -> None:
        self.fs.put_file(str(local), self._r(rel))

    # -- reading -------------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self._r("store.json"))

    def config(self) -> StoreConfig:
        if not self.exists():
            raise StoreError(f"no model store at {self.url} (run `cl-serve init --store {self.url} ...` first)")
        self._fetch("store.json")
        return super().config()

    def policy(self):
        if not self._fetch("policy.json"):
            self.policy_path.unlink(missing_ok=True)
        return super().policy()

    def verify_backbone(self) -> None:
        for name in ("model.safetensors", "card.json"):
            if not (self.backbone_dir / name).is_file():
                self._fetch(f"backbone/{name}")
        try:
            super().verify_backbone()
        except StoreError:
            self._fetch("backbone/model.safetensors")  # a stale or partial cached copy: download once more
            super().verify_backbone()

    def versions(self) -> list[int]:
        found = self._glob("versions", "*", "manifest.json")
        return sorted(int(p.split("/")[-2]) for p in found if re.fullmatch(r"[0-9]{1,9}", p.split("/")[-2]))

    def _read_current(self) -> bytes | None:
        try:
            return self.fs.cat_file(self._r("CURRENT"))[:64]
        except FileNotFoundError:
            return None

    def manifest(self, v: int, verify: bool = True) -> Manifest:
        if v not in self.versions():
            have = ", ".join(map(str, self.versions())) or "none"
            raise StoreError(f"version {v} does not exist in {self.url} (versions: {have})")
        rel = f"versions/{vname(v)}"
        self._fetch(f"{rel}/manifest.json")
        m = super().manifest(v, verify=False)
        if not verify:
            return m
        for name in m.files:  # one HEAD per file: a rewritten object is downloaded again, then verified
            self._fresh_copy(f"{rel}/{name}")
        return super().manifest(v, verify=True)

    # -- writing -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, wait: bool = False, timeout: float | None = None,
             hint: str = "retry later or pass --wait") -> Iterator[None]:
        key = "lease:" + self.url
        if key in Store._held:
            with Store._nested(key):
                yield
            return
        self._acquire_lease(wait, timeout, hint)
        try:
            Store._held[key] = 1
            with super().lock(wait=True, timeout=timeout, hint=hint):  # the cache directory, for local processes
                yield
        finally:
            Store._held.pop(key, None)
            self._release_lease()

    def _acquire_lease(self, wait: bool, timeout: float | None, hint: str) -> None:
        lease = self._r(".lock")
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
                if token and json.loads(self.fs.cat_file(self._r(".lock"))).get("token") == token:
                    self.fs.pipe_file(self._r(".lock"), self._lease_body(token))

    def _release_lease(self) -> None:
        self._renew_stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        lease = self._r(".lock")
        with contextlib.suppress(Exception):
            if json.loads(self.fs.cat_file(lease)).get("token") == self._lease_token:
                self.fs.rm_file(lease)
        self._lease_token = None

    def clean_stale_temporaries(self) -> list[str]:
        """Also remove version prefixes in the bucket that never got their manifest (a crashed upload)."""
        removed = super().clean_stale_temporaries()
        complete = set(self.versions())
        for v in complete:  # files a crashed re-export uploaded but never switched to
            listed = set(Store.manifest(self, v, verify=False).files) if (self.version_dir(v) / "manifest.json"
                                                                           ).is_file() else None
            if listed is None:
                continue
            for obj in self.fs.ls(self._r("versions", vname(v)), detail=False, refresh=True):
                leaf = obj.rstrip("/").split("/")[-1]
                if leaf.startswith("model") and leaf.endswith(".onnx") and leaf not in listed:
                    self.fs.rm_file(obj)
                    removed.append(f"{self.url}/versions/{vname(v)}/{leaf}")
        for prefix in self._glob("versions", "*"):
            leaf = prefix.rstrip("/").split("/")[-1]
            if re.fullmatch(r"[0-9]{1,9}", leaf) and int(leaf) not in complete:
                self.fs.rm(prefix, recursive=True)
                removed.append(f"{self.url}/versions/{leaf}")
        return removed

    def create(self, config: StoreConfig) -> None:
        if self.exists():
            raise StoreError(f"{self.url} already holds a store (store.json exists); use another --store")
        self.config_path.unlink(missing_ok=True)  # a cache left from an earlier store at the same URL
        super().create(config)
        for p in sorted(self.backbone_dir.iterdir()):
            if p.is_file() and not p.name.startswith("."):
                self._upload(p, f"backbone/{p.name}")
        self._upload(self.config_path, "store.json")  # last: the store exists once store.json does

    def new_version(self) -> VersionWriter:
        numbers = [int(p.rstrip("/").split("/")[-1]) for p in self._glob("versions", "*")
                   if re.fullmatch(r"[0-9]{1,9}", p.rstrip("/").split("/")[-1])]
        local = super().versions()
        return VersionWriter(self, max(numbers + local + [0]) + 1)

    def publish(self, writer: VersionWriter, manifest: Manifest, make_current: bool = True) -> int:
        v = super().publish(writer, manifest, make_current=False)  # hashed, manifest written, in the cache
        rel, d = f"versions/{vname(v)}", self.version_dir(v)
        for name in Store.manifest(self, v, verify=False).files:
            self._upload(d / name, f"{rel}/{name}")
            (d / f".{name}.id").write_text(self._identity(f"{rel}/{name}") or "")
        fault_point("remote-before-manifest")
        self._upload(d / "manifest.json", f"{rel}/manifest.json")  # the version is visible from here on
        fault_point("remote-before-current")
        if make_current:
            self.set_current(v)
        return v

    def set_current(self, v: int) -> None:
        self.manifest(v, verify=True)
        self.fs.pipe_file(self._r("CURRENT"), (vname(v) + "\n").encode())

    def set_policy(self, policy: Any) -> None:
        super().set_policy(policy)
        self._upload(self.policy_path, "policy.json")

    def switch_onnx(self, v: int, source: Path, info: dict[str, Any], fp16: bool = False) -> str:
        old = self.manifest(v, verify=True).onnx_file(fp16)
        name = super().switch_onnx(v, source, info, fp16)
        if name != old:
            rel = f"versions/{vname(v)}"
            self._upload(self.version_dir(v) / name, f"{rel}/{name}")
            self._upload(self.version_dir(v) / "manifest.json", f"{rel}/manifest.json")  # the switch
            if old is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self._r(rel, old))
        return name
