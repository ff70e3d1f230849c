"""/v1/tenants/{tenant}/quotas: a tenant's quotas and usage (service.quotas), for admins.

An admin reads its own tenant's quotas, a global admin any tenant's; only a global admin sets
them (a tenant's own admin must not raise its own quota: 403). Another tenant's quotas answer
a tenant's admin 404, as every object of another tenant does.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from service import api_keys, quotas
from service.admin_schemas import QuotasUpdate, TenantQuotas
from service.api_keys import Principal, Scope
from service.auth import authorize
from service.deps import PrincipalDep, SessionDep, SettingsDep
from service.domain_errors import Forbidden, NotFound
from service.http_errors import error_responses

router = APIRouter(
    prefix="/v1/tenants",
    tags=["tenants"],
    dependencies=[authorize(Scope.ADMIN)],
    responses=error_responses(401, 403, 404, 422),
)


def _visible(principal: Principal, tenant: str) -> str:
    api_keys.check_tenant(tenant)
    if not principal.global_admin and tenant != principal.tenant_id:
        raise NotFound("tenant", tenant)
    return tenant


@router.get("/{tenant}/quotas", response_model=TenantQuotas, summary="A tenant's quotas and usage")
def get_quotas(
    tenant: str, session: SessionDep, principal: PrincipalDep, settings: SettingsDep
) -> TenantQuotas:
    _visible(principal, tenant)
    effective = quotas.get_quotas(session, tenant, settings)
    return TenantQuotas.build(tenant, effective, quotas.usage(session, tenant))


@router.put(
    "/{tenant}/quotas",
    response_model=TenantQuotas,
    summary="Set a tenant's quotas (global admins)",
    responses=error_responses(400),  # an unparseable JSON body
)
def set_quotas(
    tenant: str,
    body: QuotasUpdate,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
) -> TenantQuotas:
    _visible(principal, tenant)
    if not principal.global_admin:
        raise Forbidden(
            "insufficient_scope",
            "only a global admin key sets quotas; a tenant's own admin cannot change them",
            {"tenant": tenant},
        )
    changes = body.model_dump(include=body.model_fields_set)
    effective = quotas.set_quotas(session, tenant, changes, settings)
    limiter: quotas.RateLimiter = request.app.state.rate_limiter
    limiter.forget_rate(tenant)  # this process applies a new rate at once, others within 5 s
    return TenantQuotas.build(tenant, effective, quotas.usage(session, tenant))
