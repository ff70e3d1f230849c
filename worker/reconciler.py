"""The reconcile loop: a daemon thread in every worker's main process.

Why a thread in the worker (not Celery beat, not the gateway): it needs no extra process to
deploy or forget, it runs wherever jobs can run (a worker that restarts after a crash repairs
its own jobs first), and the gateway stays free of broker-repair duties. Several workers may
run it at once: every repair in service.job_runs.reconcile is a compare-and-set, and a duplicate
message is refused by the worker's claim.

What it repairs (docs/operations.md, "Long jobs on Celery + Redis"): queued jobs whose message was
lost (Redis restarted without persistence, a send that failed), running jobs whose worker
stopped beating (re-queued, or failed as "worker_lost" after `job_max_attempts`), and jobs
left "cancelling" by a dead worker (cancelled). Work dirs of jobs it ends are removed.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from service import job_runs
from service.broker import Broker
from service.db import Database
from service.settings import Settings
from service.storage import Storage

log = logging.getLogger(__name__)

_thread: threading.Thread | None = None
_stop = threading.Event()


def reconcile_once(
    settings: Settings,
    db: Database,
    broker: Broker,
    storage: Storage | None = None,
    now: datetime | None = None,
) -> job_runs.Reconciled:
    """One pass; removes the work dirs of the jobs it ended."""
    with db.sessionmaker() as session:
        report = job_runs.reconcile(session, settings, broker.send_finetune, now=now)
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
            storage.remove(storage.job_dir(job_id))
    return report


def run_forever(settings: Settings, stop: threading.Event) -> None:
    """Reconcile now, then every `reconcile_interval_seconds`, until `stop` is set."""
    db = Database(settings.database_url)
    broker = Broker(settings)
    storage = Storage(settings.artifact_root)
    try:
        while not stop.is_set():
            try:
                reconcile_once(settings, db, broker, storage)
            except Exception:  # the database or broker is down: try again next round
                log.exception("reconcile pass failed")
            stop.wait(settings.reconcile_interval_seconds)
    finally:
        broker.close()
        db.dispose()


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
