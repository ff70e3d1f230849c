"""How a training run talks to its caller: progress reports, cooperative cancel, checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Phase = Literal["preparing", "training", "evaluating"]


@dataclass(frozen=True)
class Progress:
    """One report. `step` counts completed optimizer steps (0..total_steps); `lr` is the rate
    the step just taken used, i.e. learning_rate(plan, step - 1). `loss` is None until the
    first step has run (JSON has no NaN)."""

    step: int
    total_steps: int
    loss: float | None
    lr: float
    images_per_second: float
    eta_seconds: float | None
    phase: Phase

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainCallbacks:
    """Override what you need; the defaults do nothing and never cancel.

    `should_cancel` is polled between optimizer steps and (at most about once a second) between
    micro-batches, so it should be cheap: read a flag, not a database.
    """

    def on_progress(self, progress: Progress) -> None:
        return None

    def should_cancel(self) -> bool:
        return False

    def on_checkpoint(self, step: int) -> None:
        return None


class TrainingCancelled(Exception):
    """Raised after the state at `step` completed steps has been checkpointed."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training cancelled after {step} steps (checkpoint written)")
        self.step = step

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return (type(self), (self.step,))
