"""Typed, validated head settings (recorded in store.json next to the method), one model per head strategy;
torch-free, like the method settings.

Defaults follow the official recipes: `aligned` is InfLoRA+CA's classifier alignment (5 epochs of SGD, lr 0.01,
momentum 0.9, weight decay 5e-4, cosine over the epochs, 256 samples per class per epoch drawn from each class's
Gaussian, logits divided by the mean per-task logit norm and a temperature of 0.1); `analytic` is RanPAC's ridge
head (fixed Gaussian random projection + ReLU, one-hot targets, lambda searched over 10^-8..10^8 on an 80/20
split of the current task's features).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

HEAD_NAMES = ("task-local", "aligned", "analytic")


class _Head(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskLocalConfig(_Head):
    """One linear block per task, trained with cross-entropy on its own logits only, frozen afterwards."""

    name: Literal["task-local"] = "task-local"


class AlignedConfig(_Head):
    """Per-task blocks, then the whole head retrained on Gaussian samples of every seen class's features."""

    name: Literal["aligned"] = "aligned"
    covariance: Literal["full", "lowrank"] = Field(
        "lowrank", description="full: a d x d covariance per class; lowrank: top-k eigenpairs + diagonal residual")
    cov_rank: int = Field(16, ge=1, le=1024, description="k of the low-rank covariance")
    shrinkage: float = Field(1e-4, ge=0.0, description="added to the covariance diagonal (official: 1e-4)")
    epochs: int = Field(5, ge=1, le=1000)
    samples_per_class: int = Field(256, ge=1, le=100_000)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    temperature: float = Field(0.1, gt=0.0, description="logit normalisation temperature (official logit_norm 0.1)")
    seed: int = 0


class AnalyticConfig(_Head):
    """RanPAC: h = ReLU(f W_rand) (or h = f with projection 0), streaming G = sum h h^T, Q = sum h y^T, ridge."""

    name: Literal["analytic"] = "analytic"
    projection: int = Field(2048, ge=0, le=65536, description="M, the random projection width (0: ridge on f)")
    seed: int = 0
    ridge_min_exp: int = Field(-8, ge=-30, le=30)
    ridge_max_exp: int = Field(8, ge=-30, le=30)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share of the task's data for lambda")
    drift: Literal["transport", "ignore"] = Field("ignore", description=(
        "when a task moves the backbone, move the earlier classes' statistics with a linear map fitted on the task's "
        "features before and after (transport), or keep them as computed (ignore)"))
    drift_samples: int = Field(256, ge=1, le=100_000, description="samples per earlier class when M > 0")


HeadConfig = Annotated[Union[TaskLocalConfig, AlignedConfig, AnalyticConfig], Field(discriminator="name")]
_ADAPTER = TypeAdapter(HeadConfig)


def head_config_from_dict(d: dict[str, Any] | None) -> HeadConfig:
    """Validate {"name": ..., settings...}; None means the papers' default (task-local)."""
    return _ADAPTER.validate_python(d if d is not None else {"name": "task-local"})
