"""Export a merged (plain timm) model to ONNX with a dynamic batch axis and self-describing metadata.

Uses the modern exporter (`torch.onnx.export(..., dynamo=True)`), traced with batch 2 so the batch dimension
stays symbolic. The file carries, as ONNX metadata, the ordered labels, the preprocessing, version, method and
opset, so a model.onnx (with the weight files it names beside it: `cl_serve.export.external_data`) is enough to
serve it.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from cl_serve.contract.preprocessing import Preprocessing
from cl_serve.export.external_data import save_split

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@contextlib.contextmanager
def exportable_attention(model: torch.nn.Module):
    """Attention with a relative position bias (BEiT) computed through timm's unfused path while exporting: the
    exporter cannot decompose fused attention with a bias at a symbolic batch size ("Cannot view a tensor with
    shape ..."); the unfused path is the same arithmetic. Other families keep fused attention."""
    changed = [m for m in model.modules()
               if getattr(m, "fused_attn", False) and getattr(m, "relative_position_bias_table", None) is not None]
    for m in changed:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in changed:
            m.fused_attn = True


def export_onnx(model: torch.nn.Module, path: str | Path, *, preprocessing: Preprocessing, labels: list[str],
                metadata: dict[str, Any] | None = None, fp16: bool = False, opset: int = OPSET) -> dict[str, Any]:
    """Write `path` and its weight files beside it (write into a directory of its own); returns the export info
    recorded in the manifest (opset, dtype, input/output names, the weight files)."""
    import onnx

    path = Path(path)
    model = model.eval()
    dtype = torch.float16 if fp16 else torch.float32
    if fp16:
        model = model.half()
    x = torch.randn(2, 3, preprocessing.input_size, preprocessing.input_size, dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=4096)
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), exportable_attention(model):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: batch},), opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False)
    program.save(str(path) + ".partial")
    proto = onnx.load(str(path) + ".partial")
    meta = {"cl_serve.labels": json.dumps(labels), "cl_serve.preprocessing": preprocessing.model_dump_json(),
            "cl_serve.opset": str(opset), "cl_serve.dtype": "float16" if fp16 else "float32"}
    for k, v in (metadata or {}).items():
        meta[f"cl_serve.{k}"] = v if isinstance(v, str) else json.dumps(v)
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    data = save_split(proto, path)
    for leftover in path.parent.glob(path.name + ".partial*"):
        leftover.unlink()
    return {"opset": opset, "dtype": meta["cl_serve.dtype"], "input": INPUT_NAME, "output": OUTPUT_NAME,
            "dynamic_batch": True, "data": data}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The cl_serve.* metadata of an exported file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
