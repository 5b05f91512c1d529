"""Store an ONNX file's large weights beside it, one external-data file per tensor named by its content.

ONNX's external-data format lets a graph read a tensor's bytes from another file (`location`, `offset`,
`length`), which ONNX Runtime resolves relative to the graph's directory. Naming each file by the sha256 of its
bytes (`weights-<sha256>.bin`) makes a tensor that did not change between two versions the same file in both — the
model store then keeps it once (`cl_serve.store.model_store`). Tensors below `MIN_EXTERNAL_BYTES` (biases, norms)
stay inside the graph. No torch: onnx only.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from cl_serve.base.atomic_files import atomic_write_bytes

MIN_EXTERNAL_BYTES = 4096  # weight matrices and the larger biases; norms and small biases stay inline


def data_file_name(digest: str) -> str:
    return f"weights-{digest}.bin"


def _write_once(path: Path, data: bytes) -> None:
    """Write `path` atomically unless a file of that (content-derived) name is already there."""
    if not path.is_file():
        atomic_write_bytes(path, data)


def save_split(model, path: str | Path, min_bytes: int = MIN_EXTERNAL_BYTES) -> list[str]:
    """Write the in-memory ONNX `model` to `path` with every initializer of at least `min_bytes` read from its own
    content-named file in the same directory; returns those file names (sorted, each once). The weight files are
    written first, then the graph atomically."""
    import onnx
    from onnx.external_data_helper import set_external_data

    path = Path(path)
    names: set[str] = set()
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < min_bytes:
            continue
        raw = tensor.raw_data
        name = data_file_name(hashlib.sha256(raw).hexdigest())
        _write_once(path.parent / name, raw)
        names.add(name)
        set_external_data(tensor, location=name, offset=0, length=len(raw))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
    atomic_write_bytes(path, model.SerializeToString())
    return sorted(names)


def load_model(path: str | Path):
    """The ONNX model at `path` with its weights read in. onnx's own loader refuses a weight file with more than one
    hard link (its guard against a link planted in an untrusted model's directory), and a store keeps shared
    weights exactly so (`cl_serve.store.model_store`); this reads only plain file names in the graph's directory,
    whose bytes the store has verified against its manifest."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        if Path(info.location).name != info.location or info.location.startswith("."):
            raise ValueError(f"{path.name}: tensor {tensor.name} names {info.location!r}, not a file beside the graph")
        with open(path.parent / info.location, "rb") as f:
            f.seek(info.offset or 0)
            raw = f.read(info.length) if info.length else f.read()
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = raw
    return model


def onnx_bytes(graph: str | Path) -> int:
    """The bytes of an ONNX model: its graph file and every weight file it reads."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    graph = Path(graph)
    model = onnx.load(str(graph), load_external_data=False)
    names = {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}
    return graph.stat().st_size + sum((graph.parent / n).stat().st_size for n in names)
