"""`python -m bitcore predict` and `checkpoints list|pull` (bitcore.cli parses their options)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bitcore.cli_checks import FROM_SCRATCH_MODELS, UserError
from bitcore.images import ImageError


def cmd_predict(args: argparse.Namespace) -> int:
    _check_artifact_dir(args.artifact)
    payloads = []
    for path in args.images:
        if path.is_dir():
            raise UserError(f"image {path} is a folder; name image files (e.g. {path}/*.jpg)")
        if not path.exists():
            raise UserError(f"image {path} does not exist")
        if not path.is_file():
            raise UserError(f"image {path} is not a regular file")
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
    if args.json:
        predictions = [
            {"image": str(path), "top": [{"label": label, "score": score} for label, score in top]}
            for path, top in zip(args.images, results, strict=True)
        ]
        print(json.dumps({"artifact": str(args.artifact), "predictions": predictions}))
        return 0
    for path, top in zip(args.images, results, strict=True):
        print(path)
        for label, score in top:
            print(f"  {score:.4f}  {label}")
    return 0


def _check_artifact_dir(artifact: Path) -> None:
    from bitcore.cli_checks import ARTIFACT_MARKER

    if not artifact.exists():
        raise UserError(f"artifact directory {artifact} does not exist")
    if not artifact.is_dir():
        raise UserError(
            f"{artifact} is a file, not an artifact directory (the folder `finetune --out` "
            "wrote: model.safetensors + metadata.json)"
        )
    if not (artifact / ARTIFACT_MARKER).is_file():
        raise UserError(
            f"{artifact} is a folder but not an artifact: it has no {ARTIFACT_MARKER} "
            "(use the folder `finetune --out` wrote)"
        )


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from bitcore import catalog

    directory = args.dir if args.dir is not None else catalog.checkpoint_dir()
    if args.action == "list":
        rows = [
            {
                "name": name,
                "architecture": entry.model_name,
                "download_bytes": entry.approx_bytes,
                "present": catalog.is_present(name, directory),
                "upstream": entry.upstream,
            }
            for name, entry in catalog.CATALOG.items()
        ]
        if args.json:
            document = {
                "directory": str(directory),
                "checkpoints": rows,
                "from_scratch": list(FROM_SCRATCH_MODELS),
            }
            print(json.dumps(document, indent=2))
            return 0
        print(f"checkpoint directory: {directory}")
        print(f"{'name':<24} {'download':>9}  {'present':<7}  upstream")
        for row, entry in zip(rows, catalog.CATALOG.values(), strict=True):
            size = f"{entry.approx_bytes / 2**20:.0f} MiB"
            present = "yes" if row["present"] else "no"
            print(f"{row['name']:<24} {size:>9}  {present:<7}  {row['upstream']}")
        print(
            f"from scratch (no checkpoint, finetune --from-scratch): "
            f"{', '.join(FROM_SCRATCH_MODELS)}"
        )
        return 0
    # Every name is checked before the first (possibly long) download starts.
    for name in args.checkpoint_names:
        if name not in catalog.CATALOG:
            from bitcore.cli_checks import did_you_mean

            guess = did_you_mean(name, catalog.CATALOG)
            hint = f"did you mean {guess}? " if guess else ""
            raise UserError(
                f"unknown checkpoint {name!r}; {hint}see `python -m bitcore checkpoints list`"
            )
    for name in args.checkpoint_names:
        print(catalog.pull_with_progress_bar(name, directory), flush=True)
    return 0
