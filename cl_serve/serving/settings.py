"""The server's settings, typed, in one place: every key of the classifier deployment's Serve `user_config` (what
`cl-serve serve`, `build_app`, `app_builder` and a RayService's serveConfigV2 set), with its default, its bounds
and what it does. Validated where settings enter (`build_app`, `Classifier.reconfigure`, `cl-serve serve`), so a
bad value is refused with the key's name before a replica serves with it. No Ray, no torch.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cl_serve.serving.api_models import MAX_TOP_K
from cl_serve.contract.image_decode import ALLOWED_FORMATS, DEFAULT_FORMATS
from cl_serve.contract.store_schema import describe_error

MIB = 1024 * 1024


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    poll_interval_s: float = Field(1.0, gt=0, le=3600, description="seconds between checks of the store's CURRENT")
    max_request_bytes: int = Field(20 * MIB, gt=0, description="largest request body (413 past it)")
    body_timeout_s: float = Field(10.0, gt=0, description="a body not received within this gets 408")
    max_body_bytes_in_flight: int = Field(256 * MIB, gt=0, description=(
        "bytes of bodies being received at once on a replica (503 + Retry-After past it)"))
    max_pixels: int = Field(40_000_000, gt=0, description="pixels one image may declare")
    max_side: int = Field(20_000, gt=0, description="largest width or height")
    max_aspect: float = Field(50.0, ge=1.0, description="longest side / shortest side")
    max_costly_pixels: int = Field(12_000_000, gt=0, description=(
        "pixels of a file decoded whole (WebP, progressive or CMYK JPEG)"))
    max_request_pixels: int = Field(100_000_000, gt=0, description="decoded pixels of all images of one request")
    max_images: int = Field(64, ge=1, le=4096, description="images per request")
    default_top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="predictions per image when top_k is not given")
    max_concurrent_decodes: int = Field(2, ge=1, le=256, description="requests decoding at once per replica")
    max_queued_requests: int = Field(64, ge=1, description=(
        "requests a replica holds once their body has arrived; beyond, 503 + Retry-After"))
    request_timeout_s: float = Field(30.0, gt=0, description="seconds per request after its body; beyond, 503")
    canary_percent: float = Field(0.0, ge=0, le=100, description=(
        "share of requests without ?version sent to the newest candidate"))
    model_name: str = Field("classifier", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description=(
        "the model's name in the Open Inference Protocol's routes (/v2/models/{name}/infer)"))
    image_formats: list[str] = Field(list(DEFAULT_FORMATS), min_length=1, description=(
        f"accepted image formats, from {sorted(ALLOWED_FORMATS)}"))

    @field_validator("image_formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        v = [f.upper() for f in v]
        bad = sorted(set(v) - ALLOWED_FORMATS)
        if bad:
            raise ValueError(f"unknown image formats {bad}; choose from {sorted(ALLOWED_FORMATS)}")
        return list(dict.fromkeys(v))


KEYS = tuple(ServerSettings.model_fields)
PIN = "version"  # user_config key that pins a version (null follows CURRENT again); not a setting


def defaults() -> dict[str, Any]:
    return ServerSettings().model_dump()


def default(key: str) -> Any:
    return ServerSettings.model_fields[key].default


def validated(settings: dict[str, Any]) -> dict[str, Any]:
    """The full settings from `settings` (every missing key at its default); ValueError names an unknown key or
    the first invalid value."""
    unknown = sorted(set(settings) - set(KEYS) - {PIN})
    if unknown:
        raise ValueError(f"unknown server settings: {unknown} (known: {sorted(KEYS)})")
    try:
        return ServerSettings(**{k: v for k, v in settings.items() if k != PIN}).model_dump()
    except ValidationError as e:
        raise ValueError(f"invalid server settings: {describe_error(e)}") from None


class BatchSettings(BaseModel):
    """How a replica batches (fixed for a deployment: `serve --max-batch-size/--batch-wait-ms`, `build_app`,
    `app_builder`'s arguments); `ModelBatcher` applies them."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, ge=1, le=4096, description="images per model call at most")
    batch_wait_ms: float = Field(0.0, ge=0, le=1000, description=(
        "how long an idle model waits for company before it runs a lone request"))


class SessionSettings(BaseModel):
    """How a replica runs ONNX Runtime on CPUs (fixed for a deployment: `serve --intra-op-threads/--ort-spinning`,
    `build_app`, `app_builder`'s arguments); `cl_serve.serving.model.load_version` applies them to every session."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    intra_op_threads: Optional[int] = Field(None, ge=1, le=1024, description=(
        "ONNX Runtime's threads inside one operator (default: ONNX Runtime's choice, one per core it sees)"))
    spinning: bool = Field(True, description=(
        "intra-op threads busy-wait for the next operator's work instead of sleeping (ONNX Runtime's default): "
        "lower latency on cores of its own, CPU taken from the request handling beside it on shared ones"))

    def apply(self, opts) -> None:
        """Set these on an `onnxruntime.SessionOptions`."""
        if self.intra_op_threads:
            opts.intra_op_num_threads = self.intra_op_threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")


def session_settings(intra_op_threads: Optional[int] = None, spinning: bool = True) -> SessionSettings:
    """The session settings, or ValueError naming the bad one."""
    try:
        return SessionSettings(intra_op_threads=intra_op_threads, spinning=spinning)
    except ValidationError as e:
        raise ValueError(f"invalid ONNX Runtime settings: {describe_error(e)}") from None


def batch_settings(max_batch_size: int, batch_wait_ms: float) -> BatchSettings:
    """The batch settings, or ValueError naming the bad one."""
    try:
        return BatchSettings(max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms)
    except ValidationError as e:
        raise ValueError(f"invalid batch settings: {describe_error(e)}") from None
