"""Typed, validated training settings of one task (the add-task options; recorded in every manifest), torch-free."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """Per-task optimisation budget and recipe (recorded in every version's manifest).

    Defaults are InfLoRA's recipe shape (Adam, cosine schedule); SD-LoRA's official recipe is
    `optimizer="sgd", momentum=0.9, schedule="constant", lr=8e-3`. `precision="bf16"` runs the training forward
    under CPU/GPU autocast (faster where the CPU has bf16 units); feature passes, heads and merging stay fp32.
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(5, ge=1, le=1000)
    lr: float = Field(5e-4, gt=0, le=1.0)
    batch_size: int = Field(64, ge=1, le=8192)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    schedule: Literal["cosine", "constant"] = "cosine"
    precision: Literal["fp32", "bf16"] = "fp32"
    min_crop_scale: float = Field(0.35, gt=0.0, le=1.0, description="random resized crop keeps >= this area")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_batch_size: int = Field(64, ge=1, description=(
        "images per no-grad pass (features, evaluation, the gate); their activations are add-task's largest "
        "transient: a ViT-S/16 at 224 px holds ~0.9 GB of them at 256 images and ~0.4 GB at 64, at the same speed "
        "on CPUs"))
    views: int = Field(4, ge=1, le=64, description=(
        "augmented views per image cached when only the last blocks are adapted (method `blocks`); cached only when "
        "fewer than the epochs (V views save epochs - V passes over the frozen blocks; as many or more save none)"))
    cache_max_gib: float = Field(2.0, ge=0.0, description=(
        "memory for the frozen blocks' cached outputs, the evaluation view's included: the evaluation view is cached "
        "first, then as many training views as fit; what does not fit is recomputed (0: no cache)"))
