"""Liveness, readiness and Prometheus metrics (no API key needed)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import sqlalchemy as sa
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.domain_errors import Unavailable
from service.http_errors import error_responses
from service.schemas import Health, Ready
from service.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 3.0
READY_RETRY_AFTER = 5


def check_broker(url: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raise unless the broker at `url` answers: a Redis PING, or a connect for sqla+ URLs."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
    elif url.startswith("sqla+"):
        from service.db import create_engine

        engine = create_engine(url.removeprefix("sqla+"))
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
    elif not url.startswith("memory://"):
        raise ValueError(f"unsupported broker URL scheme: {url.split(':', 1)[0]}")


def readiness_checks(request: Request) -> dict[str, Callable[[], None]]:
    state = request.app.state
    settings: Settings = state.settings
    checks: dict[str, Callable[[], None]] = {
        "database": state.db.check,
        "broker": lambda: check_broker(settings.broker_url),
        "storage": state.storage.check,
    }
    # `bitserve up` supervises its worker (service.supervisor) and sets this: a crash-looping
    # worker makes the service not ready (training stalls) though the API answers.
    supervisor = getattr(state, "supervisor", None)
    if supervisor is not None:
        checks.update(supervisor.readiness_checks())
    return checks


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Ready,
    responses=error_responses(503),
    response_class=Response,
)
async def readyz(request: Request) -> Response:
    failing: dict[str, str] = {}
    for name, check in readiness_checks(request).items():
        try:
            with anyio.fail_after(CHECK_TIMEOUT_S + 1):
                # abandon_on_cancel: a hung dependency must not hang the probe itself.
                await anyio.to_thread.run_sync(check, abandon_on_cancel=True)
        except Exception as exc:  # any failure means "not ready"; the reason goes to the body
            log.warning("readiness: %s failed: %s", name, exc)
            failing[name] = f"{type(exc).__name__}: {exc}"[:300]
    if failing:
        raise Unavailable(
            "not_ready",
            f"not ready: {', '.join(failing)} unavailable",
            {"failing": failing},
            retry_after=READY_RETRY_AFTER,
        )
    return Response('{"status":"ready"}', media_type="application/json")


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
