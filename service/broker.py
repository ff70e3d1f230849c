"""A light Celery client: the gateway sends "work on job X" by task name, never importing worker/.

The database is the source of truth for jobs (docs/operations.md, "Long jobs on Celery + Redis"):
a message only says which job to work on, so a lost or duplicated message is harmless (the
reconciler re-sends, the worker's compare-and-set claim drops duplicates).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Queue

from service.settings import Settings

FINETUNE_TASK = "bitserve.finetune"
INGEST_TASK = "bitserve.ingest"
EVALUATE_TASK = "bitserve.evaluate"  # scoring a model: inference, so the train queue's nodes
BATCH_PREDICT_TASK = "bitserve.batch_predict"  # a dataset through a model: the train queue too
# A key the reconciler keeps in Redis next to the queue (one per train queue: deployments that
# share a Redis each keep their own). Gone means Redis lost its data (restarted without
# persistence, flushed, a fresh server): the messages of every queued job are gone with it. A
# Redis that kept its data (AOF/RDB, a replica promoted) still has the key and its messages, so
# nothing is sent twice for nothing.
BROKER_MARKER_PREFIX = "bitserve:broker-marker:"
SQLITE_BROKER_PREFIX = "sqla+sqlite:///"
# Sending must not hang a request when the broker is down: the job row is already committed
# and the reconciler re-sends it later, so give up quickly.
BROKER_CONNECT_TIMEOUT_SECONDS = 3
PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}


def is_redis_url(url: str) -> bool:
    return url.startswith(("redis://", "rediss://"))


def is_sqlalchemy_url(url: str) -> bool:
    """kombu's SQLAlchemy transport ("sqla+sqlite:///...", "sqla+postgresql://...")."""
    return url.startswith(("sqla+", "sqlalchemy+"))


def transport_options(settings: Settings) -> dict[str, Any]:
    """broker_transport_options for producer and worker alike.

    Redis: `visibility_timeout` above the longest job, otherwise an unacked late-ack training
    task is redelivered after the 1 h default and runs twice. The SQLAlchemy transport passes
    its options to `create_engine` (an unknown keyword would raise) and has no visibility
    timeout: there a SQLite busy timeout lets the gateway and worker processes share the file.
    """
    if is_sqlalchemy_url(settings.broker_url):
        if "sqlite" in settings.broker_url.split("://", 1)[0]:
            return {"connect_args": {"timeout": 30}}
        return {}
    # A connect to an unreachable host (no RST) must fail in seconds, not hang a request for
    # the kernel's TCP timeout: the job is already recorded, the reconciler sends it later.
    return {
        "visibility_timeout": settings.broker_visibility_timeout,
        "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_SECONDS,
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """Configuration shared by the client here and the worker app (worker/celery_app.py)."""
    if settings.broker_url.startswith(SQLITE_BROKER_PREFIX):
        # The embedded broker lives in a SQLite file under home: make sure its folder exists.
        path = Path(settings.broker_url.removeprefix(SQLITE_BROKER_PREFIX))
        path.parent.mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options(settings),
        "broker_connection_retry_on_startup": True,
        # A worker whose broker went away reconnects for as long as it takes (Celery's default
        # gives up after 100 tries and the worker exits).
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        "broker_channel_error_retry": True,
        "broker_connection_timeout": BROKER_CONNECT_TIMEOUT_SECONDS,
        "task_routes": {
            FINETUNE_TASK: {"queue": settings.train_queue},
            INGEST_TASK: {"queue": settings.ingest_queue},
            EVALUATE_TASK: {"queue": settings.train_queue},
            BATCH_PREDICT_TASK: {"queue": settings.train_queue},
        },
        "task_default_queue": settings.train_queue,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
    }


class Broker:
    """Sends training and ingestion tasks by name. The Celery client is built lazily, once per instance."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._app: Celery | None = None
        self._lock = threading.Lock()

    @property
    def app(self) -> Celery:
        with self._lock:
            if self._app is None:
                app = Celery("bitserve-client", set_as_current=False)
                app.conf.update(celery_config(self.settings))
                self._app = app
            return self._app

    def send_finetune(self, job_id: str) -> None:
        """Publish `bitserve.finetune(job_id)` to the train queue; raises if the broker is down."""
        self.app.send_task(
            FINETUNE_TASK,
            args=[job_id],
            queue=self.settings.train_queue,
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )

    def send_ingest(self, dataset_id: str) -> None:
        """Publish `bitserve.ingest(dataset_id)` to the ingest queue; raises if the broker is
        down (the dataset row is committed: the reconciler sends it later)."""
        self.app.send_task(
            INGEST_TASK,
            args=[dataset_id],
            queue=self.settings.ingest_queue,
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )

    def send_evaluate(self, evaluation_id: str) -> None:
        """Publish `bitserve.evaluate(evaluation_id)` to the train queue (its nodes load models
        fastest); raises if the broker is down (the reconciler sends it later)."""
        self.app.send_task(
            EVALUATE_TASK,
            args=[evaluation_id],
            queue=self.settings.train_queue,
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )

    def send_batch_predict(self, batch_id: str) -> None:
        """Publish `bitserve.batch_predict(batch_id)` to the train queue; raises if the broker
        is down (the reconciler sends it later)."""
        self.app.send_task(
            BATCH_PREDICT_TASK,
            args=[batch_id],
            queue=self.settings.train_queue,
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )

    def messages_lost(self) -> bool:
        """True when a Redis broker has lost its data since `keep_marker` last ran (or never
        had it set): see BROKER_MARKER_PREFIX. Always False for other brokers (the embedded one
        lives in a file next to the database). Raises if the broker does not answer."""
        if not is_redis_url(self.settings.broker_url):
            return False
        with self._redis() as client:
            return not client.exists(self.marker_key)

    def keep_marker(self) -> None:
        """Set the marker (after the lost messages were dealt with)."""
        if is_redis_url(self.settings.broker_url):
            with self._redis() as client:
                client.set(self.marker_key, "1")

    @property
    def marker_key(self) -> str:
        return BROKER_MARKER_PREFIX + self.settings.train_queue

    @contextlib.contextmanager
    def _redis(self) -> Iterator[Any]:
        import redis

        timeout = BROKER_CONNECT_TIMEOUT_SECONDS
        client = redis.Redis.from_url(
            self.settings.broker_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        try:
            yield client
        finally:
            client.close()

    def declare_queues(self) -> None:
        """Create the train and ingest queues now. On kombu's SQLAlchemy transport (the
        embedded broker) a queue is a row made on first use by a select-then-insert: two
        workers starting together may both insert it, and the loser exits with a UNIQUE
        constraint error (seen once in CI under `bitserve up`). Made here first, both find it."""
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            for name in (self.settings.train_queue, self.settings.ingest_queue):
                Queue(name, channel=channel).declare()

    def close(self) -> None:
        with self._lock:
            if self._app is not None:
                self._app.close()
                self._app = None
