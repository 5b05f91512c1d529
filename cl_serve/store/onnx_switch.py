"""Attach a re-exported ONNX model (a graph file and the weight files it reads) to a published version without
ever rewriting a file in place: `cl-serve export` (fp32 again, fp16, another opset) and `--int8` go through here.

The new graph gets a new, content-addressed name (`model[.fp16|.int8].<sha256[:12]>.onnx`); its weight files are
named by their content already (`cl_serve.export.external_data`), so one the version holds is kept and the others
join it — the large ones into the store's shared content, like a publish. Then manifest.json is replaced
atomically: the one switch (before it the old graph is served, after it the new one; both manifests verify). Only
then are the files no entry of the manifest lists any more removed. A crash at any point leaves the version
verifiable; files left unlisted are removed by the next writer, shared content no version lists by `prune`.
Stdlib + pydantic.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from cl_serve.contract.store_schema import ONNX_PRECISIONS, OnnxInfo
from cl_serve.store.backends import atomic_write_text, fault_point, fsync_dir, sha256_file, vname
from cl_serve.store.model_store import Store, VerifiedVersion, settle_file


@contextlib.contextmanager
def staging_dir(store: Store, version: int) -> Iterator[Path]:
    """A fresh directory inside the version's own (same filesystem: files move in by rename) to write a graph and
    its weight files into; removed afterwards, and by the next writer after a crash (`.*.tmp`)."""
    path = store.version_dir(version) / f".onnx-{uuid.uuid4().hex[:8]}.tmp"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _move_in(store: Store, handle: VerifiedVersion, sources: dict[str, Path]) -> tuple[dict[str, str], list[str]]:
    """Move the new files into the version's directory and into the store (shared when large); returns their
    sha256 and the names kept as shared content."""
    d, rel = handle.path, f"versions/{vname(handle.number)}"
    added, shared = {}, []
    for name, src in sources.items():
        added[name] = sha256_file(src)
        settle_file(src)
        os.replace(src, d / name)
    fsync_dir(d)
    for name, digest in added.items():
        if store.share_if_large(d / name, digest):
            shared.append(name)
        else:
            store.backend.put(f"{rel}/{name}")
    return added, shared


def switch_onnx(store: Store, version: int | VerifiedVersion, graph: Path, info: dict[str, Any],
                precision: str = "fp32") -> str:
    """Attach the graph `graph` (its weight files `info["data"]` beside it) as the version's `precision` model;
    returns the graph's name in the version (unchanged when it is the same bytes)."""
    handle = version if isinstance(version, VerifiedVersion) else store.verified(version)
    d, m, rel = handle.path, handle.manifest, f"versions/{vname(handle.number)}"
    digest, data = sha256_file(graph), list(info.get("data", []))
    old = m.onnx_file(precision)
    if old is not None and m.files[old] == digest:  # the graph names its weight files by content: all the same
        return old
    name = f"model{'' if precision == 'fp32' else '.' + precision}.{digest[:12]}.onnx"
    sources = {n: graph.parent / n for n in data if n not in m.files}  # a listed weight file is these bytes
    added, shared = _move_in(store, handle, {**sources, name: graph})
    fault_point("export-before-manifest")
    others = set().union(*(set(m.onnx_files(p)) for p in ONNX_PRECISIONS if p != precision))
    dropped = set(m.onnx_files(precision)) - others - {name, *data}
    files = {k: h for k, h in m.files.items() if k not in dropped} | added
    new = m.model_copy(update={ONNX_PRECISIONS[precision][0]: OnnxInfo(**{**info, "file": name, "data": data}),
                               "files": files, "shared": sorted((set(m.shared) | set(shared)) & set(files))})
    atomic_write_text(d / "manifest.json", new.model_dump_json(indent=2))
    store.backend.put(f"{rel}/manifest.json")  # the switch
    fault_point("export-before-cleanup")
    for gone in sorted(dropped):
        with contextlib.suppress(FileNotFoundError):
            (d / gone).unlink()
        if gone not in m.shared:  # shared content stays until no version lists it (prune's sweep)
            with contextlib.suppress(FileNotFoundError):
                store.backend.delete(f"{rel}/{gone}")
    fsync_dir(d)
    return name
