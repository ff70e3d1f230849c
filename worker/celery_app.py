"""The worker's Celery app. Configured from service.settings when Celery first needs it (not
at import), so `celery -A worker.celery_app worker -Q train` reads the environment then.

Settings follow docs/operations.md, "Long jobs on Celery + Redis":
- acks_late + reject_on_worker_lost: a message is acknowledged only when its task returns, so
  a worker that dies mid-job gives the message back; the database's attempt counter (not the
  broker) stops a job that kills its worker from looping.
- prefetch multiplier 1: a training worker holds no messages it is not running.
- Redis visibility_timeout above the longest job (service.broker.transport_options),
  otherwise an unacked job is redelivered after an hour and runs twice.
- No CUDA in the prefork parent: the parent never loads the training code; a task picks its
  device when it runs (worker.runner).
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_ready, worker_shutdown, worker_shutting_down

from service.broker import celery_config
from service.log_format import configure_root
from service.settings import get_settings

app = Celery("bitserve", include=["worker.tasks"])
# Set when this process should stop: a running job checkpoints and goes back to the queue
# (docs/operations.md: "SIGTERM ... lets the running training step checkpoint").
SHUTTING_DOWN = threading.Event()


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    settings = get_settings()
    sender.conf.update(celery_config(settings))
    sender.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        # A training task runs for hours: never let Celery kill it on a time limit.
        task_time_limit=None,
        task_soft_time_limit=None,
        worker_hijack_root_logger=False,
    )


@setup_logging.connect
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    # Replaces Celery's own log set-up: every record (Celery's included) is written by
    # service.log_format, JSON by default, so a value from a message (a forged job id) cannot
    # start a log line of its own. `bitserve up` asks for text (BITSERVE_LOG_FORMAT).
    configure_root(get_settings().log_format or "json", loglevel or "INFO")


@worker_ready.connect
def _start_reconciler(sender: Any = None, **_: Any) -> None:
    # In the worker's main process (the prefork parent): database and broker work only.
    from worker import reconciler

    reconciler.start(get_settings())


@worker_shutting_down.connect
def _on_shutting_down(sender: Any = None, **_: Any) -> None:
    # The main process got SIGTERM/SIGINT (warm shutdown). With the solo pool (one training
    # process per GPU) the job runs in this process: it checkpoints, goes back to the queue
    # and the worker exits. Prefork children do not see this flag: there the warm shutdown
    # waits for the job, and a SIGKILL after the grace period is repaired by the reconciler.
    SHUTTING_DOWN.set()


@worker_shutdown.connect
def _stop_reconciler(sender: Any = None, **_: Any) -> None:
    from worker import reconciler

    reconciler.stop()
