"""A fine-tune's curves: training loss, learning rate and speed per step, and the validation
accuracy and loss at the evaluation points, kept at a bounded resolution.

A 20,000-step schedule reports every step; the history keeps at most `max_points` training
points by thinning uniformly: when full, the stride doubles and only steps that are multiples
of it stay (the last step reported is always kept, so a curve ends where training did). The
same object is what `python -m bitcore finetune` writes next to its artifact and what the
service stores per job (GET /v1/jobs/{id}/metrics), so both show the same curves.

Resuming from a checkpoint re-runs the steps after it: a report for step s drops every point
at or after s first, so the history never holds two values for one step.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bitcore.train.callbacks import Progress

MAX_POINTS = 500
CSV_COLUMNS = ("step", "loss", "lr", "images_per_second", "val_accuracy", "val_loss")


@dataclass
class TrainingHistory:
    max_points: int = MAX_POINTS
    stride: int = 1
    training: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_points < 2:
            raise ValueError(f"max_points must be >= 2, got {self.max_points}")

    def add_progress(self, progress: Progress) -> None:
        """Record a training step's report (other phases are ignored). A report at or before
        the last kept step means training resumed from a checkpoint: the later points go."""
        if progress.phase != "training" or progress.step < 1:
            return
        step = progress.step
        self._forget_from(step)
        # The newest report is always kept, so the curve ends where training is; once a newer
        # one arrives it stays only if its step is on the stride.
        if self.training and self.training[-1]["step"] % self.stride != 0:
            self.training.pop()
        self.training.append(
            {
                "step": step,
                "loss": _finite(progress.loss),
                "lr": _finite(progress.lr),
                "images_per_second": _finite(progress.images_per_second),
            }
        )
        while len(self.training) > self.max_points:
            self.stride *= 2
            newest = self.training[-1]
            self.training = [p for p in self.training[:-1] if p["step"] % self.stride == 0]
            self.training.append(newest)

    def add_validation(self, step: int, accuracy: float | None, loss: float | None) -> None:
        """A validation result after `step` optimizer steps (replaces one already at `step`)."""
        self.validation = [p for p in self.validation if p["step"] != step]
        self.validation.append({"step": step, "accuracy": _finite(accuracy), "loss": _finite(loss)})
        self.validation.sort(key=lambda p: p["step"])

    def _forget_from(self, step: int) -> None:
        if self.training and self.training[-1]["step"] >= step:
            self.training = [p for p in self.training if p["step"] < step]
        self.validation = [p for p in self.validation if p["step"] < step]

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_points": self.max_points,
            "stride": self.stride,
            "training": [dict(p) for p in self.training],
            "validation": [dict(p) for p in self.validation],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TrainingHistory:
        """The stored form back; None or {} gives an empty history."""
        if not data:
            return cls()
        return cls(
            max_points=int(data.get("max_points", MAX_POINTS)),
            stride=int(data.get("stride", 1)),
            training=[dict(p) for p in data.get("training", [])],
            validation=[dict(p) for p in data.get("validation", [])],
        )

    def to_csv(self) -> str:
        """One row per step that has a training point or a validation point (or both)."""
        rows: dict[int, dict[str, Any]] = {}
        for point in self.training:
            rows.setdefault(point["step"], {}).update(
                loss=point["loss"], lr=point["lr"], images_per_second=point["images_per_second"]
            )
        for point in self.validation:
            rows.setdefault(point["step"], {}).update(
                val_accuracy=point["accuracy"], val_loss=point["loss"]
            )
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for step in sorted(rows):
            row = rows[step]
            writer.writerow([step, *(_cell(row.get(name)) for name in CSV_COLUMNS[1:])])
        return out.getvalue()


def validation_steps(total_steps: int, points: int = 3) -> tuple[int, ...]:
    """The steps after which training pauses to score the validation split: `points` evenly
    spaced inside the schedule (the final evaluation after the last step is separate). Short
    schedules get fewer, and none under 8 steps: there the final evaluation is enough."""
    if total_steps < 8 or points < 1:
        return ()
    steps = {round(total_steps * k / (points + 1)) for k in range(1, points + 1)}
    return tuple(sorted(s for s in steps if 0 < s < total_steps))


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: a diverged loss is stored as null."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)
