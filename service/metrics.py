"""Prometheus metrics: one registry per app (several apps can live in one test process).

Request counts and latency are labelled by route *template* (/v1/models/{model_id}), never the
raw path, so label cardinality stays bounded. Job states and worker heartbeat ages are read
from the database at scrape time: the database is the source of truth for jobs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db import Database
from service.ids import utcnow
from service.job_states import HELD_BY_WORKER, JobStatus
from service.tables import Job

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "bitserve_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "bitserve_http_request_duration_seconds",
            "HTTP request latency (until the response is sent)",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "bitserve_http_requests_in_flight", "requests being served", registry=r
        )
        # Serving (service.serving fills these): queue time and compute time kept apart.
        self.predict_batch_size = Histogram(
            "bitserve_predict_batch_size",
            "images per forward pass",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.predict_queue_depth = Gauge(
            "bitserve_predict_queue_depth", "images waiting for a forward pass", registry=r
        )
        self.predict_queue_seconds = Histogram(
            "bitserve_predict_queue_seconds",
            "time an image waited in the batch queue",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predict_compute_seconds = Histogram(
            "bitserve_predict_compute_seconds",
            "time of one batched forward pass",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predict_images = Counter("bitserve_predict_images", "images classified", registry=r)
        # Deployments (service.routers.deployments): who answered each name, how fast; the
        # first-label distribution is in GET /v1/deployments/{name}/stats (labels are data).
        self.deployment_requests = Counter(
            "bitserve_deployment_requests",
            "predict requests through a deployment, by the model that answered (or its shadow)",
            ["tenant", "deployment", "model", "role", "outcome"],
            registry=r,
        )
        self.deployment_latency = Histogram(
            "bitserve_deployment_predict_seconds",
            "time a deployment's model took to answer (decode + queue + forward)",
            ["tenant", "deployment", "model", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Set once at start-up by ModelCache.start (bitcore.cpus): what the pools are sized for.
        self.available_cpus = Gauge(
            "bitserve_available_cpus",
            "CPUs this process sizes its threads for: min(affinity, cgroup quota) or BITSERVE_CPUS",
            registry=r,
        )
        self.predict_threads = Gauge(
            "bitserve_predict_threads",
            "prediction threads: compute (torch and ONNX Runtime intra-op) and decode (pool)",
            ["pool"],
            registry=r,
        )

    def watch_jobs(self, db: Database) -> None:
        """Report jobs by state and worker heartbeat ages from `db` at each scrape."""
        self.registry.register(JobsCollector(db))


class JobsCollector(Collector):
    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("bitserve_jobs", "fine-tuning jobs by state", labels=["state"])
        ages = GaugeMetricFamily(
            "bitserve_worker_heartbeat_age_seconds",
            "seconds since each busy worker's last heartbeat",
            labels=["worker"],
        )
        up = GaugeMetricFamily(
            "bitserve_database_up", "1 if the last scrape could read the database"
        )
        try:
            with self.db.sessionmaker() as session:
                counts = dict(
                    session.execute(
                        sa.select(Job.status, sa.func.count()).group_by(Job.status)
                    ).all()
                )
                beats = session.execute(
                    sa.select(Job.worker_id, sa.func.max(Job.heartbeat_at))
                    .where(Job.status.in_(HELD_BY_WORKER), Job.heartbeat_at.is_not(None))
                    .group_by(Job.worker_id)
                ).all()
        except Exception:  # a scrape must not fail because the database is down
            log.warning("metrics: cannot read jobs", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for state in JobStatus:
            jobs.add_metric([state.value], counts.get(state, 0))
        now = utcnow()
        for worker, beat in beats:
            if beat is None:
                continue
            beat = beat if beat.tzinfo else beat.replace(tzinfo=UTC)
            ages.add_metric([worker or "unknown"], max(0.0, (now - beat).total_seconds()))
        yield from (up, jobs, ages)


class MetricsMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware): upload streams and disconnects pass untouched."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()
        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            route = _route_template(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Counted before the last byte leaves: a client that has its answer and then
                # reads /metrics always finds its request counted.
                record()
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            record()  # no-op when counted above; here for errors and disconnects


def _route_template(scope: dict[str, Any] | Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(path) if path else "unmatched"
