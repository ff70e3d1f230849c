"""What a job trains on, made ready on this node: its dataset's index (in the local cache,
filled from the object store) and the base checkpoint (downloaded if needed, its SHA-256
checked). A problem becomes a JobFailure, an API error code with a message for the user; the
server's paths and internals go to the worker's log only."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from bitcore import catalog
from bitcore.data.index import DatasetIndex
from service.db import Database
from service.object_store import ObjectCorrupt, ObjectMissing
from service.settings import Settings
from service.storage import Storage
from service.tables import Dataset, Job
from worker.failures import checkpoint_missing_message

log = logging.getLogger(__name__)


class JobFailure(Exception):
    """A failure with an API error code (e.g. checkpoint_missing) and a message for the user."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def dataset_index(db: Database, storage: Storage, job: Job) -> DatasetIndex:
    """The index of the job's dataset, its files in this node's cache; JobFailure if the
    dataset was deleted, is not ready, or is missing or damaged in the object store."""
    with db.sessionmaker() as session:
        dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
        if dataset is None or dataset.status != "ready":
            raise JobFailure(
                "dataset_missing", f"dataset {job.dataset_id} was deleted or is not ready"
            )
    try:  # this node's cache, filled from the object store on a miss
        storage.ensure_local("datasets", dataset.id)
    except ObjectMissing:
        raise JobFailure(
            "dataset_missing", f"dataset {dataset.id} is not in the object store"
        ) from None
    except ObjectCorrupt as exc:
        log.error("job %s: dataset %s: %s", job.id, dataset.id, exc)
        raise JobFailure(
            "dataset_corrupt",
            f"dataset {dataset.id} is damaged in the server's object store (a file differs "
            "from its recorded SHA-256); upload it again",
        ) from None
    index_path = storage.dataset_index(dataset.id)
    if not index_path.is_file():
        raise JobFailure("dataset_missing", f"dataset {dataset.id} has no index on disk")
    return DatasetIndex.load(index_path)


def base_checkpoint(
    job: Job, settings: Settings, report: Callable[[int, int | None], None]
) -> Path:
    """The catalog checkpoint, downloaded first if needed (`report(done, total)` as bytes
    arrive; it may raise to stop the download), its SHA-256 checked against the pinned or
    recorded one on every use."""
    name, directory = job.base_model, settings.checkpoint_dir
    path = catalog.local_path(name, directory)
    try:
        return catalog.pull(
            name,
            directory,
            progress=report,
            allow_download=settings.allow_downloads,
            base_url=settings.checkpoint_base_url,
            pins=settings.checkpoint_sha256,
            max_bytes=settings.checkpoint_max_bytes,
            allow_insecure=settings.allow_insecure_mirror,
        )
    except catalog.CheckpointCorrupt as exc:
        raise corrupt_checkpoint(job.id, name, exc) from None
    except catalog.CheckpointMissing as exc:
        # The full text names the server's directory: the operator's, in the log.
        log.warning("job %s: %s", job.id, exc)
        raise JobFailure(
            "checkpoint_missing",
            checkpoint_missing_message(name, path, settings, "downloads are disabled"),
        ) from None
    except (catalog.CheckpointDownloadError, catalog.InsecureMirror) as exc:
        log.warning("job %s: downloading the %s checkpoint failed: %s", job.id, name, exc)
        raise JobFailure(
            "checkpoint_missing",
            checkpoint_missing_message(name, path, settings, "the download failed")
            + " Or set BITSERVE_CHECKPOINT_BASE_URL to a reachable mirror.",
        ) from None


def corrupt_checkpoint(job_id: str, name: str, exc: Exception) -> JobFailure:
    """The job error for a checkpoint whose SHA-256 is wrong; the full text (it names the
    server's files) goes to the log only."""
    log.error("job %s: %s", job_id, exc)
    return JobFailure(
        "checkpoint_corrupt",
        f"the {name} checkpoint on the server differs from its pinned or recorded SHA-256 (it "
        "was modified or replaced); an operator should remove it from BITSERVE_CHECKPOINT_DIR "
        "so that it is downloaded again",
    )
