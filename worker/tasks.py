"""Celery tasks: thin wrappers that hand the job id to worker.runner (Celery's own advice: a
task is like a view; the logic lives elsewhere)."""

from __future__ import annotations

import logging

from service.broker import BATCH_PREDICT_TASK, EVALUATE_TASK, FINETUNE_TASK, INGEST_TASK
from service.ids import is_id
from service.settings import get_settings
from worker.celery_app import SHUTTING_DOWN, app

log = logging.getLogger(__name__)
# How much of a refused argument the log quotes (repr: escaped, one line).
QUOTED_CHARS = 200


@app.task(name=FINETUNE_TASK, ignore_result=True)
def finetune(job_id: object) -> str:
    """Run job `job_id` to an end state; returns how it ended (for the worker's log)."""
    # Anyone who can write to the broker can send this task: an argument that is not a job id
    # is dropped (acknowledged, never run), and quoted escaped, so it cannot forge a log line.
    if not isinstance(job_id, str) or not is_id(job_id, "job"):
        log.warning(
            "dropped a %s task whose argument is not a job id: %s",
            FINETUNE_TASK,
            repr(job_id)[:QUOTED_CHARS],
        )
        return "invalid_job_id"
    # Imported here, in the process that runs the task: the prefork parent never loads the
    # training code (and so never touches CUDA).
    from worker.runner import run_job

    return run_job(job_id, get_settings(), shutdown=SHUTTING_DOWN)


@app.task(name=INGEST_TASK, ignore_result=True)
def ingest(dataset_id: object) -> str:
    """Ingest dataset `dataset_id` (an uploaded archive) to ready or failed."""
    if not isinstance(dataset_id, str) or not is_id(dataset_id, "ds"):
        log.warning(
            "dropped a %s task whose argument is not a dataset id: %s",
            INGEST_TASK,
            repr(dataset_id)[:QUOTED_CHARS],
        )
        return "invalid_dataset_id"
    from worker.ingest import run_ingest

    return run_ingest(dataset_id, get_settings())


@app.task(name=EVALUATE_TASK, ignore_result=True)
def evaluate(evaluation_id: object) -> str:
    """Score a model on a dataset (evaluation `evaluation_id`) to succeeded or failed."""
    if not isinstance(evaluation_id, str) or not is_id(evaluation_id, "eval"):
        log.warning(
            "dropped a %s task whose argument is not an evaluation id: %s",
            EVALUATE_TASK,
            repr(evaluation_id)[:QUOTED_CHARS],
        )
        return "invalid_evaluation_id"
    from worker.evaluate import run_evaluation

    return run_evaluation(evaluation_id, get_settings())


@app.task(name=BATCH_PREDICT_TASK, ignore_result=True)
def batch_predict(batch_id: object) -> str:
    """Predict every file of a dataset (batch prediction `batch_id`) to an end state."""
    if not isinstance(batch_id, str) or not is_id(batch_id, "bp"):
        log.warning(
            "dropped a %s task whose argument is not a batch prediction id: %s",
            BATCH_PREDICT_TASK,
            repr(batch_id)[:QUOTED_CHARS],
        )
        return "invalid_batch_prediction_id"
    from worker.batch_predict import run_batch_prediction

    return run_batch_prediction(batch_id, get_settings())
