"""Celery tasks: thin wrappers that hand the job id to worker.runner (Celery's own advice: a
task is like a view; the logic lives elsewhere)."""

from __future__ import annotations

from service.broker import FINETUNE_TASK
from service.settings import get_settings
from worker.celery_app import SHUTTING_DOWN, app


@app.task(name=FINETUNE_TASK, ignore_result=True)
def finetune(job_id: str) -> str:
    """Run job `job_id` to an end state; returns how it ended (for the worker's log)."""
    # Imported here, in the process that runs the task: the prefork parent never loads the
    # training code (and so never touches CUDA).
    from worker.runner import run_job

    return run_job(job_id, get_settings(), shutdown=SHUTTING_DOWN)
