"""How `python -m bitcore finetune` reports progress, suited to where it goes.

- a terminal: a live tqdm bar on stderr;
- anything else (a log file, a pipe): one short line every `--log-every` seconds, e.g.
  `step 250/3000 loss 0.0021 lr 0.0013 348 img/s eta 6m` (a bar's carriage returns would make
  one line of tens of thousands of characters);
- `--json`: JSON lines on stdout (progress, validation, then the result);
- `--quiet`: nothing but the result and errors.

The same callbacks record the training curves and turn Ctrl-C into a stop request that the
loop answers by checkpointing (as the worker does on SIGTERM).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from types import FrameType
from typing import Any, Literal, TextIO

from bitcore.train import Progress, TrainCallbacks

Mode = Literal["bar", "lines", "json", "quiet"]


def choose_mode(*, quiet: bool, as_json: bool, stream: TextIO) -> Mode:
    if as_json:
        return "json"
    if quiet:
        return "quiet"
    return "bar" if stream.isatty() else "lines"


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{round(seconds / 60)}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def format_step(progress: Progress) -> str:
    """`step 250/3000 loss 0.0021 lr 0.0013 348 img/s eta 6m` (under 100 characters)."""
    parts = [f"step {progress.step}/{progress.total_steps}"]
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4g}")
    parts.append(f"lr {progress.lr or 0.0:.2g}")
    if progress.images_per_second:
        parts.append(f"{progress.images_per_second:.3g} img/s")
    parts.append(f"eta {format_eta(progress.eta_seconds)}")
    return " ".join(parts)


def emit_json(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class StopOnInterrupt:
    """SIGINT while training asks the loop to stop at the next step (it checkpoints first);
    before training starts, or a second time, it interrupts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.training = False
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopOnInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *_: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.training or self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nstopping: saving a checkpoint after this step (Ctrl-C again to quit at once)",
            file=sys.stderr,
            flush=True,
        )


class CliCallbacks(TrainCallbacks):
    """Progress output for `mode`, curve recording (`recorder`) and the Ctrl-C stop request."""

    def __init__(
        self, mode: Mode, stop: StopOnInterrupt, recorder: Any, every_seconds: float
    ) -> None:
        self.mode = mode
        self.stop = stop
        self.recorder = recorder
        self.every = every_seconds
        self.phase: str | None = None
        self.last_line = float("-inf")
        self.bar: Any = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def should_cancel(self) -> bool:
        return self.stop.requested

    def on_checkpoint(self, step: int) -> None:
        self.recorder.save()

    def on_validation(self, step: int, metrics: dict[str, Any]) -> None:
        self.recorder.history.add_validation(step, metrics["accuracy"], metrics["loss"])
        if self.mode == "json":
            emit_json("validation", step=step, accuracy=metrics["accuracy"], loss=metrics["loss"])
        elif self.mode == "lines":
            self._line(f"validation after step {step}: accuracy {metrics['accuracy']:.4f}")

    def on_progress(self, progress: Progress) -> None:
        self.stop.training = progress.phase == "training"
        if progress.phase == "training":
            self.recorder.history.add_progress(progress)
        changed = progress.phase != self.phase
        self.phase = progress.phase
        if self.mode == "bar":
            self._bar(progress)
            return
        now = time.monotonic()
        last = progress.phase == "training" and progress.step == progress.total_steps
        if not (changed or last or now - self.last_line >= self.every):
            return
        self.last_line = now
        if self.mode == "json":
            emit_json("progress", **progress.to_dict())
        elif self.mode == "lines":
            if progress.phase == "training":
                self._line(format_step(progress))
            else:
                self._line(f"{progress.phase} (step {progress.step}/{progress.total_steps})")

    def _line(self, text: str) -> None:
        if self.mode == "lines":
            print(text, file=sys.stderr, flush=True)

    def _bar(self, progress: Progress) -> None:
        from tqdm import tqdm

        if self.bar is not None and progress.phase == "training" and self.bar.n == 0:
            # The first step of a resumed run: its rate counts from here, not from step 0.
            self.bar.close()
            self.bar = None
        if self.bar is None:
            self.bar = tqdm(
                total=progress.total_steps,
                initial=max(0, progress.step - 1),
                desc="fine-tuning",
                unit="step",
                file=sys.stderr,
            )
        postfix = {"phase": progress.phase, "lr": f"{progress.lr or 0.0:.2g}"}
        if progress.loss is not None:
            postfix["loss"] = f"{progress.loss:.4f}"
        if progress.images_per_second:
            postfix["img/s"] = f"{progress.images_per_second:.1f}"
        self.bar.set_postfix(postfix, refresh=False)  # shown by the update below
        self.bar.total = progress.total_steps
        self.bar.update(max(0, progress.step - self.bar.n))
