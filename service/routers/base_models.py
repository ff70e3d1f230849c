"""GET /v1/base-models: the models a job can start from."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from bitcore import catalog
from bitcore.models import MODEL_SPECS, count_parameters
from service.api_keys import Scope
from service.auth import authorize
from service.deps import SettingsDep
from service.http_errors import error_responses
from service.schemas import BaseModelPublic, Page

router = APIRouter(
    prefix="/v1",
    tags=["base models"],
    dependencies=[authorize(Scope.TRAIN)],
    responses=error_responses(401, 403),
)


def base_model_catalog(checkpoint_dir: Any, base_url: str | None) -> list[BaseModelPublic]:
    """Every registry model: published ones with their checkpoint, small ones without."""
    items = []
    for name, spec in MODEL_SPECS.items():
        entry = catalog.CATALOG.get(name) if spec.published else None
        items.append(
            BaseModelPublic(
                name=name,
                architecture=spec.architecture,
                parameters=count_parameters(name),  # cached per process
                upstream=entry.upstream if entry else spec.upstream,
                published=spec.published,
                requires_checkpoint=entry is not None,
                checkpoint_present=catalog.is_present(name, checkpoint_dir) if entry else None,
                download_bytes=entry.approx_bytes if entry else None,
                url=entry.url(base_url) if entry else None,
                description=spec.description,
            )
        )
    return items


@router.get("/base-models", response_model=Page[BaseModelPublic])
def list_base_models(settings: SettingsDep) -> Page[BaseModelPublic]:
    # The list shape of every list route (docs/api.md); the catalog always fits one page.
    items = base_model_catalog(settings.checkpoint_dir, settings.checkpoint_base_url)
    return Page(items=items, next_cursor=None)
