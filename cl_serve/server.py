"""The Ray Serve application: FastAPI ingress, ONNX Runtime per replica, @serve.batch, hot swap.

    POST /classify   multipart form files (field `file`, repeatable) or JSON {"images": [base64, ...]};
                     optional top_k (form field, JSON key or query). -> {"model_version", "predictions": [...]}
    GET  /healthz    live version and readiness (200 ready, 503 not yet / broken), last refusal reason
    GET  /v1/model   version, labels, tasks, method, metrics of the served model

Every replica runs a `ModelWatcher` on the store (poll interval from the Serve `user_config`; `reconfigure` can
also pin a version). A batch takes the model reference once, so each response is computed by exactly one
version, and that version is what the response reports. Never imports training code.
"""

import asyncio
import base64
import binascii
import json
import logging
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from cl_serve.runtime import BadInput, ModelWatcher, prepare_batch, top_k_predictions

log = logging.getLogger("cl_serve")
app = FastAPI(title="cl-serve", description="Continual image classification with zero-downtime model swaps")

DEFAULTS = {"poll_interval_s": 1.0, "max_request_bytes": 20 * 1024 * 1024, "max_pixels": 40_000_000,
            "max_images": 64, "default_top_k": 5}


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "status": status, **extra})


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256, health_check_period_s=5)
@serve.ingress(app)
class Classifier:
    def __init__(self, store: str, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
                 intra_op_threads: Optional[int] = None):
        self.settings = dict(DEFAULTS)
        self.watcher = ModelWatcher(store, self.settings["poll_interval_s"], intra_op_threads)
        self._infer.set_max_batch_size(max_batch_size)
        self._infer.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)

    # -- Serve hooks ----------------------------------------------------------------------------------------------
    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config: poll_interval_s, max_request_bytes, max_pixels, max_images, default_top_k, and
        `version` (pin that version; null follows CURRENT again)."""
        unknown = set(config) - set(DEFAULTS) - {"version"}
        if unknown:
            raise ValueError(f"unknown user_config keys: {sorted(unknown)}")
        self.settings.update({k: v for k, v in config.items() if k in DEFAULTS})
        self.watcher.poll_interval_s = float(self.settings["poll_interval_s"])
        if "version" in config:
            self.watcher.pinned = config["version"]
            self.watcher.check()

    async def check_health(self) -> None:
        if not self.watcher.alive:
            raise RuntimeError("model watcher thread died")

    # -- inference ------------------------------------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _infer(self, batches: list[np.ndarray]) -> list[tuple[int, list[str], np.ndarray]]:
        model = self.watcher.model  # one reference for the whole batch: a swap never splits it
        sizes = [len(b) for b in batches]
        logits = await asyncio.to_thread(model.run, np.concatenate(batches))
        out, start = [], 0
        for n in sizes:
            out.append((model.version, model.labels, logits[start:start + n]))
            start += n
        return out

    async def _read_images(self, request: Request) -> tuple:
        limit = int(self.settings["max_request_bytes"])
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise BadInput(413, f"request body is {declared} bytes; the limit is {limit}")
        body = await request.body()
        if len(body) > limit:
            raise BadInput(413, f"request body is {len(body)} bytes; the limit is {limit}")
        if not body:
            raise BadInput(400, "empty request body: send multipart files (field 'file') or JSON {\"images\": [...]}")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        top_k = request.query_params.get("top_k")
        if ctype == "multipart/form-data":
            form = await request.form(max_files=int(self.settings["max_images"]) + 1)
            files = form.getlist("file")
            blobs = [await f.read() for f in files if hasattr(f, "read")]
            if not blobs:
                raise BadInput(400, "multipart request without any 'file' field")
            top_k = form.get("top_k", top_k)
        elif ctype == "application/json":
            try:
                payload = json.loads(body)
            except ValueError:
                raise BadInput(400, "body is not valid JSON") from None
            images = payload.get("images") if isinstance(payload, dict) else None
            if not isinstance(images, list) or not images or not all(isinstance(s, str) for s in images):
                raise BadInput(400, 'JSON body must be {"images": ["<base64>", ...]} with at least one image')
            try:
                blobs = [base64.b64decode(s, validate=True) for s in images]
            except (binascii.Error, ValueError):
                raise BadInput(400, "an entry of 'images' is not valid base64") from None
            top_k = payload.get("top_k", top_k)
        else:
            raise BadInput(415, f"unsupported content type {ctype or 'none'}: use multipart/form-data or application/json")
        if len(blobs) > int(self.settings["max_images"]):
            raise BadInput(413, f"{len(blobs)} images in one request; the limit is {self.settings['max_images']}")
        if top_k is not None:
            try:
                top_k = int(top_k)
            except (TypeError, ValueError):
                raise BadInput(400, f"top_k must be an integer, got {top_k!r}") from None
            if top_k < 1:
                raise BadInput(400, "top_k must be >= 1")
        return blobs, top_k

    @app.post("/classify")
    async def classify(self, request: Request):
        model = self.watcher.model
        if model is None:
            return _error(503, "no model version is live yet: publish one with `cl-serve add-task`",
                          **self.watcher.status())
        try:
            blobs, top_k = await self._read_images(request)
            x = await asyncio.to_thread(prepare_batch, blobs, model.preprocessing, int(self.settings["max_pixels"]))
        except BadInput as e:
            return _error(e.status, e.message)
        version, labels, logits = await self._infer(x)
        k = top_k or int(self.settings["default_top_k"])
        return {"model_version": version, "predictions": top_k_predictions(logits, labels, k)}

    @app.get("/healthz")
    async def healthz(self):
        st = self.watcher.status()
        return JSONResponse(status_code=200 if st["ready"] else 503, content=st)

    @app.get("/v1/model")
    async def model_info(self):
        model = self.watcher.model
        if model is None:
            return _error(503, "no model version is live yet", **self.watcher.status())
        return model.info()


def build_app(store: str, *, replicas: int = 1, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
              poll_interval_s: float = 1.0, max_request_bytes: int = DEFAULTS["max_request_bytes"],
              num_cpus: float = 1.0, intra_op_threads: Optional[int] = None):
    """The bound Serve application for a store (used by `cl-serve serve`, the tests and the RayService)."""
    return Classifier.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus},
        user_config={"poll_interval_s": poll_interval_s, "max_request_bytes": max_request_bytes},
    ).bind(store=str(store), max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
           intra_op_threads=intra_op_threads)


def app_builder(args: dict[str, Any]):
    """Entry point for `serve run cl_serve.server:app_builder store=/path` and KubeRay's serveConfigV2."""
    return build_app(args["store"], replicas=int(args.get("replicas", 1)),
                     max_batch_size=int(args.get("max_batch_size", 32)),
                     poll_interval_s=float(args.get("poll_interval_s", 1.0)))
