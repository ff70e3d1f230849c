"""BiT-HyperRule: transfer hyper-parameters from the dataset size and image size alone.

Numbers from the reference code (google-research/big_transfer, bit_hyperrule.py) and the
paper (sec. 3.3). Where the paper text and the code differ (resolution: the paper says
resize 448 / crop 384, the code uses 512 / 480) the code's numbers are the default and the
paper's are available as `resolution="paper"`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

SMALL_IMAGE_AREA = 96 * 96
SMALL_DATASET = 20_000
MEDIUM_DATASET = 500_000
SMALL_RESOLUTION = (160, 128)  # (precrop, crop) when H*W < 96*96
LARGE_RESOLUTION = {"code": (512, 480), "paper": (448, 384)}
SCHEDULES = {  # [warmup, decay1, decay2, decay3, end] in optimizer steps
    "small": (100, 200, 300, 400, 500),
    "medium": (500, 3000, 6000, 9000, 10_000),
    "large": (500, 6000, 12_000, 18_000, 20_000),
}
BASE_LR = 0.003
BATCH_SIZE = 512
MOMENTUM = 0.9

Resolution = Literal["code", "paper"]
OVERRIDABLE = (
    "steps",
    "warmup_steps",
    "batch_size",
    "micro_batch_size",
    "base_lr",
    "crop",
    "precrop",
    "mixup_alpha",
)
# Hard upper bounds on overrides (docs/security.md, "Limits"): far above anything the rule
# chooses itself (crop 480, batch 512, 20k steps), far below what exhausts a worker
# (precrop 60000 or batch 1e9 need tens of GB; steps 1e12 holds a worker for ever).
MAX_OVERRIDE: dict[str, int | float] = {
    "steps": 100_000,
    "warmup_steps": 100_000,
    "batch_size": 4096,
    "micro_batch_size": 4096,
    "crop": 1024,
    "precrop": 1024,
    "base_lr": 10.0,
    "mixup_alpha": 10.0,
}


class PlanError(ValueError):
    """An invalid override or dataset description; the message says which and why."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Plan:
    """Everything the fine-tuning engine needs, and why (`overridden`)."""

    precrop: int
    crop: int
    warmup_steps: int
    decay_steps: tuple[int, ...]
    total_steps: int
    mixup_alpha: float
    batch_size: int = BATCH_SIZE
    micro_batch_size: int | None = None  # None: chosen to fit memory at run time
    base_lr: float = BASE_LR
    momentum: float = MOMENTUM
    weight_decay: float = 0.0
    zero_head: bool = True
    num_examples: int | None = None
    image_size: tuple[int, int] | None = None
    resolution: Resolution = "code"
    overridden: tuple[str, ...] = field(default=())

    @property
    def boundaries(self) -> tuple[int, ...]:
        """The reference code's "supports": warmup, decays, end."""
        return (self.warmup_steps, *self.decay_steps, self.total_steps)

    def to_dict(self) -> dict[str, Any]:
        """The REST shape (docs/api.md, POST /v1/jobs -> plan)."""
        return {
            "precrop": self.precrop,
            "crop": self.crop,
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "base_lr": self.base_lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "warmup_steps": self.warmup_steps,
            "decay_steps": list(self.decay_steps),
            "total_steps": self.total_steps,
            "mixup_alpha": self.mixup_alpha,
            "zero_head": self.zero_head,
            "source": {
                "rule": "bit-hyperrule",
                "resolution": self.resolution,
                "num_examples": self.num_examples,
                "image_size": list(self.image_size) if self.image_size else None,
                "overridden": list(self.overridden),
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        source = data.get("source", {})
        image_size = source.get("image_size")
        return cls(
            precrop=int(data["precrop"]),
            crop=int(data["crop"]),
            warmup_steps=int(data["warmup_steps"]),
            decay_steps=tuple(int(s) for s in data["decay_steps"]),
            total_steps=int(data["total_steps"]),
            mixup_alpha=float(data["mixup_alpha"]),
            batch_size=int(data["batch_size"]),
            micro_batch_size=data.get("micro_batch_size"),
            base_lr=float(data["base_lr"]),
            momentum=float(data.get("momentum", MOMENTUM)),
            weight_decay=float(data.get("weight_decay", 0.0)),
            zero_head=bool(data.get("zero_head", True)),
            num_examples=source.get("num_examples"),
            image_size=(int(image_size[0]), int(image_size[1])) if image_size else None,
            resolution=source.get("resolution", "code"),
            overridden=tuple(source.get("overridden", ())),
        )


def resolution(image_size: tuple[int, int], variant: Resolution = "code") -> tuple[int, int]:
    """(precrop, crop): small images go to 160/128, others to 512/480 (code) or 448/384 (paper)."""
    # Checked first: a bad variant must not pass silently just because the images are small.
    if variant not in LARGE_RESOLUTION:
        raise PlanError(f"resolution must be 'code' or 'paper', got {variant!r}", "resolution")
    h, w = image_size
    if h * w < SMALL_IMAGE_AREA:
        return SMALL_RESOLUTION
    return LARGE_RESOLUTION[variant]


def schedule(num_examples: int) -> tuple[int, ...]:
    """[warmup, decay1, decay2, decay3, end] by dataset size (< 20k, < 500k, larger)."""
    if num_examples < SMALL_DATASET:
        return SCHEDULES["small"]
    if num_examples < MEDIUM_DATASET:
        return SCHEDULES["medium"]
    return SCHEDULES["large"]


def mixup_alpha(num_examples: int) -> float:
    return 0.0 if num_examples < SMALL_DATASET else 0.1


def plan(
    num_examples: int,
    image_size: tuple[int, int],
    *,
    resolution_variant: Resolution = "code",
    **overrides: Any,
) -> Plan:
    """The HyperRule plan for a dataset, with optional validated overrides.

    `steps` rescales the rule's own schedule: warmup and decay boundaries keep their fractions
    of the total (e.g. 20/40/60/80% for the small-dataset schedule), so a shortened run still
    warms up, decays three times and ends.
    """
    # A plain int from here on: numpy scalars would not survive json.dumps(plan.to_dict()).
    num_examples = _check_dataset(num_examples, image_size)
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise PlanError(f"unknown override(s) {unknown}; allowed: {list(OVERRIDABLE)}", unknown[0])
    given = {k: v for k, v in overrides.items() if v is not None}
    precrop, crop = resolution(image_size, resolution_variant)
    supports = schedule(num_examples)
    result = Plan(
        precrop=precrop,
        crop=crop,
        warmup_steps=supports[0],
        decay_steps=supports[1:-1],
        total_steps=supports[-1],
        mixup_alpha=mixup_alpha(num_examples),
        num_examples=num_examples,
        image_size=(int(image_size[0]), int(image_size[1])),
        resolution=resolution_variant,
    )
    return apply_overrides(result, given) if given else result


def apply_overrides(base: Plan, overrides: Mapping[str, Any]) -> Plan:
    """Return `base` with `overrides` applied and checked; records what was overridden."""
    changes: dict[str, Any] = {}
    for key in ("batch_size", "micro_batch_size", "precrop", "crop", "steps", "warmup_steps"):
        if key in overrides:
            changes[key] = _positive_int(key, overrides[key])
    for key in ("base_lr", "mixup_alpha"):
        if key in overrides:
            changes[key] = _non_negative_float(key, overrides[key])
    if changes.get("base_lr") == 0.0:
        raise PlanError("base_lr must be > 0", "base_lr")
    for key, value in changes.items():
        if value > MAX_OVERRIDE[key]:
            raise PlanError(f"{key} must be <= {MAX_OVERRIDE[key]}, got {value}", key)

    steps = changes.pop("steps", None)
    warmup = changes.pop("warmup_steps", None)
    if steps is not None:
        fractions = [b / base.total_steps for b in base.boundaries[:-1]]
        scaled = [max(1, round(f * steps)) for f in fractions]
        changes["total_steps"] = steps
        changes["warmup_steps"] = min(scaled[0], steps - 1) if steps > 1 else 0
        changes["decay_steps"] = tuple(min(s, steps) for s in scaled[1:])
    if warmup is not None:
        changes["warmup_steps"] = warmup

    result = dataclasses.replace(
        base, **changes, overridden=tuple(sorted(set(base.overridden) | set(overrides)))
    )
    _check_plan(result)
    return result


def learning_rate(plan: Plan, step: int) -> float | None:
    """The reference schedule: linear warmup from 0, /10 after each decay boundary, None at end."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup, *decays, end = plan.boundaries
    if step < warmup:
        return plan.base_lr * step / warmup
    if step >= end:
        return None
    lr = plan.base_lr
    for boundary in decays:
        if boundary < step:
            lr /= 10
    return lr


def _check_dataset(num_examples: int, image_size: tuple[int, int]) -> int:
    count = _positive_int("num_examples", num_examples)
    # Sizes may be medians (floats); they must be finite numbers >= 1.
    if (
        isinstance(image_size, str | bytes)
        or len(image_size) != 2
        or not all(_is_number(v) and math.isfinite(v) and v >= 1 for v in image_size)
    ):
        raise PlanError(
            f"image_size must be (height, width) >= 1, got {image_size!r}", "image_size"
        )
    return count


def _check_plan(p: Plan) -> None:
    if p.crop > p.precrop:
        raise PlanError(f"crop ({p.crop}) must be <= precrop ({p.precrop})", "crop")
    mbs = p.micro_batch_size
    if mbs is not None and (mbs > p.batch_size or p.batch_size % mbs):
        raise PlanError(
            f"micro_batch_size ({mbs}) must divide batch_size ({p.batch_size})",
            "micro_batch_size",
        )
    if p.warmup_steps >= p.total_steps and p.total_steps > 1:
        raise PlanError(
            f"warmup_steps ({p.warmup_steps}) must be < total steps ({p.total_steps})",
            "warmup_steps",
        )


def _is_number(value: Any) -> bool:
    """int/float and numpy scalars, but not bool (True is not a step count)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> int:
    # isfinite first: int(nan) / int(inf) would raise ValueError / OverflowError, not PlanError.
    if not _is_number(value) or not math.isfinite(value) or int(value) != value:
        raise PlanError(f"{name} must be a whole number, got {value!r}", name)
    if value < 1:
        raise PlanError(f"{name} must be >= 1, got {value}", name)
    return int(value)


def _non_negative_float(name: str, value: Any) -> float:
    if not _is_number(value):
        raise PlanError(f"{name} must be a number, got {value!r}", name)
    if not math.isfinite(value):
        raise PlanError(f"{name} must be a finite number, got {value!r}", name)
    if value < 0:
        raise PlanError(f"{name} must be >= 0, got {value}", name)
    return float(value)
