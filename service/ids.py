"""Opaque, prefixed identifiers and UTC timestamps."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lower case
ID_LENGTH = 20  # 100 random bits: collisions are not a practical concern
# fullmatch, never match + "$": "$" also matches before a trailing newline, so "job_…\n"
# passed for an id (and could forge a log line).
ID_PATTERN = re.compile(rf"(?P<prefix>[a-z]{{2,5}})_[a-z2-7]{{{ID_LENGTH}}}")


def new_id(prefix: str) -> str:
    """`prefix` + "_" + 20 random base32 characters, e.g. new_id("ds") -> "ds_k3j…"."""
    return f"{prefix}_{''.join(secrets.choice(ALPHABET) for _ in range(ID_LENGTH))}"


def is_id(value: str, prefix: str | None = None) -> bool:
    match = ID_PATTERN.fullmatch(value)
    return bool(match) and (prefix is None or match.group("prefix") == prefix)  # type: ignore[union-attr]


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(dt: datetime | None) -> str | None:
    """RFC 3339 in UTC with a Z suffix (naive datetimes are taken to be UTC already)."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")
