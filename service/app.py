"""The FastAPI application factory. Nothing is built at import time: create_app does it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service.admission import PredictAdmission, UploadSlots
from service.archive_uploads import register_body_schemas
from service.audit_middleware import AuditMiddleware
from service.auth import PrincipalCache, check_auth_setting
from service.body_limits import BodyLimitMiddleware
from service.broker import Broker
from service.connections import BodyTimeoutMiddleware
from service.db import Database
from service.deployment_routing import DeploymentRoutes, read_deployment
from service.deployment_stats import DeploymentStats, flush_every
from service.draining import Drain, DrainMiddleware
from service.http_errors import install_error_handlers
from service.job_events import DatasetNotifier, JobNotifier
from service.known_models import KnownModels
from service.metrics import Metrics, MetricsMiddleware
from service.quotas import RateLimiter
from service.routers import (
    audit,
    base_models,
    batch_predictions,
    datasets,
    deployments,
    evaluations,
    health,
    jobs,
    keys,
    models,
    tenants,
    ui,
)
from service.serving import ModelCache
from service.settings import Settings, get_settings
from service.storage import Storage
from service.web_security import WebSecurityMiddleware

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    check_auth_setting(settings)
    db = Database(settings.database_url, settings.db_timeout_seconds)
    storage = Storage.from_settings(settings)
    metrics = Metrics()
    metrics.watch_jobs(db)
    model_cache = ModelCache(settings, storage, metrics)
    broker = Broker(settings)  # its Celery client (and connection pool) is built on first send
    # Predict requests per API key: buckets in this process's memory (docs/operations.md).
    rate_limiter = RateLimiter(settings.predict_burst)
    # Every job event stream of this process is fed by one database read per interval.
    job_events = JobNotifier(
        db, settings.events_poll_seconds, settings.max_streams_per_key, settings.stream_max_seconds
    )
    # Dataset ingestion streams: the same cadence, and the same per-key cap (shared counts).
    dataset_events = DatasetNotifier(
        db,
        settings.events_poll_seconds,
        settings.max_streams_per_key,
        settings.stream_max_seconds,
        streams=job_events.streams,
    )

    deployment_routes = DeploymentRoutes(
        partial(read_deployment, db), model_cache.get, settings.deployment_refresh_seconds
    )
    deployment_stats = DeploymentStats()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.auto_migrate:
            await run_in_threadpool(db.migrate)
        model_cache.start()
        flushing = asyncio.get_running_loop().create_task(
            flush_every(deployment_stats, db, settings.deployment_stats_flush_seconds)
        )
        try:
            yield
        finally:
            flushing.cancel()
            await deployment_routes.close()
            await run_in_threadpool(deployment_stats.flush, db)
            await job_events.close()
            await dataset_events.close()
            await model_cache.close()
            broker.close()
            db.dispose()

    app = FastAPI(
        title="bitserve",
        version="0.1.0",
        description="Fine-tune BiT (Big Transfer) models with the BiT-HyperRule and serve them.",
        lifespan=lifespan,
        # /docs is served from the package by service.routers.ui (FastAPI's loads a CDN);
        # no ReDoc (a CDN too).
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.db = db
    app.state.storage = storage
    app.state.metrics = metrics
    app.state.models = model_cache
    app.state.broker = broker
    app.state.principals = PrincipalCache()
    app.state.known_models = KnownModels()
    app.state.rate_limiter = rate_limiter
    app.state.job_events = job_events
    app.state.deployment_routes = deployment_routes
    app.state.deployment_stats = deployment_stats
    app.state.shadow_tasks = set()  # shadow copies in flight (service.routers.deployments)
    app.state.dataset_events = dataset_events
    # Set by `bitserve api` on SIGTERM (service.draining): new requests are answered 503.
    app.state.drain = Drain()
    install_error_handlers(app)
    # Per-process admission for uploads and predict requests (docs/security.md "Limits").
    app.state.upload_slots = UploadSlots(settings.max_concurrent_uploads)
    app.state.predict_admission = PredictAdmission(
        settings.predict_max_concurrent_requests, settings.predict_max_inflight_bytes
    )
    # Innermost of all: a JSON body over its cap is refused before the app reads it.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_json_body_bytes)
    # A body that stalls or trickles is answered 408 (service.connections); inside the metrics
    # and the audit trail, so they see the 408.
    app.add_middleware(
        BodyTimeoutMiddleware,
        idle_seconds=settings.body_idle_timeout_seconds,
        min_bytes_per_second=settings.body_min_bytes_per_second,
    )
    # Innermost: the metrics and the audit trail see the 503s of a draining gateway.
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(AuditMiddleware, db=db, settings=settings)
    # Outermost: a foreign Host or a cross-site write is refused before anything else runs.
    app.add_middleware(WebSecurityMiddleware, settings=settings)
    routers = (
        health,
        base_models,
        datasets,
        jobs,
        models,
        evaluations,
        batch_predictions,
        deployments,
        keys,
        tenants,
        audit,
        ui,
    )
    for module in routers:
        app.include_router(module.router)
    # Bodies that are JSON or a multipart archive: parsed by their routes, named here.
    register_body_schemas(
        app, (evaluations.EvaluationCreate, batch_predictions.BatchPredictionCreate)
    )
    return app
