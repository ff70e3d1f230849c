"""The public shapes of HyperRule plans: what a job was planned with, the overrides a request
may set (each bounded: docs/security.md, "Limits"), and what a plan is estimated to cost."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from bitcore.hyperrule import MAX_OVERRIDE
from service.datasets import WorkEstimate
from service.schema_base import Schema, Stored


class PlanSource(Stored):
    rule: Literal["bit-hyperrule"]
    resolution: Literal["code", "paper"]
    num_examples: int | None = Field(description="training images the schedule is sized for")
    image_size: list[int] | None = Field(description="[median height, median width]")
    overridden: list[str] = Field(description="fields set by overrides, not by the rule")
    from_scratch: bool = Field(False, description="no pre-trained checkpoint: random init")


class Plan(Stored):
    """The BiT-HyperRule's choices for one job (docs/bit.md, "BiT-HyperRule")."""

    precrop: int
    crop: int
    batch_size: int
    micro_batch_size: int | None = Field(description="null: chosen to fit memory at run time")
    base_lr: float
    momentum: float
    weight_decay: float
    warmup_steps: int
    decay_steps: list[int]
    total_steps: int
    mixup_alpha: float
    zero_head: bool
    source: PlanSource


def _unset(value: object) -> bool:
    return value is None


class Overrides(Stored):
    """HyperRule fields a job set itself (POST /v1/jobs `overrides`); only those set appear."""

    steps: int | None = Field(None, exclude_if=_unset)
    warmup_steps: int | None = Field(None, exclude_if=_unset)
    batch_size: int | None = Field(None, exclude_if=_unset)
    micro_batch_size: int | None = Field(None, exclude_if=_unset)
    base_lr: float | None = Field(None, exclude_if=_unset)
    crop: int | None = Field(None, exclude_if=_unset)
    precrop: int | None = Field(None, exclude_if=_unset)
    mixup_alpha: float | None = Field(None, exclude_if=_unset)


def _bounded_int(what: str, name: str) -> Any:
    # strict: `true` is not 1 step, nor "5" five (JSON numbers only).
    return Field(None, ge=1, le=int(MAX_OVERRIDE[name]), strict=True, description=what)


class OverridesRequest(Schema):
    """POST /v1/jobs `overrides`: HyperRule fields to set instead of the rule's choice.

    Each has a hard bound (docs/security.md, "Limits"); how they fit together (crop <=
    precrop, micro_batch_size dividing batch_size, warmup_steps < steps) is the planner's to
    check (422 invalid_override), and what they cost together is checked against the server's
    limits (422 job_too_expensive)."""

    steps: int | None = _bounded_int("total optimizer steps", "steps")
    warmup_steps: int | None = _bounded_int("linear warm-up steps, < steps", "warmup_steps")
    batch_size: int | None = _bounded_int("images per optimizer step", "batch_size")
    micro_batch_size: int | None = _bounded_int(
        "images per forward pass; divides batch_size", "micro_batch_size"
    )
    base_lr: float | None = Field(
        None, gt=0, le=MAX_OVERRIDE["base_lr"], strict=True, allow_inf_nan=False
    )
    crop: int | None = _bounded_int("training crop, px; <= precrop", "crop")
    precrop: int | None = _bounded_int("resize before the crop, px", "precrop")
    mixup_alpha: float | None = Field(
        None, ge=0, le=MAX_OVERRIDE["mixup_alpha"], strict=True, allow_inf_nan=False
    )


class JobCost(Schema):
    """What the plan is estimated to cost (bitcore.costs); a job past one of the server's
    limits is refused (422 job_too_expensive)."""

    memory_bytes: int = Field(description="model state + saved activations of one micro-batch")
    micro_batch_size: int = Field(
        description="the micro-batch memory_bytes is for: the plan's, or 1 if chosen at run time"
    )
    cache_bytes: int = Field(
        description="the image cache at precrop: the images at precrop x precrop x 3 bytes, "
        "at most twice the dataset's bytes"
    )
    images_processed: int = Field(description="total_steps x batch_size")


class DatasetPlan(Schema):
    """The plan a job on this dataset would get, how much work it is, and what it costs."""

    dataset_id: str
    base_model: str
    validation_fraction: float
    plan: Plan
    estimate: WorkEstimate
    cost: JobCost
