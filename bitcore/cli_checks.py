"""The cheap checks `python -m bitcore` runs before any image is decoded, and the wording of
its one-line errors (real flags, "did you mean", the path that is wrong and what to do).

Torch-free on purpose: `plan` and `--help` must not pay for importing it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path

from bitcore import hyperrule

# Registry models without a published checkpoint (bitcore.models.MODEL_SPECS with
# published=False): trained with --from-scratch only. Listed here so `--help` need not import
# torch; tests/unit/test_cli_validation.py checks it against the registry.
FROM_SCRATCH_MODELS = ("tiny-R10x0.25", "small-R26x0.5")

# Suffixes counted as loose images in a flat folder (the index sniffs content, not names).
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
ARTIFACT_MARKER = "metadata.json"  # bitcore.artifacts.METADATA_FILE: written last, so complete

# Library keyword arguments that appear in messages from bitcore.train, and the flags that
# set them on this command line: the user is told what to type, not what to pass in Python.
_FLAG_WORDS = (
    ("delete it or pass resume=False to start over", "add --restart to discard it and start over"),
    ("pass from_scratch=True", "pass --from-scratch"),
    ("from_scratch=True", "--from-scratch"),
    ("resume=False", "--restart"),
    ("checkpoint=", "--checkpoint"),
    ("validation_fraction", "--validation-fraction"),
)


class UserError(Exception):
    """A problem with the command line or its inputs; printed as one line, exit status 2."""


def cli_words(message: str) -> str:
    for python, flag in _FLAG_WORDS:
        message = message.replace(python, flag)
    return message


def did_you_mean(name: str, known: Iterable[str]) -> str | None:
    """The closest known name, compared case-insensitively (difflib), or None."""
    by_folded = {k.casefold(): k for k in known}
    if name.casefold() in by_folded:
        return by_folded[name.casefold()]
    close = difflib.get_close_matches(name.casefold(), list(by_folded), n=1, cutoff=0.6)
    return by_folded[close[0]] if close else None


def check_base_model(name: str, known: list[str]) -> None:
    if name in known:
        return
    guess = did_you_mean(name, known)
    hint = f"did you mean {guess}? " if guess else ""
    raise UserError(
        f"unknown base model {name!r}; {hint}see `python -m bitcore checkpoints list` "
        f"(from scratch: {', '.join(FROM_SCRATCH_MODELS)})"
    )


def check_overrides(keys: Iterable[str]) -> None:
    """Unknown --set keys, before the dataset is decoded."""
    unknown = sorted(set(keys) - set(hyperrule.OVERRIDABLE))
    if not unknown:
        return
    guesses = [g for k in unknown if (g := did_you_mean(k, hyperrule.OVERRIDABLE))]
    hint = f"did you mean {', '.join(guesses)}? " if guesses else ""
    raise UserError(
        f"unknown override(s) {unknown} for --set; {hint}allowed: "
        f"{', '.join(hyperrule.OVERRIDABLE)}"
    )


def check_output(out: Path, dataset: Path, overwrite: bool) -> Path:
    """The absolute artifact directory to write, refused before training if it cannot or
    should not be written: a file, the dataset, a non-empty folder that is not an artifact
    (unless --overwrite), an existing artifact (unless --overwrite), an unwritable place."""
    target = out.expanduser().resolve()
    shown = str(out)
    if target == Path(target.anchor):
        raise UserError(f"--out {shown} is the file-system root; name a new folder")
    data = dataset.expanduser().resolve()
    if target == data or data in target.parents or target in data.parents:
        raise UserError(
            f"--out {shown} overlaps the dataset folder {dataset}; write the artifact elsewhere"
        )
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {shown} is an existing file; name a folder for the artifact")
    if target.is_dir() and any(target.iterdir()):
        if (target / ARTIFACT_MARKER).is_file():
            if not overwrite:
                raise UserError(
                    f"--out {shown} already holds an artifact; add --overwrite to replace it, "
                    "or choose another --out"
                )
        elif not overwrite:
            where = "the current folder" if target == Path.cwd() else "a folder"
            raise UserError(
                f"--out {shown} is {where} with other files in it (not an artifact); name a "
                "new or empty folder, or add --overwrite to write into it"
            )
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--out {shown}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {shown}: {existing} is not writable; choose another --out")
    return target


def work_dir(target: Path) -> Path:
    """Where finetune keeps caches, checkpoints and curves.pending.json while it runs."""
    return target.with_name(target.name + ".work")


def flat_folder_hint(folder: Path) -> str:
    """', but N images sit directly in it ...' when a dataset folder has loose images."""
    try:
        loose = sum(
            1
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_SUFFIXES
        )
    except OSError:
        return ""
    if not loose:
        return ""
    return (
        f"; {loose} image{'s' if loose != 1 else ''} sit directly in {folder}: put them in one "
        f"sub-folder per class ({folder}/<class>/<image>)"
    )


def describe_os_error(exc: OSError) -> str:
    """`[Errno 13] Permission denied: 'x'` -> `permission denied: x`, with what to do."""
    reason = (exc.strerror or type(exc).__name__).lower()
    path = exc.filename
    if path is None:
        return str(exc)
    hints = {
        "permission denied": "check its permissions or choose another path",
        "no space left on device": "free some space or choose another path",
        "read-only file system": "choose a writable path",
    }
    hint = hints.get(reason, "check the path")
    return f"{reason}: {path} ({hint})"
