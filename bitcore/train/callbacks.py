"""How a training run talks to its caller: progress reports, cooperative cancel, checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

# A job's phases in order. Training reports preparing/training/evaluating; a service that runs
# the training adds "downloading" (the base checkpoint, before training) and "done".
Phase = Literal["downloading", "preparing", "training", "evaluating", "done"]


@dataclass(frozen=True)
class Progress:
    """A fine-tuning job's progress. `step` counts completed optimizer steps
    (0..total_steps); `lr` is the rate the last step used. `loss` is null until the first step
    has run (JSON has no NaN). `downloaded_bytes` / `total_bytes` are set while the base
    checkpoint downloads (phase "downloading"; total unknown: null)."""

    step: int
    total_steps: int
    loss: float | None = None
    lr: float | None = None
    images_per_second: float | None = None
    eta_seconds: float | None = None
    phase: Phase | None = None
    downloaded_bytes: int | None = None
    total_bytes: int | None = None

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

    def on_validation(self, step: int, metrics: dict[str, Any]) -> None:
        """The validation split scored after `step` steps (bitcore.train.history.validation_
        steps, and once more after the last step): at least "accuracy" and "loss"."""
        return None


class TrainingCancelled(Exception):
    """Raised after the state at `step` completed steps has been checkpointed."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training cancelled after {step} steps (checkpoint written)")
        self.step = step

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return (type(self), (self.step,))
