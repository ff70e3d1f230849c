"""`python -m bitcore`: plan, fine-tune and predict from the command line, without the service.

    python -m bitcore plan DIR [--resolution code|paper] [--set steps=200 ...] [--json]
    python -m bitcore finetune DIR --base-model BiT-M-R50x1 --out OUT [--set ...]
    python -m bitcore predict ARTIFACT IMG... [--top-k 5] [--json]
    python -m bitcore checkpoints list [--dir DIR] [--json] | pull NAME... [--dir DIR]

User errors (bad folder, bad override, unknown model, unreadable image, an --out that cannot or
should not be written, a bad path: OSError, ValueError) print one line to stderr and exit with
status 2; Ctrl-C exits 130; anything else is a bug (exit 1, a traceback with --debug).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import bitcore
from bitcore import hyperrule
from bitcore.cli_checks import (
    FROM_SCRATCH_MODELS,
    UserError,
    check_overrides,
    cli_words,
    describe_os_error,
    flat_folder_hint,
)
from bitcore.cli_commands import cmd_checkpoints, cmd_predict
from bitcore.data import DatasetError, DatasetIndex, index_directory, stratified_split
from bitcore.hyperrule import Plan, PlanError
from bitcore.images import ImageError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

__all__ = ["UserError", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        result: int = args.command(args)
        return result
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `... | head`: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (UserError, DatasetError, PlanError, ImageError) as exc:
        return _user_error(str(exc), debug)
    except OSError as exc:  # a path that cannot be read or written: name it
        return _user_error(describe_os_error(exc), debug)
    except ValueError as exc:  # bad input found by the library (artifact, checkpoint, resume)
        return _user_error(str(exc), debug)
    except Exception as exc:
        if _is_user_error(exc):
            return _user_error(str(exc), debug)
        if debug:
            raise
        print(
            f"error: {type(exc).__name__}: {exc} (a bug: run again with --debug for the "
            "traceback and report it)",
            file=sys.stderr,
        )
        return 1


def _user_error(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"error: {cli_words(message)}", file=sys.stderr)
    return EXIT_USER_ERROR


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help; the examples (epilog) kept as written."""


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bitcore",
        description="Fine-tune BiT (Big Transfer) models with the BiT-HyperRule.",
        formatter_class=_HelpFormatter,
        epilog=_examples(
            "python -m bitcore plan my_images/",
            "python -m bitcore checkpoints pull BiT-M-R50x1",
            "python -m bitcore finetune my_images/ --base-model BiT-M-R50x1 --out model/",
            "python -m bitcore predict model/ photo.jpg --top-k 3",
        )
        + "\n\nexit status: 0 ok, 2 bad usage or input, 130 interrupted, 1 anything else",
    )
    parser.add_argument("--version", action="version", version=f"bitcore {bitcore.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")

    def command(name: str, text: str, *examples: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=text,
            description=text[0].upper() + text[1:] + ".",
            formatter_class=_HelpFormatter,
            epilog=_examples(*examples),
        )
        sub.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )
        return sub

    plan_cmd = command(
        "plan",
        "index a class-folder dataset and show its HyperRule plan",
        "python -m bitcore plan my_images/",
        "python -m bitcore plan my_images/ --set steps=500 --json",
    )
    _add_plan_options(plan_cmd)
    plan_cmd.add_argument("--json", action="store_true", help="print one JSON document")
    plan_cmd.set_defaults(command=cmd_plan)

    tune = command(
        "finetune",
        "fine-tune a base model on a class-folder dataset and write an artifact",
        "python -m bitcore finetune my_images/ --base-model BiT-M-R50x1 --out model/",
        "python -m bitcore finetune my_images/ --base-model tiny-R10x0.25 --from-scratch "
        "--out tiny/ --set steps=200",
        "python -m bitcore finetune my_images/ --base-model BiT-M-R50x1 --out model/ --json "
        "> log.jsonl",
        "Ctrl-C saves a checkpoint in OUT.work/; the same command again resumes from it.",
    )
    _add_plan_options(tune)
    tune.add_argument(
        "--base-model",
        required=True,
        help="a BiT model (see `checkpoints list`, e.g. BiT-M-R50x1), or one trained "
        f"--from-scratch: {', '.join(FROM_SCRATCH_MODELS)}",
    )
    tune.add_argument(
        "--out", required=True, type=Path, help="artifact folder to write (new or empty)"
    )
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
    tune.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing artifact at --out, or write into a non-empty folder",
    )
    tune.add_argument(
        "--restart",
        action="store_true",
        help="discard the checkpoint an interrupted run left in OUT.work/ and start at step 0",
    )
    tune.add_argument(
        "--keep-cache",
        action="store_true",
        help="keep OUT.work/ (decoded image caches) after success; by default it is removed",
    )
    _add_output_options(tune, progress=True)
    tune.set_defaults(command=cmd_finetune)

    pred = command(
        "predict",
        "classify images with a fine-tuned artifact",
        "python -m bitcore predict model/ photo.jpg other.png --top-k 3",
        "python -m bitcore predict model/ photos/*.jpg --json",
    )
    pred.add_argument("artifact", type=Path, help="artifact folder (model.safetensors + json)")
    pred.add_argument(
        "images", type=Path, nargs="+", metavar="IMG", help="image files (JPEG, PNG, ...)"
    )
    pred.add_argument(
        "--top-k", type=_positive_int, default=5, help="how many classes to show per image"
    )
    pred.add_argument("--device", help="cpu, cuda, mps, xla (default: best available)")
    _add_output_options(pred, progress=False)
    pred.set_defaults(command=cmd_predict)

    ckpt = command(
        "checkpoints",
        "list or download base checkpoints",
        "python -m bitcore checkpoints list",
        "python -m bitcore checkpoints pull BiT-M-R50x1 BiT-S-R50x1",
    )
    ckpt_commands = ckpt.add_subparsers(dest="action", required=True, metavar="ACTION")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--dir", type=Path, help="checkpoint directory (default: $BITSERVE_CHECKPOINT_DIR)"
    )
    listing = ckpt_commands.add_parser(
        "list",
        parents=[store],
        help="the catalog and what is present locally",
        formatter_class=_HelpFormatter,
        epilog=_examples("python -m bitcore checkpoints list --json"),
    )
    listing.add_argument("--json", action="store_true", help="print one JSON document")
    pull = ckpt_commands.add_parser(
        "pull",
        parents=[store],
        help="download checkpoints into the local store",
        formatter_class=_HelpFormatter,
        epilog=_examples("python -m bitcore checkpoints pull BiT-M-R50x1"),
    )
    pull.add_argument("checkpoint_names", metavar="NAME", nargs="+", help="catalog names")
    ckpt.set_defaults(command=cmd_checkpoints)
    return parser


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dataset", type=Path, metavar="DIR", help="a folder of class folders: DIR/<class>/<image>"
    )
    parser.add_argument(
        "--resolution",
        choices=["code", "paper"],
        default="code",
        help="code: the reference code's sizes (160/128 for small images); paper: the "
        "paper's (e.g. 448/384 for large images)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=_override,
        metavar="KEY=VALUE",
        help=f"override the rule ({', '.join(hyperrule.OVERRIDABLE)}); repeatable",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        help="share of each class held out to validate, in [0, 1)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the split, data order and augmentation"
    )


def _add_output_options(parser: argparse.ArgumentParser, *, progress: bool) -> None:
    group = parser.add_mutually_exclusive_group()
    if progress:
        group.add_argument(
            "--json",
            action="store_true",
            help="JSON lines on stdout: progress, then the result (event: result)",
        )
        group.add_argument(
            "--quiet", action="store_true", help="no progress; only the result and errors"
        )
        parser.add_argument(
            "--log-every",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="when stderr is not a terminal (or with --json): a progress line this often",
        )
    else:
        group.add_argument("--json", action="store_true", help="print one JSON document")


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
    check_overrides(key for key, _ in args.overrides)
    fraction = args.validation_fraction
    if not 0.0 <= fraction < 1.0:  # checked before the (possibly long) decode of every image
        raise UserError(f"--validation-fraction must be in [0, 1), got {fraction}")
    try:
        index = _index_with_progress(args.dataset)
    except DatasetError as exc:
        if exc.code != "too_few_classes":
            raise
        raise UserError(f"{exc}{flat_folder_hint(args.dataset)}") from exc
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
    from bitcore import cli_finetune

    return cli_finetune.run(args, _known_base_models(), _index_and_plan)


def _known_base_models() -> list[str]:
    """Registry architectures plus catalog checkpoints (e.g. BiT-M-R50x1-ILSVRC2012)."""
    from bitcore.catalog import CATALOG
    from bitcore.models import MODEL_SPECS

    return sorted(set(MODEL_SPECS) | set(CATALOG))


def _is_user_error(exc: Exception) -> bool:
    """Errors from lazily imported modules (catalog, checkpoints, artifacts, train) that
    describe bad input. By name, so that `plan` does not import torch to catch them; the
    catalog's errors all derive from CatalogError, MissingCheckpointError is a
    FileNotFoundError (caught in `main`)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ArtifactError", "CatalogError", "CheckpointError", "ResumeError"})
