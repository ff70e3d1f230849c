"""How a running job reports: the training callbacks of one JobRun (progress, curves,
checkpoints, cancel) and the throttle on its progress writes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bitcore.train import Progress, TrainCallbacks

if TYPE_CHECKING:  # the run imports this module; the type is for the checker only
    from worker.runner import JobRun


class RunCallbacks(TrainCallbacks):
    """What training tells the run, and asks it (should it stop?)."""

    def __init__(self, run: JobRun) -> None:
        self.run = run

    def on_progress(self, progress: Progress) -> None:
        self.run.history.add_progress(progress)
        self.run.progress(progress)
        if progress.phase == "training" and progress.step % self.run.checkpoint_every == 0:
            self.run.save_history(progress.step)  # before the loop writes that checkpoint

    def on_validation(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.history.add_validation(step, metrics.get("accuracy"), metrics.get("loss"))

    def should_cancel(self) -> bool:
        return self.run.cancel.is_set() or self.run.shutdown.is_set()

    def on_checkpoint(self, step: int) -> None:
        self.run.save_history(step)  # e.g. the checkpoint of a cancel or a hand-back
        self.run.checkpoints.submit(step)


class Throttled:
    """Write at most once per `interval` seconds, but always the first report, a change of
    phase and the last step (so the stored progress never lags a finished phase)."""

    def __init__(
        self,
        write: Callable[[Progress], None],
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.write, self.interval, self.clock = write, interval, clock
        self.latest: Progress | None = None
        self._last_write = -float("inf")

    def __call__(self, progress: Progress) -> None:
        previous, self.latest = self.latest, progress
        now = self.clock()
        due = now - self._last_write >= self.interval
        phase_changed = previous is None or previous.phase != progress.phase
        last_step = progress.step == progress.total_steps
        if due or phase_changed or last_step:
            self._last_write = now
            self.write(progress)


def checkpoint_every(total_steps: int) -> int:
    """Checkpoint about 10 times per run, at least every 50 steps: a lost worker costs at most
    a tenth of the run (or 50 steps) when the job resumes elsewhere."""
    return max(1, min(50, total_steps // 10))
