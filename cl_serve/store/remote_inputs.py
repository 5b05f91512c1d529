"""Inputs named by URL: a training, test or gate folder (ImageFolder) or a backbone checkpoint staged in object
storage (s3://bucket/prefix, gs://..., any fsspec URL) is copied into a local cache before use, so the folder
scanner and the checkpoint loader only ever see plain files. Local paths pass through unchanged.

The cache ($CL_SERVE_CACHE, else ~/.cache/cl-serve, under `inputs/<hash of the URL>`) is synchronised, not just
filled: an object is downloaded again when its identity (S3 ETag, GCS generation) changed, files no
longer in the bucket are removed, and every download lands in a per-process folder beside the copy and is renamed
into place, so an interrupted copy never leaves a half-written image that a later run would take for a whole one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from cl_serve.base.errors import UserError
from cl_serve.base.progress import progress as progress_reporter
from cl_serve.store.object_backend import cache_root, object_identity, open_filesystem


def is_url(path: str | Path) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


def _cache_dir(url: str) -> Path:
    return cache_root() / "inputs" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _listing(fs, remote: str, url: str, single_file: bool) -> dict[str, dict]:
    """Relative name -> object info for a prefix (every object under it) or for one file (and a card.json beside
    it, which a checkpoint may carry)."""
    fs.invalidate_cache()
    if single_file:
        try:
            found = {remote.rsplit("/", 1)[-1]: fs.info(remote)}
        except FileNotFoundError:
            raise UserError(f"no such object: {url}") from None
        card = remote.rsplit("/", 1)[0] + "/card.json"
        if fs.exists(card):
            found["card.json"] = fs.info(card)
        return found
    prefix = remote.rstrip("/") + "/"
    found = {name[len(prefix):]: info for name, info in fs.find(prefix, detail=True).items()
             if name.startswith(prefix) and info.get("type", "file") == "file"}
    if not found:
        raise UserError(f"nothing under {url}: stage the folder there first (one sub-folder of images per class)")
    return found


def local_copy(path: str | Path, *, single_file: bool = False, progress: bool = True) -> Path:
    """The local path to read `path` from: itself when local, else a synchronised cached copy of the URL (a file
    when `single_file`, else the folder)."""
    if not is_url(path):
        return Path(path)
    url = str(path).rstrip("/")
    fs, remote = open_filesystem(url, UserError)
    listing = _listing(fs, remote, url, single_file)
    cache = _cache_dir(url)
    tree, index_file = cache / "tree", cache / "index.json"
    tree.mkdir(parents=True, exist_ok=True)
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    base = remote.rsplit("/", 1)[0] if single_file else remote.rstrip("/")
    stale = [rel for rel, info in listing.items()
             if index.get(rel) != object_identity(info) or not (tree / rel).is_file()]
    # Downloads land in this process's own folder beside the tree (never inside it, where a half-written file
    # would look like an image) and are renamed into place; folders of processes that died are removed.
    for old in cache.glob("partial-*"):
        if not _pid_alive(old.name.removeprefix("partial-")):
            shutil.rmtree(old, ignore_errors=True)
    partial = cache / f"partial-{os.getpid()}"
    partial.mkdir(exist_ok=True)
    try:
        with progress_reporter(sum(int(listing[rel].get("size") or 0) for rel in stale), f"fetching {url}", "B",
                               enabled=progress and bool(stale)) as bar:
            for n, rel in enumerate(stale):
                target = tree / rel
                if not target.resolve().is_relative_to(tree.resolve()):
                    raise UserError(f"refusing object name {rel!r} under {url}: it leaves the folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{base}/{rel}", str(partial / str(n)))
                os.replace(partial / str(n), target)
                index[rel] = object_identity(listing[rel])
                bar.update(int(listing[rel].get("size") or 0))
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    for file in [p for p in tree.rglob("*") if p.is_file()]:
        if file.relative_to(tree).as_posix() not in listing:
            file.unlink()
    for folder in sorted((p for p in tree.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):  # a class removed from the bucket must not stay as an empty folder
            folder.rmdir()
    index = {rel: ident for rel, ident in index.items() if rel in listing}
    tmp_index = partial.with_name(f"index-{os.getpid()}.json")
    tmp_index.write_text(json.dumps(index))
    os.replace(tmp_index, index_file)
    return tree / next(iter(listing)) if single_file else tree
