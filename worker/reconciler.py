"""The reconcile loop: a daemon thread in every worker's main process.

Why a thread in the worker (not Celery beat, not the gateway): it needs no extra process to
deploy or forget, it runs wherever jobs can run (a worker that restarts after a crash repairs
its own jobs first), and the gateway stays free of broker-repair duties. Several workers may
run it at once: every repair in service.job_runs.reconcile is a compare-and-set, and a duplicate
message is refused by the worker's claim.

What it repairs (docs/operations.md, "Long jobs on Celery + Redis"): queued jobs whose message was
lost (Redis restarted without persistence, a send that failed), running jobs whose worker
stopped beating or whose worker process is known dead (worker.identity; re-queued, or failed
as "worker_lost" after `job_max_attempts`), and jobs left "cancelling" by a dead worker
(cancelled). Work dirs of jobs it ends are removed, and their checkpoints in the object store.
Datasets being ingested get the same repairs (`reconcile_ingestion`), and so do evaluations
and batch predictions.

It runs at once when the worker starts (a worker restarted after a crash takes its dead
predecessor's job back within seconds), then every `reconcile_interval_seconds`; sooner when the
broker lost its messages or is down (watched every BROKER_WATCH_SECONDS; while it is down passes
run every BROKER_RETRY_SECONDS, so jobs recorded meanwhile are sent soon after it returns), or
when a dead worker's job or an unsent job is about to become due.

With `sweep_interval_seconds` set (BITSERVE_SWEEP_INTERVAL_SECONDS; off by default) the same
thread also sweeps the object store's orphans (service.sweep) when the worker starts, then
every interval. A sweep lists the whole store, so a big one delays the next reconcile pass by
as long; deleting twice is harmless, so every worker may sweep.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime

from service import batch_prediction_runs, evaluation_runs, ingest_runs, job_runs, sweep
from service.batch_predictions import KIND as BATCH_PREDICTIONS
from service.broker import Broker
from service.db import Database
from service.settings import Settings
from service.storage import Storage
from worker.identity import holder_is_dead

log = logging.getLogger(__name__)

# While the broker does not answer, passes run this often (instead of every interval), so the
# jobs recorded meanwhile are sent within seconds of its return.
BROKER_RETRY_SECONDS = 2.0
# Between passes, the broker is looked at this often (see run_forever).
BROKER_WATCH_SECONDS = 2.0

_thread: threading.Thread | None = None
_stop = threading.Event()


def reconcile_once(
    settings: Settings,
    db: Database,
    broker: Broker,
    storage: Storage | None = None,
    now: datetime | None = None,
) -> job_runs.Reconciled:
    """One pass; removes the work dirs (and stored checkpoints) of the jobs it ended."""
    try:
        lost = broker.messages_lost()
        broker_down = False
    except Exception as exc:  # the broker is down: repair the rest, look again soon
        log.warning("reconciler: the broker does not answer: %s", exc)
        lost, broker_down = False, True
    with db.sessionmaker() as session:
        report = job_runs.reconcile(
            session,
            settings,
            broker.send_finetune,
            now=now,
            holder_is_dead=holder_is_dead,
            messages_lost=lost,
        )
    # Before the marker is kept: had this died, the next pass would look at datasets again.
    ingest_send_failed = reconcile_ingestion(settings, db, broker, storage, lost, now)
    ingest_send_failed = reconcile_evaluations(settings, db, broker, now) or ingest_send_failed
    ingest_send_failed = (
        reconcile_batch_predictions(settings, db, broker, storage, now) or ingest_send_failed
    )
    if lost:
        log.warning(
            "reconciler: the broker lost its messages (restarted empty?): "
            "%d queued jobs are sent again",
            report.forgotten,
        )
        broker.keep_marker()  # only now: had this pass died, the next one would look again
    report.send_failed = report.send_failed or broker_down or ingest_send_failed
    if report:
        log.warning(
            "reconciled jobs: resent %s, requeued %s, failed %s, cancelled %s",
            report.resent,
            report.requeued,
            report.failed,
            report.cancelled,
        )
    if storage is not None:
        for job_id in (*report.failed, *report.cancelled):
            storage.discard_job(job_id)  # work dir here, checkpoint in the store
    return report


def reconcile_ingestion(
    settings: Settings,
    db: Database,
    broker: Broker,
    storage: Storage | None,
    messages_lost: bool,
    now: datetime | None = None,
) -> bool:
    """The same repairs for datasets being ingested (service.ingest_runs); the files of those
    it fails go. True when a send failed (the broker is down)."""
    with db.sessionmaker() as session:
        repairs = ingest_runs.reconcile(
            session, settings, broker.send_ingest, now, messages_lost=messages_lost
        )
    if repairs:
        log.warning(
            "reconciled datasets: resent %s, requeued %s, failed %s",
            repairs.resent,
            repairs.requeued,
            repairs.failed,
        )
    if storage is not None:
        for dataset_id in repairs.failed:
            storage.discard("uploads", dataset_id)
            storage.discard("datasets", dataset_id)
    return repairs.send_failed


def reconcile_evaluations(
    settings: Settings, db: Database, broker: Broker, now: datetime | None = None
) -> bool:
    """The same repairs for evaluations (service.evaluation_runs). True when a send failed."""
    with db.sessionmaker() as session:
        repairs = evaluation_runs.reconcile(session, settings, broker.send_evaluate, now)
    if repairs:
        log.warning(
            "reconciled evaluations: resent %s, requeued %s, failed %s",
            repairs.resent,
            repairs.requeued,
            repairs.failed,
        )
    return repairs.send_failed


def reconcile_batch_predictions(
    settings: Settings,
    db: Database,
    broker: Broker,
    storage: Storage | None,
    now: datetime | None = None,
) -> bool:
    """The same repairs for batch predictions (service.batch_prediction_runs); the files of
    those it ends (failed, cancelled) go. True when a send failed."""
    with db.sessionmaker() as session:
        repairs = batch_prediction_runs.reconcile(session, settings, broker.send_batch_predict, now)
    if repairs:
        log.warning(
            "reconciled batch predictions: resent %s, requeued %s, failed %s, cancelled %s",
            repairs.resent,
            repairs.requeued,
            repairs.failed,
            repairs.cancelled,
        )
    if storage is not None:
        for batch_id in (*repairs.failed, *repairs.cancelled):
            storage.discard(BATCH_PREDICTIONS, batch_id)
    return repairs.send_failed


def run_forever(settings: Settings, stop: threading.Event) -> None:
    """Reconcile now, then every `reconcile_interval_seconds` (or sooner), until `stop` is set.

    Between passes the broker is watched every BROKER_WATCH_SECONDS (one Redis EXISTS): when
    it lost its messages or stopped answering, the next pass runs at once instead of up to an
    interval later."""
    db = Database(settings.database_url)
    broker = Broker(settings)
    storage = Storage.from_settings(settings)  # with the object store: checkpoints too
    next_pass = next_sweep = time.monotonic()
    try:
        while not stop.is_set():
            if settings.sweep_interval_seconds and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + settings.sweep_interval_seconds
                sweep_once(settings, db)
            if time.monotonic() >= next_pass:
                wait = settings.reconcile_interval_seconds
                try:
                    wait = next_pass_in(settings, reconcile_once(settings, db, broker, storage))
                except Exception:  # the database is down: try again next round
                    log.exception("reconcile pass failed")
                next_pass = time.monotonic() + wait
            elif broker_needs_a_pass(broker):
                next_pass = time.monotonic()
                continue
            stop.wait(max(0.0, min(BROKER_WATCH_SECONDS, next_pass - time.monotonic())))
    finally:
        broker.close()
        db.dispose()


def sweep_once(settings: Settings, db: Database) -> sweep.SweepReport | None:
    """Delete the store's orphans older than `sweep_min_age_seconds`; None if it failed (the
    store or the database is down: the next interval tries again)."""
    try:
        with db.sessionmaker() as session:
            report = sweep.sweep(
                Storage.from_settings(settings),
                session,
                min_age_seconds=settings.sweep_min_age_seconds,
            )
    except Exception:
        log.exception("storage sweep failed")
        return None
    if report.removed or report.failed:
        log.warning(
            "storage sweep: removed %d orphaned folders and uploads (%d bytes); %d refused",
            len(report.removed),
            report.bytes_freed,
            len(report.failed),
        )
    for orphan, error in report.failed:
        log.warning("storage sweep: %s/%s not removed: %s", orphan.kind, orphan.name, error)
    return report


def broker_needs_a_pass(broker: Broker) -> bool:
    """The broker lost its messages, or does not answer (then passes retry sends soon)."""
    try:
        return broker.messages_lost()
    except Exception:
        return True


def next_pass_in(settings: Settings, report: job_runs.Reconciled) -> float:
    """Seconds to the next pass: the interval, or sooner (see the module's docstring)."""
    wait = settings.reconcile_interval_seconds
    if report.send_failed:
        wait = min(wait, BROKER_RETRY_SECONDS)
    if report.next_due_in is not None:
        wait = min(wait, report.next_due_in + 0.1)
    return wait


def start(settings: Settings) -> threading.Thread:
    """Start the loop in a daemon thread (idempotent within a process)."""
    global _thread
    if _thread is not None and _thread.is_alive():
        return _thread
    _stop.clear()
    _thread = threading.Thread(
        target=run_forever, args=(settings, _stop), name="bitserve-reconciler", daemon=True
    )
    _thread.start()
    return _thread


def stop(timeout: float = 5.0) -> None:
    global _thread
    _stop.set()
    if _thread is not None:
        _thread.join(timeout)
        _thread = None
