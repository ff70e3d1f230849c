"""/v1/audit: the audit trail, for admins (docs/security.md, "Audit trail"). An admin reads its
own tenant's events; a global admin any tenant's (?tenant=), or all of them, including calls
that presented no valid key."""

from __future__ import annotations

from fastapi import APIRouter

from service import api_keys, audit
from service.admin_schemas import AuditEventPublic
from service.api_keys import Scope
from service.auth import authorize
from service.deps import PrincipalDep, SessionDep, TenantQuery
from service.http_errors import error_responses
from service.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, page
from service.schemas import Page

router = APIRouter(
    prefix="/v1/audit",
    tags=["audit"],
    dependencies=[authorize(Scope.ADMIN)],
    responses=error_responses(400, 401, 403, 422),
)


@router.get("", response_model=Page[AuditEventPublic], summary="List audit events")
def list_audit_events(
    session: SessionDep,
    principal: PrincipalDep,
    tenant: TenantQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> Page[AuditEventPublic]:
    query = audit.list_events(api_keys.visible_tenant(principal, tenant, "audit events"))
    return page(session, query, limit, cursor, AuditEventPublic.from_row)
