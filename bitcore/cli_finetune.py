"""`python -m bitcore finetune`: every cheap check first (model name, --set keys, output path,
pre-trained weights, device), then decode, train, write the artifact and its curves.

Ctrl-C while training stops at the next step with a checkpoint in `<out>.work/` and exit 130;
running the same command again resumes from it ("resuming from step N"), `--restart`
discards it. After success `<out>.work/` (caches, checkpoints, curves.pending.json) is removed
unless `--keep-cache`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bitcore.cli_checks import (
    UserError,
    check_base_model,
    check_output,
    check_overrides,
    cli_words,
    work_dir,
)
from bitcore.cli_progress import CliCallbacks, StopOnInterrupt, choose_mode, emit_json

if TYPE_CHECKING:
    from bitcore.train import FinetuneResult
    from bitcore.train.history import TrainingHistory

PENDING_CURVES = "curves.pending.json"
EXIT_INTERRUPTED = 130


class CurveRecorder:
    """The run's TrainingHistory, saved at every checkpoint so a resumed run continues it."""

    def __init__(self, path: Path) -> None:
        from bitcore.train.history import TrainingHistory

        self.path = path
        self.history: TrainingHistory = TrainingHistory()
        # A damaged file only loses the earlier part of the curve, never the training.
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            self.history = TrainingHistory.from_dict(json.loads(path.read_text()))

    def save(self) -> None:
        from bitcore.atomic import write_json_atomic

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.history.to_dict(), indent=None)


def run(args: argparse.Namespace, known_models: list[str], index_and_plan: object) -> int:
    from bitcore.cli import format_plan, format_summary

    check_base_model(args.base_model, known_models)
    check_overrides(key for key, _ in args.overrides)
    if not 0.0 <= args.validation_fraction < 1.0:
        raise UserError(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    out = check_output(args.out, args.dataset, args.overwrite)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        what = "is a folder, not" if args.checkpoint.is_dir() else "does not exist; expected"
        raise UserError(f"checkpoint file {args.checkpoint} {what} an official BiT .npz file")

    from bitcore.train import TrainingCancelled, finetune, state
    from bitcore.train.engine import STATE_DIR
    from bitcore.train.prepare import resolve_checkpoint

    try:  # before any image is decoded: a missing download is a one-line error, at once
        resolve_checkpoint(args.base_model, args.checkpoint, args.from_scratch)
    except FileNotFoundError as exc:
        raise UserError(cli_words(str(exc))) from exc
    if args.device is not None:
        from bitcore.devices import select_device

        try:
            select_device(args.device)
        except (RuntimeError, ValueError) as exc:  # "cuda requested but not available", typos
            raise UserError(f"--device {args.device}: {exc}") from exc

    mode = choose_mode(quiet=args.quiet, as_json=args.json, stream=sys.stderr)
    work = work_dir(out)
    pending = work / PENDING_CURVES
    if args.restart:
        state.clear(work / STATE_DIR)
        pending.unlink(missing_ok=True)
    saved = state.latest(work / STATE_DIR)

    index, plan, num_train = index_and_plan(args)  # type: ignore[operator]
    if mode in ("bar", "lines"):
        print(format_summary(index, num_train), file=sys.stderr)
        print(format_plan(plan), file=sys.stderr)
    elif mode == "json":
        emit_json("plan", num_train=num_train, plan=plan.to_dict())
    if saved is not None:
        note = f"resuming from step {saved.step} (the checkpoint in {work}; --restart starts over)"
        if mode == "json":
            emit_json("resuming", step=saved.step, work_dir=str(work))
        elif mode != "quiet":
            print(note, file=sys.stderr, flush=True)

    recorder = CurveRecorder(pending)
    with StopOnInterrupt() as stop:
        callbacks = CliCallbacks(mode, stop, recorder, args.log_every)
        try:
            result = finetune(
                index,
                args.base_model,
                plan,
                out,
                device=args.device,
                checkpoint=args.checkpoint,
                from_scratch=args.from_scratch,
                validation_fraction=args.validation_fraction,
                seed=args.seed,
                callbacks=callbacks,
                serving_precision=args.serving_precision,
            )
        except TrainingCancelled as cancelled:
            callbacks.close()
            return _interrupted(cancelled.step, plan.total_steps, work, mode)
        finally:
            callbacks.close()

    from bitcore.curves import write_curves

    curves = write_curves(recorder.history, plan, result.artifact_dir)
    _drop_stale_int8(result)
    if args.keep_cache:
        pending.unlink(missing_ok=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    if mode == "json":
        emit_json(
            "result",
            artifact=str(result.artifact_dir),
            steps=result.steps,
            seconds=result.seconds,
            resumed_from=result.resumed_from,
            accuracy=result.metrics.get("accuracy"),
            loss=result.metrics.get("loss"),
            precision=result.metrics.get("precision"),
            curves=[str(p) for p in curves],
        )
        return 0
    print(describe_result(result))
    if mode != "quiet":
        names = ", ".join(p.name for p in curves)
        print(f"training curves: {names} in {result.artifact_dir}", file=sys.stderr)
    return 0


def _interrupted(step: int, total: int, work: Path, mode: str) -> int:
    if mode == "json":
        emit_json("interrupted", step=step, total_steps=total, work_dir=str(work))
    print(
        f"interrupted at step {step}/{total}; checkpoint saved in {work}. Run the same command "
        "again to continue from there, or add --restart to start over.",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def _drop_stale_int8(result: FinetuneResult) -> None:
    """An --overwrite of an artifact that served int8 must not keep the old int8 graph."""
    from bitcore.quantize import INT8_FILE

    precision = result.metrics.get("precision") or {}
    if precision.get("served") != "int8":
        (result.artifact_dir / INT8_FILE).unlink(missing_ok=True)


def describe_result(result: FinetuneResult) -> str:
    line = (
        f"artifact written to {result.artifact_dir} ({result.steps} steps, {result.seconds:.0f} s"
    )
    if result.resumed_from is not None:
        line += f", resumed from step {result.resumed_from}"
    line += ")"
    accuracy = result.metrics.get("accuracy")
    if accuracy is not None:
        line += f"; validation accuracy {accuracy:.4f}"
    precision = result.metrics.get("precision")
    if precision is not None:
        line += f"; serving {precision['served']}: {precision['reason']}"
    return line
