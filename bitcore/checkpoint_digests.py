"""SHA-256 digests of downloaded checkpoints: recorded on first download, checked on every use.

The official BiT files publish no digests, and this project cannot fetch them to compute one,
so trust starts at the first download (trust on first use): the digest of what arrived is
written next to it as `<name>.npz.sha256` (sha256sum's format), and every later use recomputes
the file's digest and refuses a file that no longer matches. That catches a file modified or
replaced after download (disk corruption, a tampered shared volume, a half-copied file put in
place by hand).

An operator who knows the right digest pins it (BITSERVE_CHECKPOINT_SHA256, a JSON object of
name -> hex digest, or `pins=` in code): a pinned digest is checked before a download is put
in place and on every use, and wins over the recorded one, so a mirror or an attacker who can
write the checkpoint directory (and so the sidecar) still cannot substitute weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from bitcore.atomic import atomic_write

PINS_ENV = "BITSERVE_CHECKPOINT_SHA256"
SIDECAR_SUFFIX = ".sha256"
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


class DigestMismatch(ValueError):
    """A checkpoint's bytes differ from its pinned or recorded SHA-256."""

    def __init__(self, path: Path, expected: str, actual: str, source: str) -> None:
        super().__init__(
            f"{path.name} has SHA-256 {actual}, not the {expected} {source}; the file was "
            f"modified or replaced. Delete {path.name} and {path.name}{SIDECAR_SUFFIX} to "
            f"download it again."
        )
        self.expected, self.actual, self.source = expected, actual, source


def normalise_pins(pins: Mapping[str, str]) -> dict[str, str]:
    """Lower-cased digests, each checked to be 64 hex digits (ValueError names a bad one)."""
    normalised: dict[str, str] = {}
    for name, digest in pins.items():
        value = str(digest).strip().lower()
        if not _HEX_DIGEST.fullmatch(value):
            raise ValueError(f"{PINS_ENV}: the digest of {name} is not 64 hex digits: {digest!r}")
        normalised[str(name)] = value
    return normalised


def pins_from_env() -> dict[str, str]:
    """The pins in $BITSERVE_CHECKPOINT_SHA256 (a JSON object), or none."""
    text = os.environ.get(PINS_ENV, "").strip()
    if not text:
        return {}
    try:
        pins = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{PINS_ENV} is not JSON: {exc}") from None
    if not isinstance(pins, dict):
        raise ValueError(f"{PINS_ENV} must be a JSON object of name -> SHA-256")
    return normalise_pins(pins)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def recorded(path: Path) -> str | None:
    """The digest recorded for `path`, or None if none is (or the record is unreadable)."""
    try:
        first = sidecar(path).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    return first[0] if first and _HEX_DIGEST.fullmatch(first[0]) else None


def record(path: Path, digest: str) -> None:
    with atomic_write(sidecar(path)) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n", encoding="ascii")


def verify(path: Path, pinned: str | None) -> str:
    """Check `path` against its pinned digest, else its recorded one, else record it.

    Returns the digest; raises DigestMismatch. A pin that passes replaces a stale record, so
    the sidecar always holds the digest that was last checked.
    """
    actual = sha256_of(path)
    known = recorded(path)
    if pinned is not None:
        if actual != pinned:
            raise DigestMismatch(path, pinned, actual, f"pinned in {PINS_ENV}")
    elif known is not None and actual != known:
        raise DigestMismatch(path, known, actual, f"recorded in {sidecar(path).name}")
    if known != actual:
        record(path, actual)
    return actual
