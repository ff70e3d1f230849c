"""Score one model on one dataset: claim the evaluation, load both, score, store the result.

  claim (service.evaluation_runs) -> the model as the gateway serves it (same runtime, same
  int8 choice) and the dataset's index (this node's cache, from the object store) ->
  bitcore.evaluation.evaluate_model -> thumbnails of the worst examples into
  evaluations/<id>/ (published) -> succeeded

with progress written by a heartbeat thread. The dataset's labels are checked again here (it
may have been processing when the evaluation was asked for): unknown ones fail it with
`unknown_labels`. An unexpected error leaves the claim: the reconciler gives the evaluation
back to the queue once the heartbeat is stale, and fails it after job_max_attempts.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from typing import Any

from sqlalchemy.orm import Session

from bitcore.evaluation import (
    EvaluationCancelled,
    UnknownLabels,
    check_labels,
    evaluate_model,
    thumbnail,
)
from service import evaluation_runs
from service.db import Database
from service.evaluations import thumbnail_name
from service.settings import Settings
from service.storage import Storage
from service.tables import Dataset, Evaluation, Model
from worker.held_work import WorkFailure, beating, dataset_index, served_predictor
from worker.identity import new_worker_id

log = logging.getLogger(__name__)


class _Beat:
    def __init__(self) -> None:
        self.progress: dict[str, Any] = {"done": 0, "total": None}
        self.lost = threading.Event()

    def report(self, done: int, total: int) -> None:
        self.progress = {"done": done, "total": total}


def run_evaluation(evaluation_id: str, settings: Settings) -> str:
    """Run `evaluation_id` to succeeded or failed; returns how it ended (for the log)."""
    db = Database(settings.database_url)
    storage = Storage.from_settings(settings)
    worker_id = new_worker_id()
    try:
        with db.sessionmaker() as session:
            claimed = evaluation_runs.claim(session, evaluation_id, worker_id, settings)
            if claimed != "claimed":
                log.info("evaluation %s not run here: %s", evaluation_id, claimed)
                return claimed
            row = session.get(Evaluation, evaluation_id)
            assert row is not None
            model = session.get(Model, row.model_id)
            dataset = session.get(Dataset, row.dataset_id) if row.dataset_id else None
            model_id, classes = (model.id, list(model.classes)) if model else (None, [])
            dataset_id = dataset.id if dataset is not None and dataset.status == "ready" else None
        try:
            if model_id is None:
                raise WorkFailure("model_missing", "the model was deleted")
            if dataset_id is None:
                raise WorkFailure("dataset_missing", "the dataset was deleted or is not ready")
            return _score(db, storage, settings, evaluation_id, worker_id, model_id, dataset_id)
        except WorkFailure as exc:
            return _fail(db, evaluation_id, worker_id, exc.code, exc.message)
        except UnknownLabels as exc:
            message = (
                f"{exc}; evaluate on class folders named like the model's classes "
                f"({', '.join(classes)})"
            )
            return _fail(db, evaluation_id, worker_id, "unknown_labels", message)
    finally:
        db.dispose()


def _score(
    db: Database,
    storage: Storage,
    settings: Settings,
    evaluation_id: str,
    worker_id: str,
    model_id: str,
    dataset_id: str,
) -> str:
    started = time.monotonic()
    beat = _Beat()
    index = dataset_index(storage, dataset_id)
    predictor = served_predictor(storage, settings, model_id)
    check_labels(index.classes, predictor.classes)

    def write(session: Session) -> bool:
        return evaluation_runs.heartbeat(session, evaluation_id, worker_id, beat.progress)

    with beating(db, settings, f"evaluation {evaluation_id}", write, beat.lost):
        try:
            scored = evaluate_model(
                predictor, index, on_progress=beat.report, should_cancel=beat.lost.is_set
            )
        except EvaluationCancelled:
            log.warning("evaluation %s is no longer this worker's; stopped", evaluation_id)
            return "lost"
        folder = storage.shared_dir("evaluations", evaluation_id)
        storage.remove(folder)  # what a crashed attempt left
        folder.mkdir(parents=True)
        worst = []
        for i, example in enumerate(scored.worst):
            (folder / thumbnail_name(i)).write_bytes(thumbnail(index.root / example.path))
            worst.append({"index": i, **asdict(example)})
        storage.publish("evaluations", evaluation_id)
    result = {**scored.metrics, "worst": worst}
    with db.sessionmaker() as session:
        done = evaluation_runs.finish_succeeded(session, evaluation_id, worker_id, result)
    if not done:
        return "lost"
    log.info(
        "evaluation %s succeeded: model %s on dataset %s, %d images, %.1f s",
        evaluation_id,
        model_id,
        dataset_id,
        result.get("num_examples", 0),
        time.monotonic() - started,
    )
    return "succeeded"


def _fail(db: Database, evaluation_id: str, worker_id: str, code: str, message: str) -> str:
    with db.sessionmaker() as session:
        ended = evaluation_runs.finish_failed(session, evaluation_id, worker_id, code, message)
    log.info("evaluation %s failed: %s: %s", evaluation_id, code, message)
    return "failed" if ended else "lost"
