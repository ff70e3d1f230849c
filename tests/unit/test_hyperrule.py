"""BiT-HyperRule: every schedule boundary, resolution and MixUp thresholds, overrides.

Expected numbers come from docs/bit.md (the reference bit_hyperrule.py), written out by hand here
rather than recomputed with the module's own constants.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from bitcore.hyperrule import Plan, PlanError, learning_rate, plan, resolution

BASE = 0.003
SMALL = (32, 32)  # H*W < 96*96: 160/128
LARGE = (224, 224)

# (N, [warmup, decay1, decay2, decay3, end]) at each side of both dataset-size thresholds.
SCHEDULES = [
    (1, (100, 200, 300, 400, 500)),
    (19_999, (100, 200, 300, 400, 500)),
    (20_000, (500, 3000, 6000, 9000, 10_000)),
    (499_999, (500, 3000, 6000, 9000, 10_000)),
    (500_000, (500, 6000, 12_000, 18_000, 20_000)),
    (10_000_000, (500, 6000, 12_000, 18_000, 20_000)),
]


def _boundary_table(supports: tuple[int, ...]) -> list[tuple[int, float | None]]:
    """(step, lr) at every boundary: 0, 1, warmup-1, warmup, each decay -1/0/+1, end-1, end."""
    warmup, d1, d2, d3, end = supports
    return [
        (0, 0.0),
        (1, BASE * 1 / warmup),
        (warmup // 2, BASE * (warmup // 2) / warmup),
        (warmup - 1, BASE * (warmup - 1) / warmup),
        (warmup, BASE),
        (warmup + 1, BASE),
        (d1 - 1, BASE),
        (d1, BASE),  # a boundary counts only once it is strictly below the step
        (d1 + 1, BASE / 10),
        (d2 - 1, BASE / 10),
        (d2, BASE / 10),
        (d2 + 1, BASE / 100),
        (d3 - 1, BASE / 100),
        (d3, BASE / 100),
        (d3 + 1, BASE / 1000),
        (end - 1, BASE / 1000),
        (end, None),
        (end + 1, None),
        (10 * end, None),
    ]


CASES = [
    pytest.param(n, step, lr, id=f"N={n}-step={step}")
    for n, supports in SCHEDULES
    for step, lr in _boundary_table(supports)
]


@pytest.mark.parametrize(("num_examples", "supports"), SCHEDULES)
def test_schedule_by_dataset_size(num_examples: int, supports: tuple[int, ...]) -> None:
    p = plan(num_examples, SMALL)
    assert p.boundaries == supports
    assert p.warmup_steps == supports[0]
    assert p.decay_steps == supports[1:4]
    assert p.total_steps == supports[4]


@pytest.mark.parametrize(("num_examples", "step", "expected"), CASES)
def test_learning_rate_at_every_boundary(
    num_examples: int, step: int, expected: float | None
) -> None:
    lr = learning_rate(plan(num_examples, SMALL), step)
    if expected is None:
        assert lr is None
    else:
        assert lr == pytest.approx(expected, rel=1e-12, abs=0.0)


def test_learning_rate_exact_small_schedule_values() -> None:
    p = plan(1000, SMALL)
    assert learning_rate(p, 0) == 0.0
    assert learning_rate(p, 1) == pytest.approx(3e-5, rel=1e-12)
    assert learning_rate(p, 99) == pytest.approx(0.00297, rel=1e-12)
    assert learning_rate(p, 100) == 0.003
    assert learning_rate(p, 201) == pytest.approx(3e-4, rel=1e-12)
    assert learning_rate(p, 301) == pytest.approx(3e-5, rel=1e-12)
    assert learning_rate(p, 401) == pytest.approx(3e-6, rel=1e-12)
    assert learning_rate(p, 499) == pytest.approx(3e-6, rel=1e-12)
    assert learning_rate(p, 500) is None


def test_learning_rate_refuses_negative_steps() -> None:
    with pytest.raises(ValueError, match="step must be >= 0"):
        learning_rate(plan(1000, SMALL), -1)


def test_learning_rate_uses_the_plans_base_lr() -> None:
    p = plan(1000, SMALL, base_lr=0.01)
    assert learning_rate(p, 50) == pytest.approx(0.005, rel=1e-12)
    assert learning_rate(p, 250) == pytest.approx(0.001, rel=1e-12)


@pytest.mark.parametrize(
    ("image_size", "variant", "expected"),
    [
        ((1, 1), "code", (160, 128)),
        ((32, 32), "code", (160, 128)),
        ((95, 96), "code", (160, 128)),  # 9120 pixels
        ((96 * 96 - 1, 1), "code", (160, 128)),  # the area decides, not the sides
        ((1, 96 * 96 - 1), "paper", (160, 128)),
        ((96, 96), "code", (512, 480)),  # exactly 96*96 is not small
        ((96 * 96, 1), "code", (512, 480)),
        ((96, 96), "paper", (448, 384)),
        ((500, 375), "code", (512, 480)),
        ((500, 375), "paper", (448, 384)),
    ],
)
def test_resolution_threshold(
    image_size: tuple[int, int], variant: str, expected: tuple[int, int]
) -> None:
    assert resolution(image_size, variant) == expected  # type: ignore[arg-type]
    p = plan(100, image_size, resolution_variant=variant)  # type: ignore[arg-type]
    assert (p.precrop, p.crop) == expected
    assert p.resolution == variant


@pytest.mark.parametrize("image_size", [SMALL, LARGE])
def test_unknown_resolution_variant_is_refused(image_size: tuple[int, int]) -> None:
    with pytest.raises(PlanError, match="resolution must be 'code' or 'paper'") as info:
        plan(100, image_size, resolution_variant="huge")  # type: ignore[arg-type]
    assert info.value.field == "resolution"


@pytest.mark.parametrize(
    ("num_examples", "alpha"), [(1, 0.0), (19_999, 0.0), (20_000, 0.1), (1_000_000, 0.1)]
)
def test_mixup_threshold(num_examples: int, alpha: float) -> None:
    assert plan(num_examples, SMALL).mixup_alpha == alpha


def test_defaults_follow_the_paper() -> None:
    p = plan(5000, LARGE)
    assert (p.batch_size, p.base_lr, p.momentum, p.weight_decay) == (512, 0.003, 0.9, 0.0)
    assert p.zero_head is True
    assert p.micro_batch_size is None
    assert p.overridden == ()
    assert (p.num_examples, p.image_size) == (5000, (224, 224))


@pytest.mark.parametrize(
    ("num_examples", "steps", "expected"),
    [
        # Small schedule: warmup and decays at 20/40/60/80% of the run.
        (1000, 1000, (200, 400, 600, 800, 1000)),
        (1000, 10, (2, 4, 6, 8, 10)),
        (1000, 250, (50, 100, 150, 200, 250)),
        # Medium schedule: 5%, 30%, 60%, 90%.
        (50_000, 1000, (50, 300, 600, 900, 1000)),
        (50_000, 20_000, (1000, 6000, 12_000, 18_000, 20_000)),
        # Large schedule: 2.5%, 30%, 60%, 90%.
        (600_000, 1000, (25, 300, 600, 900, 1000)),
        # Tiny runs: every boundary at least 1, warmup below the end.
        (1000, 2, (1, 1, 1, 2, 2)),
        (1000, 1, (0, 1, 1, 1, 1)),
    ],
)
def test_steps_override_rescales_the_schedule(
    num_examples: int, steps: int, expected: tuple[int, ...]
) -> None:
    p = plan(num_examples, SMALL, steps=steps)
    assert p.boundaries == expected
    assert p.overridden == ("steps",)
    assert learning_rate(p, steps) is None
    assert learning_rate(p, steps - 1) is not None


def test_rescaled_schedule_learning_rates() -> None:
    p = plan(1000, SMALL, steps=1000)
    assert learning_rate(p, 100) == pytest.approx(0.0015, rel=1e-12)
    assert learning_rate(p, 200) == 0.003
    assert learning_rate(p, 400) == 0.003
    assert learning_rate(p, 401) == pytest.approx(3e-4, rel=1e-12)
    assert learning_rate(p, 999) == pytest.approx(3e-6, rel=1e-12)
    assert learning_rate(p, 1000) is None
    one = plan(1000, SMALL, steps=1)
    assert learning_rate(one, 0) == 0.003  # no warmup room: the one step runs at base lr
    assert learning_rate(one, 1) is None


def test_steps_and_warmup_together() -> None:
    p = plan(1000, SMALL, steps=1000, warmup_steps=50)
    assert p.boundaries == (50, 400, 600, 800, 1000)
    assert p.overridden == ("steps", "warmup_steps")
    assert plan(1000, SMALL, warmup_steps=10).boundaries == (10, 200, 300, 400, 500)


def test_other_overrides_are_applied_and_recorded() -> None:
    p = plan(
        1000,
        LARGE,
        batch_size=128,
        micro_batch_size=32,
        base_lr=0.001,
        crop=224,
        precrop=256,
        mixup_alpha=0.2,
    )
    assert (p.batch_size, p.micro_batch_size, p.base_lr) == (128, 32, 0.001)
    assert (p.crop, p.precrop, p.mixup_alpha) == (224, 256, 0.2)
    assert p.overridden == (
        "base_lr",
        "batch_size",
        "crop",
        "micro_batch_size",
        "mixup_alpha",
        "precrop",
    )
    assert p.boundaries == (100, 200, 300, 400, 500)  # the schedule is untouched
    assert plan(1000, SMALL, steps=None, crop=None).overridden == ()  # None means "not given"
    assert plan(1000, SMALL, crop=128.0).crop == 128  # a whole float is a whole number
    assert plan(1000, SMALL, mixup_alpha=0).mixup_alpha == 0.0


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"steps": 0}, "steps", "steps must be >= 1, got 0"),
        ({"steps": -5}, "steps", "steps must be >= 1, got -5"),
        ({"steps": 10.5}, "steps", "steps must be a whole number, got 10.5"),
        ({"steps": "100"}, "steps", "steps must be a whole number, got '100'"),
        ({"steps": True}, "steps", "steps must be a whole number, got True"),
        ({"batch_size": False}, "batch_size", "batch_size must be a whole number, got False"),
        ({"steps": math.nan}, "steps", "steps must be a whole number, got nan"),
        ({"steps": math.inf}, "steps", "steps must be a whole number, got inf"),
        ({"warmup_steps": 0}, "warmup_steps", "warmup_steps must be >= 1"),
        ({"warmup_steps": 500}, "warmup_steps", r"warmup_steps \(500\) must be < total steps"),
        ({"steps": 100, "warmup_steps": 100}, "warmup_steps", r"warmup_steps \(100\) must be <"),
        ({"crop": 161}, "crop", r"crop \(161\) must be <= precrop \(160\)"),
        ({"precrop": 100}, "crop", r"crop \(128\) must be <= precrop \(100\)"),
        ({"micro_batch_size": 100}, "micro_batch_size", r"\(100\) must divide batch_size \(512\)"),
        ({"micro_batch_size": 1024}, "micro_batch_size", r"\(1024\) must divide batch_size"),
        ({"batch_size": 96, "micro_batch_size": 64}, "micro_batch_size", "must divide"),
        ({"base_lr": 0}, "base_lr", "base_lr must be > 0"),
        ({"base_lr": -0.1}, "base_lr", "base_lr must be >= 0"),
        ({"base_lr": True}, "base_lr", "base_lr must be a number, got True"),
        ({"base_lr": "0.1"}, "base_lr", "base_lr must be a number"),
        ({"base_lr": math.nan}, "base_lr", "base_lr must be a finite number, got nan"),
        ({"base_lr": math.inf}, "base_lr", "base_lr must be a finite number, got inf"),
        ({"mixup_alpha": -1.0}, "mixup_alpha", "mixup_alpha must be >= 0"),
        ({"mixup_alpha": math.nan}, "mixup_alpha", "mixup_alpha must be a finite number"),
        ({"learning_rate": 0.1}, "learning_rate", r"unknown override\(s\) \['learning_rate'\]"),
        ({"momentum": 0.5}, "momentum", "allowed: .*'steps'"),
    ],
)
def test_bad_overrides_are_refused_clearly(
    overrides: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(PlanError, match=message) as info:
        plan(1000, SMALL, **overrides)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("num_examples", "image_size", "field"),
    [
        (0, SMALL, "num_examples"),
        (-1, SMALL, "num_examples"),
        (True, SMALL, "num_examples"),
        ("1000", SMALL, "num_examples"),
        (1.5, SMALL, "num_examples"),
        (100, (0, 32), "image_size"),
        (100, (32,), "image_size"),
        (100, (32, 32, 3), "image_size"),
        (100, ("32", 32), "image_size"),
        (100, (math.nan, 32), "image_size"),
        (100, (True, 32), "image_size"),
        (100, "32x32", "image_size"),
    ],
)
def test_bad_dataset_facts_are_refused_clearly(
    num_examples: object, image_size: object, field: str
) -> None:
    with pytest.raises(PlanError, match=field) as info:
        plan(num_examples, image_size)  # type: ignore[arg-type]
    assert info.value.field == field


def test_numpy_and_float_dataset_facts_are_accepted() -> None:
    # Dataset statistics often arrive as numpy scalars, and median sizes as floats.
    p = plan(np.int64(20_000), (np.float64(40.5), 48.0), steps=np.int64(300))  # type: ignore[arg-type]
    assert p.boundaries == (15, 90, 180, 270, 300)
    assert (p.precrop, p.crop, p.mixup_alpha) == (160, 128, 0.1)
    assert p.image_size == (40, 48)
    assert p.num_examples == 20_000 and type(p.num_examples) is int
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.parametrize(
    "p",
    [
        plan(1000, SMALL),
        plan(600_000, LARGE, resolution_variant="paper"),
        plan(50_000, LARGE, steps=777, micro_batch_size=64, base_lr=0.001, mixup_alpha=0.0),
    ],
)
def test_to_dict_from_dict_round_trip(p: Plan) -> None:
    data = p.to_dict()
    assert Plan.from_dict(data) == p
    assert Plan.from_dict(json.loads(json.dumps(data))) == p  # as stored in the database


def test_rest_shape() -> None:
    data = plan(1000, SMALL, steps=1000, base_lr=0.01).to_dict()
    assert set(data) == {
        "precrop",
        "crop",
        "batch_size",
        "micro_batch_size",
        "base_lr",
        "momentum",
        "weight_decay",
        "warmup_steps",
        "decay_steps",
        "total_steps",
        "mixup_alpha",
        "zero_head",
        "source",
    }
    assert data["decay_steps"] == [400, 600, 800]
    assert (data["warmup_steps"], data["total_steps"]) == (200, 1000)
    assert (data["precrop"], data["crop"], data["batch_size"]) == (160, 128, 512)
    assert data["micro_batch_size"] is None
    assert (data["weight_decay"], data["zero_head"], data["mixup_alpha"]) == (0.0, True, 0.0)
    assert data["source"] == {
        "rule": "bit-hyperrule",
        "resolution": "code",
        "num_examples": 1000,
        "image_size": [32, 32],
        "overridden": ["base_lr", "steps"],
    }
