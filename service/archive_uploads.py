"""An archive sent in a request's body becomes a dataset: the one path every route that takes
an archive uses (POST /v1/datasets, and the evaluations and batch predictions that take their
data in the same call), with the same caps, quota, disk check and upload slots.

Also the JSON half of routes that accept either: `is_json` picks the branch and `parse_json`
answers a bad JSON body exactly as FastAPI answers a declared body (400 or 422, the field).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from service import datasets, quotas
from service.admission import UploadSlots
from service.archives import detect_kind
from service.broker import Broker
from service.db import Database
from service.domain_errors import UnsupportedMedia
from service.request_bodies import QuotaCap, check_declared_length
from service.settings import Settings
from service.storage import Storage
from service.tables import Dataset
from service.uploads import check_free_disk, receive_upload

M = TypeVar("M", bound=BaseModel)
F = TypeVar("F")


def archive_or_json_body(schema: str, form_fields: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route taking JSON (the `schema` component, which
    `register_body_schemas` adds) or a multipart archive with `form_fields` beside it."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {
                                "type": "string",
                                "format": "binary",
                                "description": "a .zip or .tar.gz of <class>/<image> folders",
                            },
                            **form_fields,
                        },
                    }
                },
            },
        }
    }


def register_body_schemas(app: FastAPI, models: Iterable[type[BaseModel]]) -> None:
    """Put the JSON bodies that routes parse themselves (they also take multipart, so they
    declare no body parameter) into the document's components, where their $ref points."""
    build = app.openapi
    models = tuple(models)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schemas[model.__name__] = model.model_json_schema(
                    ref_template="#/components/schemas/{model}"
                )
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]


def is_json(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return kind == "application/json"


async def parse_json(request: Request, model: type[M]) -> M:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:  # answered as any body's errors (400 or 422, the field)
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def parse_fields(fields: Mapping[str, str], model: type[M]) -> M:
    """Form fields (strings) validated by a JSON body's model: `"3"` is the number 3 there."""
    try:
        return model.model_validate_strings(dict(fields))
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


async def receive_dataset(
    request: Request,
    settings: Settings,
    db: Database,
    storage: Storage,
    broker: Broker,
    tenant: str,
    *,
    fields: frozenset[str] = frozenset({"name"}),
    check_fields: Callable[[dict[str, str]], F] | None = None,
) -> tuple[Dataset, F | None]:
    """Stream a multipart body's `file` part (a .zip or .tar.gz) into a new dataset, queued
    for ingestion. `check_fields` sees the form's other fields once the body is read and before
    anything is kept: what it raises refuses the request with nothing stored; what it returns
    comes back beside the dataset."""
    slots: UploadSlots = request.app.state.upload_slots
    with slots.take():
        room = await run_in_threadpool(_byte_room, db, settings, tenant)
        quota = QuotaCap(room.remaining, room.exceeded)
        tmp = await run_in_threadpool(storage.upload_tmp)
        max_bytes = settings.max_upload_bytes
        # Over the cap or the quota says more than a full disk would: those answers come first.
        check_declared_length(request, max_bytes, quota=quota)
        await run_in_threadpool(
            check_free_disk,
            tmp,
            request.headers.get("content-length"),
            settings.upload_free_disk_margin_bytes,
        )
        async with receive_upload(
            request, tmp, max_bytes=max_bytes, quota=quota, fields=fields
        ) as upload:
            checked = check_fields(upload.fields) if check_fields is not None else None
            # The first bytes only (magic numbers): nothing is decompressed or decoded here.
            kind = await run_in_threadpool(detect_kind, upload.path)
            if kind is None:
                raise UnsupportedMedia(
                    "unsupported_media_type",
                    "the file is not a .zip or .tar.gz archive (judged by its content)",
                )
            name = datasets.dataset_name(upload.fields.get("name"), upload.filename, "dataset")
            row = await run_in_threadpool(
                datasets.accept_upload,
                db,
                storage,
                broker,
                settings,
                upload.path,
                kind,
                name=name,
                size=upload.size,
                tenant_id=tenant,
            )
    return row, checked


def _byte_room(db: Database, settings: Settings, tenant: str) -> quotas.ByteRoom:
    with db.sessionmaker() as session:
        return quotas.byte_room(session, tenant, settings)
