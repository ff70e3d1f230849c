"""Datasets registered from a bucket: `{"source": "s3://bucket/prefix/"}` instead of an upload.

For data that already lives in object storage (class folders under a prefix), nothing is
uploaded through the gateway: it records the dataset as processing and an ingest worker copies
the images from the bucket, under the same limits and checks as an archive's members.

Only sources under a bucket (or bucket/prefix) the operator listed in
BITSERVE_DATASET_SOURCE_BUCKETS are accepted, never an arbitrary URL: the server reads them
with its own credentials (boto3's standard settings, as for BITSERVE_STORAGE_URL), so a tenant
must not be able to point it anywhere else. A key is mapped to a path only through
service.archives.safe_relpath (no `..`, no absolute paths), and each object is read with the
size its listing declared as a cap.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.archives import (
    HEAD_BYTES,
    ArchiveTooLarge,
    Extracted,
    Limits,
    Skipped,
    SkipRule,
    is_nested_archive,
    safe_relpath,
)
from service.domain_errors import InvalidRequest
from service.names import first_refused

MAX_SOURCE_CHARS = 1024
COPY_CHUNK = 1 << 20
# S3 bucket names (the rules AWS enforces for new buckets): 3-63 of a-z 0-9 . -
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Source:
    bucket: str
    prefix: str  # "" (the whole bucket) or ending with "/"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def to_dict(self) -> dict[str, str]:
        return {"bucket": self.bucket, "prefix": self.prefix}


def not_allowed(source: str, why: str) -> InvalidRequest:
    return InvalidRequest(
        "source_not_allowed",
        f"source {source[:200]!r} cannot be used: {why}",
        {"field": "source"},
    )


def parse_source(text: str, allowed: list[str]) -> Source:
    """`s3://bucket/prefix/` checked against the operator's list; InvalidRequest
    `source_not_allowed` (422) otherwise. The prefix ends with "/" (a folder, not a key
    prefix that would also take `prefix-other/`)."""
    if not allowed:
        raise not_allowed(text, "this server takes no dataset sources; upload an archive")
    if len(text) > MAX_SOURCE_CHARS or first_refused(text) is not None:
        raise not_allowed(text, f"at most {MAX_SOURCE_CHARS} printable characters")
    if not text.startswith("s3://"):
        raise not_allowed(text, "only s3://bucket/prefix/ sources are taken")
    bucket, _, prefix = text.removeprefix("s3://").partition("/")
    if not _BUCKET.match(bucket):
        raise not_allowed(text, "not a valid bucket name")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts) or "//" in prefix or "\\" in prefix:
        raise not_allowed(text, "the prefix must be a plain folder path")
    source = Source(bucket, "".join(f"{p}/" for p in parts))
    if not any(_under(source, entry) for entry in allowed):
        raise not_allowed(
            text,
            "its bucket is not one the server's operator allowed "
            "(BITSERVE_DATASET_SOURCE_BUCKETS); ask them, or upload an archive",
        )
    return source


def _under(source: Source, entry: str) -> bool:
    """`entry` is "bucket" or "bucket/prefix": the source is that bucket, under that prefix."""
    bucket, _, prefix = entry.strip().removeprefix("s3://").partition("/")
    parts = [p for p in prefix.split("/") if p]
    allowed_prefix = "".join(f"{p}/" for p in parts)
    return source.bucket == bucket and source.prefix.startswith(allowed_prefix)


@dataclass(frozen=True)
class _Listed:
    key: str
    path: str  # safe relative path under the dataset's files/
    size: int


# Answers of the source's bucket that will not change by trying again.
UNREADABLE_CODES = frozenset(
    {"NoSuchBucket", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "403", "404"}
)


def copy_source(
    client: Any,
    source: Source,
    target: Path,
    limits: Limits,
    skip: SkipRule,
    progress: Callable[[int, int], None] | None = None,
) -> Extracted:
    """copy_objects, with a bucket that is missing or refuses this server's credentials
    turned into InvalidRequest `source_unreadable` (the dataset fails: trying again would not
    help); other store errors propagate (the ingestion is tried again)."""
    try:
        return copy_objects(client, source, target, limits, skip, progress)
    except Exception as exc:
        response = getattr(exc, "response", None)
        code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
        if code not in UNREADABLE_CODES:
            raise
        raise InvalidRequest(
            "source_unreadable",
            f"the server cannot read {source.uri} ({code}): check the bucket exists and "
            "that the server's credentials may list and read it",
            {"source": source.uri, "reason": code},
        ) from None


def copy_objects(
    client: Any,
    source: Source,
    target: Path,
    limits: Limits,
    skip: SkipRule,
    progress: Callable[[int, int], None] | None = None,
) -> Extracted:
    """Copy the objects under the source's prefix into `target` as an archive's members would
    be extracted: the whole listing is checked first (entry count, declared bytes, every key's
    path), then each object is read, capped at its listed size. Raises ArchiveTooLarge,
    ArchiveUnsafe (a key that would escape), or the client's errors (the store did not answer:
    the caller retries)."""
    out = Extracted()
    listed: list[_Listed] = []
    total = 0
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=source.bucket, Prefix=source.prefix):
        for item in page.get("Contents", []):
            key, size = str(item["Key"]), int(item["Size"])
            if key.endswith("/"):
                continue  # a "folder" marker some tools write
            path = safe_relpath(key[len(source.prefix) :])
            if path is None:
                continue
            if len(listed) + len(out.skipped) >= limits.max_entries:
                raise ArchiveTooLarge(
                    f"the source holds more than {limits.max_entries} objects",
                    limit=limits.max_entries,
                )
            if is_nested_archive(path):
                out.skipped.append(Skipped(path, "nested_archive"))
                continue
            total += size
            if total > limits.max_uncompressed_bytes:
                raise ArchiveTooLarge(
                    f"the source holds more than {limits.max_uncompressed_bytes} bytes",
                    limit=limits.max_uncompressed_bytes,
                )
            listed.append(_Listed(key, path, size))
    target.mkdir(parents=True, exist_ok=True)
    for done, entry in enumerate(listed):
        if progress is not None:
            progress(done, len(listed))
        answer = client.get_object(Bucket=source.bucket, Key=entry.key)
        body = answer["Body"]
        head = body.read(HEAD_BYTES)
        reason = skip(entry.path, head)
        if reason is not None:
            body.close()
            if reason:
                out.skipped.append(Skipped(entry.path, reason))
            continue
        dest = target / entry.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        written = _copy(body, head, dest, entry)
        out.bytes += written
        out.files += 1
    return out


def _copy(body: Any, head: bytes, dest: Path, entry: _Listed) -> int:
    written = 0
    with open(dest, "xb") as handle:
        chunk = head
        while chunk or (chunk := body.read(COPY_CHUNK)):
            written += len(chunk)
            if written > entry.size:  # the object changed since it was listed
                raise ArchiveTooLarge(
                    f"object {entry.path!r} is larger than its listing said",
                    reason="uncompressed_size",
                    path=entry.path,
                )
            handle.write(chunk)
            chunk = b""
    return written
