"""What the workers that score models share (worker.evaluate, worker.batch_predict), and the
heartbeat thread every held row uses (worker.ingest too).

- `served_predictor`: the model as the gateway serves it (service.serving): the same runtime,
  int8 choice, batch size, pixel cap and JPEG decoding, so that a score or a row is what a
  predict request answers for the same file.
- `dataset_index`: a ready dataset's index on this node (fetched from the object store).
- `beating`: a thread that beats for a held row (and stores its progress) every
  `job_heartbeat_seconds`; `lost` is set once the row is not this worker's any more.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session

from bitcore.data.index import DatasetIndex
from bitcore.predict import Predictor
from service.db import Database
from service.object_store import ObjectCorrupt, ObjectMissing
from service.settings import Settings
from service.storage import Storage

log = logging.getLogger(__name__)


class WorkFailure(Exception):
    """Ends the held row failed with this error code and message (the client reads them)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def served_predictor(storage: Storage, settings: Settings, model_id: str) -> Predictor:
    try:
        directory = storage.ensure_local("models", model_id)
    except (ObjectMissing, ObjectCorrupt):
        raise WorkFailure(
            "model_missing", f"the artifact of model {model_id} is missing or damaged"
        ) from None
    return Predictor.load(
        directory,
        settings.device,
        max_batch_size=int(settings.predict_max_batch_size),
        max_pixels=int(settings.predict_max_image_pixels),
        runtime=settings.predict_runtime,
        int8=bool(settings.predict_int8),
        jpeg_draft=bool(settings.predict_jpeg_draft),
    )


def dataset_index(storage: Storage, dataset_id: str) -> DatasetIndex:
    try:
        storage.ensure_local("datasets", dataset_id)
    except ObjectMissing:
        raise WorkFailure(
            "dataset_missing", f"dataset {dataset_id} is not in the object store"
        ) from None
    except ObjectCorrupt:
        raise WorkFailure(
            "dataset_corrupt",
            f"dataset {dataset_id} is damaged in the server's object store; upload it again",
        ) from None
    path = storage.dataset_index(dataset_id)
    if not path.is_file():
        raise WorkFailure("dataset_missing", f"dataset {dataset_id} has no index")
    return DatasetIndex.load(path)


@contextmanager
def beating(
    db: Database,
    settings: Settings,
    name: str,
    beat: Callable[[Session], bool],
    lost: threading.Event,
) -> Iterator[None]:
    """Run `beat(session)` (True: still ours) from a thread while the block runs; a database
    blip is logged and retried on the next beat, never fatal to the work."""
    stop = threading.Event()
    interval = min(settings.job_heartbeat_seconds, settings.job_progress_interval_seconds or 1.0)

    def run() -> None:
        while not stop.wait(interval):
            try:
                with db.sessionmaker() as session:
                    ours = beat(session)
            except Exception as exc:
                log.warning("heartbeat for %s failed: %s", name, exc)
                continue
            if not ours:
                lost.set()
                return

    thread = threading.Thread(target=run, name=f"beat-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
