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
    /v2/...          the Open Inference Protocol (cl_serve.serving.open_inference_handlers), same model and bounds

Every error, of any route or status (404, 405 and 422 included), is `{"error": ..., "status": ...}`. Bodies are
read as a stream and refused past `max_request_bytes`; images are decoded under `cl_serve.contract.image_decode`'s bounds
and a per-request pixel budget, so no input costs more than a bounded amount of time and memory. With a bearer
token (`--auth-token` or $CL_SERVE_AUTH_TOKEN) every route but the probes and the page needs `Authorization: Bearer
<token>`. Overload protection: `max_queued_requests` per replica and `request_timeout_s` (503 + Retry-After);
metrics through `cl_serve.serving.metrics`.

Every replica runs a `ModelWatcher` on the store (poll interval from the Serve `user_config`; `reconfigure` can
also pin a version). A request's images are prepared for the model chosen for it and computed by that model, in a
batch with other requests' images for the same model (`cl_serve.serving.batcher`: the next batch is everything
that arrived while the last one ran), so each response comes from exactly one version, the one it reports.
Never imports training code.
"""

import asyncio
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from cl_serve.serving.api_models import (ClassifyJSON, ClassifyMultipart, ClassifyResponse, error_responses,
                                 openapi_body)
from cl_serve.base.loopback import patch_replica_grpc
from cl_serve.serving.http_app import ReplicaAuth, app, error
from cl_serve.serving.open_inference_handlers import V2_INFER_ERRORS, OpenInferenceHandlers
from cl_serve.serving.request_parsing import (BodyBudget, parse_count, read_classify_images,
                                              parse_version, read_body)
from cl_serve.serving.model import PRECISIONS, BadInput, LoadedModel, prepare_batch, top_k_predictions
from cl_serve.serving.watcher import ModelWatcher
from cl_serve.serving.batcher import ModelBatcher
from cl_serve.serving.history import PAGE_DEFAULT, PAGE_MAX
from cl_serve.serving.model import LABELS_DEFAULT, LABELS_MAX
from cl_serve.serving.metrics import ServerMetrics
from cl_serve.serving import settings as server_settings
from cl_serve.serving.memory_return import MemoryReturn
from cl_serve.contract.image_decode import ImageLimits

log = logging.getLogger("cl_serve")
DEFAULTS = server_settings.defaults()  # every user_config key: cl_serve/serving/settings.py
PAGE = Path(__file__).with_name("static") / "index.html"
PINNED_VERSIONS = 2  # versions besides the live one a replica keeps loaded for ?version=N and the canary


# max_ongoing_requests is Serve's per-replica cap on requests handed to a replica, which holds a request while its
# body arrives: it is set high because a waiting upload costs a coroutine, and what needs bounding is bounded by the
# app: body bytes being received (max_body_bytes_in_flight), decoding and inference (max_queued_requests, decode
# slots), and time (body_timeout_s, request_timeout_s). At 256, 500 stalled uploads held every slot until their
# deadline and legitimate requests waited 15 s behind them.
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4096, health_check_period_s=5)
@serve.ingress(app)
class Classifier(OpenInferenceHandlers):
    def __init__(self, store: str, max_batch_size: int = 32, batch_wait_ms: float = 0.0,
                 session: Optional[dict[str, Any]] = None, auth_token: Optional[str] = None, precision: str = "fp32"):
        patch_replica_grpc()  # before Serve starts this replica's gRPC server (a no-op outside `cl-serve serve`)
        self.settings = dict(DEFAULTS)
        self.limits = ImageLimits()
        ReplicaAuth.token = auth_token or None  # the replica's own process; read by the middleware on every request
        self.metrics = ServerMetrics()
        self._inflight = 0  # requests this replica holds (overload protection)
        self.watcher = ModelWatcher(store, self.settings["poll_interval_s"],
                                    server_settings.SessionSettings(**(session or {})), on_event=self.metrics.event,
                                    precision=precision)
        # Decoding is where a request's memory goes (up to ~300 MiB for the largest admitted image): at most this
        # many requests decode at once per replica; the others wait their turn.
        self._decode_slots = asyncio.Semaphore(int(self.settings["max_concurrent_decodes"]))
        self._memory = MemoryReturn()
        self._bodies = BodyBudget(int(self.settings["max_body_bytes_in_flight"]))
        self._batcher = ModelBatcher(max_batch_size, batch_wait_ms / 1000.0, on_batch=self.metrics.batch_images.observe)

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
        if not self._batcher.alive:
            raise RuntimeError("the batcher's worker stopped")

    # -- inference ------------------------------------------------------------------------------------------------
    @app.post("/classify", response_model=ClassifyResponse, openapi_extra=openapi_body(ClassifyJSON, ClassifyMultipart),
              responses=error_responses(400, 401, 404, 409, 413, 415, 422, 503))
    async def classify(self, request: Request):
        """Classify one or more images (multipart field `file`, repeatable, or JSON base64 `images`), with the live
        version or `?version=N`. Overload protection: at most `max_queued_requests` requests per replica at once
        and `request_timeout_s` each; beyond either, 503 with Retry-After."""
        return await self.answer(request, self._classify)

    async def answer(self, request: Request, respond) -> Any:
        """Every inference route's request: its body read under the byte limits and a deadline, admitted under the
        replica's queue bound, answered by `respond(request, body) -> (response, version)` within
        request_timeout_s, counted in the metrics; the last request out gives back what the others grew
        (cl_serve.serving.memory_return)."""
        try:
            return await self._admit(request, respond)
        finally:
            if self._inflight == 0 and self._bodies.used == 0 and self._memory.grown():
                await asyncio.to_thread(self._memory.give_back)

    async def _admit(self, request: Request, respond):
        t0 = time.monotonic()
        # The body is read first, under its own deadline and outside the in-flight count: a slow or stalled upload
        # is dropped after body_timeout_s and never holds capacity that decoding and inference need.
        try:
            body = await asyncio.wait_for(read_body(request, int(self.settings["max_request_bytes"]), self._bodies),
                                          float(self.settings["body_timeout_s"]))
        except asyncio.TimeoutError:
            self.metrics.rejected.inc(tags={"reason": "slow_body"})
            response = error(408, f"request body not received within {self.settings['body_timeout_s']}s",
                             headers={"Connection": "close"})
            self.metrics.request(408, None, time.monotonic() - t0)
            return response
        except BadInput as e:
            self.metrics.request(e.status, None, time.monotonic() - t0)
            if e.status == 503:
                self.metrics.rejected.inc(tags={"reason": "body_budget"})
            return error(e.status, e.message, headers={"Retry-After": "1"} if e.status == 503 else None)
        if self._inflight >= int(self.settings["max_queued_requests"]):
            self.metrics.rejected.inc(tags={"reason": "queue_full"})
            response = error(503, f"server busy: {self._inflight} requests in progress on this replica; retry",
                             headers={"Retry-After": "1"})
            self.metrics.request(503, None, time.monotonic() - t0)
            return response
        self._inflight += 1
        version = None
        try:
            result, version = await asyncio.wait_for(respond(request, body),
                                                     float(self.settings["request_timeout_s"]))
        except BadInput as e:
            result = error(e.status, e.message)
        except asyncio.TimeoutError:
            self.metrics.rejected.inc(tags={"reason": "timeout"})
            result = error(503, f"request took longer than {self.settings['request_timeout_s']}s; retry later",
                           headers={"Retry-After": "5"})
        except asyncio.CancelledError:  # Serve cancels a request whose client left (proxy and direct ingress alike):
            # it stops waiting for a decode slot and the model (the batcher drops it before its batch runs); counted
            self.metrics.rejected.inc(tags={"reason": "client_gone"})
            self.metrics.request(499, None, time.monotonic() - t0)
            raise
        finally:
            self._inflight -= 1
        status = result.status_code if isinstance(result, Response) else 200
        self.metrics.request(status, version if status == 200 else None, time.monotonic() - t0)
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

    async def choose_model(self, version: Optional[int]) -> tuple[LoadedModel, bool]:
        """The model that answers a request: (model, canary). An explicit version (404 unknown, 409 refused);
        otherwise the live model, or the newest candidate for `canary_percent` of requests. BadInput 503 while
        nothing is served."""
        if version is not None:
            return await self._model_of(version), False
        model = self.watcher.model
        if model is None:
            raise BadInput(503, self.watcher.unavailable_reason() or "no model")
        if random.random() * 100 < float(self.settings["canary_percent"]):
            candidate = await asyncio.to_thread(self.watcher.newest_candidate)
            if candidate is not None:
                try:
                    return await self._model_of(candidate), True
                except BadInput:  # a candidate that cannot be served: the live version answers
                    pass
        return model, False

    async def decode(self, blobs: list[bytes], model: LoadedModel) -> np.ndarray:
        """Encoded images -> the model's input batch, under the decode slots, image limits and pixel budget."""
        async with self._decode_slots:
            return await asyncio.to_thread(prepare_batch, blobs, model.preprocessing, self.limits,
                                           int(self.settings["max_request_pixels"]))

    async def infer(self, model: LoadedModel, x: np.ndarray) -> tuple[int, list[str], np.ndarray]:
        """(version, labels, logits) of prepared images, computed by `model` in a batch with other requests' images
        for the same model (cl_serve.serving.batcher)."""
        return model.version, model.labels, await self._batcher.run(model, x)

    async def _classify(self, request: Request, body: bytes):
        try:
            model, canary = await self.choose_model(parse_version(request.query_params.get("version")))
        except BadInput as e:
            extra = self.watcher.status() if e.status == 503 else {}
            return error(e.status, e.message, **extra), None
        blobs, top_k = await read_classify_images(request, body, int(self.settings["max_images"]))
        x = await self.decode(blobs, model)
        version, labels, logits = await self.infer(model, x)
        k = top_k or int(self.settings["default_top_k"])
        return {"model_version": version, "canary": canary,
                "predictions": top_k_predictions(logits, labels, k)}, version

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
            return error(e.status, e.message)
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
            return error(503, self.watcher.unavailable_reason() or "no model", **self.watcher.status())
        try:
            offset = parse_count(request.query_params.get("labels_offset"), "labels_offset", 0, 0, 10**9)
            limit = parse_count(request.query_params.get("labels_limit"), "labels_limit", LABELS_DEFAULT, 1,
                                LABELS_MAX)
        except BadInput as e:
            return error(e.status, e.message)
        return model.info(offset, limit)

    # -- the Open Inference Protocol (behaviour in cl_serve.serving.open_inference_handlers) ------------------------
    # Declared here, not in the handlers' module: Serve makes class-based routes of the deployment class's own
    # module (a route function imported by reference from elsewhere reaches the replica without `self` bound).
    @app.get("/v2", responses=error_responses(401))
    async def v2_server(self):
        """Server metadata: name, version, extensions."""
        return self.v2_server_metadata()

    @app.get("/v2/health/live")
    async def v2_live(self):
        """200 while the replica runs."""
        return {"live": True}

    @app.get("/v2/health/ready", responses=error_responses(503))
    async def v2_ready(self):
        """200 while a model is served, else 503 with the reason."""
        return self.v2_server_ready()

    @app.get("/v2/models/{name}", responses=error_responses(401, 404, 503))
    async def v2_model(self, name: str):
        """Metadata of the live version: inputs, outputs, the store's versions, preprocessing."""
        return await self.v2_metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}", responses=error_responses(401, 404, 409, 422, 503))
    async def v2_model_version(self, name: str, version: str):
        """Metadata of one version."""
        return await self.v2_metadata(name, version)

    @app.get("/v2/models/{name}/ready", responses=error_responses(401, 404, 503))
    async def v2_model_ready(self, name: str):
        """200 when the live version is served."""
        return await self.v2_model_ready_answer(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", responses=error_responses(401, 404, 409, 422, 503))
    async def v2_model_version_ready(self, name: str, version: str):
        """200 when that version can be served (it is loaded to find out)."""
        return await self.v2_model_ready_answer(name, version)

    @app.post("/v2/models/{name}/infer", responses=V2_INFER_ERRORS)
    async def v2_infer(self, request: Request, name: str):
        """Classify with the live version (or, for `canary_percent` of requests, the newest candidate)."""
        return await self.answer(request, lambda req, body: self.v2_infer_answer(req, body, name, None))

    @app.post("/v2/models/{name}/versions/{version}/infer", responses=V2_INFER_ERRORS)
    async def v2_infer_version(self, request: Request, name: str, version: str):
        """Classify with one version."""
        return await self.answer(request, lambda req, body: self.v2_infer_answer(req, body, name, version))


def build_app(store: str, *, replicas: int = 1, max_batch_size: int = 32, batch_wait_ms: float = 0.0,
              poll_interval_s: float = DEFAULTS["poll_interval_s"],
              max_request_bytes: int = DEFAULTS["max_request_bytes"],
              num_cpus: float = 1.0, gpus_per_replica: float = 0.0, intra_op_threads: Optional[int] = None,
              ort_spinning: bool = True, auth_token: Optional[str] = None, settings: Optional[dict[str, Any]] = None,
              autoscaling: Optional[dict[str, Any]] = None, precision: str = "fp32"):
    """The bound Serve application for a store (used by `cl-serve serve`, the tests and the RayService).
    `settings`: more user_config keys (see `Classifier.reconfigure`), e.g. max_queued_requests.
    `autoscaling`: a Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...) instead of
    a fixed number of replicas. `precision`: fp32, or int8 (each version's int8 file where it has one)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    server_settings.batch_settings(max_batch_size, batch_wait_ms)
    session = server_settings.session_settings(intra_op_threads, ort_spinning)
    user_config = {"poll_interval_s": poll_interval_s, "max_request_bytes": max_request_bytes, **(settings or {})}
    server_settings.validated(user_config)  # an unknown key or a bad value fails here, not in a replica
    scaling: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    return Classifier.options(
        **scaling, ray_actor_options={"num_cpus": num_cpus, "num_gpus": gpus_per_replica}, user_config=user_config,
    ).bind(store=str(store), max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
           session=session.model_dump(), auth_token=auth_token, precision=precision)


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
                     batch_wait_ms=float(args.get("batch_wait_ms", 0.0)),
                     poll_interval_s=float(args.get("poll_interval_s", DEFAULTS["poll_interval_s"])),
                     max_request_bytes=int(args.get("max_request_bytes", DEFAULTS["max_request_bytes"])),
                     gpus_per_replica=float(args.get("gpus_per_replica", 0)), settings=settings,
                     intra_op_threads=args.get("intra_op_threads"), ort_spinning=args.get("ort_spinning", True),
                     autoscaling=args.get("autoscaling"), precision=str(args.get("precision", "fp32")))
