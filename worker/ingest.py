"""Ingest one dataset: claim it, fetch its archive (or copy its source), extract and index, publish.

What a synchronous upload used to do inside the HTTP request, moved to the `ingest` queue: the
gateway only stored the archive (service.datasets.accept_upload). Here, on any node:

  claim (service.ingest_runs) -> fetch uploads/<id>/ (object store, checked) -> extract and
  index into datasets/<id>/ under the limits the gateway recorded -> publish -> ready

with progress and a heartbeat written every `job_heartbeat_seconds` from a thread. A refused
archive (unsafe, too large, too few images...) ends `failed` with the error code and message
the upload would have answered; either way the uploaded archive is then deleted. An unexpected
error (the object store or the database down) leaves the claim: the reconciler gives the
dataset back to the queue once the heartbeat is stale, and fails it after job_max_attempts.
The training cache is not built here: the node that trains builds it (bitcore.data.cache).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy.orm import Session

from service import batch_prediction_runs, evaluation_runs, ingest_runs
from service.broker import Broker
from service.dataset_sources import Source, copy_source
from service.datasets import Filler, archive_filler, build_dataset_files, files_bytes, ready_values
from service.db import Database
from service.domain_errors import DomainError
from service.object_store import ObjectCorrupt, ObjectMissing, S3Store
from service.settings import Settings
from service.storage import Storage, disk_full_as
from service.tables import Dataset
from worker.held_work import beating
from worker.identity import new_worker_id

log = logging.getLogger(__name__)


class _Beat:
    """The latest progress, written with each heartbeat; `lost` once the row is not ours."""

    def __init__(self) -> None:
        self.progress: dict[str, Any] = {"phase": "extracting"}
        self.lost = threading.Event()

    def phase(self, name: str) -> Any:
        def report(done: int, total: int) -> None:
            self.progress = {"phase": name, "done": done, "total": total}

        return report


class IngestLost(Exception):
    """The dataset was deleted or taken over while this worker ingested it."""


def run_ingest(dataset_id: str, settings: Settings) -> str:
    """Ingest `dataset_id` to ready or failed; returns how it ended (for the worker's log)."""
    db = Database(settings.database_url)
    storage = Storage.from_settings(settings)
    worker_id = new_worker_id()
    try:
        with db.sessionmaker() as session:
            claimed = ingest_runs.claim(session, dataset_id, worker_id, settings)
            row = session.get(Dataset, dataset_id) if claimed == "claimed" else None
        if row is None:
            if claimed == "too_many_attempts":
                _drop_files(storage, dataset_id)
            log.info("dataset %s not ingested here: %s", dataset_id, claimed)
            return claimed
        assert row.ingest is not None  # every processing row has it (accept_upload)
        return _ingest(db, storage, settings, row.id, row.ingest, worker_id)
    finally:
        db.dispose()


def _ingest(
    db: Database,
    storage: Storage,
    settings: Settings,
    dataset_id: str,
    ingest: dict[str, Any],
    worker_id: str,
) -> str:
    beat = _Beat()
    started = time.monotonic()
    directory = storage.dataset_dir(dataset_id)

    def write(session: Session) -> bool:
        return ingest_runs.heartbeat(session, dataset_id, worker_id, beat.progress)

    with beating(db, settings, f"dataset {dataset_id}", write, beat.lost):
        try:
            fill = _filler(storage, dataset_id, ingest)
            storage.remove(directory)  # what a crashed attempt left
            with disk_full_as("the dataset"):
                directory.mkdir(parents=True)
                index, rejected = build_dataset_files(
                    fill,
                    directory,
                    ingest["options"],
                    on_extract=beat.phase("extracting"),
                    on_index=beat.phase("indexing"),
                )
                values = ready_values(index, rejected)
                if "source" in ingest:  # no upload: the copied images are what it stores
                    values["bytes"] = files_bytes(directory)
            beat.progress = {"phase": "storing"}
            if beat.lost.is_set():
                raise IngestLost
            storage.publish("datasets", dataset_id)
        except DomainError as exc:  # the archive is refused: the client reads why
            storage.remove(directory)
            return _fail(db, storage, dataset_id, worker_id, exc)
        except BaseException:
            storage.remove(directory)
            raise
        with db.sessionmaker() as session:
            ready = ingest_runs.finish_ready(session, dataset_id, worker_id, values)
    if not ready:
        return _abandon(db, storage, dataset_id)
    storage.discard("uploads", dataset_id)
    _release_waiting(db, dataset_id, settings)
    log.info(
        "dataset %s ready: %d images, %d rejected, %.1f s",
        dataset_id,
        index.num_images,
        len(rejected),
        time.monotonic() - started,
    )
    return "ready"


def _release_waiting(db: Database, dataset_id: str, settings: Settings) -> None:
    """Evaluations and batch predictions asked for while the dataset was processing run now
    (a failed send is the reconciler's to repeat)."""
    broker = Broker(settings)
    try:
        with db.sessionmaker() as session:
            evaluation_runs.send_waiting(session, dataset_id, broker.send_evaluate)
            batch_prediction_runs.send_waiting(session, dataset_id, broker.send_batch_predict)
    finally:
        broker.close()


def _filler(storage: Storage, dataset_id: str, ingest: dict[str, Any]) -> Filler:
    """Where the images come from: the uploaded archive (fetched here first), or the bucket
    prefix the dataset was registered from (service.dataset_sources)."""
    if "source" in ingest:
        source = Source(**ingest["source"])
        client = S3Store(source.bucket).client()
        return lambda target, limits, skip, progress: copy_source(
            client, source, target, limits, skip, progress
        )
    try:
        archive = storage.upload_archive(dataset_id, ingest["kind"])
    except (ObjectMissing, ObjectCorrupt) as exc:  # trying again would not bring it back
        raise DomainError(
            "ingest_failed",
            "the uploaded archive is missing or damaged in the server's store; upload it again",
            {"reason": type(exc).__name__},
        ) from None
    return archive_filler(archive, ingest["kind"])


def _fail(db: Database, storage: Storage, dataset_id: str, worker_id: str, exc: DomainError) -> str:
    with db.sessionmaker() as session:
        ended = ingest_runs.finish_failed(
            session, dataset_id, worker_id, exc.code, exc.message, exc.details
        )
    if ended:
        storage.discard("uploads", dataset_id)
        log.info("dataset %s failed: %s: %s", dataset_id, exc.code, exc.message)
        with db.sessionmaker() as session:
            evaluation_runs.fail_waiting(session, dataset_id, exc.code, exc.message)
            batch_prediction_runs.fail_waiting(session, dataset_id, exc.code, exc.message)
        return "failed"
    return _abandon(db, storage, dataset_id)


def _abandon(db: Database, storage: Storage, dataset_id: str) -> str:
    """The row stopped being ours meanwhile. Deleted (or failed by the reconciler): nobody
    will reach its files, they go. Taken over by another worker (or made ready by it): the
    files are that worker's now, left alone."""
    with db.sessionmaker() as session:
        row = session.get(Dataset, dataset_id)
        status = None if row is None else row.status
    if status in (None, ingest_runs.FAILED):
        _drop_files(storage, dataset_id)
    log.warning("dataset %s is no longer this worker's (now %s); stopped", dataset_id, status)
    return "lost"


def _drop_files(storage: Storage, dataset_id: str) -> None:
    storage.discard("uploads", dataset_id)
    storage.discard("datasets", dataset_id)
