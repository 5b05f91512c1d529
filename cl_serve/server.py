"""The Ray Serve application: FastAPI ingress, ONNX Runtime per replica, @serve.batch, hot swap.

    POST /classify   multipart form files (field `file`, repeatable) or JSON {"images": [base64, ...]};
                     optional top_k (form field, JSON key or query). -> {"model_version", "predictions": [...]}
    GET  /healthz    live version and readiness (200 ready, 503 not yet / broken), last refusal reason
    GET  /v1/model   version, labels, tasks, method, metrics of the served model
    GET  /docs, /openapi.json   the typed API (request bodies, responses, errors)

Every error, of any route or status (404, 405 and 422 included), is `{"error": ..., "status": ...}`. Bodies are
read as a stream and refused past `max_request_bytes`; images are decoded under `exports.image_decode`'s bounds
and a per-request pixel budget, so no input costs more than a bounded amount of time and memory. With a bearer
token (`--auth-token` or $CL_SERVE_AUTH_TOKEN) every route but /healthz needs `Authorization: Bearer <token>`.

Every replica runs a `ModelWatcher` on the store (poll interval from the Serve `user_config`; `reconfigure` can
also pin a version). A batch takes the model reference once, so each response is computed by exactly one
version, and that version is what the response reports. Never imports training code.
"""

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import re
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cl_serve.api_models import (MAX_TOP_K, ClassifyJSON, ClassifyMultipart, ClassifyResponse, error_responses,
                                 openapi_body)
from cl_serve.loopback import patch_replica_grpc
from cl_serve.runtime import BadInput, ModelWatcher, prepare_batch, top_k_predictions
from exports.image_decode import ImageLimits

log = logging.getLogger("cl_serve")
app = FastAPI(title="cl-serve", description="Continual image classification with zero-downtime model swaps")

DEFAULTS = {"poll_interval_s": 1.0, "max_request_bytes": 20 * 1024 * 1024, "max_pixels": 40_000_000,
            "max_side": 20_000, "max_aspect": 50.0, "max_request_pixels": 100_000_000,
            "max_images": 64, "default_top_k": 5, "max_concurrent_decodes": 2}
AUTH_ENV = "CL_SERVE_AUTH_TOKEN"
PUBLIC_PATHS = {"/healthz"}  # answered without the bearer token (Kubernetes probes)


def _error(status: int, message: str, headers: Optional[dict] = None, **extra) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "status": status, **extra}, headers=headers)


# One error shape for every error: the framework's own 404/405/422 too.
@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return _error(422, "invalid request", detail=json.loads(json.dumps(exc.errors(), default=str)))


@app.middleware("http")
async def _require_token(request: Request, call_next):
    token = os.environ.get(AUTH_ENV)  # the process environment: the app object may be a by-value copy
    if token and request.url.path not in PUBLIC_PATHS:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            return _error(401, "missing or wrong bearer token (send Authorization: Bearer <token>)",
                          headers={"WWW-Authenticate": 'Bearer realm="cl-serve"'})
    return await call_next(request)


def _parse_top_k(value: Any) -> Optional[int]:
    """top_k from a query or form field: decimal digits in 1..MAX_TOP_K, nothing else."""
    if value is None:
        return None
    text = value if isinstance(value, str) else ""
    if not re.fullmatch(r"[0-9]{1,4}", text) or not 1 <= int(text) <= MAX_TOP_K:
        raise BadInput(422, f"top_k must be an integer from 1 to {MAX_TOP_K}, got {str(value)[:20]!r}")
    return int(text)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, read as a stream and refused (413) as soon as it passes `limit` bytes, whether or not
    a Content-Length was sent."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not re.fullmatch(r"[0-9]{1,18}", declared.strip()):
            raise BadInput(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise BadInput(413, f"request body is {declared} bytes; the limit is {limit}")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise BadInput(413, f"request body is over the limit of {limit} bytes")
    return bytes(buf)


def _replay(request: Request, body: bytes) -> Request:
    """A Request over the same scope whose body is `body` (already read under the size limit)."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256, health_check_period_s=5)
@serve.ingress(app)
class Classifier:
    def __init__(self, store: str, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
                 intra_op_threads: Optional[int] = None, auth_token: Optional[str] = None):
        patch_replica_grpc()  # before Serve starts this replica's gRPC server (a no-op outside `cl-serve serve`)
        self.settings = dict(DEFAULTS)
        self.limits = ImageLimits()
        if auth_token:  # the replica's own process; read by the middleware on every request
            os.environ[AUTH_ENV] = auth_token
        self.watcher = ModelWatcher(store, self.settings["poll_interval_s"], intra_op_threads)
        # Decoding is where a request's memory goes (up to ~300 MiB for the largest admitted image): at most this
        # many requests decode at once per replica; the others wait their turn.
        self._decode_slots = asyncio.Semaphore(int(self.settings["max_concurrent_decodes"]))
        self._infer.set_max_batch_size(max_batch_size)
        self._infer.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)

    # -- Serve hooks ----------------------------------------------------------------------------------------------
    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config: poll_interval_s, max_request_bytes, max_pixels, max_side, max_aspect, max_request_pixels,
        max_images, default_top_k, max_concurrent_decodes, and `version` (pin that version; null follows CURRENT again)."""
        unknown = set(config) - set(DEFAULTS) - {"version"}
        if unknown:
            raise ValueError(f"unknown user_config keys: {sorted(unknown)}")
        settings = {**self.settings, **{k: v for k, v in config.items() if k in DEFAULTS}}
        self.limits = ImageLimits(max_pixels=settings["max_pixels"], max_side=settings["max_side"],
                                  max_aspect=settings["max_aspect"])
        if settings["max_concurrent_decodes"] != self.settings["max_concurrent_decodes"]:
            self._decode_slots = asyncio.Semaphore(int(settings["max_concurrent_decodes"]))
        self.settings = settings
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

    async def _read_images(self, request: Request) -> tuple[list[bytes], Optional[int]]:
        max_images = int(self.settings["max_images"])
        top_k = _parse_top_k(request.query_params.get("top_k"))
        body = await _read_body(request, int(self.settings["max_request_bytes"]))
        if not body:
            raise BadInput(400, "empty request body: send multipart files (field 'file') or JSON {\"images\": [...]}")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            form = await _replay(request, body).form(max_files=max_images + 1, max_fields=16)
            files = form.getlist("file")
            blobs = [await f.read() for f in files if hasattr(f, "read")]
            if not blobs:
                raise BadInput(400, "multipart request without any 'file' field")
            form_k = form.get("top_k")
            if form_k is not None:
                top_k = _parse_top_k(form_k)
        elif ctype == "application/json":
            try:
                payload = ClassifyJSON.model_validate_json(body)
            except ValidationError as e:
                if any(err["type"] == "json_invalid" for err in e.errors()):
                    raise BadInput(400, "body is not valid JSON (or is nested too deeply)") from None
                raise BadInput(422, "invalid JSON body: " + "; ".join(
                    f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:5]))
            except RecursionError:
                raise BadInput(400, "JSON body is nested too deeply") from None
            if len(payload.images) > max_images:
                raise BadInput(413, f"{len(payload.images)} images in one request; the limit is {max_images}")
            try:
                blobs = [base64.b64decode(s, validate=True) for s in payload.images]
            except (binascii.Error, ValueError):
                raise BadInput(400, "an entry of 'images' is not valid base64") from None
            if payload.top_k is not None:
                top_k = payload.top_k
        else:
            raise BadInput(415, f"unsupported content type {ctype[:60] or 'none'}: use multipart/form-data or "
                                "application/json")
        if len(blobs) > max_images:
            raise BadInput(413, f"{len(blobs)} images in one request; the limit is {max_images}")
        return blobs, top_k

    @app.post("/classify", response_model=ClassifyResponse, openapi_extra=openapi_body(ClassifyJSON, ClassifyMultipart),
              responses=error_responses(400, 401, 413, 415, 422, 503))
    async def classify(self, request: Request):
        """Classify one or more images (multipart field `file`, repeatable, or JSON base64 `images`)."""
        model = self.watcher.model
        if model is None:
            return _error(503, self.watcher.unavailable_reason() or "no model", **self.watcher.status())
        try:
            blobs, top_k = await self._read_images(request)
            async with self._decode_slots:
                x = await asyncio.to_thread(prepare_batch, blobs, model.preprocessing, self.limits,
                                            int(self.settings["max_request_pixels"]))
        except BadInput as e:
            return _error(e.status, e.message)
        version, labels, logits = await self._infer(x)
        k = top_k or int(self.settings["default_top_k"])
        return {"model_version": version, "predictions": top_k_predictions(logits, labels, k)}

    @app.get("/healthz")
    async def healthz(self):
        """200 while a model is served (with `store_error` if the store broke since), 503 with the reason when
        nothing can be served."""
        st = self.watcher.status()
        return JSONResponse(status_code=200 if st["ready"] else 503, content=st)

    @app.get("/v1/model", responses=error_responses(401, 503))
    async def model_info(self):
        """Version, labels, tasks, method, metrics and ONNX providers of the served model."""
        model = self.watcher.model
        if model is None:
            return _error(503, self.watcher.unavailable_reason() or "no model", **self.watcher.status())
        return model.info()


def build_app(store: str, *, replicas: int = 1, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
              poll_interval_s: float = 1.0, max_request_bytes: int = DEFAULTS["max_request_bytes"],
              num_cpus: float = 1.0, intra_op_threads: Optional[int] = None, auth_token: Optional[str] = None):
    """The bound Serve application for a store (used by `cl-serve serve`, the tests and the RayService)."""
    return Classifier.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus},
        user_config={"poll_interval_s": poll_interval_s, "max_request_bytes": max_request_bytes},
    ).bind(store=str(store), max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
           intra_op_threads=intra_op_threads, auth_token=auth_token)


def app_builder(args: dict[str, Any]):
    """Entry point for `serve run cl_serve.server:app_builder store=/path` and KubeRay's serveConfigV2."""
    return build_app(args["store"], replicas=int(args.get("replicas", 1)),
                     max_batch_size=int(args.get("max_batch_size", 32)),
                     poll_interval_s=float(args.get("poll_interval_s", 1.0)))
