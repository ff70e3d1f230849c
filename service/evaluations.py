"""Evaluations, the REST side: a model scored on a labelled dataset, run by a worker.

    POST /v1/models/{id}/evaluations {"dataset_id"} -> queued -> running -> succeeded | failed

The dataset is one of the tenant's (uploaded as any other, `POST /v1/datasets`); it may still
be processing: the evaluation then waits for it (service.evaluation_runs). Its class folders
must all be classes the model knows (422 `unknown_labels`, naming them), checked here when the
dataset is ready and by the worker otherwise. Every model also gets its fine-tune's own
validation result as its first evaluation (`record_validation`, in the transaction that
records the model). Worst-scored examples are stored as thumbnails under
`evaluations/<id>/` in the object store, read back with `example_thumbnail`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import evaluation_runs
from service.domain_errors import Conflict, DomainError, NotFound
from service.ids import new_id, utcnow
from service.models_store import get_model
from service.object_store import ObjectMissing
from service.storage import Storage
from service.tables import Dataset, Evaluation, Model, tenant_is

log = logging.getLogger(__name__)

VALIDATION, DATASET = "validation", "dataset"
# What a training run's own evaluation (bitcore.train.engine.evaluate) carries into the
# validation evaluation; precision (the int8 guard) stays with the model.
VALIDATION_FIELDS = (
    "accuracy",
    "loss",
    "macro_f1",
    "num_examples",
    "per_class",
    "confusion_matrix",
)


class UnknownLabels(DomainError):
    """422: the dataset has classes the model was not trained on."""

    def __init__(self, labels: Sequence[str], model_classes: Sequence[str]) -> None:
        super().__init__(
            "unknown_labels",
            f"the model does not know the labels: {', '.join(labels)} (it knows: "
            f"{', '.join(model_classes)}); evaluate on class folders named like its classes",
            {"labels": list(labels), "model_classes": list(model_classes)},
        )


def thumbnail_name(index: int) -> str:
    return f"worst-{index:02d}.jpg"


def create_evaluation(
    session: Session,
    tenant_id: str | None,
    model_id: str,
    dataset_id: str,
    send: Callable[[str], None],
) -> Evaluation:
    """Validate, commit the queued evaluation, then send it (a failed send is the
    reconciler's to repeat; a dataset still processing makes it wait instead)."""
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
    if dataset.status == "ready":
        check_labels([c["name"] for c in dataset.classes or []], model.classes)
    row = Evaluation(
        id=new_id("eval"),
        tenant_id=tenant_id,
        model_id=model.id,
        dataset_id=dataset.id,
        source=DATASET,
        status=evaluation_runs.QUEUED,
        created_at=utcnow(),
    )
    session.add(row)
    session.commit()
    if dataset.status == "ready":
        try:
            send(row.id)
        except Exception as exc:  # the broker is down: the reconciler sends it later
            log.warning("evaluation %s queued but not sent: %s", row.id, exc)
        else:
            evaluation_runs.mark_sent(session, row.id)
    session.refresh(row)
    return row


def check_labels(dataset_classes: Sequence[str], model_classes: Sequence[str]) -> None:
    unknown = sorted(set(dataset_classes) - set(model_classes))
    if unknown:
        raise UnknownLabels(unknown, model_classes)


def record_validation(session: Session, model: Model, metrics: Mapping[str, Any] | None) -> None:
    """The model's first evaluation: its fine-tune's validation result (not committed here:
    it is part of the transaction that records the model)."""
    if not metrics or metrics.get("num_examples") in (None, 0):
        return  # trained without a validation split: nothing was measured
    result: dict[str, Any] = {key: metrics.get(key) for key in VALIDATION_FIELDS}
    per_class = metrics.get("per_class") or []
    result["classes"] = list(model.classes)
    result["labels_evaluated"] = [c["label"] for c in per_class if c.get("support")]
    result["top_k_accuracy"] = None  # the training run scores top-1 only
    result["most_confused"] = most_confused(metrics.get("confusion_matrix") or [], model.classes)
    result["skipped"] = 0
    result["worst"] = []
    now = utcnow()
    session.add(
        Evaluation(
            id=new_id("eval"),
            tenant_id=model.tenant_id,
            model_id=model.id,
            dataset_id=None,
            source=VALIDATION,
            status=evaluation_runs.SUCCEEDED,
            result=result,
            attempts=0,
            created_at=model.created_at or now,
            started_at=model.created_at or now,
            finished_at=model.created_at or now,
        )
    )


def most_confused(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], limit: int = 10
) -> list[dict[str, Any]]:
    """The off-diagonal cells with a count, largest first (then by label, then prediction)."""
    cells = sorted(
        (-int(count), classes[t], classes[p])
        for t, row in enumerate(confusion)
        for p, count in enumerate(row)
        if t != p and count > 0
    )
    return [{"label": t, "predicted": p, "count": -n} for n, t, p in cells[:limit]]


def get_evaluation(session: Session, tenant_id: str | None, evaluation_id: str) -> Evaluation:
    row = session.get(Evaluation, evaluation_id, populate_existing=True)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound("evaluation", evaluation_id)
    return row


def list_evaluations(tenant_id: str | None, model_id: str) -> sa.Select[Evaluation]:
    """The model's evaluations (paginate with service.pagination: newest first)."""
    return sa.select(Evaluation).where(
        tenant_is(Evaluation.tenant_id, tenant_id), Evaluation.model_id == model_id
    )


def example_thumbnail(
    session: Session, storage: Storage, tenant_id: str | None, evaluation_id: str, index: int
) -> bytes:
    """The JPEG thumbnail of worst example `index`; NotFound past the list."""
    row = get_evaluation(session, tenant_id, evaluation_id)
    worst = (row.result or {}).get("worst") or []
    if not 0 <= index < len(worst):
        raise NotFound("example", f"{evaluation_id}/{index}")
    local = storage.shared_dir("evaluations", row.id) / thumbnail_name(index)
    if local.is_file():  # the local store, or this node wrote it
        return local.read_bytes()
    try:
        return storage.read_shared("evaluations", row.id, thumbnail_name(index))
    except ObjectMissing:
        raise NotFound("example", f"{evaluation_id}/{index}") from None
