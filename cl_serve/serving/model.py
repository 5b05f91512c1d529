"""One served model, free of Ray and torch: load a verified version into an ONNX Runtime session (provider and
file chosen for the hardware), run it, decode and preprocess a request's images within their bounds, and turn
logits into top-k predictions. Watching the store and swapping versions is `cl_serve.serving.watcher`'s job."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cl_serve.base.errors import StoreError
from cl_serve.store.model_store import Manifest, Store
from cl_serve.contract.image_decode import ImageLimits, ImageRejected, open_bounded
from cl_serve.contract.preprocessing import Preprocessing, preprocess_image
from cl_serve.serving.settings import SessionSettings

log = logging.getLogger("cl_serve")


LABELS_DEFAULT, LABELS_MAX = 1000, 10_000  # labels one GET /v1/model returns by default, at most
TASK_LABELS_SHOWN = 20


class BadInput(Exception):
    """A request the server refuses with a 4xx status and a JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def onnx_providers(available: list[str] | None = None, gpu_present: bool | None = None) -> list[str]:
    """Execution providers in preference order: TensorRT, then CUDA, when onnxruntime offers them and a GPU is
    present; CPU always last (override: CL_SERVE_ORT_PROVIDERS=a,b). Arguments exist for tests."""
    forced = os.environ.get("CL_SERVE_ORT_PROVIDERS")
    if forced:
        return [p.strip() for p in forced.split(",") if p.strip()]
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if gpu_present is None:
        gpu_present = os.path.exists("/dev/nvidiactl")
    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available] if gpu_present else []
    return gpu + ["CPUExecutionProvider"]


PRECISIONS = ("fp32", "int8")  # what `serve --precision` may ask for (fp16 follows the provider)


def choose_onnx_file(manifest: Manifest, providers: list[str], precision: str = "fp32") -> str | None:
    """The file to load: with precision int8, the version's int8 file when it has one (else fp32, with a
    warning); the fp16 export on a GPU provider when the version has one; else the fp32 file."""
    if precision == "int8":
        name = manifest.onnx_file("int8")
        if name is not None:
            return name
        log.warning("version %s has no int8 file (cl-serve export --int8 --version %s): serving fp32",
                    manifest.version, manifest.version)
    if providers and providers[0] != "CPUExecutionProvider" and manifest.onnx_file("fp16"):
        return manifest.onnx_file("fp16")
    return manifest.onnx_file()


@dataclass
class LoadedModel:
    version: int
    labels: list[str]
    preprocessing: Preprocessing
    manifest: dict[str, Any]
    session: Any
    input_name: str
    onnx_file: str = "model.onnx"
    loaded_at: float = field(default_factory=time.time)

    input_dtype: Any = np.float32

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: x.astype(self.input_dtype, copy=False)})[0]
        return out.astype(np.float32, copy=False)

    def info(self, labels_offset: int = 0, labels_limit: int = LABELS_DEFAULT) -> dict[str, Any]:
        """What GET /v1/model shows: a window of the labels and, per task, its class count and first labels, so
        the answer stays small at thousands of classes."""
        m = self.manifest
        end = min(len(self.labels), labels_offset + labels_limit)
        return {"version": self.version, "labels": self.labels[labels_offset:end], "labels_offset": labels_offset,
                "labels_next_offset": end if end < len(self.labels) else None, "num_classes": len(self.labels),
                "tasks": [{"index": t["index"], "version": t["version"], "classes": len(t["labels"]),
                           "labels": t["labels"][:TASK_LABELS_SHOWN]} for t in m["tasks"]],
                "method": m["method"], "backbone": m["backbone"], "preprocessing": self.preprocessing.model_dump(),
                "metrics": m["metrics"], "created_at": m["created_at"], "onnx": m["onnx"],
                "onnx_file": self.onnx_file, "providers": self.session.get_providers()}


def load_version(store: Store, version: int, session: SessionSettings | None = None,
                 precision: str = "fp32") -> LoadedModel:
    """Verify and load one version; raises StoreError with the reason when it cannot be served.

    On a GPU provider the version's fp16 file is preferred when it has one; `LoadedModel.info()` reports the file
    and the providers actually used.
    """
    import onnxruntime as ort

    m = store.verified(version).manifest
    providers = onnx_providers()
    name = choose_onnx_file(m, providers, precision)
    if name is None:
        raise StoreError(f"version {version} has no ONNX file (published with --no-export); "
                         f"run `cl-serve export --version {version}`")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    (session or SessionSettings()).apply(opts)
    try:
        sess = ort.InferenceSession(str(store.version_dir(version) / name), opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        raise StoreError(f"version {version}: ONNX Runtime cannot load {name}: {e}") from e
    meta = sess.get_modelmeta().custom_metadata_map
    try:
        labels = json.loads(meta.get("cl_serve.labels", "null"))
    except ValueError:
        labels = None
    if labels != m.labels:
        raise StoreError(f"version {version}: labels in {name} do not match manifest.json")
    p = m.preprocessing
    model = LoadedModel(version, list(m.labels), p, json.loads(m.model_dump_json()), sess, sess.get_inputs()[0].name,
                        onnx_file=name)
    dtype = np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32
    model.input_dtype = dtype
    warm = model.run(np.zeros((2, 3, p.input_size, p.input_size), np.float32))  # warm-up, and a sanity check
    if warm.shape != (2, len(m.labels)) or not np.isfinite(warm).all():
        raise StoreError(f"version {version}: warm-up output {warm.shape} is not (2, {len(m.labels)}) finite logits")
    return model


def prepare_batch(blobs: list[bytes], p: Preprocessing, limits: ImageLimits, max_request_pixels: int) -> np.ndarray:
    """Decode (bounded, see cl_serve.contract.image_decode) and preprocess every image of a request: float32 (n, 3, H, W).
    The request's images together may decode to at most `max_request_pixels` pixels."""
    out, budget = [], max_request_pixels
    for i, b in enumerate(blobs):
        try:
            img = open_bounded(b, limits, min_side=p.scale_size, pixel_budget=budget)
        except ImageRejected as e:
            raise BadInput(e.status, f"image {i}: {e.message}" if len(blobs) > 1 else e.message) from None
        budget -= img.size[0] * img.size[1]
        out.append(preprocess_image(img, p))
    return np.stack(out)


def top_k_predictions(logits: np.ndarray, labels: list[str], k: int) -> list[dict[str, Any]]:
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    k = max(1, min(k, len(labels)))
    out = []
    for row in probs:
        idx = np.argsort(-row)[:k]
        top = [{"label": labels[i], "class_id": int(i), "score": float(row[i])} for i in idx]
        out.append({**top[0], "top_k": top})
    return out
