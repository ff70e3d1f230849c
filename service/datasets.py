"""Datasets: plain functions the routes (and tests) call.

An upload becomes a dataset in one blocking step (`create_dataset`, run in a worker thread):
safe extraction, decoding and validating every image (bitcore.data.index), a resized copy at
the HyperRule's pre-crop size for training (bitcore.data.cache), then the database row. The
row is written last, so a dataset that exists is always complete; on any failure its folder
is removed.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from bitcore import hyperrule
from bitcore.atomic import write_json_atomic
from bitcore.data.cache import build_cache
from bitcore.data.index import IGNORED_NAMES, DatasetError, DatasetIndex, index_directory
from bitcore.images import sniff_format
from service import jobs, quotas
from service.archives import ArchiveKind, Extracted, Limits, extract_archive
from service.db import Database
from service.domain_errors import Conflict, InvalidRequest, NotFound
from service.ids import new_id
from service.job_states import ACTIVE
from service.names import check_name
from service.object_store import ObjectStoreError
from service.settings import Settings
from service.storage import (
    DATASET_CACHE,
    DATASET_FILES,
    DATASET_INDEX,
    Storage,
    disk_full_as,
    storage_unavailable,
)
from service.tables import Dataset, Job, tenant_is

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 200
# Rejected members listed in the dataset itself (GET /v1/datasets pages carry them); the whole
# list is DATASET_REJECTED in its folder, paged by GET /v1/datasets/{id}/rejected.
REJECTED_INLINE = 100
DATASET_REJECTED = "rejected.json"
_ARCHIVE_SUFFIX = re.compile(r"(\.tar\.gz|\.tgz|\.zip|\.gz)$", re.IGNORECASE)


def dataset_name(given: str | None, filename: str | None, fallback: str) -> str:
    """The client's name if given, else the archive's file name without its suffix."""
    if given is not None:
        name = check_name(given, "name").strip()
        if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise InvalidRequest(
                "invalid_request",
                f"name must be 1-{MAX_NAME_LENGTH} printable characters",
                {"field": "name"},
            )
        return name
    stem = _ARCHIVE_SUFFIX.sub("", Path((filename or "").replace("\\", "/")).name)
    stem = "".join(c for c in stem if c.isprintable()).strip()[:MAX_NAME_LENGTH]
    return stem or fallback


def _limits(settings: Settings) -> Limits:
    return Limits(
        max_entries=settings.max_archive_entries,
        max_uncompressed_bytes=settings.max_uncompressed_bytes,
        max_compression_ratio=settings.max_compression_ratio,
        archive_ratio_min_bytes=settings.archive_ratio_min_bytes,
    )


def rejected_counts(row: Dataset) -> dict[str, int]:
    """{reason: count} of every rejected member (rows made before the counts: from the list)."""
    if row.rejected_counts is not None:
        return {str(k): int(v) for k, v in row.rejected_counts.items()}
    return dict(Counter(str(item["reason"]) for item in row.rejected))


def rejected_page(
    storage: Storage, row: Dataset, offset: int, limit: int
) -> tuple[list[dict[str, str]], int | None]:
    """Rejected members [offset, offset+limit) in path order, and the next offset (None at the
    end). The list never changes once the dataset exists, so an offset is a stable cursor."""
    path = storage.path(row.storage_key) / DATASET_REJECTED
    try:
        with open(path, encoding="utf-8") as handle:
            items: list[dict[str, str]] = json.load(handle)
    except FileNotFoundError:  # a dataset made before the file: its row holds the whole list
        items = list(row.rejected)
    end = offset + limit
    return items[offset:end], end if end < len(items) else None


def _rejected(index: DatasetIndex, files: Path, extracted: Extracted) -> list[dict[str, str]]:
    """Skipped members and undecodable images, as paths inside the uploaded archive."""
    items = [{"path": s.path, "reason": s.reason} for s in extracted.skipped]
    for r in index.rejected:
        path = (index.root / r.path).relative_to(files).as_posix()
        items.append({"path": path, "reason": r.reason})
    return sorted(items, key=lambda item: item["path"])


def images_only(path: str, head: bytes) -> str | None:
    """The archive SkipRule of a dataset: only what may be an image reaches the disk.

    Hidden files and folders (which the index ignores) are dropped silently; a non-empty
    member whose first bytes are no allowed image format is reported as the index would
    (`unsupported_format`) but never written, so 500 zero-filled `.bin` members cost nothing.
    Empty members are written (0 bytes) for the index to name (`empty`)."""
    if any(part.startswith(".") or part in IGNORED_NAMES for part in path.split("/")):
        return ""
    if head and sniff_format(head) is None:
        return "unsupported_format"
    return None


def _delete_rejected(index: DatasetIndex) -> None:
    # Kept on disk, a rejected file is stored bytes nobody can use: stored ~ accepted images.
    for rejected in index.rejected:
        path = index.root / rejected.path
        if path.is_file() and not path.is_symlink():
            path.unlink()


def build_dataset_files(
    archive: Path, kind: ArchiveKind, directory: Path, settings: Settings
) -> tuple[DatasetIndex, list[dict[str, str]]]:
    """Extract, index and cache into `directory`. Blocking: call from a worker thread.
    Returns the index and every rejected member (also written to DATASET_REJECTED)."""
    files = directory / DATASET_FILES
    extracted = extract_archive(archive, files, _limits(settings), kind, skip=images_only)
    try:
        index = index_directory(
            files,
            max_pixels=settings.max_image_pixels,
            min_images_per_class=settings.min_images_per_class,
        )
    except DatasetError as exc:  # bitcore's error: a plain library knows no API errors
        raise InvalidRequest(exc.code, str(exc), exc.details) from None
    _delete_rejected(index)
    rejected = _rejected(index, files, extracted)
    write_json_atomic(directory / DATASET_REJECTED, rejected, indent=None)
    index.save(directory / DATASET_INDEX)
    # The training copy at the HyperRule's pre-crop size: decoding full-size uploads on
    # every epoch would dominate a CPU fine-tuning run. Images at or under that size are kept
    # at their own size (squashed up when loaded): the cache is at most the dataset's bytes.
    # The pre-crop size depends on the image size only (BiT sec. 3.3), so jobs on this dataset
    # find this cache unless they override `precrop`.
    plan = hyperrule.plan(index.num_images, index.median_size)
    build_cache(
        index, plan.precrop, directory / DATASET_CACHE, max_pixels=settings.max_image_pixels
    )
    return index, rejected


def create_dataset(
    db: Database,
    storage: Storage,
    settings: Settings,
    archive: Path,
    kind: ArchiveKind,
    *,
    name: str,
    size: int,
    tenant_id: str | None,
) -> Dataset:
    """Turn an uploaded archive into a ready dataset (blocking; the upload route runs it in a
    thread). Raises the kinds of service.domain_errors (InsufficientStorage when the store's disk
    fills up: nothing is kept); QuotaExceeded when `size` more bytes
    would pass the tenant's max_stored_bytes (checked with the row's insert, under the
    tenant's lock: the route's check before the upload races with other uploads). This is the
    seam where ingestion can move off the request path: the route only hands it a received
    archive."""
    dataset_id = new_id("ds")
    directory = storage.dataset_dir(dataset_id)
    try:
        # A full disk while extracting, indexing or caching: 507, and the folder goes below.
        with disk_full_as("the dataset"):
            directory.mkdir(parents=True)
            index, rejected = build_dataset_files(archive, kind, directory, settings)
        # The durable copy (object store), before the row: a dataset that exists can be
        # fetched by any node. The resized cache/ travels too (rebuilding it costs a decode).
        try:
            storage.publish("datasets", dataset_id)
        except ObjectStoreError as exc:
            log.warning("dataset %s: publishing to the object store failed: %s", dataset_id, exc)
            raise storage_unavailable("upload the dataset again shortly") from None
        height, width = index.median_size
        row = Dataset(
            id=dataset_id,
            tenant_id=tenant_id,
            name=name,
            status="ready",
            num_images=index.num_images,
            num_classes=len(index.classes),
            classes=[{"name": n, "count": c} for n, c in index.counts().items()],
            image_size={"median_height": height, "median_width": width},
            # A few inline (every listing carries them), the rest paged from the file.
            rejected=rejected[:REJECTED_INLINE],
            rejected_counts=dict(Counter(item["reason"] for item in rejected)),
            bytes=size,
            storage_key=storage.key(directory),
        )
        with db.session() as session:
            # Under the tenant's lock: concurrent uploads cannot both fit the last bytes.
            quotas.check_stored_bytes(session, tenant_id, settings, size)
            session.add(row)
        return row
    except BaseException:
        storage.discard("datasets", dataset_id)
        raise


def get_dataset(session: Session, tenant_id: str | None, dataset_id: str) -> Dataset:
    """The tenant's dataset; NotFound for unknown ids and other tenants' datasets alike."""
    row = session.get(Dataset, dataset_id)
    if row is None or row.tenant_id != tenant_id or row.status != "ready":
        raise NotFound("dataset", dataset_id)
    return row


def list_datasets(tenant_id: str | None) -> sa.Select[Dataset]:
    """The tenant's datasets (paginate it with service.pagination)."""
    return sa.select(Dataset).where(
        tenant_is(Dataset.tenant_id, tenant_id),
        Dataset.status == "ready",
    )


def delete_dataset(db: Database, storage: Storage, tenant_id: str | None, dataset_id: str) -> None:
    """Delete the row, then the files. Conflict while a queued/running/cancelling job uses it."""
    with db.session() as session:
        # Row lock (PostgreSQL): a job inserted concurrently waits for this decision in its
        # foreign-key check, and is answered 404 if the dataset goes (service.jobs.create_job).
        row = session.get(Dataset, dataset_id, with_for_update=True)
        if row is None or row.tenant_id != tenant_id or row.status != "ready":
            raise NotFound("dataset", dataset_id)
        active = session.scalars(
            sa.select(Job.id).where(Job.dataset_id == dataset_id, Job.status.in_(ACTIVE)).limit(10)
        ).all()
        if active:
            raise Conflict(
                "dataset_in_use",
                "jobs are using this dataset; cancel them or wait for them to finish",
                {"jobs": list(active)},
            )
        session.delete(row)
    storage.discard("datasets", dataset_id)


@dataclass(frozen=True)
class WorkEstimate:
    """How much work a plan is. No throughput has been measured for this deployment's
    hardware, so no time is promised (`seconds` is null): images_processed divided by a
    measured images/s gives it."""

    training_examples: int
    images_processed: int  # total_steps x batch_size
    epochs: float
    seconds: float | None = None
    basis: str = "total_steps x batch_size training images; time unknown until measured"


def plan_estimate(
    row: Dataset, base_model: str, validation_fraction: float, overrides: dict[str, Any]
) -> tuple[dict[str, Any], WorkEstimate]:
    """The plan a job on `row` would get (the same function creates jobs), and its work."""
    given = {k: v for k, v in overrides.items() if v is not None}
    plan = jobs.plan_for_dataset(row, base_model, validation_fraction, given)
    images = int(plan["total_steps"]) * int(plan["batch_size"])
    train_examples = int(plan["source"]["num_examples"])
    estimate = WorkEstimate(train_examples, images, round(images / train_examples, 2))
    return plan, estimate
