"""Datasets: plain functions the routes, the ingest worker (and tests) call.

An upload becomes a dataset in two steps. The gateway (`accept_upload`) only stores the
received archive (uploads/<id>/, published to the object store) and records the dataset as
`processing` with the limits it applies, then sends an `ingest` message; it decodes nothing.
An ingest worker (worker.ingest) then extracts it safely, decodes and validates every image
(`build_dataset_files`: bitcore.data.index), publishes the folder and marks the row ready, or
failed with the error a synchronous upload would have answered. The training cache is built
later, by the node that trains (bitcore.data.cache).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from bitcore.atomic import write_json_atomic
from bitcore.data.index import (
    IGNORED_NAMES,
    DatasetError,
    DatasetIndex,
    Progress,
    index_directory,
)
from bitcore.images import sniff_format
from service import ingest_runs, jobs, quotas
from service.archives import ArchiveKind, Extracted, Limits, SkipRule, extract_archive
from service.broker import Broker
from service.dataset_sources import Source
from service.db import Database
from service.domain_errors import Conflict, InvalidRequest, NotFound
from service.ids import new_id
from service.job_states import ACTIVE
from service.names import check_name
from service.object_store import ObjectMissing, ObjectStoreError
from service.settings import Settings
from service.storage import (
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


def ingest_options(settings: Settings) -> dict[str, Any]:
    """The limits this gateway applies to an upload, recorded with the dataset: the worker
    that ingests it applies these, whatever its own settings say."""
    return {
        "max_entries": settings.max_archive_entries,
        "max_uncompressed_bytes": settings.max_uncompressed_bytes,
        "max_compression_ratio": settings.max_compression_ratio,
        "archive_ratio_min_bytes": settings.archive_ratio_min_bytes,
        "max_image_pixels": settings.max_image_pixels,
        "min_images_per_class": settings.min_images_per_class,
    }


def rejected_counts(row: Dataset) -> dict[str, int]:
    """{reason: count} of every rejected member (rows made before the counts: from the list)."""
    if row.rejected_counts is not None:
        return {str(k): int(v) for k, v in row.rejected_counts.items()}
    return dict(Counter(str(item["reason"]) for item in row.rejected))


def rejected_page(
    storage: Storage, row: Dataset, offset: int, limit: int
) -> tuple[list[dict[str, str]], int | None]:
    """Rejected members [offset, offset+limit) in path order, and the next offset (None at the
    end). The list never changes once the dataset exists, so an offset is a stable cursor.
    Read from this node's copy, else from the object store (that one file, checked)."""
    path = storage.path(row.storage_key) / DATASET_REJECTED
    items: list[dict[str, str]]
    try:
        if path.is_file():
            items = json.loads(path.read_bytes())
        else:
            items = json.loads(storage.read_shared("datasets", row.id, DATASET_REJECTED))
    except ObjectMissing:  # a dataset made before the file: its row holds the whole list
        items = list(row.rejected)
    except ObjectStoreError as exc:
        log.warning("dataset %s: reading its rejected list failed: %s", row.id, exc)
        raise storage_unavailable("try again shortly") from None
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


# Fills a dataset's files/ folder: (target, limits, skip rule, progress) -> what it skipped.
Filler = Callable[[Path, Limits, SkipRule, Progress | None], Extracted]


def archive_filler(archive: Path, kind: ArchiveKind) -> Filler:
    """Files from an uploaded archive, extracted safely (service.archives)."""

    def fill(target: Path, limits: Limits, skip: SkipRule, progress: Progress | None) -> Extracted:
        return extract_archive(archive, target, limits, kind, skip=skip, progress=progress)

    return fill


def build_dataset_files(
    fill: Filler,
    directory: Path,
    options: dict[str, Any],
    *,
    on_extract: Progress | None = None,
    on_index: Progress | None = None,
) -> tuple[DatasetIndex, list[dict[str, str]]]:
    """Fill and index `directory` under the recorded `options` (ingest_options). Blocking
    (the ingest worker). Returns the index and every rejected member (also written to
    DATASET_REJECTED). Raises the kinds of service.domain_errors for refused data."""
    files = directory / DATASET_FILES
    limits = Limits(
        max_entries=options["max_entries"],
        max_uncompressed_bytes=options["max_uncompressed_bytes"],
        max_compression_ratio=options["max_compression_ratio"],
        archive_ratio_min_bytes=options["archive_ratio_min_bytes"],
    )
    extracted = fill(files, limits, images_only, on_extract)
    try:
        index = index_directory(
            files,
            max_pixels=options["max_image_pixels"],
            min_images_per_class=options["min_images_per_class"],
            progress=on_index,
        )
    except DatasetError as exc:  # bitcore's error: a plain library knows no API errors
        raise InvalidRequest(exc.code, str(exc), exc.details) from None
    _delete_rejected(index)
    rejected = _rejected(index, files, extracted)
    write_json_atomic(directory / DATASET_REJECTED, rejected, indent=None)
    index.save(directory / DATASET_INDEX)
    return index, rejected


def files_bytes(directory: Path) -> int:
    """Bytes of the images a dataset keeps (what a source dataset counts against quotas)."""
    files = directory / DATASET_FILES
    return sum(p.stat().st_size for p in files.rglob("*") if p.is_file() and not p.is_symlink())


def ready_values(index: DatasetIndex, rejected: list[dict[str, str]]) -> dict[str, Any]:
    """The row's figures once ingested (service.ingest_runs.finish_ready writes them)."""
    height, width = index.median_size
    return {
        "num_images": index.num_images,
        "num_classes": len(index.classes),
        "classes": [{"name": n, "count": c} for n, c in index.counts().items()],
        "image_size": {"median_height": height, "median_width": width},
        # A few inline (every listing carries them), the rest paged from the file.
        "rejected": rejected[:REJECTED_INLINE],
        "rejected_counts": dict(Counter(item["reason"] for item in rejected)),
    }


def accept_upload(
    db: Database,
    storage: Storage,
    broker: Broker,
    settings: Settings,
    archive: Path,
    kind: ArchiveKind,
    *,
    name: str,
    size: int,
    tenant_id: str | None,
) -> Dataset:
    """Store a received archive and record its dataset as processing; send it to the ingest
    queue (blocking: the upload route runs it in a thread). Takes as long as moving (local) or
    uploading (object store) the archive: nothing is decoded here.

    Raises InsufficientStorage (the disk filled up), Unavailable storage_unavailable (the
    object store did not answer), QuotaExceeded when `size` more bytes would pass the tenant's
    max_stored_bytes (checked with the row's insert, under the tenant's lock). Nothing is kept
    on any of them. A failed send is only logged: the row is committed, the reconciler sends."""
    dataset_id = new_id("ds")
    try:
        with disk_full_as("the dataset"):
            storage.store_upload(dataset_id, archive, kind)
        ingest = {"kind": kind, "options": ingest_options(settings)}
        row = _processing_row(dataset_id, tenant_id, name, size, ingest)
        with db.session() as session:
            # Under the tenant's lock: concurrent uploads cannot both fit the last bytes.
            quotas.check_stored_bytes(session, tenant_id, settings, size)
            session.add(row)
    except ObjectStoreError as exc:
        storage.discard("uploads", dataset_id)
        log.warning("dataset %s: storing the upload failed: %s", dataset_id, exc)
        raise storage_unavailable("upload the dataset again shortly") from None
    except BaseException:
        storage.discard("uploads", dataset_id)
        raise
    _send(db, broker, dataset_id)
    return row


def register_source(
    db: Database,
    broker: Broker,
    settings: Settings,
    source: Source,
    *,
    name: str,
    tenant_id: str | None,
) -> Dataset:
    """Record a dataset whose images an ingest worker copies from `source` (checked by
    service.dataset_sources.parse_source) and send it to the ingest queue. Its bytes are
    known once ingested (then counted against the tenant's max_stored_bytes); a tenant
    already past that quota is refused now (QuotaExceeded)."""
    dataset_id = new_id("ds")
    ingest = {"source": source.to_dict(), "options": ingest_options(settings)}
    row = _processing_row(dataset_id, tenant_id, name, 0, ingest)
    with db.session() as session:
        quotas.check_stored_bytes(session, tenant_id, settings, 0)
        session.add(row)
    _send(db, broker, dataset_id)
    return row


def _processing_row(
    dataset_id: str, tenant_id: str | None, name: str, size: int, ingest: dict[str, Any]
) -> Dataset:
    """A dataset waiting for its ingest worker: nothing known of its images yet."""
    return Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name=name,
        status=ingest_runs.PROCESSING,
        num_images=0,
        num_classes=0,
        classes=[],
        image_size={},
        rejected=[],
        rejected_counts={},
        bytes=size,
        storage_key=f"datasets/{dataset_id}",  # Storage.dataset_dir's key
        ingest=ingest,
        progress={"phase": "queued"},
    )


def _send(db: Database, broker: Broker, dataset_id: str) -> None:
    try:
        broker.send_ingest(dataset_id)
    except Exception as exc:
        log.warning("dataset %s: the ingest message was not sent (sent later): %s", dataset_id, exc)
    else:
        with db.sessionmaker() as session:
            ingest_runs.mark_sent(session, dataset_id)


def get_dataset(session: Session, tenant_id: str | None, dataset_id: str) -> Dataset:
    """The tenant's dataset, in any status; NotFound for unknown ids and other tenants'."""
    row = session.get(Dataset, dataset_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound("dataset", dataset_id)
    return row


def get_ready_dataset(session: Session, tenant_id: str | None, dataset_id: str) -> Dataset:
    """The tenant's dataset once ingested; Conflict dataset_not_ready while processing or
    after a failed ingestion."""
    row = get_dataset(session, tenant_id, dataset_id)
    if row.status != ingest_runs.READY:
        raise not_ready(row)
    return row


def not_ready(row: Dataset) -> Conflict:
    why = (
        "is still being ingested; try again when its status is ready"
        if (row.status == ingest_runs.PROCESSING)
        else "failed to ingest (see its error); upload the archive again"
    )
    return Conflict("dataset_not_ready", f"dataset {row.id} {why}", {"status": row.status})


def list_datasets(tenant_id: str | None) -> sa.Select[Dataset]:
    """The tenant's datasets, every status (paginate it with service.pagination)."""
    return sa.select(Dataset).where(tenant_is(Dataset.tenant_id, tenant_id))


def delete_dataset(db: Database, storage: Storage, tenant_id: str | None, dataset_id: str) -> None:
    """Delete the row, then the files (an ingestion in progress finds its row gone and stops).
    Conflict while a queued/running/cancelling job uses it."""
    with db.session() as session:
        # Row lock (PostgreSQL): a job inserted concurrently waits for this decision in its
        # foreign-key check, and is answered 404 if the dataset goes (service.jobs.create_job).
        row = session.get(Dataset, dataset_id, with_for_update=True)
        if row is None or row.tenant_id != tenant_id:
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
    storage.discard("uploads", dataset_id)
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
