"""The FastAPI application every route of the Serve deployment hangs on, and what applies to all of them: one
error shape (`{"error", "status"}`, the framework's own 404/405/422 included) and the bearer token. Route modules
(`cl_serve.serving.app` for /classify and /v1, `cl_serve.serving.open_inference_handlers` for what /v2 does) import
`app` and `error` from here. No Ray, no torch.
"""
from __future__ import annotations

import hmac
import json
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# No /docs or /redoc: FastAPI's pages load their scripts from a CDN (broken offline, and a third party on an
# operator's page); /openapi.json stays. No trailing-slash redirects: they echo the request's Host header.
app = FastAPI(title="cl-serve", description="Continual image classification with zero-downtime model swaps",
              docs_url=None, redoc_url=None, redirect_slashes=False)

# Answered without the bearer token: probes (ours and the Open Inference Protocol's), and the page (it asks for
# the token).
PUBLIC_PATHS = {"/healthz", "/", "/v2/health/live", "/v2/health/ready"}


class ReplicaAuth:
    """The bearer token of this replica process: set by the deployment's constructor, read by the middleware. A
    class attribute of this module, so the middleware (pickled by reference into the replica) and the deployment
    share it, without putting the secret in the process environment that child processes inherit."""

    token: Optional[str] = None


def error(status: int, message: str, headers: Optional[dict] = None, **extra) -> JSONResponse:
    """The one error body: `{"error": message, "status": status, ...}` (the Open Inference Protocol reads
    `error`)."""
    return JSONResponse(status_code=status, content={"error": message, "status": status, **extra}, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return error(422, "invalid request", detail=json.loads(json.dumps(exc.errors(), default=str)))


@app.middleware("http")
async def _require_token(request: Request, call_next):
    token = ReplicaAuth.token
    if token and request.url.path not in PUBLIC_PATHS:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            return error(401, "missing or wrong bearer token (send Authorization: Bearer <token>)",
                         headers={"WWW-Authenticate": 'Bearer realm="cl-serve"'})
    return await call_next(request)
