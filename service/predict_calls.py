"""One predict call on a loaded model, its errors in the API's terms: shared by a model's and a
deployment's predict routes."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from bitcore.predict import InputImageError
from service import quotas
from service.auth import principal_of
from service.db import Database
from service.domain_errors import InvalidRequest, Unavailable
from service.schemas import ImagePrediction, Label
from service.serving import ModelCache, ModelUnavailable, Overloaded
from service.settings import Settings

Ranked = Sequence[tuple[str, float]]


async def predict_images(
    cache: ModelCache, model_id: str, names: Sequence[str], images: Sequence[bytes], top_k: int
) -> list[Ranked]:
    """The top-k (label, score) of each image, or the error the client can act on."""
    try:
        return list(await cache.predict(model_id, images, top_k))
    except InputImageError as exc:
        name = names[exc.index]
        cause = str(exc.__cause__ or exc)
        raise InvalidRequest(
            "invalid_image",
            f"image {exc.index} ({name}) cannot be used: {cause}",
            {"index": exc.index, "filename": name, "reason": exc.reason},
        ) from exc
    except Overloaded as exc:
        raise Unavailable(
            "overloaded",
            f"the server is busy ({exc}); retry later",
            {"waiting": exc.waiting, "limit": exc.limit},
            retry_after=exc.retry_after,
        ) from exc
    except ModelUnavailable as exc:
        raise Unavailable(
            exc.code, str(exc), {"model_id": model_id}, retry_after=exc.retry_after
        ) from exc


def image_predictions(results: Sequence[Ranked]) -> list[ImagePrediction]:
    return [
        ImagePrediction(top_k=[Label(label=label, score=score) for label, score in ranked])
        for ranked in results
    ]


async def limit_predict_rate(request: Request) -> None:
    """429 rate_limited past the caller's predict rate: a token bucket per API key (per
    tenant when auth is off) in this process (service.quotas.RateLimiter), checked after the
    key and before a byte of the body is read."""
    principal = principal_of(request)
    limiter: quotas.RateLimiter = request.app.state.rate_limiter
    tenant = principal.tenant_id
    rate = limiter.cached_rate(tenant)
    if rate is None:
        app_state = request.app.state
        rate = await run_in_threadpool(_predict_rate, app_state.db, app_state.settings, tenant)
        limiter.remember_rate(tenant, rate)
    wait = limiter.acquire(principal.key_id or f"tenant:{tenant}", rate)
    if wait > 0:
        raise quotas.rate_limited(rate, limiter.burst, wait)


def _predict_rate(db: Database, settings: Settings, tenant: str) -> float:
    with db.sessionmaker() as session:
        return quotas.get_quotas(session, tenant, settings).predict_rate_per_second


def declared_bytes(request: Request, settings: Settings) -> int:
    declared = request.headers.get("content-length", "")
    limit = int(settings.predict_max_request_bytes)
    return min(int(declared), limit) if declared.isdigit() else limit
