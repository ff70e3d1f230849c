"""/v1/keys: API keys, for admins. An admin manages its own tenant's keys; a global admin
(the key `bitserve up` makes, or `bitserve keys create --global`) any tenant's."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service import api_keys
from service.admin_schemas import KeyCreate, KeyCreated, KeyPublic
from service.api_keys import Scope
from service.auth import PrincipalCache, authorize
from service.deps import PrincipalDep, SessionDep, SettingsDep, TenantQuery
from service.domain_errors import Forbidden
from service.http_errors import error_responses
from service.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, page
from service.schemas import Page

router = APIRouter(
    prefix="/v1/keys",
    tags=["keys"],
    dependencies=[authorize(Scope.ADMIN)],
    responses=error_responses(401, 403, 422),
)


@router.post(
    "",
    status_code=201,
    response_model=KeyCreated,
    summary="Create an API key",
    responses=error_responses(400),  # an unparseable JSON body
)
async def create_key(
    body: KeyCreate, session: SessionDep, principal: PrincipalDep, settings: SettingsDep
) -> KeyCreated:
    tenant = api_keys.visible_tenant(principal, body.tenant) or principal.tenant_id
    if body.global_admin and not principal.global_admin:
        raise Forbidden("insufficient_scope", "only a global admin key makes global admin keys")
    expires = timedelta(days=body.expires_days) if body.expires_days is not None else None
    made = await run_in_threadpool(
        api_keys.create_key,
        session,
        tenant_id=tenant,
        scopes=body.scopes,
        pepper=settings.pepper,
        name=body.name,
        expires_in=expires,
        global_admin=body.global_admin,
        created_by=principal.key_id,
    )
    public = KeyPublic.from_row(made.row)
    return KeyCreated(**public.model_dump(), key=made.token)


@router.get(
    "", response_model=Page[KeyPublic], summary="List API keys", responses=error_responses(400)
)
def list_keys(
    session: SessionDep,
    principal: PrincipalDep,
    tenant: TenantQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> Page[KeyPublic]:
    query = api_keys.list_keys(api_keys.visible_tenant(principal, tenant))
    return page(session, query, limit, cursor, KeyPublic.from_row)


@router.delete(
    "/{key_id}", status_code=204, summary="Revoke an API key", responses=error_responses(404)
)
def revoke_key(
    key_id: str, request: Request, session: SessionDep, principal: PrincipalDep
) -> Response:
    api_keys.revoke_key(session, api_keys.visible_tenant(principal, None), key_id)
    cache: PrincipalCache = request.app.state.principals
    cache.forget(key_id)  # at once here; other gateway processes within auth.CACHE_SECONDS
    return Response(status_code=204)
