"""The Open Inference Protocol (KServe V2, REST) for one image classifier, free of Ray and torch: an infer request
read under the same bounds as /classify, in JSON or with Triton's binary tensor data extension (tritonclient's
default), the response written either way, and the metadata documents.

The model has two inputs, of which a request sends exactly one:
    images        BYTES [N]            encoded image files, one element per image (in JSON: base64 strings)
    pixels        FP32  [N, 3, S, S]   images already preprocessed as the model's metadata says
and two outputs, both returned when a request names none:
    probabilities FP32  [N, C]         softmax over the C classes (with Triton's classification extension,
                                       `"classification": k`, BYTES [N, k] of "score:index:label" instead)
    labels        BYTES [N, k]         the top-k labels, k from the request parameter `top_k` (default: the
                                       server's default_top_k)

Bounds, checked before anything is allocated from a number the client sent: the body's size (the transport's
max_request_bytes), the JSON header's structure (brackets and commas counted before parsing, as /classify's
JSON), N <= max_images, declared sizes against the bytes actually present, every BYTES element's length against
what remains. Errors are BadInput (status + message); the server answers `{"error": ...}` with that status.
"""
from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from cl_serve.serving.api_models import MAX_TOP_K
from cl_serve.serving.model import BadInput
from cl_serve.serving.request_parsing import validate_json

INPUT_IMAGES, INPUT_PIXELS = "images", "pixels"
OUTPUT_PROBABILITIES, OUTPUT_LABELS = "probabilities", "labels"
OUTPUTS = (OUTPUT_PROBABILITIES, OUTPUT_LABELS)
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data", "classification"]
MAX_OPEN_BRACKETS = 32  # a valid header: the request, its inputs, outputs, shapes, data and parameters


class _Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    datatype: StrictStr
    shape: list[StrictInt] = Field(max_length=4)
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Optional[list[Any]] = None


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    parameters: dict[str, Any] = Field(default_factory=dict)


class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Optional[StrictStr] = Field(None, max_length=256)
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[_Tensor] = Field(min_length=1, max_length=1)
    outputs: Optional[list[_Output]] = Field(None, min_length=1, max_length=len(OUTPUTS))


@dataclass
class Output:
    """One output the client asked for: in binary or in JSON, and for probabilities Triton's `classification`."""

    name: str
    binary: bool = False
    classification: int = 0


@dataclass
class InferRequest:
    """A parsed infer request: exactly one of `images` (encoded files) and `pixels` (N, 3, S, S) is set."""

    id: Optional[str]
    images: Optional[list[bytes]] = None
    pixels: Optional[np.ndarray] = None
    outputs: list[Output] = field(default_factory=list)
    top_k: Optional[int] = None


def _param(params: dict[str, Any], key: str, kind: type, low: int = 1, high: int = MAX_TOP_K) -> Any:
    value = params.get(key)
    if value is None:
        return None
    if kind is bool and not isinstance(value, bool):
        raise BadInput(400, f"parameter {key!r} must be true or false")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise BadInput(400, f"parameter {key!r} must be an integer from {low} to {high}")
    return value


def _split_body(body: bytes, header_length: Optional[str]) -> tuple[bytes, bytes]:
    """The JSON header and the binary section (empty without the binary extension)."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not text.isdigit() or len(text) > 12 or int(text) > len(body) or int(text) == 0:
        raise BadInput(400, f"Inference-Header-Content-Length must be the JSON header's size in bytes, 1 to "
                            f"{len(body)} for this body; got {header_length[:20]!r}")
    return body[:int(text)], body[int(text):]


def _header(raw: bytes, max_elements: int) -> _Header:
    if raw.count(b"[") + raw.count(b"{") > MAX_OPEN_BRACKETS:
        raise BadInput(400, "invalid inference header: too deeply nested or too many objects (tensor data is one "
                            "flat array)")
    if raw.count(b",") > max_elements + 64:
        raise BadInput(413, f"inference header has over {max_elements} elements: more than a request may hold")
    return validate_json(_Header, raw, what="inference header", invalid_status=400, limit=3)


def _bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """Triton's BYTES serialisation: each element a little-endian uint32 length, then that many bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if len(out) == count or pos + 4 > len(raw):
            raise BadInput(400, f"BYTES data holds more than its shape's {count} elements or a cut length prefix")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise BadInput(400, f"BYTES element {len(out)} declares {n} bytes; {len(raw) - pos - 4} remain")
        out.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    if len(out) != count:
        raise BadInput(400, f"BYTES data holds {len(out)} elements; its shape says {count}")
    return out


def _batch_size(t: _Tensor, per_item: tuple[int, ...], max_images: int) -> int:
    allowed = [per_item] if per_item else [(), (1,)]  # images: [N] or [N, 1]
    if not t.shape or any(d < 0 for d in t.shape) or tuple(t.shape[1:]) not in allowed:
        want = "[N]" if not per_item else "[N, " + ", ".join(map(str, per_item)) + "]"
        raise BadInput(400, f"input {t.name!r} must have shape {want}; got {t.shape}")
    n = t.shape[0]
    if n == 0:
        raise BadInput(400, f"input {t.name!r} holds no images")
    if n > max_images:
        raise BadInput(413, f"{n} images in one request; the limit is {max_images}")
    return n


def _images(t: _Tensor, binary: Optional[bytes], max_images: int) -> list[bytes]:
    if t.datatype != "BYTES":
        raise BadInput(400, f"input 'images' has datatype BYTES (encoded image files); got {t.datatype[:20]!r}")
    n = _batch_size(t, (), max_images)
    if binary is not None:
        return _bytes_elements(binary, n)
    if not isinstance(t.data, list) or len(t.data) != n or not all(isinstance(s, str) and s for s in t.data):
        raise BadInput(400, f"input 'images' in JSON needs 'data': {n} base64 strings (one per image)")
    try:
        return [base64.b64decode(s, validate=True) for s in t.data]
    except (binascii.Error, ValueError):
        raise BadInput(400, "an element of 'images' is not valid base64") from None


def _pixels(t: _Tensor, binary: Optional[bytes], size: int, max_images: int) -> np.ndarray:
    if t.datatype != "FP32":
        raise BadInput(400, f"input 'pixels' has datatype FP32; got {t.datatype[:20]!r}")
    n = _batch_size(t, (3, size, size), max_images)
    count = n * 3 * size * size
    if binary is not None:
        if len(binary) != 4 * count:
            raise BadInput(400, f"input 'pixels' of shape {t.shape} needs {4 * count} bytes; got {len(binary)}")
        x = np.frombuffer(binary, dtype="<f4").astype(np.float32)
    else:
        if not isinstance(t.data, list) or len(t.data) != count:
            raise BadInput(400, f"input 'pixels' of shape {t.shape} needs 'data': {count} numbers, flat")
        try:
            x = np.asarray(t.data, dtype=np.float32)
        except (TypeError, ValueError):
            raise BadInput(400, "input 'pixels': every element of 'data' must be a number") from None
        if x.shape != (count,):
            raise BadInput(400, f"input 'pixels' needs 'data': {count} numbers, flat")
    if not np.isfinite(x).all():
        raise BadInput(400, "input 'pixels' holds NaN or infinite values")
    return x.reshape(n, 3, size, size)


def _outputs(header: _Header) -> list[Output]:
    default_binary = _param(header.parameters, "binary_data_output", bool) or False
    if header.outputs is None:
        return [Output(name, default_binary) for name in OUTPUTS]
    out = []
    for o in header.outputs:
        if o.name not in OUTPUTS or any(x.name == o.name for x in out):
            raise BadInput(400, f"unknown or repeated output {o.name[:40]!r}; the outputs are {list(OUTPUTS)}")
        binary = _param(o.parameters, "binary_data", bool)
        k = _param(o.parameters, "classification", int) or 0
        if k and o.name != OUTPUT_PROBABILITIES:
            raise BadInput(400, f"'classification' applies to output {OUTPUT_PROBABILITIES!r} only")
        out.append(Output(o.name, default_binary if binary is None else binary, k))
    return out


def parse_infer(body: bytes, header_length: Optional[str], *, input_size: int, max_images: int) -> InferRequest:
    """An infer request's body (and its Inference-Header-Content-Length header, None without the binary
    extension) for a model whose `pixels` are (3, input_size, input_size). Raises BadInput."""
    if not body:
        raise BadInput(400, "empty request body: send an inference request (JSON, or Triton's binary extension)")
    raw, binary = _split_body(body, header_length)
    header = _header(raw, max_images * 3 * input_size * input_size)
    t = header.inputs[0]
    size = _param(t.parameters, "binary_data_size", int, 0, len(binary))
    if size is not None and t.data is not None:
        raise BadInput(400, f"input {t.name!r} has both 'data' and binary_data_size")
    if size is None and t.data is None:
        raise BadInput(400, f"input {t.name!r} has neither 'data' nor binary_data_size")
    if len(binary) != (size or 0):
        raise BadInput(400, f"the binary section holds {len(binary)} bytes; the inputs declare {size or 0}")
    chunk = binary if size is not None else None
    request = InferRequest(id=header.id, outputs=_outputs(header),
                           top_k=_param(header.parameters, "top_k", int))
    if t.name == INPUT_IMAGES:
        request.images = _images(t, chunk, max_images)
    elif t.name == INPUT_PIXELS:
        request.pixels = _pixels(t, chunk, input_size, max_images)
    else:
        raise BadInput(400, f"unknown input {t.name[:40]!r}: send {INPUT_IMAGES!r} (BYTES, encoded images) or "
                            f"{INPUT_PIXELS!r} (FP32 [N, 3, {input_size}, {input_size}])")
    return request


def _serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def _tensor(out: Output, probs: np.ndarray, labels: list[str], top_k: int) -> tuple[dict[str, Any], Any]:
    """One output's metadata and its values (a float32 array or a list of strings)."""
    if out.name == OUTPUT_PROBABILITIES and not out.classification:
        return {"name": out.name, "datatype": "FP32", "shape": list(probs.shape)}, probs
    k = max(1, min(out.classification or top_k, probs.shape[1]))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    if out.name == OUTPUT_PROBABILITIES:  # Triton's classification extension
        values = [f"{probs[r, i]:.6f}:{i}:{labels[i]}" for r in range(len(probs)) for i in top[r]]
    else:
        values = [labels[i] for row in top for i in row]
    return {"name": out.name, "datatype": "BYTES", "shape": [len(probs), k]}, values


def encode_response(request: InferRequest, *, model_name: str, version: int, canary: bool, logits: np.ndarray,
                    labels: list[str], default_top_k: int) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or with any binary output the binary extension's JSON header
    followed by the outputs' bytes in order."""
    probs = _softmax(logits)
    outputs, blobs = [], []
    for out in request.outputs:
        meta, values = _tensor(out, probs, labels, request.top_k or default_top_k)
        if out.binary:
            blob = values.tobytes() if isinstance(values, np.ndarray) else _serialize_bytes(
                [v.encode() for v in values])
            meta["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            meta["data"] = values.ravel().tolist() if isinstance(values, np.ndarray) else values
        outputs.append(meta)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": str(version), "outputs": outputs,
                           "parameters": {"canary": canary}}
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      "Inference-Header-Content-Length": str(len(header))}


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "cl-serve", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(name: str, version: int, versions: list[int], num_classes: int,
                   preprocessing: dict[str, Any]) -> dict[str, Any]:
    """GET /v2/models/{name}[/versions/{v}]: the inputs and outputs of `version`, the store's versions, and the
    preprocessing that `pixels` must already have had (mean, std, sizes, interpolation)."""
    size = int(preprocessing["input_size"])
    return {"name": name, "versions": [str(v) for v in versions], "platform": "onnxruntime_onnx",
            "inputs": [{"name": INPUT_IMAGES, "datatype": "BYTES", "shape": [-1]},
                       {"name": INPUT_PIXELS, "datatype": "FP32", "shape": [-1, 3, size, size]}],
            "outputs": [{"name": OUTPUT_PROBABILITIES, "datatype": "FP32", "shape": [-1, num_classes]},
                        {"name": OUTPUT_LABELS, "datatype": "BYTES", "shape": [-1, -1]}],
            "parameters": {"version": version, "preprocessing": preprocessing}}


def pixel_bytes(max_images: int, input_size: int) -> int:
    """The most bytes a `pixels` input may hold: what an FP32 request costs at most beyond its body."""
    return 4 * max_images * 3 * input_size * input_size

