"""Reading and parsing a /classify request without Ray: the body under a size limit and a shared byte budget, the
JSON body with its structure bounded before validation, and the query/form scalars. Raises `BadInput` (status +
message); tested in tests/test_request_parsing.py without a server.
"""
from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Optional, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from cl_serve.serving.api_models import MAX_TOP_K, ClassifyJSON
from cl_serve.contract.store_schema import describe_error
from cl_serve.serving.model import BadInput

M = TypeVar("M", bound=BaseModel)


class BodyBudget:
    """Bytes of request bodies being received at once on a replica, bounded. A body is admitted by its declared
    Content-Length (or chunk by chunk without one); past the budget the request gets 503 with Retry-After at once,
    before it is read. Stalled uploads therefore cost a coroutine and their few declared bytes, not a replica slot
    that decoding needs, while many large uploads at once cannot hold more than the budget in memory."""

    def __init__(self, limit: int):
        self.limit, self.used = int(limit), 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise BadInput(503, f"too many request bodies being received on this replica ({self.used} bytes); retry")
        self.used += n

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


def parse_version(value: Any) -> Optional[int]:
    """?version=N: decimal digits, nothing else (absent: the live version)."""
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]{1,9}", value):
        raise BadInput(422, f"version must be a version number, got {str(value)[:20]!r}")
    return int(value)


def parse_count(value: Any, name: str, default: int, low: int, high: int) -> int:
    """A paging parameter (?limit=, ?offset=, ?before=): decimal digits in low..high (absent: `default`)."""
    if value is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", str(value)) or not low <= int(value) <= high:
        raise BadInput(422, f"{name} must be an integer from {low} to {high}, got {str(value)[:20]!r}")
    return int(value)


def parse_top_k(value: Any) -> Optional[int]:
    """top_k from a query or form field: decimal digits in 1..MAX_TOP_K, nothing else."""
    if value is None:
        return None
    text = value if isinstance(value, str) else ""
    if not re.fullmatch(r"[0-9]{1,4}", text) or not 1 <= int(text) <= MAX_TOP_K:
        raise BadInput(422, f"top_k must be an integer from 1 to {MAX_TOP_K}, got {str(value)[:20]!r}")
    return int(text)


async def read_body(request: Request, limit: int, budget: BodyBudget | None = None) -> bytes:
    """The request body, read as a stream and refused (413) as soon as it passes `limit` bytes, whether or not
    a Content-Length was sent; with a `budget`, its bytes are held in it while the body arrives."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not re.fullmatch(r"[0-9]{1,18}", declared.strip()):
            raise BadInput(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise BadInput(413, f"request body is {declared} bytes; the limit is {limit}")
    held = 0
    try:
        if budget is not None and declared is not None:
            budget.take(int(declared))
            held = int(declared)
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise BadInput(413, f"request body is over the limit of {limit} bytes")
            if budget is not None and len(buf) > held:
                budget.take(len(buf) - held)
                held = len(buf)
        return bytes(buf)
    finally:
        if budget is not None:
            budget.give(held)


def parse_classify_json(body: bytes, max_images: int) -> ClassifyJSON:
    """The JSON body of /classify with its structure bounded before any full parse or validation: a valid body
    has at most `max_images` + 1 commas and 2 levels of brackets outside its base64 strings (which hold neither),
    so a body with more is refused from two byte counts, whatever its size (a 4 M-element array costs ~25 ms here, not
    a minute of per-element validation errors). Raises BadInput."""
    commas, opens = body.count(b","), body.count(b"[") + body.count(b"{")
    if commas > max_images + 1:
        raise BadInput(413, f"JSON body has {commas + 1} or more elements; a request holds at most {max_images} "
                            f"images and top_k")
    if opens > 2:
        raise BadInput(422, "invalid JSON body: expected {\"images\": [\"<base64>\", ...], \"top_k\": N} "
                            "(no nested arrays or objects)")
    return validate_json(ClassifyJSON, body, what="body", invalid_status=422, limit=5)


def validate_json(model: type[M], raw: bytes, *, what: str, invalid_status: int, limit: int) -> M:
    """`raw` (its structure already bounded by the caller) parsed and validated as `model`: 400 when it is not
    JSON, `invalid_status` with the first `limit` errors when it does not fit the model."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise BadInput(400, f"{what} is not valid JSON") from None
        raise BadInput(invalid_status, f"invalid JSON {what}: " + describe_error(e, limit=limit, whole=what)) from None


def replay(request: Request, body: bytes) -> Request:
    """A Request over the same scope whose body is `body` (already read under the size limit)."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


async def read_classify_images(request: Request, body: bytes, max_images: int) -> tuple[list[bytes], Optional[int]]:
    """A /classify body (multipart files or JSON base64 images, already read under the size limit) -> the encoded
    images and top_k (from the query, the form or the JSON). Raises BadInput."""
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
