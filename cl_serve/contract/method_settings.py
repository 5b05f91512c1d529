"""Typed, validated method hyper-parameters (recorded in store.json and every manifest), one model per method
family; torch-free, so the CLI, the store and the server read them without the trainer.

Defaults are the papers' recipes from DESIGN.md: InfLoRA r = 10 on key/value, eps_0 = 0.95 (CIFAR) growing to 1
over the expected number of tasks; SD-LoRA r = 10 on query/value, magnitudes start at 1, the RR rank schedule
10/8/6, KD threshold tau = 9e-4.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

# target name -> (linear layer inside each block, which third of its rows; None = all rows)
TARGETS: dict[str, tuple[str, int | None]] = {
    "q": ("attn.qkv", 0), "k": ("attn.qkv", 1), "v": ("attn.qkv", 2),
    "proj": ("attn.proj", None), "fc1": ("mlp.fc1", None), "fc2": ("mlp.fc2", None),
}

METHOD_NAMES = ("inflora", "sdlora", "sdlora-rr", "sdlora-kd", "seq-lora", "none", "auto")


CHOSEN_BY = Field(None, description=(
    "manifests only: --method auto's evidence for choosing this method (held-out accuracies, the rows tried)"))


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chosen_by: dict[str, Any] | None = CHOSEN_BY

    rank: int = Field(10, ge=1, le=512, description="rank of each task's branch")
    blocks: int | None = Field(None, ge=1, le=1024, description=(
        "adapt only the last N transformer blocks (None: every block). The frozen blocks before them run once "
        "per image view during training (cached tokens), so a step costs about N/depth of a full one"))
    adapt_tasks: int | None = Field(None, ge=1, description=(
        "learn branches during the first N tasks only; later tasks keep the backbone as it is and only the head "
        "learns (first-session adaptation, as in RanPAC/APER: no feature drift after task N). None: every task"))

    @field_validator("targets", check_fields=False)
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        bad = sorted(set(v) - set(TARGETS))
        if bad or not v:
            raise ValueError(f"targets must be a non-empty subset of {sorted(TARGETS)}, got {v}")
        return list(dict.fromkeys(v))


class InfLoRAConfig(_Common):
    name: Literal["inflora"] = "inflora"
    targets: list[str] = Field(default_factory=lambda: ["k", "v"])
    eps0: float = Field(0.95, gt=0.0, lt=1.0, description="DualGPM energy threshold at the first task")
    expected_tasks: int = Field(10, ge=1, description="T in eps_t = eps0 + (1 - eps0) t / T (clamped at 1)")
    b_scale: float = Field(1 / math.sqrt(3), gt=0.0, description="scale of the designed B rows (official: 1/sqrt 3)")

    @property
    def family(self) -> str:
        return "inflora"

    def threshold(self, task: int) -> float:
        return self.eps0 + (1.0 - self.eps0) * min(task / self.expected_tasks, 1.0)


class RankStep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    from_task: int = Field(ge=1, description="1-based task number from which this rank applies")
    rank: int = Field(ge=1, le=512)


class SDLoRAConfig(_Common):
    name: Literal["sdlora", "sdlora-rr", "sdlora-kd"] = "sdlora"
    targets: list[str] = Field(default_factory=lambda: ["q", "v"])
    alpha_init: float = Field(1.0, description="initial magnitude of a new direction")
    rank_schedule: list[RankStep] | None = Field(None, description="SD-LoRA-RR: rank by task (default 10/8/6)")
    kd_tau: float = Field(9e-4, ge=0.0, description="SD-LoRA-KD: fold a direction whose LS residual is <= tau")
    magnitudes: Literal["per-layer", "per-task"] = Field(
        "per-layer", description="per-layer: one alpha per (layer, target, task); per-task: one alpha per task shared "
                                 "by every layer and target (the official code). The CLI's default is per-task (the "
                                 "better one in the CIL benchmark); the field's default stays per-layer because a "
                                 "store.json written before the option existed was per-layer.")

    @model_validator(mode="after")
    def _schedule(self) -> "SDLoRAConfig":
        if self.name == "sdlora-rr" and self.rank_schedule is None:
            self.rank_schedule = [RankStep(from_task=1, rank=10), RankStep(from_task=5, rank=8),
                                  RankStep(from_task=9, rank=6)]
        if self.rank_schedule is not None:
            firsts = [s.from_task for s in self.rank_schedule]
            if firsts != sorted(firsts) or firsts[0] != 1 or len(set(firsts)) != len(firsts):
                raise ValueError("rank_schedule must start at from_task 1 and increase strictly")
        return self

    @property
    def family(self) -> str:
        return "sdlora"

    @property
    def distill(self) -> bool:
        return self.name == "sdlora-kd"

    def rank_for(self, task: int) -> int:
        """Rank of the branch learned in 0-based task `task`."""
        if not self.rank_schedule:
            return self.rank
        return [s.rank for s in self.rank_schedule if s.from_task <= task + 1][-1]


class SeqLoRAConfig(_Common):
    """Baseline: one LoRA branch fine-tuned task after task (no protection: the forgetting lower bound)."""

    name: Literal["seq-lora"] = "seq-lora"
    targets: list[str] = Field(default_factory=lambda: ["q", "v"])

    @property
    def family(self) -> str:
        return "seq-lora"


class NoneConfig(BaseModel):
    """No branches: the frozen backbone alone, so that a head by itself is a first-class baseline."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["none"] = "none"
    targets: list[str] = Field(default_factory=list, max_length=0)
    chosen_by: dict[str, Any] | None = CHOSEN_BY

    @property
    def family(self) -> str:
        return "none"


AdapterConfig = Annotated[Union[InfLoRAConfig, SDLoRAConfig, SeqLoRAConfig, NoneConfig], Field(discriminator="name")]


class AutoConfig(BaseModel):
    """Decide on the first task: the frozen backbone and the `candidate` adapter are each trained on the task's
    images minus a held-out share and scored on that share; the adapter is kept only if it wins by `margin`. With
    the analytic head, its projection width M is chosen the same way among `projections` whose G (8 M^2 bytes)
    fits `max_head_mib`. The winner is what every later task uses (recorded in each version's manifest)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["auto"] = "auto"
    candidate: Annotated[Union[InfLoRAConfig, SDLoRAConfig, SeqLoRAConfig], Field(discriminator="name")] = Field(
        default_factory=lambda: InfLoRAConfig(adapt_tasks=1))
    holdout: float = Field(0.2, gt=0.0, lt=1.0, description="share of each class's images held out for the choice")
    margin: float = Field(0.01, ge=0.0, le=1.0, description="held-out accuracy the adapter must win by")
    projections: list[int] = Field(default_factory=lambda: [0, 2048, 5000], min_length=1)
    max_head_mib: float = Field(256.0, gt=0.0, description="memory cap for the analytic head's G (8 M^2 bytes)")
    seed: int = 0

    @field_validator("projections")
    @classmethod
    def _projections(cls, v: list[int]) -> list[int]:
        if any(m < 0 or m > 65536 for m in v):
            raise ValueError(f"projections must lie in 0..65536, got {v}")
        return sorted(set(v))

    @property
    def family(self) -> str:
        return "auto"


MethodConfig = Annotated[Union[InfLoRAConfig, SDLoRAConfig, SeqLoRAConfig, NoneConfig, AutoConfig],
                         Field(discriminator="name")]
_ADAPTER = TypeAdapter(MethodConfig)


def method_config_from_dict(d: dict[str, Any]) -> MethodConfig:
    """Validate {"name": ..., hyper-parameters...}; raises pydantic.ValidationError with the field at fault."""
    return _ADAPTER.validate_python(d)
