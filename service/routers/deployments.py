"""/v1/deployments: stable names for served models (create, read, change, roll back, delete,
history, figures) and predictions through a name.

Thin: parse, call service.deployments (the database) and the app's DeploymentRoutes (what
this process serves), answer a deployment schema. A change warms its models in this process
before it is committed, so no request waits for a load here afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service import deployment_stats, deployments
from service.admission import PredictAdmission
from service.api_keys import Scope
from service.auth import authorize
from service.db import Database
from service.deployment_routing import DeploymentRoutes, Resolved, Route
from service.deployment_schemas import (
    DeploymentChangePublic,
    DeploymentCreate,
    DeploymentPredictResponse,
    DeploymentPublic,
    DeploymentStatsPublic,
    DeploymentUpdate,
    ModelFigures,
)
from service.deployment_stats import DeploymentStats
from service.deps import PrincipalDep, SessionDep, SettingsDep, TenantDep
from service.http_errors import error_responses
from service.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, page
from service.predict_calls import (
    declared_bytes,
    image_predictions,
    limit_predict_rate,
    predict_images,
)
from service.request_bodies import read_images
from service.routers.models import PREDICT_BODY_DOC
from service.schemas import Page
from service.serving import ModelCache

log = logging.getLogger(__name__)
router = APIRouter(
    prefix="/v1/deployments", tags=["deployments"], responses=error_responses(401, 403, 422)
)
READ = [authorize(Scope.PREDICT, Scope.TRAIN)]
MANAGE = [authorize(Scope.TRAIN)]
PREDICT = [authorize(Scope.PREDICT), Depends(limit_predict_rate)]
T = TypeVar("T")
# Shadow copies in flight per process: past this, a request's copy is not sent (the shadow
# must never slow the answers down or pile up behind a slow model).
MAX_SHADOW_IN_FLIGHT = 8


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await run_in_threadpool(fn, *args, **kwargs)


async def _read(session: Session, fn: Callable[..., T], *args: Any) -> T:
    """A read that ends its transaction: no connection held idle while models load."""

    def run() -> T:
        try:
            return fn(session, *args)
        finally:
            session.rollback()

    return await run_in_threadpool(run)


def _routes(request: Request) -> DeploymentRoutes:
    routes: DeploymentRoutes = request.app.state.deployment_routes
    return routes


def _stats(request: Request) -> DeploymentStats:
    stats: DeploymentStats = request.app.state.deployment_stats
    return stats


def _public(session: Session, tenant: str, name: str) -> DeploymentPublic:
    row = deployments.get_deployment(session, tenant, name)
    return DeploymentPublic.of(row, deployments.targets_of(session, row.id))


def _resolved(session: Session, tenant: str, name: str) -> Resolved:
    row = deployments.get_deployment(session, tenant, name)
    return Resolved(row.id, row.name, row.version, deployments.targets_of(session, row.id))


@router.post(
    "",
    status_code=201,
    response_model=DeploymentPublic,
    dependencies=MANAGE,
    responses=error_responses(400, 404, 409, 503),
)
async def create_deployment(
    body: DeploymentCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    principal: PrincipalDep,
) -> DeploymentPublic:
    """A stable name for one model (`model_id`), or a split by weight (`targets`), with an
    optional `shadow_model_id`. The models are loaded and warmed here before the answer."""
    targets = body.targets_value()
    await _read(session, deployments.check_targets, tenant, targets)
    await _routes(request).warm(targets)
    await _call(
        deployments.create_deployment, session, tenant, body.name, targets, principal.key_id
    )
    response.headers["Location"] = f"/v1/deployments/{body.name}"
    return await _settled(request, session, tenant, body.name)


@router.get(
    "",
    response_model=Page[DeploymentPublic],
    dependencies=READ,
    responses=error_responses(400),
    summary="The tenant's deployments, newest first",
)
async def list_deployments(
    session: SessionDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> Page[DeploymentPublic]:
    def public(row: Any) -> DeploymentPublic:
        return DeploymentPublic.of(row, deployments.targets_of(session, row.id))

    query = deployments.list_deployments(tenant)
    return await _call(page, session, query, limit, cursor, public)


@router.get(
    "/{name}", response_model=DeploymentPublic, dependencies=READ, responses=error_responses(404)
)
async def get_deployment(name: str, session: SessionDep, tenant: TenantDep) -> DeploymentPublic:
    return await _call(_public, session, tenant, name)


@router.patch(
    "/{name}",
    response_model=DeploymentPublic,
    dependencies=MANAGE,
    responses=error_responses(400, 404, 409, 503),
)
async def update_deployment(
    name: str,
    body: DeploymentUpdate,
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    principal: PrincipalDep,
) -> DeploymentPublic:
    """Point the name at other models or weights, or change its shadow. The new models are
    loaded and warmed here before the change is committed; requests already running finish
    on the model they started on; other gateways follow within
    BITSERVE_DEPLOYMENT_REFRESH_SECONDS (after loading the new models themselves)."""
    current = await _read(session, _resolved, tenant, name)
    targets = body.targets_value(current.targets)
    await _read(session, deployments.check_targets, tenant, targets)
    await _routes(request).warm(targets)
    await _call(
        deployments.update_deployment,
        session,
        tenant,
        name,
        targets,
        principal.key_id,
        expected_version=current.version,
    )
    return await _settled(request, session, tenant, name)


@router.post(
    "/{name}/rollback",
    response_model=DeploymentPublic,
    dependencies=MANAGE,
    responses=error_responses(404, 409, 503),
    summary="Back to what the deployment pointed at before its latest change",
)
async def rollback_deployment(
    name: str, request: Request, session: SessionDep, tenant: TenantDep, principal: PrincipalDep
) -> DeploymentPublic:
    """One call, recorded as a change of its own (`rolled_back`); rolling back twice returns
    to where it was. 409 `nothing_to_roll_back` for a deployment never changed."""
    targets, version = await _read(session, deployments.previous_targets, tenant, name)
    await _routes(request).warm(targets)
    await _call(
        deployments.update_deployment,
        session,
        tenant,
        name,
        targets,
        principal.key_id,
        action=deployments.ROLLED_BACK,
        expected_version=version,
    )
    return await _settled(request, session, tenant, name)


@router.delete("/{name}", status_code=204, dependencies=MANAGE, responses=error_responses(404))
async def delete_deployment(
    name: str, request: Request, session: SessionDep, tenant: TenantDep
) -> Response:
    """The name stops answering (here at once, elsewhere within the refresh bound); its
    models stay."""
    await _call(deployments.delete_deployment, session, tenant, name)
    _routes(request).forget(tenant, name)
    return Response(status_code=204)


@router.get(
    "/{name}/history",
    response_model=Page[DeploymentChangePublic],
    dependencies=READ,
    responses=error_responses(400, 404),
    summary="Every change of the deployment, newest first: who, when, from what, to what",
)
async def deployment_history(
    name: str,
    session: SessionDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> Page[DeploymentChangePublic]:
    row = await _call(deployments.get_deployment, session, tenant, name)
    query = deployments.history(session, row)
    return await _call(page, session, query, limit, cursor, DeploymentChangePublic.from_row)


@router.get(
    "/{name}/stats",
    response_model=DeploymentStatsPublic,
    dependencies=READ,
    responses=error_responses(404),
    summary="Requests, errors, latency and first labels per model, over every gateway",
)
async def deployment_stats_of(
    name: str, request: Request, session: SessionDep, tenant: TenantDep
) -> DeploymentStatsPublic:
    """Per model that answered through the name (targets, the shadow, and former ones): the
    figures of every gateway, each added every BITSERVE_DEPLOYMENT_STATS_FLUSH_SECONDS."""
    db: Database = request.app.state.db
    await _call(_stats(request).flush, db)  # this process's own counts, up to now
    return await _call(_figures, session, tenant, name)


def _figures(session: Session, tenant: str, name: str) -> DeploymentStatsPublic:
    row = deployments.get_deployment(session, tenant, name)
    targets = deployments.targets_of(session, row.id)
    weights = dict(targets.split)
    rows = deployment_stats.read(session, row.id)
    order = {model_id: i for i, model_id in enumerate(targets.model_ids)}
    rows.sort(key=lambda r: (order.get(r.model_id, len(order)), r.role, r.model_id))
    models = [
        ModelFigures.model_validate(
            {
                "model_id": r.model_id,
                "role": r.role,
                "weight": weights.get(r.model_id) if r.role == deployments.TARGET else None,
                **deployment_stats.summary(r),
            }
        )
        for r in rows
    ]
    return DeploymentStatsPublic(deployment=row.name, version=row.version, models=models)


@router.post(
    "/{name}/predict",
    openapi_extra=PREDICT_BODY_DOC,
    response_model=DeploymentPredictResponse,
    dependencies=PREDICT,
    responses=error_responses(400, 404, 413, 415, 429, 503),
)
async def predict(
    name: str,
    request: Request,
    settings: SettingsDep,
    tenant: TenantDep,
    top_k: Annotated[int, Query(ge=1, description="labels per image (clamped to classes)")] = 5,
) -> DeploymentPredictResponse:
    """The same bodies as POST /v1/models/{id}/predict; answered by the model the deployment
    picks (its split), named in `model_id`. A shadow gets a copy after the answer is ready;
    its answers go to the figures only."""
    route = await _routes(request).resolve(tenant, name)
    model_id, _ = route.pick()
    admission: PredictAdmission = request.app.state.predict_admission
    with admission.admit(declared_bytes(request, settings)):
        names, images = await read_images(request, settings)
        cache: ModelCache = request.app.state.models
        state = request.app.state
        started = time.perf_counter()
        try:
            results = await predict_images(cache, model_id, names, images, top_k)
        except Exception:
            _count(state, tenant, route, model_id, deployments.TARGET, started, error=True)
            raise
        firsts = [ranked[0][0] if ranked else "" for ranked in results]
        _count(state, tenant, route, model_id, deployments.TARGET, started, labels=firsts)
        if route.shadow is not None:
            _send_shadow(request, tenant, route, names, images, firsts)
    return DeploymentPredictResponse(
        deployment=route.resolved.name,
        version=route.version,
        model_id=model_id,
        predictions=image_predictions(results),
    )


def _count(
    state: Any,
    tenant: str,
    route: Route,
    model_id: str,
    role: str,
    started: float,
    *,
    labels: list[str] | None = None,
    error: bool = False,
    agreed: int | None = None,
) -> None:
    """One answer (or failure) of a deployment's model: into the figures and the metrics."""
    seconds = time.perf_counter() - started
    name = route.resolved.name
    stats: DeploymentStats = state.deployment_stats
    stats.record(
        route.resolved.deployment_id,
        model_id,
        role,
        latency_ms=seconds * 1000,
        labels=labels or [],
        error=error,
        agreed=agreed,
    )
    outcome = "error" if error else "ok"
    state.metrics.deployment_requests.labels(tenant, name, model_id, role, outcome).inc()
    state.metrics.deployment_latency.labels(tenant, name, model_id, role).observe(seconds)


def _send_shadow(
    request: Request,
    tenant: str,
    route: Route,
    names: list[str],
    images: list[bytes],
    firsts: list[str],
) -> None:
    in_flight: set[asyncio.Task[None]] = request.app.state.shadow_tasks
    if len(in_flight) >= MAX_SHADOW_IN_FLIGHT:
        log.debug(
            "deployment %s: shadow copy not sent (%d in flight)",
            route.resolved.name,
            len(in_flight),
        )
        return
    task = asyncio.get_running_loop().create_task(
        _shadow(request.app.state, tenant, route, names, images, firsts)
    )
    in_flight.add(task)
    task.add_done_callback(in_flight.discard)


async def _shadow(
    state: Any,
    tenant: str,
    route: Route,
    names: list[str],
    images: list[bytes],
    firsts: list[str],
) -> None:
    shadow = route.shadow
    assert shadow is not None
    cache: ModelCache = state.models
    started = time.perf_counter()
    try:
        results = await predict_images(cache, shadow, names, images, 1)
    except Exception as exc:
        _count(state, tenant, route, shadow, deployments.SHADOW, started, error=True)
        log.info("deployment %s: shadow %s failed: %s", route.resolved.name, shadow, exc)
        return
    labels = [ranked[0][0] if ranked else "" for ranked in results]
    agreed = sum(a == b for a, b in zip(labels, firsts, strict=True))
    _count(state, tenant, route, shadow, deployments.SHADOW, started, labels=labels, agreed=agreed)


async def _settled(request: Request, session: Session, tenant: str, name: str) -> DeploymentPublic:
    """The committed deployment, now served by this process (its models were warmed)."""
    resolved = await _call(_resolved, session, tenant, name)
    await _routes(request).apply(tenant, resolved)
    return await _call(_public, session, tenant, name)
