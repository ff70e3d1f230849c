"""Batch predictions, the REST side: a model's top-k labels for every file of a dataset, run as
a job by a worker (worker.batch_predict), downloadable as one CSV or JSONL file.

    POST /v1/models/{id}/batch-predictions {"dataset_id", "top_k", "format"}
      -> queued -> running -> succeeded | failed      (cancel: cancelling -> cancelled)

The files come from one of the tenant's datasets (uploaded as any other, `POST /v1/datasets`;
a client with a loose archive uploads it first). Its class folders are ignored: every image is
predicted, whatever its label. A dataset still processing is waited for (as evaluations do,
service.batch_prediction_runs). The output is `batch_predictions/<id>/predictions.csv` (or
`.jsonl`) in the object store once the batch prediction succeeded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import batch_prediction_runs as runs
from service.domain_errors import Conflict, Gone, NotFound
from service.ids import new_id, utcnow
from service.models_store import get_model
from service.object_store import ObjectCorrupt, ObjectMissing, ObjectStoreError
from service.storage import Storage, storage_unavailable
from service.tables import BatchPrediction, Dataset, tenant_is

log = logging.getLogger(__name__)

KIND = "batch_predictions"  # its folder in the store (service.storage.SHARED_KINDS)
FORMATS = ("csv", "jsonl")
MEDIA_TYPES = {"csv": "text/csv", "jsonl": "application/x-ndjson"}
DEFAULT_TOP_K = 5
MAX_TOP_K = 1000  # a row of a CSV: label and score columns per rank


@dataclass(frozen=True)
class Output:
    """The finished output file, as the download route sends it."""

    path: Path
    media_type: str
    filename: str


def output_name(format: str) -> str:
    """The output file's name in the batch prediction's folder."""
    return f"predictions.{format}"


def create_batch_prediction(
    session: Session,
    tenant_id: str | None,
    model_id: str,
    dataset_id: str,
    top_k: int,
    format: str,
    send: Callable[[str], None],
) -> BatchPrediction:
    """Validate, commit the queued batch prediction, then send it (a failed send is the
    reconciler's to repeat; a dataset still processing makes it wait instead)."""
    if format not in FORMATS:  # the route's schema already refuses it
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    model = get_model(session, tenant_id, model_id)
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise NotFound("dataset", dataset_id)
    if dataset.status == "failed":
        raise Conflict(
            "dataset_not_ready",
            f"dataset {dataset.id} failed ingestion ({dataset.error_code}); upload it again",
            {"status": dataset.status},
        )
    row = BatchPrediction(
        id=new_id("bp"),
        tenant_id=tenant_id,
        model_id=model.id,
        dataset_id=dataset.id,
        top_k=top_k,
        format=format,
        status=runs.QUEUED,
        cancel_requested=False,
        shards_done=0,
        images_done=0,
        images_total=dataset.num_images if dataset.status == "ready" else None,
        attempts=0,
        created_at=utcnow(),
    )
    session.add(row)
    session.commit()
    if dataset.status == "ready":
        try:
            send(row.id)
        except Exception as exc:  # the broker is down: the reconciler sends it later
            log.warning("batch prediction %s queued but not sent: %s", row.id, exc)
        else:
            runs.mark_sent(session, row.id)
    session.refresh(row)
    return row


def get_batch_prediction(session: Session, tenant_id: str | None, batch_id: str) -> BatchPrediction:
    row = session.get(BatchPrediction, batch_id, populate_existing=True)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound("batch_prediction", batch_id)
    return row


def list_batch_predictions(tenant_id: str | None, model_id: str) -> sa.Select[BatchPrediction]:
    """The model's batch predictions (paginate with service.pagination: newest first)."""
    return sa.select(BatchPrediction).where(
        tenant_is(BatchPrediction.tenant_id, tenant_id), BatchPrediction.model_id == model_id
    )


def request_cancel(session: Session, tenant_id: str | None, batch_id: str) -> BatchPrediction:
    """queued -> cancelled now; running -> cancelling (its worker stops after the shard it is
    on); cancelling stays; an ended one is 409 `batch_prediction_finished`."""
    now = utcnow()
    for _ in range(5):  # each turn loses at most one race with a worker transition
        row = get_batch_prediction(session, tenant_id, batch_id)
        if row.status == runs.CANCELLING:
            return row
        if row.status in runs.FINISHED:
            raise Conflict(
                "batch_prediction_finished",
                f"batch prediction {batch_id} already {row.status}",
                {"status": row.status},
            )
        values: dict[str, Any] = {"cancel_requested": True}
        if row.status == runs.QUEUED:
            values.update(status=runs.CANCELLED, finished_at=now)
        else:
            values["status"] = runs.CANCELLING
        changed = session.execute(
            sa.update(BatchPrediction)
            .where(BatchPrediction.id == batch_id, BatchPrediction.status == row.status)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if getattr(changed, "rowcount", 0):
            return get_batch_prediction(session, tenant_id, batch_id)
    raise Conflict("conflict", f"batch prediction {batch_id} changed state repeatedly; try again")


def output(session: Session, storage: Storage, tenant_id: str | None, batch_id: str) -> Output:
    """The output file of a succeeded batch prediction (fetched from the object store on a
    cache miss); 409 `not_finished` before, 410 `output_missing` when the file is gone."""
    row = get_batch_prediction(session, tenant_id, batch_id)
    if row.status != runs.SUCCEEDED:
        raise Conflict(
            "not_finished",
            f"batch prediction {batch_id} is {row.status}; its output exists once it succeeded",
            {"status": row.status},
        )
    name = output_name(row.format)
    path = _local_output(storage, row.id, name)
    return Output(path, MEDIA_TYPES[row.format], f"{row.id}-{name}")


def _local_output(storage: Storage, batch_id: str, name: str) -> Path:
    folder = storage.shared_dir(KIND, batch_id)
    if not (folder / name).is_file() and storage.remote:
        # A folder here without the output: shards a worker on this node left before another
        # node finished. The published folder (the output alone) replaces it.
        storage.remove(folder)
    try:
        storage.ensure_local(KIND, batch_id)
    except (ObjectMissing, ObjectCorrupt) as exc:
        log.error("batch prediction %s: its output is missing or damaged: %s", batch_id, exc)
        raise Gone(
            "output_missing",
            f"the output of batch prediction {batch_id} is missing or damaged in the server's "
            "store; ask for the batch prediction again",
        ) from None
    except ObjectStoreError as exc:
        log.warning("batch prediction %s: the object store failed: %s", batch_id, exc)
        raise storage_unavailable("try again shortly") from None
    path = folder / name
    if not path.is_file():
        raise Gone(
            "output_missing",
            f"the output of batch prediction {batch_id} is missing; ask for it again",
        )
    return path
