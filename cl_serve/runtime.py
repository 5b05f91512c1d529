"""Serving runtime, free of Ray and torch: load a verified version into ONNX Runtime, watch the store and
hot-swap, and decode request images safely.

`ModelWatcher` polls the store's CURRENT (and accepts explicit loads); a new version is verified (sha256 of every
file), its session created and warmed up, and only then is the single `model` reference replaced, so a request
that already holds the old model finishes on it. A version that fails to load is refused, the old one keeps
serving, and `status()` says why.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from cl_serve.errors import StoreError
from cl_serve.contract.store_schema import version_state
from cl_serve.store import Manifest, Store
from cl_serve.open_store import open_store
from cl_serve.contract.image_decode import ImageLimits, ImageRejected, open_bounded
from cl_serve.contract.preprocessing import Preprocessing, preprocess_image

log = logging.getLogger("cl_serve")


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


def choose_onnx_file(manifest: Manifest, providers: list[str]) -> str | None:
    """The file to load: the fp16 export on a GPU provider when the version has one, else the fp32 file."""
    if providers and providers[0] != "CPUExecutionProvider" and manifest.onnx_file(fp16=True):
        return manifest.onnx_file(fp16=True)
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

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {"version": self.version, "labels": self.labels, "num_classes": len(self.labels),
                "tasks": [{"index": t["index"], "labels": t["labels"], "version": t["version"]} for t in m["tasks"]],
                "method": m["method"], "backbone": m["backbone"], "preprocessing": self.preprocessing.model_dump(),
                "metrics": m["metrics"], "created_at": m["created_at"], "onnx": m["onnx"],
                "onnx_file": self.onnx_file, "providers": self.session.get_providers()}


def load_version(store: Store, version: int, intra_op_threads: int | None = None) -> LoadedModel:
    """Verify and load one version; raises StoreError with the reason when it cannot be served.

    On a GPU provider the version's fp16 file is preferred when it has one; `LoadedModel.info()` reports the file
    and the providers actually used.
    """
    import onnxruntime as ort

    m = store.verified(version).manifest
    providers = onnx_providers()
    name = choose_onnx_file(m, providers)
    if name is None:
        raise StoreError(f"version {version} has no ONNX file (published with --no-export); "
                         f"run `cl-serve export --version {version}`")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
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


class ModelWatcher:
    """Keeps `self.model` on the store's live version (or a pinned one), swapping atomically."""

    def __init__(self, store_root: str, poll_interval_s: float = 1.0, intra_op_threads: int | None = None,
                 on_event: Callable[[str, int], None] | None = None):
        self.store = open_store(store_root)
        self.on_event = on_event or (lambda kind, version: None)  # ("swap"|"refused"|"tick", version): metrics
        self.poll_interval_s = poll_interval_s
        self.intra_op_threads = intra_op_threads
        self.model: LoadedModel | None = None
        self.pinned: int | None = None
        self.last_error: str | None = None
        self.refused: dict[int, str] = {}
        self.store_error: str | None = None  # CURRENT unreadable or broken (the reason includes the fix)
        self.fix_hint: str | None = None  # computed once per refusal: which version to roll back to
        self._refused_stamp: dict[int, tuple] = {}  # the version's files when it was refused
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.swaps = 0
        self._candidate: tuple[float, int | None] = (float("-inf"), None)  # (when looked up, newest candidate)
        self.check()
        self._thread = threading.Thread(target=self._loop, name="cl-serve-watcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.check()
                if self.model is not None:
                    self.on_event("tick", self.model.version)
            except Exception as e:  # never let the watcher die
                self.last_error = f"watcher: {type(e).__name__}: {e}"
                log.exception("watcher iteration failed")

    def wanted_version(self) -> int | None:
        return self.pinned if self.pinned is not None else self.store.current()

    def check(self) -> None:
        """One poll: load the wanted version if it differs from the served one."""
        try:
            want = self.wanted_version()
        except StoreError as e:
            self.last_error = self.store_error = str(e)
            return
        self.store_error = None
        if want is None and self.model is not None:  # CURRENT was deleted under a serving replica
            self.store_error = (f"broken store: CURRENT is missing; version {self.model.version} keeps serving; "
                                f"{self.store.fix_hint()}")
            return
        if want is None or (self.model is not None and self.model.version == want):
            return
        self.load(want)

    def _version_stamp(self, version: int) -> tuple:
        """What a refusal is tied to: every file of the version with its size and modification time, so restoring
        any file (not only the manifest) makes the version worth trying again."""
        d = self.store.version_dir(version)
        try:
            stats = ((p.name, p.stat()) for p in d.iterdir() if p.is_file())
            return tuple(sorted((name, st.st_mtime_ns, st.st_size) for name, st in stats))
        except OSError:
            return ()

    def load(self, version: int) -> bool:
        """Load and swap to `version`; on failure keep the old model and record why (not retried until the
        version's files change)."""
        with self._lock:
            if self.refusal(version) is not None:
                return False
            stamp = self._version_stamp(version)
            try:
                new = load_version(self.store, version, self.intra_op_threads)
            except StoreError as e:
                self.refused[version], self._refused_stamp[version] = str(e), stamp
                self.last_error = f"refused version {version}: {e}"
                self.fix_hint = self.store.fix_hint()
                log.warning(self.last_error)
                self.on_event("refused", version)
                return False
            self.model = new  # the swap: one reference assignment; in-flight batches keep the old object
            self.swaps += 1
            self.last_error = None
            log.info("serving version %d", version)
            self.on_event("swap", version)
            return True

    def refusal(self, version: int) -> str | None:
        """Why `version` was refused, or None. A refusal lapses as soon as any of the version's files changes (a
        restored file is tried again, without a restart)."""
        if version not in self.refused:
            return None
        if self._refused_stamp.get(version) != self._version_stamp(version):
            self.refused.pop(version, None)
            self._refused_stamp.pop(version, None)
            return None
        return self.refused[version]

    def newest_candidate(self) -> int | None:
        """The newest version above the served one that the release gate refused (a candidate), for the canary;
        looked up at most once per poll interval (a few manifest reads, never a hash check)."""
        checked, found = self._candidate
        if time.monotonic() - checked < self.poll_interval_s:
            return found
        serving = self.model.version if self.model is not None else 0
        found = None
        try:
            for v in sorted((v for v in self.store.versions() if v > serving), reverse=True):
                if self.refusal(v) is not None:
                    continue
                gate = self.store.manifest(v).gate
                if gate is not None and not gate.passed:
                    found = v
                    break
        except StoreError:
            found = None
        self._candidate = (time.monotonic(), found)
        return found

    def load_pinned(self, version: int) -> LoadedModel:
        """Load an explicit version (`POST /classify?version=N`, a canary's candidate), verified like any other;
        the deployment keeps what this returns in Serve's per-replica model cache (`@serve.multiplexed`).
        BadInput 404 for a version the store does not have, 409 for one that cannot be served."""
        with self._lock:
            if version not in self.store.versions():
                raise BadInput(404, f"version {version} does not exist")
            refused = self.refusal(version)
            if refused is not None:
                raise BadInput(409, f"version {version} cannot be served: {refused}")
            stamp = self._version_stamp(version)
            try:
                loaded = load_version(self.store, version, self.intra_op_threads)
            except StoreError as e:
                self.refused[version], self._refused_stamp[version] = str(e), stamp
                self.on_event("refused", version)
                raise BadInput(409, f"version {version} cannot be served: {e}") from None
            return loaded

    def list_versions(self) -> list[dict[str, Any]]:
        """Every version with parent, task, classes, accuracies, release-gate decision and state (for
        GET /v1/versions): `state` in the store's one vocabulary (cl_serve.contract.store_schema.VERSION_STATES:
        live, published, candidate, broken: unreadable, or refused by this replica, with the error), and `serving`
        (this replica's model)."""
        try:
            current = self.store.current()
        except StoreError:
            current = None
        serving = self.model.version if self.model is not None else None
        rows = []
        for v in self.store.versions():
            row: dict[str, Any] = {"version": v, "live": v == current, "serving": v == serving}
            try:
                m = self.store.manifest(v)
            except StoreError as e:
                rows.append({**row, "state": version_state(live=v == current, gate=None, error=str(e)),
                             "error": str(e)})
                continue
            test = m.metrics.test.per_task if m.metrics.test else []
            gate = m.gate
            row.update({"parent": m.parent, "task": m.task_index, "created_at": m.created_at,
                        "classes": len(m.labels), "new_labels": m.tasks[-1].labels if m.tasks else [],
                        "method": m.method.name, "head": m.head.name,
                        "per_task_accuracy": {str(t.task): t.accuracy for t in (gate.tasks if gate else [])
                                              if t.accuracy is not None}
                        or {str(t.task): t.accuracy for t in test},
                        "accuracy_source": "gate" if gate else ("test" if test else None),
                        "gate": None if not gate else {"passed": gate.passed, "reasons": gate.reasons}})
            refused = self.refusal(v)
            row["state"] = version_state(live=v == current, gate=m.gate, error=refused)
            if refused is not None:
                row["error"] = refused
            rows.append(row)
        return rows

    def unavailable_reason(self) -> str | None:
        """Why nothing is served (None when a model is): what a request or /healthz tells the operator."""
        if self.model is not None:
            return None
        if self.store_error:
            return self.store_error
        want = self.pinned if self.pinned is not None else None
        if want is None:
            try:
                want = self.store.current()
            except StoreError as e:
                return str(e)
        if want is None:
            return "no model version is live yet: publish one with `cl-serve add-task`"
        if want in self.refused:
            return f"live version {want} cannot be served ({self.refused[want]}); {self.fix_hint}"
        return f"version {want} is loading"

    def status(self) -> dict[str, Any]:
        m = self.model
        live: Any
        try:
            live = self.store.current()
        except StoreError as e:
            live = None
            self.store_error = str(e)
        return {"ready": m is not None, "version": m.version if m else None, "store_current": live,
                "store_error": self.store_error, "reason": self.unavailable_reason(),
                "pinned": self.pinned, "last_error": self.last_error,
                "refused_versions": {str(k): v for k, v in self.refused.items()}, "swaps": self.swaps,
                "onnx_file": m.onnx_file if m else None, "providers": m.session.get_providers() if m else None,
                "watcher_alive": self.alive}


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
