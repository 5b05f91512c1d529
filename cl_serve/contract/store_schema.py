"""The typed schema of a model store's files, free of torch and Ray: store.json (`StoreConfig`), policy.json
(`ReleasePolicy`) and each version's manifest.json (`Manifest`). The store reads and writes them
(`cl_serve.store`), the trainer's commands fill them, the server reads them; `describe_error` turns a validation
error into one line for a user.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cl_serve.contract.preprocessing import Preprocessing

FORMAT_VERSION = 1
VERSION_FILES = ("learner.safetensors", "merged.safetensors", "model.onnx")
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a file name inside a version directory, nothing else

def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StoreConfig(BaseModel):
    """store.json: fixed when the store is created."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    created_at: str = Field(default_factory=utc_now)
    backbone: dict[str, Any]  # cl_serve.trainer.backbone.BackboneSpec as a dict
    backbone_sha256: str
    method: dict[str, Any]  # the method config (name + hyper-parameters)
    head: dict[str, Any] = Field(default_factory=lambda: {"name": "task-local"})  # the head strategy and settings
    preprocessing: Preprocessing


class ReleasePolicy(BaseModel):
    """policy.json: when a newly trained version may go live by itself (changeable at any time)."""

    model_config = ConfigDict(extra="forbid")

    gate_data: str | None = Field(None, description="ImageFolder of held-out images of old and new classes; "
                                                    "None: every version goes live when published")
    max_drop: float = Field(0.05, ge=0.0, le=1.0, description="largest accuracy drop allowed on any earlier task, "
                                                              "against the parent version, on the gate data")
    min_new_accuracy: float = Field(0.0, ge=0.0, le=1.0, description="accuracy the new task must reach")


class TaskRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    labels: list[str]
    version: int


class Manifest(BaseModel):
    """manifest.json of one immutable version."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    version: int
    parent: int | None
    task_index: int
    created_at: str = Field(default_factory=utc_now)
    labels: list[str]  # class-index order
    tasks: list[TaskRecord]
    preprocessing: Preprocessing
    method: dict[str, Any]
    head: dict[str, Any] = Field(default_factory=lambda: {"name": "task-local"})
    backbone: dict[str, Any]
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    onnx: dict[str, Any] | None = None  # export info; "file" names the ONNX file (default model.onnx)
    onnx_fp16: dict[str, Any] | None = None  # the same for the fp16 export, when there is one
    gate: dict[str, Any] | None = None  # the release gate's decision (cl_serve.release_gate), when a policy ran
    files: dict[str, str]  # file name -> sha256

    @field_validator("files")
    @classmethod
    def _plain_names(cls, files: dict[str, str]) -> dict[str, str]:
        bad = [n for n in files if not PLAIN_NAME.fullmatch(n) or n == "manifest.json"]
        if bad:
            raise ValueError(f"file names must be plain names inside the version directory, got {bad[:3]}")
        return files

    def onnx_file(self, fp16: bool = False) -> str | None:
        """The version's ONNX file name (fp16: the half-precision one), or None when it has none."""
        info = self.onnx_fp16 if fp16 else self.onnx
        name = (info or {}).get("file", "model.fp16.onnx" if fp16 else "model.onnx")
        return name if name in self.files else None


def describe_error(e: Exception, limit: int | None = 1, whole: str = "value") -> str:
    """One line for a user, the only formatter of validation errors: "field.path: message" for the first `limit`
    errors of a ValidationError (None: all), joined by "; " (`whole` names an error of the whole input); any other
    exception's first line."""
    if isinstance(e, ValidationError) and e.errors():
        return "; ".join(f"{'.'.join(str(x) for x in err['loc']) or whole}: {err['msg']}"
                         for err in e.errors()[:limit])
    return (str(e).splitlines() or [type(e).__name__])[0]


# One vocabulary for a version's state, shared by `cl-serve status`, GET /v1/versions and the page.
VERSION_STATES = {
    "live": "the store's CURRENT: what servers serve",
    "published": "verified and not live: a rollback target",
    "candidate": "refused by its release gate and not live: `cl-serve promote N` makes it live",
    "broken": "unreadable, failing verification or failing to load: nothing serves it (the error says why)",
}


def version_state(*, live: bool, gate: dict[str, Any] | None, error: str | None = None) -> str:
    """The state of one version in `VERSION_STATES` (a live version that is broken is `broken`)."""
    if error is not None:
        return "broken"
    if live:
        return "live"
    return "candidate" if gate is not None and not gate.get("passed", True) else "published"
