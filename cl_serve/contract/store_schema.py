"""The typed schema of a model store's files, free of torch and Ray: store.json (`StoreConfig`), policy.json
(`ReleasePolicy`) and each version's manifest.json (`Manifest`). The store reads and writes them
(`cl_serve.store.model_store`), the trainer's commands fill them, the server reads them; `describe_error` turns a validation
error into one line for a user.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cl_serve.contract.head_settings import HeadConfig, TaskLocalConfig
from cl_serve.contract.method_settings import MethodConfig
from cl_serve.contract.preprocessing import Preprocessing
from cl_serve.contract.train_settings import TrainConfig

FORMAT_VERSION = 1
# Versions written before merged weights became on-demand (`cl-serve export --safetensors`) also list this file;
# it is still verified and read where present.
LEGACY_MERGED = "merged.safetensors"
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a file name inside a version directory, nothing else

def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# Keyword arguments that only concern the pretraining head or regularisation: a frozen, adapted backbone
# is always built without them.
_DROPPED_KWARGS = {"num_classes", "drop_path_rate", "drop_rate", "pos_drop_rate", "attn_drop_rate", "proj_drop_rate"}


class BackboneSpec(BaseModel):
    """What `timm.create_model` needs to rebuild the backbone (recorded in store.json)."""

    model_config = ConfigDict(extra="forbid")

    timm_model: str = Field(min_length=1)
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    source: Literal["checkpoint", "pretrained", "random"] = "checkpoint"
    seed: int | None = Field(None, description="seed of a random initialisation (source 'random')")

    def build_kwargs(self, num_classes: int = 0) -> dict[str, Any]:
        kw = {k: v for k, v in self.timm_kwargs.items() if k not in _DROPPED_KWARGS}
        kw["num_classes"] = num_classes
        return kw


class StoreConfig(BaseModel):
    """store.json: fixed when the store is created."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    created_at: str = Field(default_factory=utc_now)
    backbone: BackboneSpec
    backbone_sha256: str
    method: MethodConfig  # name + hyper-parameters (cl_serve.contract.method_settings)
    head: HeadConfig = Field(default_factory=TaskLocalConfig)  # (cl_serve.contract.head_settings)
    preprocessing: Preprocessing


class ReleasePolicy(BaseModel):
    """policy.json: when a newly trained version may go live by itself (changeable at any time)."""

    model_config = ConfigDict(extra="forbid")

    gate_data: str | None = Field(None, description="ImageFolder of held-out images of old and new classes; "
                                                    "None: every version goes live when published")
    max_drop: float = Field(0.05, ge=0.0, le=1.0, description="largest accuracy drop allowed on any earlier task, "
                                                              "against the parent version, on the gate data")
    min_new_accuracy: float = Field(0.0, ge=0.0, le=1.0, description="accuracy the new task must reach")


class QuantizationCheck(BaseModel):
    """How an int8 file compares with its version's fp32 file on labelled held-out images, and the bounds it met."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["dynamic"] = "dynamic"  # ONNX Runtime's dynamic quantization: int8 weights per channel
    data: str  # the ImageFolder it was judged on (the release policy's gate data unless given)
    images: int
    agreement: float  # share of images with the same top-1 class as the fp32 file
    accuracy_fp32: float
    accuracy_int8: float
    min_agreement: float
    max_drop: float  # accuracy_fp32 - accuracy_int8 allowed


class OnnxInfo(BaseModel):
    """How a version's ONNX file was exported (cl_serve.export), and its parity with the merged weights."""

    model_config = ConfigDict(extra="forbid")
    file: str = "model.onnx"  # the file to serve, one of the manifest's files
    data: list[str] = Field(default_factory=list)  # the external-data files the graph reads (manifest files too)
    opset: int
    dtype: Literal["float32", "float16", "int8"] = "float32"
    input: str = "input"
    output: str = "logits"
    dynamic_batch: bool = True
    parity_max_abs_diff: float | None = None  # largest |ONNX - torch| logit on the parity batch
    parity_bound: float | None = None  # the bound it was held to (cl_serve.export.parity)
    # set when the float64 reference was needed: torch's own fp32 error and ONNX Runtime's, against float64
    parity_torch_fp32_error: float | None = None
    parity_onnx_fp64_error: float | None = None
    quantization: QuantizationCheck | None = None  # int8 files: the comparison that admitted it


# The ONNX files a version may hold: precision -> (manifest field, default file name).
ONNX_PRECISIONS = {"fp32": ("onnx", "model.onnx"), "fp16": ("onnx_fp16", "model.fp16.onnx"),
                   "int8": ("onnx_int8", "model.int8.onnx")}


class GateRow(BaseModel):
    """One task's line in a release-gate decision."""

    model_config = ConfigDict(extra="forbid")
    task: int
    images: int = 0
    accuracy: float | None = None
    floor: float | None = None  # the new task's floor (min_new_accuracy)
    parent_accuracy: float | None = None
    drop: float | None = None


class GateDecision(BaseModel):
    """The release gate's decision on a version (cl_serve.workflow.release_gate): live if it passed, else a candidate."""

    model_config = ConfigDict(extra="forbid")
    passed: bool
    reasons: list[str] = Field(default_factory=list)
    max_drop: float
    min_new_accuracy: float = 0.0
    tasks: list[GateRow] = Field(default_factory=list)
    gate_data: str | None = None
    parent: int | None = None
    accuracy: float | None = None  # on all the gate data


class TaskAccuracy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: int
    accuracy: float
    images: int


class AccuracyReport(BaseModel):
    """Accuracy of a version on an ImageFolder of known classes, overall and per task that introduced them."""

    model_config = ConfigDict(extra="forbid")
    accuracy: float
    images: int
    per_task: list[TaskAccuracy] = Field(default_factory=list)


class Metrics(BaseModel):
    """What add-task measured: on the task's training images, and with --test-data on the test folder."""

    model_config = ConfigDict(extra="forbid")
    train_accuracy: float | None = None
    final_loss: float | None = None
    test: AccuracyReport | None = None


class TrainingRecord(TrainConfig):
    """The task's training settings as run, and what the run cost and learned (method and head summaries)."""

    device: str = "cpu"  # the device it ran on ("cpu", "cuda:0"), not the option
    seconds: float | None = None
    workers: int = 1
    train_images: int | None = None
    corrupt_skipped: int = 0
    method_summary: dict[str, Any] = Field(default_factory=dict)  # per method family (cl_serve.trainer.methods)
    head_summary: dict[str, Any] = Field(default_factory=dict)  # per head strategy (cl_serve.trainer.heads)
    head_state_bytes: dict[str, Any] = Field(default_factory=dict)
    decode_seconds: float | None = None
    head_seconds: float | None = None  # the head's fit (inside `seconds`)
    train_steps_seconds: float | None = None  # the optimiser's steps (inside `seconds`); the rest is feature passes
    export_seconds: float | None = None
    peak_rss_mib: float | None = None  # the add-task process's peak resident memory up to publishing
    heap: str | None = None  # what add-task did to the C allocator (cl_serve.base.heap)
    cache: dict[str, Any] | None = None  # the frozen-prefix cache (method `blocks`): views, bytes, seconds


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
    method: MethodConfig  # the method that learned this version (`chosen_by`: --method auto's evidence)
    head: HeadConfig = Field(default_factory=TaskLocalConfig)
    backbone: BackboneSpec
    metrics: Metrics = Field(default_factory=Metrics)
    training: TrainingRecord | None = None
    onnx: OnnxInfo | None = None  # None: published with --no-export
    onnx_fp16: OnnxInfo | None = None  # the half-precision export, when there is one
    onnx_int8: OnnxInfo | None = None  # int8 weights for CPUs (cl-serve export --int8), when there is one
    gate: GateDecision | None = None  # when a release policy ran
    files: dict[str, str]  # file name -> sha256
    # Files kept once per content in the store's blobs/ area (by their sha256) rather than under the version:
    # shared with every other version that holds the same bytes (cl_serve.store.model_store).
    shared: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _shared_are_files(self) -> "Manifest":
        if not self.files:  # a manifest being built: the store lists the files when it publishes
            return self
        onnx = [i for i in (self.onnx, self.onnx_fp16, self.onnx_int8) if i is not None]
        missing = sorted({*self.shared, *(n for i in onnx for n in i.data)} - set(self.files))
        if missing:
            raise ValueError(f"shared and ONNX data files must be listed in files, not {missing[:3]}")
        return self

    @field_validator("files")
    @classmethod
    def _plain_names(cls, files: dict[str, str]) -> dict[str, str]:
        bad = [n for n in files if not PLAIN_NAME.fullmatch(n) or n == "manifest.json"]
        if bad:
            raise ValueError(f"file names must be plain names inside the version directory, got {bad[:3]}")
        return files

    def onnx_file(self, precision: str = "fp32") -> str | None:
        """The version's ONNX file name of a precision (fp32, fp16, int8), or None when it has none."""
        key, default = ONNX_PRECISIONS[precision]
        info = getattr(self, key)
        name = info.file if info is not None else default
        return name if name in self.files else None

    def onnx_files(self, precision: str = "fp32") -> list[str]:
        """The graph and the weight files it reads, of one precision (empty when the version has none)."""
        name, info = self.onnx_file(precision), getattr(self, ONNX_PRECISIONS[precision][0])
        return [] if name is None else [name, *(info.data if info is not None else ())]


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


def version_state(*, live: bool, gate: GateDecision | None, error: str | None = None) -> str:
    """The state of one version in `VERSION_STATES` (a live version that is broken is `broken`)."""
    if error is not None:
        return "broken"
    if live:
        return "live"
    return "candidate" if gate is not None and not gate.passed else "published"


NEW_LABELS_SHOWN = 20  # a version's summary names at most this many of its task's new classes (and their count)


def version_summary(m: Manifest) -> dict[str, Any]:
    """One version as the history lists it (GET /v1/versions, `status --fast`, history.json): small and fixed in
    size whatever the number of classes."""
    test = m.metrics.test.per_task if m.metrics.test else []
    gate = m.gate
    return {"parent": m.parent, "task": m.task_index, "created_at": m.created_at, "classes": len(m.labels),
            "new_classes": len(m.tasks[-1].labels) if m.tasks else 0,
            "new_labels": m.tasks[-1].labels[:NEW_LABELS_SHOWN] if m.tasks else [],
            "method": m.method.name, "head": m.head.name,
            "per_task_accuracy": {str(t.task): t.accuracy for t in (gate.tasks if gate else []) if t.accuracy is not None}
            or {str(t.task): t.accuracy for t in test},
            "accuracy_source": "gate" if gate else ("test" if test else None),
            "gate": None if not gate else {"passed": gate.passed, "reasons": gate.reasons},
            "test_accuracy": m.metrics.test.accuracy if m.metrics.test else None,
            "onnx": m.onnx_file() is not None}


def summary_state(summary: dict[str, Any], *, live: bool, error: str | None = None) -> str:
    """`version_state` of a version from its summary (the gate's decision as recorded there)."""
    gate = summary.get("gate")
    if error is not None or "error" in summary:
        return "broken"
    if live:
        return "live"
    return "candidate" if gate is not None and not gate["passed"] else "published"
