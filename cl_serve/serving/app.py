"""The Ray Serve application: FastAPI ingress, ONNX Runtime per replica, @serve.batch, hot swap.

    POST /classify   multipart form files (field `file`, repeatable) or JSON {"images": [base64, ...]};
                     optional top_k (form field, JSON key or query). -> {"model_version", "canary", "predictions": [...]}
                     With canary_percent P, P% of these go to the newest candidate (canary: true).
    GET  /healthz    live version and readiness (200 ready, 503 not yet / broken), last refusal reason
    POST /classify?version=N   the same with version N (bounded per-replica cache; 404 unknown, 409 refused)
    GET  /v1/model   version, labels, tasks, method, metrics, ONNX file and providers of the served model
    GET  /v1/versions   every version: parent, task, classes, per-task accuracy, release gate, state
    GET  /           a page to try the model (cl_serve/serving/static/index.html)
    GET  /openapi.json          the typed API (request bodies, responses, errors)

Every error, of any route or status (404, 405 and 422 included), is `{"error": ..., "status": ...}`. Bodies are
read as a stream and refused past `max_request_bytes`; images are decoded under `cl_serve.contract.image_decode`'s bounds
and a per-request pixel budget, so no input costs more than a bounded amount of time and memory. With a bearer
token (`--auth-token` or $CL_SERVE_AUTH_TOKEN) every route but /healthz and the page needs `Authorization: Bearer
<token>`. Overload protection: `max_queued_requests` per replica and `request_timeout_s` (503 + Retry-After);
metrics through `cl_serve.serving.metrics`.

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
import random
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cl_serve.serving.api_models import (ClassifyJSON, ClassifyMultipart, ClassifyResponse, error_responses,
                                 openapi_body)
from cl_serve.base.loopback import patch_replica_grpc
from cl_serve.serving.request_parsing import (BodyBudget, parse_classify_json, parse_count, parse_top_k,
                                              parse_version, read_body, replay)
from cl_serve.serving.model import BadInput, LoadedModel, prepare_batch, top_k_predictions
from cl_serve.serving.watcher import ModelWatcher
from cl_serve.serving.history import PAGE_DEFAULT, PAGE_MAX
from cl_serve.serving.model import LABELS_DEFAULT, LABELS_MAX
from cl_serve.serving.metrics import ServerMetrics
from cl_serve.serving import settings as server_settings
from cl_serve.serving.memory_return import MemoryReturn
from cl_serve.contract.image_decode import ImageLimits

log = logging.getLogger("cl_serve")
# No /docs or /redoc: FastAPI's pages load their scripts from a CDN (broken offline, and a third party on an
# operator's page); /openapi.json stays. No trailing-slash redirects: they echo the request's Host header.
app = FastAPI(title="cl-serve", description="Continual image classification with zero-downtime model swaps",
              docs_url=None, redoc_url=None, redirect_slashes=False)

DEFAULTS = server_settings.defaults()  # every user_config key: cl_serve/serving/settings.py


class ReplicaAuth:
    """The bearer token of this replica process: set by `Classifier.__init__`, read by the middleware. A class
    attribute of this module, so the middleware (pickled by reference into the replica) and the deployment share
    it, without putting the secret in the process environment that child processes inherit."""

    token: Optional[str] = None

PUBLIC_PATHS = {"/healthz", "/"}  # answered without the bearer token: probes, and the page (it asks for the token)
PAGE = Path(__file__).with_name("static") / "index.html"
PINNED_VERSIONS = 2  # versions besides the live one a replica keeps loaded for ?version=N and the canary


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
    token = ReplicaAuth.token
    if token and request.url.path not in PUBLIC_PATHS:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            return _error(401, "missing or wrong bearer token (send Authorization: Bearer <token>)",
                          headers={"WWW-Authenticate": 'Bearer realm="cl-serve"'})
    return await call_next(request)


# max_ongoing_requests is Serve's per-replica cap on requests handed to a replica, which holds a request while its
# body arrives: it is set high because a waiting upload costs a coroutine, and what needs bounding is bounded by the
# app: body bytes being received (max_body_bytes_in_flight), decoding and inference (max_queued_requests, decode
# slots), and time (body_timeout_s, request_timeout_s). At 256, 500 stalled uploads held every slot until their
# deadline and legitimate requests waited 15 s behind them.
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4096, health_check_period_s=5)
@serve.ingress(app)
class Classifier:
    def __init__(self, store: str, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
                 intra_op_threads: Optional[int] = None, auth_token: Optional[str] = None):
        patch_replica_grpc()  # before Serve starts this replica's gRPC server (a no-op outside `cl-serve serve`)
        self.settings = dict(DEFAULTS)
        self.limits = ImageLimits()
        ReplicaAuth.token = auth_token or None  # the replica's own process; read by the middleware on every request
        self.metrics = ServerMetrics()
        self._inflight = 0  # requests this replica holds (overload protection)
        self.watcher = ModelWatcher(store, self.settings["poll_interval_s"], intra_op_threads,
                                    on_event=self.metrics.event)
        # Decoding is where a request's memory goes (up to ~300 MiB for the largest admitted image): at most this
        # many requests decode at once per replica; the others wait their turn.
        self._decode_slots = asyncio.Semaphore(int(self.settings["max_concurrent_decodes"]))
        self._memory = MemoryReturn()
        self._bodies = BodyBudget(int(self.settings["max_body_bytes_in_flight"]))
        self._infer.set_max_batch_size(max_batch_size)
        self._infer.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)

    # -- Serve hooks ----------------------------------------------------------------------------------------------
    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config: the keys of `cl_serve.serving.settings.ServerSettings` (validated; a bad value keeps the
        replica's current settings and fails the update), and `version` (pin that version; null follows CURRENT)."""
        settings = server_settings.validated({**self.settings, **config})
        self.limits = ImageLimits(max_pixels=settings["max_pixels"], max_side=settings["max_side"],
                                  max_aspect=settings["max_aspect"], formats=tuple(settings["image_formats"]),
                                  max_costly_pixels=settings["max_costly_pixels"])
        if settings["max_concurrent_decodes"] != self.settings["max_concurrent_decodes"]:
            self._decode_slots = asyncio.Semaphore(int(settings["max_concurrent_decodes"]))
        self.settings = settings
        self._bodies.limit = int(settings["max_body_bytes_in_flight"])
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
        self.metrics.batch_images.observe(sum(sizes))
        logits = await asyncio.to_thread(model.run, np.concatenate(batches))
        out, start = [], 0
        for n in sizes:
            out.append((model.version, model.labels, logits[start:start + n]))
            start += n
        return out

    async def _read_images(self, request: Request, body: bytes) -> tuple[list[bytes], Optional[int]]:
        max_images = int(self.settings["max_images"])
        top_k = parse_top_k(request.query_params.get("top_k"))
        if not body:
            raise BadInput(400, "empty request body: send multipart files (field 'file') or JSON {\"images\": [...]}")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            form = await replay(request, body).form(max_files=max_images + 1, max_fields=16)
            try:
                blobs = [await f.read() for f in form.getlist("file") if hasattr(f, "read")]
                form_k = form.get("top_k")
            finally:
                await form.close()  # spooled parts: released now, not when the replayed request is collected
            if not blobs:
                raise BadInput(400, "multipart request without any 'file' field")
            if form_k is not None:
                top_k = parse_top_k(form_k)
        elif ctype == "application/json":
            payload = parse_classify_json(body, max_images)
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
              responses=error_responses(400, 401, 404, 409, 413, 415, 422, 503))
    async def classify(self, request: Request):
        """Classify one or more images (multipart field `file`, repeatable, or JSON base64 `images`), with the live
        version or `?version=N`. Overload protection: at most `max_queued_requests` requests per replica at once
        and `request_timeout_s` each; beyond either, 503 with Retry-After."""
        try:
            return await self._handle(request)
        finally:  # the last request out gives back what the others grew (cl_serve.serving.memory_return)
            if self._inflight == 0 and self._bodies.used == 0 and self._memory.grown():
                await asyncio.to_thread(self._memory.give_back)

    async def _handle(self, request: Request):
        t0 = time.monotonic()
        # The body is read first, under its own deadline and outside the in-flight count: a slow or stalled upload
        # is dropped after body_timeout_s and never holds capacity that decoding and inference need.
        try:
            body = await asyncio.wait_for(read_body(request, int(self.settings["max_request_bytes"]), self._bodies),
                                          float(self.settings["body_timeout_s"]))
        except asyncio.TimeoutError:
            self.metrics.rejected.inc(tags={"reason": "slow_body"})
            response = _error(408, f"request body not received within {self.settings['body_timeout_s']}s",
                              headers={"Connection": "close"})
            self.metrics.request(408, None, time.monotonic() - t0)
            return response
        except BadInput as e:
            self.metrics.request(e.status, None, time.monotonic() - t0)
            if e.status == 503:
                self.metrics.rejected.inc(tags={"reason": "body_budget"})
            return _error(e.status, e.message, headers={"Retry-After": "1"} if e.status == 503 else None)
        if self._inflight >= int(self.settings["max_queued_requests"]):
            self.metrics.rejected.inc(tags={"reason": "queue_full"})
            response = _error(503, f"server busy: {self._inflight} requests in progress on this replica; retry",
                              headers={"Retry-After": "1"})
            self.metrics.request(503, None, time.monotonic() - t0)
            return response
        self._inflight += 1
        try:
            result = await asyncio.wait_for(self._classify(request, body), float(self.settings["request_timeout_s"]))
        except asyncio.TimeoutError:
            self.metrics.rejected.inc(tags={"reason": "timeout"})
            result = _error(503, f"request took longer than {self.settings['request_timeout_s']}s; retry later",
                            headers={"Retry-After": "5"})
        finally:
            self._inflight -= 1
        if isinstance(result, JSONResponse):
            self.metrics.request(result.status_code, None, time.monotonic() - t0)
            return result
        self.metrics.request(200, result["model_version"], time.monotonic() - t0)
        return result

    async def _model_of(self, version: int) -> LoadedModel:
        """An explicit version: the live model when it is that version, else Serve's multiplexed cache."""
        live = self.watcher.model
        if live is not None and live.version == version:
            return live
        return await self.pinned_model(str(version))

    @serve.multiplexed(max_num_models_per_replica=PINNED_VERSIONS)
    async def pinned_model(self, version: str) -> LoadedModel:
        """A version asked for by `?version=N` or the canary, loaded once and kept in Serve's per-replica LRU of
        `PINNED_VERSIONS` models (a failure to load is not kept: it is asked again next time)."""
        return await asyncio.to_thread(self.watcher.load_pinned, int(version))

    async def _classify(self, request: Request, body: bytes):
        canary = False
        try:
            version = parse_version(request.query_params.get("version"))
            model = self.watcher.model
            if version is not None:
                model = await self._model_of(version)
            elif model is None:
                return _error(503, self.watcher.unavailable_reason() or "no model", **self.watcher.status())
            elif random.random() * 100 < float(self.settings["canary_percent"]):
                candidate = await asyncio.to_thread(self.watcher.newest_candidate)
                if candidate is not None:
                    try:
                        model, version = await self._model_of(candidate), candidate
                        canary = True
                    except BadInput:  # a candidate that cannot be served: the live version answers
                        pass
            blobs, top_k = await self._read_images(request, body)
            async with self._decode_slots:
                x = await asyncio.to_thread(prepare_batch, blobs, model.preprocessing, self.limits,
                                            int(self.settings["max_request_pixels"]))
        except BadInput as e:
            return _error(e.status, e.message)
        if version is None:
            version, labels, logits = await self._infer(x)
        else:  # an explicit version runs on its own, outside the live version's batches
            self.metrics.batch_images.observe(len(x))
            version, labels, logits = model.version, model.labels, await asyncio.to_thread(model.run, x)
        k = top_k or int(self.settings["default_top_k"])
        return {"model_version": version, "canary": canary, "predictions": top_k_predictions(logits, labels, k)}

    @app.get("/healthz")
    async def healthz(self):
        """200 while a model is served (with `store_error` if the store broke since), 503 with the reason when
        nothing can be served."""
        st = self.watcher.status()
        return JSONResponse(status_code=200 if st["ready"] else 503, content=st)

    @app.get("/v1/versions", responses=error_responses(401, 422))
    async def versions(self, request: Request):
        """The store's versions, newest first, `limit` (1-200, default 50) at a time below `before`: parent, task,
        classes, per-task accuracy, release-gate decision, state; `next_before` continues."""
        try:
            limit = parse_count(request.query_params.get("limit"), "limit", PAGE_DEFAULT, 1, PAGE_MAX)
            before = request.query_params.get("before")
            before = None if before is None else parse_count(before, "before", 0, 1, 10**9)
        except BadInput as e:
            return _error(e.status, e.message)
        page = await asyncio.to_thread(self.watcher.list_versions, limit, before)
        return {**page, "serving": self.watcher.model.version if self.watcher.model else None}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        """A page to try the model: pick or drop images, see predictions, versions and their accuracy."""
        return HTMLResponse(PAGE.read_text(), headers={"Cache-Control": "no-cache",
                                                       "Content-Security-Policy": "default-src 'self'; "
                                                       "style-src 'self' 'unsafe-inline'; script-src 'self' "
                                                       "'unsafe-inline'; img-src 'self' data: blob:"})

    @app.get("/v1/model", responses=error_responses(401, 422, 503))
    async def model_info(self, request: Request):
        """Version, labels (`labels_limit`, default 1000, from `labels_offset`), tasks (each with its class count
        and first labels), method, metrics and ONNX providers of the served model."""
        model = self.watcher.model
        if model is None:
            return _error(503, self.watcher.unavailable_reason() or "no model", **self.watcher.status())
        try:
            offset = parse_count(request.query_params.get("labels_offset"), "labels_offset", 0, 0, 10**9)
            limit = parse_count(request.query_params.get("labels_limit"), "labels_limit", LABELS_DEFAULT, 1,
                                LABELS_MAX)
        except BadInput as e:
            return _error(e.status, e.message)
        return model.info(offset, limit)


def build_app(store: str, *, replicas: int = 1, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
              poll_interval_s: float = DEFAULTS["poll_interval_s"],
              max_request_bytes: int = DEFAULTS["max_request_bytes"],
              num_cpus: float = 1.0, gpus_per_replica: float = 0.0, intra_op_threads: Optional[int] = None,
              auth_token: Optional[str] = None, settings: Optional[dict[str, Any]] = None,
              autoscaling: Optional[dict[str, Any]] = None):
    """The bound Serve application for a store (used by `cl-serve serve`, the tests and the RayService).
    `settings`: more user_config keys (see `Classifier.reconfigure`), e.g. max_queued_requests.
    `autoscaling`: a Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...) instead of
    a fixed number of replicas."""
    user_config = {"poll_interval_s": poll_interval_s, "max_request_bytes": max_request_bytes, **(settings or {})}
    server_settings.validated(user_config)  # an unknown key or a bad value fails here, not in a replica
    scaling: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    return Classifier.options(
        **scaling, ray_actor_options={"num_cpus": num_cpus, "num_gpus": gpus_per_replica}, user_config=user_config,
    ).bind(store=str(store), max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
           intra_op_threads=intra_op_threads, auth_token=auth_token)


def app_builder(args: dict[str, Any]):
    """Entry point for `serve run cl_serve.serving.app:app_builder store=/path` and KubeRay's serveConfigV2. Without a
    `store` argument the store is $CL_SERVE_STORE (the deploy manifests set it from a ConfigMap)."""
    store = args.get("store") or os.environ.get("CL_SERVE_STORE")
    if not store:
        raise ValueError("no model store: pass the `store` argument (a path or s3://bucket/prefix) or set "
                         "CL_SERVE_STORE")
    settings = {k: args[k] for k in DEFAULTS if k in args and k not in ("poll_interval_s", "max_request_bytes")}
    return build_app(store, replicas=int(args.get("replicas", 1)),
                     max_batch_size=int(args.get("max_batch_size", 32)),
                     poll_interval_s=float(args.get("poll_interval_s", DEFAULTS["poll_interval_s"])),
                     max_request_bytes=int(args.get("max_request_bytes", DEFAULTS["max_request_bytes"])),
                     gpus_per_replica=float(args.get("gpus_per_replica", 0)), settings=settings,
                     autoscaling=args.get("autoscaling"))
