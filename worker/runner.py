"""Run one fine-tuning job: claim it, make sure the base checkpoint is here, train, record.

Every database write goes through service.job_runs, fenced by this attempt's `worker_id`. While
the job runs a heartbeat thread keeps `heartbeat_at` fresh and watches for a cancel request;
training polls that flag between steps (cooperative cancel, docs/operations.md) and checkpoints
into the job's work dir, so a redelivered or reclaimed job resumes where it stopped. The same
thread stops a job that has run past `job_max_seconds` since its first start: the cancel path
stops it, and it fails with time_limit_exceeded.

The dataset's index and the base checkpoint are made ready by worker.job_inputs; the training
callbacks and the throttle on progress writes are worker.job_progress.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC
from functools import partial
from pathlib import Path

from bitcore.data.index import DatasetIndex
from bitcore.hyperrule import Plan
from bitcore.models import MODEL_SPECS
from bitcore.train import Progress, TrainingCancelled, finetune
from bitcore.train.history import TrainingHistory
from service import job_runs, jobs, models_store
from service.broker import Broker
from service.db import UNAVAILABLE_ERRORS, Database
from service.ids import new_id, utcnow
from service.settings import Settings
from service.storage import Storage
from service.tables import Job
from worker import deploy
from worker.checkpoints import CheckpointPublisher, restore
from worker.failures import (
    internal_error_message,
    release_memory,
    resource_failure,
)
from worker.identity import new_worker_id
from worker.job_inputs import JobFailure, base_checkpoint, dataset_index
from worker.job_progress import RunCallbacks, Throttled, checkpoint_every

log = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 1.0  # a cancel is noticed within about this (plus one training step)
# How long a finished job keeps trying to record its model while the database is down.
FINAL_WRITE_PATIENCE_SECONDS = 300.0
# The curves are rewritten whole (up to ~500 points, ~40 KB of JSON): not on every progress
# write. The page draws live points from the progress events meanwhile.
HISTORY_WRITE_SECONDS = 5.0
_databases: dict[tuple[int, str], Database] = {}
_databases_lock = threading.Lock()


def process_database(url: str) -> Database:
    """One engine per process (a forked child must not reuse its parent's connections)."""
    key = (os.getpid(), url)
    with _databases_lock:
        if key not in _databases:
            _databases[key] = Database(url)
        return _databases[key]


def run_job(
    job_id: str,
    settings: Settings,
    *,
    db: Database | None = None,
    storage: Storage | None = None,
    shutdown: threading.Event | None = None,
) -> str:
    """Claim and run `job_id`; returns how it ended: succeeded, failed, cancelled, released,
    lost, or why the claim was refused (its status, "too_many_attempts", "not_found").

    `shutdown` set while training (the worker is stopping): training checkpoints and stops,
    and the job goes back to the queue for the next worker, which resumes it."""
    db = db or process_database(settings.database_url)
    storage = storage or Storage.from_settings(settings)
    worker_id = new_worker_id()
    with db.sessionmaker() as session:
        claim = job_runs.claim(session, job_id, worker_id, settings)
    if not claim.claimed or claim.job is None:
        log.info("job %s not claimed: %s", job_id, claim.reason)
        return claim.reason
    job = claim.job
    log.info("job %s claimed by %s (attempt %d)", job_id, worker_id, job.attempts)
    run = JobRun(db, storage, settings, job, worker_id, shutdown or threading.Event())
    with run.heartbeat():
        return run.execute()


class JobRun:
    """One attempt at one job, by one worker."""

    def __init__(
        self,
        db: Database,
        storage: Storage,
        settings: Settings,
        job: Job,
        worker_id: str,
        shutdown: threading.Event,
    ) -> None:
        self.db, self.storage, self.settings = db, storage, settings
        self.job, self.worker_id = job, worker_id
        self.shutdown = shutdown  # the worker is stopping: checkpoint and hand the job back
        self.cancel = threading.Event()  # set on a cancel request or when the job is lost
        self.lost = threading.Event()  # the job is no longer ours (reclaimed elsewhere)
        self.timed_out = threading.Event()  # past job_max_seconds: stopped, then failed
        self.deadline = time.monotonic() + _seconds_left(job, settings.job_max_seconds)
        self.work_dir = storage.job_dir(job.id)
        self.model_id = models_store.new_model_id()
        self.out_dir = storage.model_dir(self.model_id)
        self.published = False  # the artifact reached the object store
        self.checkpoints = CheckpointPublisher(storage, job.id, self.work_dir)
        self.progress = Throttled(self._write_progress, settings.job_progress_interval_seconds)
        # The curves; a later attempt continues the stored ones (a resume drops the steps that
        # are run again). Written with the progress, at most every HISTORY_WRITE_SECONDS.
        self.history = TrainingHistory()
        self._history_written_at = -float("inf")
        self.history_step = -1  # the last step the stored curves include
        self.checkpoint_every = checkpoint_every(Plan.from_dict(job.plan).total_steps)

    def execute(self) -> str:
        try:
            return self._train()
        except TrainingCancelled:
            self._drop_model()
            if self.timed_out.is_set():
                return self._failed("time_limit_exceeded", self._time_limit_message())
            if self.shutdown.is_set() and not self.cancel.is_set():
                return self._released()
            return self._cancelled()
        except JobFailure as exc:
            return self._failed(exc.code, exc.message)
        except Exception as exc:
            failure = resource_failure(exc, self.job.plan)
            if failure is None:
                # The exception's own text may name server paths and internals: it goes to
                # the worker's log under an error id, and the job's error quotes only the id.
                error_id = new_id("err")
                log.exception("job %s failed: error %s", self.job.id, error_id)
                return self._failed("training_error", internal_error_message(error_id))
            log.warning("job %s: %s (%s: %s)", self.job.id, failure[0], type(exc).__name__, exc)
        # Out of the except block, the exception and the tensors its frames hold are gone:
        # release them before this worker records the failure and takes its next job.
        release_memory()
        return self._failed(*failure)

    def _train(self) -> str:
        with self.db.sessionmaker() as session:
            self.history = TrainingHistory.from_dict(job_runs.load_history(session, self.job.id))
        index = self._dataset_index()
        plan = Plan.from_dict(self.job.plan)
        spec = MODEL_SPECS[self.job.base_model]
        from_scratch = not spec.published
        checkpoint = None if from_scratch else self._base_checkpoint()
        restore(self.storage, self.job.id, self.work_dir)  # another node's, from the store
        with self.checkpoints:  # joins the last upload: it ends before the job is handed on
            result = finetune(
                index,
                self.job.base_model,
                plan,
                self.out_dir,
                device=self.settings.device,
                checkpoint=checkpoint,
                from_scratch=from_scratch,
                validation_fraction=self.job.validation_fraction,
                seed=self.job.seed,
                serving_precision=self.job.serving_precision,
                callbacks=RunCallbacks(self),
                resume=True,
                checkpoint_every=self.checkpoint_every,
                work_dir=self.work_dir,
                # The images resized at upload (service.datasets), shared by the dataset's jobs.
                cache_dir=self.storage.dataset_cache(self.job.dataset_id)
                if self.job.dataset_id
                else None,
                num_workers=0 if _daemonic() else None,
            )
        last = self.progress.latest or Progress(step=0, total_steps=plan.total_steps)
        final = replace(
            last, step=result.steps, total_steps=plan.total_steps, phase="done", eta_seconds=0
        )
        trained = models_store.TrainedModel.from_artifact(
            self.storage, self.model_id, result.metrics
        )
        # The durable copy first: once the job says succeeded, any node can serve the model.
        self.published = True
        self.storage.publish("models", self.model_id)
        # deploy_to: decided now (scoring takes a while), carried out with the success.
        decision = deploy.decide(
            self.db, self.storage, self.settings, self.job, self.model_id, index
        )
        if not self._record_success(trained, final, decision):
            # cancel requested after the last step, or the job was taken over
            self._drop_model()
            return self._cancelled()
        self.storage.discard_job(self.job.id)  # the work dir, and its published checkpoint
        log.info("job %s succeeded: model %s", self.job.id, self.model_id)
        return "succeeded"

    def _record_success(
        self,
        trained: models_store.TrainedModel,
        final: Progress,
        decision: deploy.Decision | None = None,
    ) -> bool:
        """Commit the model and the job's success; True if this attempt's model was recorded.

        The database may be down at the very moment a long run ends: keep trying (with
        backoff, for up to FINAL_WRITE_PATIENCE_SECONDS) instead of throwing the trained model
        away. A commit whose answer was lost is recognised on the retry by the job already
        pointing at this attempt's model id (the write is fenced, so it cannot happen twice).
        """
        deadline = time.monotonic() + FINAL_WRITE_PATIENCE_SECONDS
        delay = 0.5
        retried = False
        while True:
            try:
                with self.db.sessionmaker() as session:
                    if retried:
                        job = session.get(Job, self.job.id)
                        if job is not None and job.model_id == self.model_id:
                            return True
                    model = job_runs.finish_succeeded(
                        session,
                        self.job.id,
                        self.worker_id,
                        trained,
                        progress=final.to_dict(),
                        history=self.history.to_dict(),
                        deploy=partial(deploy.apply, decision=decision) if decision else None,
                    )
                return model is not None
            except UNAVAILABLE_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "job %s: recording its result failed (%s); retrying in %.1f s",
                    self.job.id,
                    exc,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                retried = True

    def _dataset_index(self) -> DatasetIndex:
        return dataset_index(self.db, self.storage, self.job)

    def _base_checkpoint(self) -> Path:
        """The base checkpoint; its download is the job's "downloading" phase, stopped by a
        cancel request or the worker's shutdown."""
        total_steps = int(self.job.plan["total_steps"])

        def report(done: int, total: int | None) -> None:
            self.progress(
                Progress(
                    step=0,
                    total_steps=total_steps,
                    phase="downloading",
                    downloaded_bytes=done,
                    total_bytes=total,
                )
            )
            if self.cancel.is_set() or self.shutdown.is_set():
                raise TrainingCancelled(0)

        return base_checkpoint(self.job, self.settings, report)

    def _time_limit_message(self) -> str:
        limit = self.settings.job_max_seconds
        return (
            f"the job ran longer than the limit of {limit:g} s (BITSERVE_JOB_MAX_SECONDS) since "
            "it first started; fewer steps or a smaller batch_size make it shorter"
        )

    def _cancelled(self) -> str:
        if self.lost.is_set():
            return self._not_ours()
        with self.db.sessionmaker() as session:
            ended = job_runs.finish_cancelled(session, self.job.id, self.worker_id)
        if not ended:
            return self._not_ours()
        self.storage.discard_job(self.job.id)  # the work dir, and its published checkpoint
        log.info("job %s cancelled", self.job.id)
        return "cancelled"

    def _released(self) -> str:
        """Back to the queue (attempt not counted) and sent again; the next worker resumes
        from the checkpoint in the job's work dir."""
        with self.db.sessionmaker() as session:
            if not job_runs.release(session, self.job.id, self.worker_id):
                return self._cancelled()  # cancel requested meanwhile, or no longer ours
            broker = Broker(self.settings)
            try:
                jobs.enqueue(session, self.job.id, broker.send_finetune)
            finally:
                broker.close()
        log.info("job %s handed back to the queue (worker shutting down)", self.job.id)
        return "released"

    def _drop_model(self) -> None:
        """Remove this attempt's artifact (and its published copy, if it got that far)."""
        if self.published:
            self.storage.discard("models", self.model_id)  # logs objects it fails to delete
        else:
            self.storage.remove(self.out_dir)

    def _failed(self, code: str, message: str) -> str:
        self._drop_model()
        if self.lost.is_set():
            return "lost"
        with self.db.sessionmaker() as session:
            ended = job_runs.finish_failed(session, self.job.id, self.worker_id, code, message)
        if not ended:
            return self._not_ours()
        self.storage.discard_job(self.job.id)  # the work dir, and its published checkpoint
        log.warning("job %s failed: %s: %s", self.job.id, code, message)
        return "failed"

    def _not_ours(self) -> str:
        # The fenced write found the job taken over (our heartbeat went stale and another
        # worker claimed it) or already ended by the reconciler, which removes the work dir
        # itself: the dir is not ours to remove, a new owner resumes from its checkpoints.
        log.warning("job %s is no longer this worker's (%s); stopped", self.job.id, self.worker_id)
        return "lost"

    def _write_progress(self, progress: Progress, *, with_history: bool = False) -> None:
        now = time.monotonic()
        due = now - self._history_written_at >= HISTORY_WRITE_SECONDS
        final = progress.step == progress.total_steps or progress.phase != "training"
        history = self.history.to_dict() if with_history or due or final else None
        try:
            with self.db.sessionmaker() as session:
                ours = job_runs.record_progress(
                    session, self.job.id, self.worker_id, progress.to_dict(), history=history
                )
            if history is not None:
                self._history_written_at = now
                self.history_step = progress.step
        except Exception as exc:  # a database blip must not kill hours of training
            log.warning("progress write for job %s failed: %s", self.job.id, exc)
            return
        if not ours:
            self.lost.set()
            self.cancel.set()

    def save_history(self, step: int) -> None:
        """Store the curves up to `step` now: called at each checkpoint (and just before a
        periodic one), so a later attempt, which resumes from the newest checkpoint, finds every
        step before it in the stored curves."""
        if self.history_step >= step:
            return
        latest = self.progress.latest
        if latest is not None:
            self._write_progress(latest, with_history=True)

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Beat (and watch for cancel) in a thread while the job runs."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self._beat, args=(stop,), name=f"heartbeat-{self.job.id}", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=10)

    def _beat(self, stop: threading.Event) -> None:
        interval = min(self.settings.job_heartbeat_seconds, CANCEL_POLL_SECONDS)
        while not stop.wait(interval):
            if time.monotonic() >= self.deadline and not self.timed_out.is_set():
                log.warning("job %s: past its time limit; stopping it", self.job.id)
                self.timed_out.set()
                self.cancel.set()  # training stops between steps, as on a cancel request
            if self.job.dataset_id:  # in use: the local cache must not evict it meanwhile
                self.storage.touch("datasets", self.job.dataset_id)
            try:
                with self.db.sessionmaker() as session:
                    state = job_runs.heartbeat(session, self.job.id, self.worker_id)
            except Exception as exc:  # a database blip must not kill the job; retry next beat
                log.warning("heartbeat for job %s failed: %s", self.job.id, exc)
                continue
            if state == "lost":
                self.lost.set()
            if state in ("cancel", "lost"):
                self.cancel.set()


def _seconds_left(job: Job, limit: float) -> float:
    """What is left of `limit` seconds since the job first started (earlier attempts count:
    a job that kills its workers cannot restart its clock)."""
    started = job.started_at
    if started is None:
        return limit
    if started.tzinfo is None:  # stored without a zone: UTC, as everywhere in the service
        started = started.replace(tzinfo=UTC)
    return limit - (utcnow() - started).total_seconds()


def _daemonic() -> bool:
    # Celery prefork children are daemonic and may not start DataLoader worker processes.
    try:
        import billiard.process

        if billiard.process.current_process().daemon:
            return True
    except ImportError:
        pass
    return bool(multiprocessing.current_process().daemon)


__all__ = ["JobFailure", "JobRun", "Throttled", "checkpoint_every", "new_worker_id", "run_job"]
