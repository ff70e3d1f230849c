"""`python -m bitcore`: plan, fine-tune and predict from the command line, without the service.

    python -m bitcore plan DIR [--resolution code|paper] [--set steps=200 ...] [--json]
    python -m bitcore finetune DIR --base-model BiT-M-R50x1 --out OUT [--set ...]
    python -m bitcore predict ARTIFACT IMG... [--top-k 5]
    python -m bitcore checkpoints list [--dir DIR] | pull NAME... [--dir DIR]

User errors (bad folder, bad override, unknown model, unreadable image) print one line to
stderr and exit with status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitcore import hyperrule
from bitcore.data import DatasetError, DatasetIndex, index_directory, stratified_split
from bitcore.hyperrule import Plan, PlanError
from bitcore.images import ImageError

if TYPE_CHECKING:
    from bitcore.train import FinetuneResult, Progress, TrainCallbacks

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the command line or its inputs; printed as one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.command(args)
        return result
    except (UserError, DatasetError, PlanError, ImageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `... | head`: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        if _is_user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bitcore",
        description="Fine-tune BiT (Big Transfer) models with the BiT-HyperRule.",
    )
    commands = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")

    plan_cmd = commands.add_parser("plan", help="index a class-folder dataset and show its plan")
    _add_plan_options(plan_cmd)
    plan_cmd.add_argument("--json", action="store_true", help="print one JSON document")
    plan_cmd.set_defaults(command=cmd_plan)

    tune = commands.add_parser("finetune", help="fine-tune a base model on a class-folder dataset")
    _add_plan_options(tune)
    tune.add_argument("--base-model", required=True, help="registry name, e.g. BiT-M-R50x1")
    tune.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    weights = tune.add_mutually_exclusive_group()
    weights.add_argument("--from-scratch", action="store_true", help="random init, no checkpoint")
    weights.add_argument(
        "--checkpoint", type=Path, help="official .npz to start from (default: the catalog copy)"
    )
    tune.add_argument("--device", help="cpu, cuda, cuda:1, mps, xla (default: best available)")
    tune.add_argument(
        "--serving-precision",
        choices=["fp32", "int8"],
        default="fp32",
        help="int8: also write model.int8.onnx if it agrees with fp32 on >= 99.5%% of the "
        "validation split (recorded in metadata.json's metrics.precision)",
    )
    tune.set_defaults(command=cmd_finetune)

    pred = commands.add_parser("predict", help="classify images with a fine-tuned artifact")
    pred.add_argument("artifact", type=Path, help="artifact directory (model.safetensors + json)")
    pred.add_argument("images", type=Path, nargs="+", metavar="IMG")
    pred.add_argument("--top-k", type=_positive_int, default=5)
    pred.add_argument("--device", help="cpu, cuda, mps, xla (default: best available)")
    pred.set_defaults(command=cmd_predict)

    ckpt = commands.add_parser("checkpoints", help="list or download base checkpoints")
    ckpt_commands = ckpt.add_subparsers(dest="action", required=True, metavar="ACTION")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--dir", type=Path, help="checkpoint directory (default: $BITSERVE_CHECKPOINT_DIR)"
    )
    ckpt_commands.add_parser(
        "list", parents=[store], help="the catalog and what is present locally"
    )
    pull = ckpt_commands.add_parser(
        "pull", parents=[store], help="download checkpoints into the local store"
    )
    pull.add_argument("checkpoint_names", metavar="NAME", nargs="+")
    ckpt.set_defaults(command=cmd_checkpoints)
    return parser


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, metavar="DIR", help="<class>/<image> folder")
    parser.add_argument("--resolution", choices=["code", "paper"], default="code")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=_override,
        metavar="KEY=VALUE",
        help=f"override the rule ({', '.join(hyperrule.OVERRIDABLE)}); repeatable",
    )
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)


def _override(text: str) -> tuple[str, int | float]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for convert in (int, float):
        try:
            return key, convert(raw.strip())
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"value of {key} must be a number, got {raw!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _index_and_plan(args: argparse.Namespace) -> tuple[DatasetIndex, Plan, int]:
    """Index the folder and plan on the training split's size (what the rule is defined on)."""
    fraction = args.validation_fraction
    if not 0.0 <= fraction < 1.0:  # checked before the (possibly long) decode of every image
        raise UserError(f"validation_fraction must be in [0, 1), got {fraction}")
    index = _index_with_progress(args.dataset)
    train, _ = stratified_split(index.samples, fraction, args.seed)
    plan = hyperrule.plan(
        len(train),
        index.median_size,
        resolution_variant=args.resolution,
        **dict(args.overrides),
    )
    return index, plan, len(train)


def _index_with_progress(folder: Path) -> DatasetIndex:
    from tqdm import tqdm

    with tqdm(desc="decoding", unit="img", disable=None, file=sys.stderr, leave=False) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return index_directory(folder, progress=progress)


def cmd_plan(args: argparse.Namespace) -> int:
    index, plan, num_train = _index_and_plan(args)
    if args.json:
        document = {
            "dataset": {
                "root": str(index.root),
                "num_images": index.num_images,
                "num_train": num_train,
                "classes": [{"name": n, "count": c} for n, c in index.counts().items()],
                "image_size": {
                    "median_height": index.median_size[0],
                    "median_width": index.median_size[1],
                },
                "rejected": [{"path": r.path, "reason": r.reason} for r in index.rejected],
            },
            "plan": plan.to_dict(),
        }
        print(json.dumps(document, indent=2))
        return 0
    print(format_summary(index, num_train))
    print()
    print(format_plan(plan))
    return 0


def format_summary(index: DatasetIndex, num_train: int) -> str:
    height, width = index.median_size
    lines = [
        f"dataset     {index.root}",
        f"images      {index.num_images} valid ({num_train} train, "
        f"{index.num_images - num_train} validation), {len(index.rejected)} rejected",
        f"image size  median {height}x{width} (height x width)",
        f"classes     {len(index.classes)}",
    ]
    lines += [f"  {name:<24} {count}" for name, count in index.counts().items()]
    if index.rejected:
        lines.append("rejected")
        lines += [f"  {r.path}: {r.reason} ({r.message})" for r in index.rejected]
    return "\n".join(lines)


def format_plan(plan: Plan) -> str:
    overridden = ", ".join(plan.overridden) or "none"
    micro = plan.micro_batch_size if plan.micro_batch_size is not None else "auto"
    rows = [
        ("resolution", f"resize {plan.precrop}, crop {plan.crop} ({plan.resolution} numbers)"),
        (
            "steps",
            f"{plan.total_steps} (warmup {plan.warmup_steps}, decay at {list(plan.decay_steps)})",
        ),
        ("batch size", f"{plan.batch_size} (micro-batch {micro})"),
        ("learning rate", f"{plan.base_lr:g}, SGD momentum {plan.momentum:g}, weight decay 0"),
        ("mixup alpha", f"{plan.mixup_alpha:g}"),
        ("head", "zero-initialised" if plan.zero_head else "random init"),
        ("overridden", overridden),
    ]
    return "BiT-HyperRule plan\n" + "\n".join(f"  {k:<14} {v}" for k, v in rows)


def cmd_finetune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    known = _known_base_models()
    if args.base_model not in known:
        raise UserError(f"unknown base model {args.base_model!r}; known: {', '.join(known)}")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UserError(f"checkpoint file {args.checkpoint} does not exist")
    if args.device is not None:
        from bitcore.devices import select_device

        try:
            select_device(args.device)
        except (RuntimeError, ValueError) as exc:  # "cuda requested but not available", typos
            raise UserError(str(exc)) from exc
    index, plan, num_train = _index_and_plan(args)
    print(format_summary(index, num_train), file=sys.stderr)
    print(format_plan(plan), file=sys.stderr)

    from bitcore.curves import write_curves
    from bitcore.train import finetune

    # The curves of an interrupted run are kept beside its checkpoints, so a resumed run's
    # curves start at step 1 too.
    pending = Path(args.out).with_name(Path(args.out).name + ".work") / PENDING_CURVES
    recorder = _CurveRecorder(pending)
    with tqdm(total=plan.total_steps, desc="fine-tuning", unit="step", file=sys.stderr) as bar:
        result = finetune(
            index,
            args.base_model,
            plan,
            args.out,
            device=args.device,
            checkpoint=args.checkpoint,
            from_scratch=args.from_scratch,
            validation_fraction=args.validation_fraction,
            seed=args.seed,
            callbacks=_progress_bar_callbacks(bar, recorder),
            serving_precision=args.serving_precision,
        )
    curves = write_curves(recorder.history, plan, result.artifact_dir)
    pending.unlink(missing_ok=True)
    print(_describe_result(result))
    print(f"training curves: {', '.join(str(p) for p in curves)}", file=sys.stderr)
    return 0


def _known_base_models() -> list[str]:
    """Registry architectures plus catalog checkpoints (e.g. BiT-M-R50x1-ILSVRC2012)."""
    from bitcore.catalog import CATALOG
    from bitcore.models import MODEL_SPECS

    return sorted(set(MODEL_SPECS) | set(CATALOG))


PENDING_CURVES = "curves.pending.json"


class _CurveRecorder:
    """The run's TrainingHistory, saved at every checkpoint so a resumed run continues it."""

    def __init__(self, path: Path) -> None:
        from bitcore.train.history import TrainingHistory

        self.path = path
        self.history = TrainingHistory()
        # A damaged file only loses the earlier part of the curve, never the training.
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            self.history = TrainingHistory.from_dict(json.loads(path.read_text()))

    def save(self) -> None:
        from bitcore.atomic import write_json_atomic

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.history.to_dict(), indent=None)


def _progress_bar_callbacks(bar: Any, recorder: _CurveRecorder | None = None) -> TrainCallbacks:
    """Training callbacks that drive a tqdm bar (Ctrl-C, not should_cancel, stops the CLI) and
    record the curves."""
    from bitcore.train import TrainCallbacks

    class ProgressBar(TrainCallbacks):
        def on_validation(self, step: int, metrics: dict[str, Any]) -> None:
            if recorder is not None:
                recorder.history.add_validation(step, metrics["accuracy"], metrics["loss"])

        def on_checkpoint(self, step: int) -> None:
            if recorder is not None:
                recorder.save()

        def on_progress(self, progress: Progress) -> None:
            if recorder is not None:
                recorder.history.add_progress(progress)
            postfix = {"phase": progress.phase, "lr": f"{progress.lr or 0.0:.2g}"}
            if progress.loss is not None:
                postfix["loss"] = f"{progress.loss:.4f}"
            if progress.images_per_second:
                postfix["img/s"] = f"{progress.images_per_second:.1f}"
            bar.set_postfix(postfix, refresh=False)  # shown by the update below
            bar.total = progress.total_steps
            bar.update(max(0, progress.step - bar.n))

    return ProgressBar()


def _describe_result(result: FinetuneResult) -> str:
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


def cmd_predict(args: argparse.Namespace) -> int:
    if not args.artifact.is_dir():
        raise UserError(f"artifact directory {args.artifact} does not exist")
    payloads = []
    for path in args.images:
        if not path.is_file():
            raise UserError(f"image {path} does not exist")
        payloads.append(path.read_bytes())

    from bitcore.predict import Predictor

    try:
        predictor = Predictor.load(args.artifact, device=args.device)
    except RuntimeError as exc:  # the requested device is not available
        raise UserError(str(exc)) from exc
    try:
        results = predictor.predict(payloads, args.top_k)
    except ImageError as exc:
        index = getattr(exc, "index", None)
        name = args.images[index] if isinstance(index, int) else "an image"
        message = str(exc).removeprefix(f"image {index}: ")
        raise UserError(f"cannot use {name}: {message}") from exc
    for path, top in zip(args.images, results, strict=True):
        print(path)
        for label, score in top:
            print(f"  {score:.4f}  {label}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from bitcore import catalog

    directory = args.dir if args.dir is not None else catalog.checkpoint_dir()
    if args.action == "list":
        print(f"checkpoint directory: {directory}")
        print(f"{'name':<24} {'download':>9}  {'present':<7}  upstream")
        for name, entry in catalog.CATALOG.items():
            size = f"{entry.approx_bytes / 2**20:.0f} MiB"
            present = "yes" if catalog.is_present(name, directory) else "no"
            print(f"{name:<24} {size:>9}  {present:<7}  {entry.upstream}")
        return 0
    # Every name is checked before the first (possibly long) download starts.
    for name in args.checkpoint_names:
        if name not in catalog.CATALOG:
            raise UserError(
                f"unknown checkpoint {name!r}; see `python -m bitcore checkpoints list`"
            )
    for name in args.checkpoint_names:
        print(catalog.pull_with_progress_bar(name, directory), flush=True)
    return 0


def _is_user_error(exc: Exception) -> bool:
    """Errors from lazily imported modules (catalog, checkpoints, artifacts, train) that
    describe bad input. By name, so that `plan` does not import torch to catch them; the
    catalog's errors all derive from CatalogError, MissingCheckpointError is a
    FileNotFoundError (caught in `main`)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ArtifactError", "CatalogError", "CheckpointError", "ResumeError"})
