"""The sweep of orphaned objects: folders of the object store that no row points to.

A delete removes the row first, then the objects; a store that refuses the delete leaves the
objects behind (service.storage.Storage.discard logs it). Ingestion and training publish a
folder before its row is written, so a process killed in between leaves objects without a row
too. Nothing can reach such a folder again: this finds and deletes them.

An orphan is a folder `<kind>/<id>` of the store (service.object_store's `list_folders`; the
local store is the artifact root itself) whose newest object is older than `min_age_seconds`
and whose id has no row: datasets/ds_..., models/mdl_...; for jobs/job_... (checkpoints, work
dirs) a row in an end state (succeeded, failed, cancelled) counts as none, since no step will
read them again. The age matters: a folder being published right now has no row yet, so it
must be older than the longest publish or ingestion. Folders whose name is no id of their kind
are never bitserve's, and never touched. Uploads in flight under this node's `tmp/` older than
`min_age_seconds` are dead too (an upload is a single request) and are removed as well.

Run by `bitserve storage sweep` (service.cli) and, every BITSERVE_SWEEP_INTERVAL_SECONDS, by
the worker's reconciler (worker.reconciler). Deleting twice is harmless, so several workers
may sweep at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.ids import is_id
from service.job_states import JobStatus
from service.object_store import ObjectStoreError, StoredFolder, tree_size_and_mtime
from service.storage import Storage
from service.tables import BatchPrediction, Dataset, Evaluation, Job, Model

log = logging.getLogger(__name__)

DEFAULT_MIN_AGE_SECONDS = 3600.0
# The kinds of folder in the store: the id prefix of each, and the table of its rows.
SweptTable = type[Dataset] | type[Model] | type[Job] | type[Evaluation] | type[BatchPrediction]
SWEPT_KINDS: dict[str, tuple[str, SweptTable]] = {
    "uploads": ("ds", Dataset),  # archives waiting for ingestion: kept while processing
    "datasets": ("ds", Dataset),
    "models": ("mdl", Model),
    "jobs": ("job", Job),
    "evaluations": ("eval", Evaluation),  # worst examples' thumbnails: kept while the row is
    "batch_predictions": ("bp", BatchPrediction),  # shards, then the output: kept alike
}
UPLOADS = "tmp"  # uploads in flight, under the artifact root (never in the store)
# Ids per `IN (...)` query: well under every database's limit on bound parameters.
QUERY_CHUNK = 500


@dataclass(frozen=True)
class Orphan:
    kind: str  # datasets, models, jobs, evaluations, batch_predictions, or tmp
    name: str  # the id (the upload's file name under tmp/)
    bytes: int
    age_seconds: float
    reason: str  # "no row", "job succeeded", "dead upload"


@dataclass
class SweepReport:
    dry_run: bool
    min_age_seconds: float
    removed: list[Orphan] = field(default_factory=list)  # or would be, on a dry run
    failed: list[tuple[Orphan, str]] = field(default_factory=list)  # the store refused

    @property
    def bytes_freed(self) -> int:
        return sum(orphan.bytes for orphan in self.removed)


def select_orphans(
    kind: str,
    folders: Iterable[StoredFolder],
    rows: dict[str, str | None],
    now: float,
    min_age_seconds: float,
) -> list[Orphan]:
    """The folders of `kind` to delete. `rows` maps each id that has a row to its status (None
    for models): a row keeps its folder while it may still be read (`_still_needed`). Folders
    younger than `min_age_seconds`, or not named as an id of `kind`, are kept."""
    prefix = SWEPT_KINDS[kind][0]
    orphans = []
    for folder in folders:
        age = now - folder.modified
        if not is_id(folder.name, prefix) or age < min_age_seconds:
            continue
        if folder.name not in rows:
            reason = "no row"
        else:
            status = rows[folder.name]
            if _still_needed(kind, status):
                continue
            reason = f"{'job' if kind == 'jobs' else 'dataset'} {status}"
        orphans.append(Orphan(kind, folder.name, folder.bytes, age, reason))
    return orphans


def _still_needed(kind: str, status: str | None) -> bool:
    """A job's checkpoints until it ends; an upload while its dataset is processing; a
    dataset's files unless its ingestion failed; a model's files always."""
    if kind == "jobs":
        return status is not None and not JobStatus(status).finished
    if kind == "uploads":
        return status == "processing"
    if kind == "datasets":
        return status != "failed"
    return True


def rows_of(session: Session, kind: str, ids: list[str]) -> dict[str, str | None]:
    """The ids among `ids` that have a row of `kind`: their status (None for models)."""
    table = SWEPT_KINDS[kind][1]
    found: dict[str, str | None] = {}
    for start in range(0, len(ids), QUERY_CHUNK):
        chunk = ids[start : start + QUERY_CHUNK]
        if table is Job or table is Dataset:
            for object_id, status in session.execute(
                sa.select(table.id, table.status).where(table.id.in_(chunk))
            ):
                found[object_id] = str(getattr(status, "value", status))
        else:
            for (object_id,) in session.execute(sa.select(table.id).where(table.id.in_(chunk))):
                found[object_id] = None
    return found


def dead_uploads(storage: Storage, now: float, min_age_seconds: float) -> list[Orphan]:
    """Entries of this node's `tmp/` (files or folders) untouched for `min_age_seconds`."""
    parent = storage.root / UPLOADS
    if not parent.is_dir():
        return []
    orphans = []
    for path in sorted(parent.iterdir()):
        size, modified = tree_size_and_mtime(path)
        if modified and now - modified >= min_age_seconds:
            orphans.append(Orphan(UPLOADS, path.name, size, now - modified, "dead upload"))
    return orphans


def find_orphans(
    storage: Storage, session: Session, min_age_seconds: float, now: float | None = None
) -> list[Orphan]:
    """Every orphan of the store and of this node's uploads, by kind then name. Raises
    ObjectStoreError if the store cannot be listed."""
    now = time.time() if now is None else now
    orphans: list[Orphan] = []
    for kind in SWEPT_KINDS:
        folders = storage.objects.list_folders(kind)
        rows = rows_of(session, kind, [folder.name for folder in folders])
        orphans += select_orphans(kind, folders, rows, now, min_age_seconds)
    return orphans + dead_uploads(storage, now, min_age_seconds)


def sweep(
    storage: Storage,
    session: Session,
    *,
    min_age_seconds: float = DEFAULT_MIN_AGE_SECONDS,
    dry_run: bool = False,
    now: float | None = None,
) -> SweepReport:
    """Find the orphans and (unless `dry_run`) delete them: from the store (the manifest
    first), then this node's copy. A delete the store refuses is reported, not raised; the next
    sweep tries again."""
    report = SweepReport(dry_run, min_age_seconds)
    for orphan in find_orphans(storage, session, min_age_seconds, now):
        if not dry_run:
            try:
                remove(storage, orphan)
            except ObjectStoreError as exc:
                report.failed.append((orphan, str(exc)))
                continue
        report.removed.append(orphan)
    return report


def remove(storage: Storage, orphan: Orphan) -> None:
    if orphan.kind != UPLOADS:
        storage.objects.delete(f"{orphan.kind}/{orphan.name}")  # a no-op for the local store
    # The local store's folder itself; with a remote one, this node's cached copy (if any).
    storage.remove(storage.root / orphan.kind / orphan.name)


def format_report(report: SweepReport) -> str:
    """A table of what was removed (or would be), then the bytes freed and any failures."""
    verb = "would remove" if report.dry_run else "removed"
    lines = [f"{'kind':9} {'id':40} {'bytes':>14} {'age (s)':>10}  reason"]
    for orphan in report.removed:
        lines.append(
            f"{orphan.kind:9} {orphan.name:40} {orphan.bytes:>14} "
            f"{orphan.age_seconds:>10.0f}  {orphan.reason}"
        )
    lines.append(
        f"{verb} {len(report.removed)} folders and uploads, {report.bytes_freed} bytes"
        f" (older than {report.min_age_seconds:g} s)"
    )
    for orphan, error in report.failed:
        lines.append(f"FAILED {orphan.kind}/{orphan.name}: {error}")
    return "\n".join(lines)
