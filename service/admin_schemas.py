"""The public shapes of the admin routes: API keys, tenants' quotas and the audit trail
(apart from service.schemas to keep each module small)."""

from __future__ import annotations

from pydantic import Field

from service.api_keys import Scope
from service.names import NameStr
from service.quotas import MAX_VALUES, Quotas, Usage
from service.schema_base import Schema, Timestamp
from service.tables import ApiKey, AuditEvent

# -- audit --------------------------------------------------------------------------------


class AuditEventPublic(Schema):
    """One mutating API call (GET /v1/audit): who, what, when, and how it ended."""

    id: str
    tenant: str | None = Field(description="the caller's tenant; null: no valid key was sent")
    key_id: str | None = Field(description="the caller's key (never the key itself); null: none")
    method: str = Field(description="POST, PUT, PATCH or DELETE")
    route: str = Field(
        description="the route template, e.g. /v1/jobs/{job_id}/cancel; unmatched: no route"
    )
    object_id: str | None = Field(
        description="the path's id, or the id a successful creation answered; null: none"
    )
    status: int = Field(description="the HTTP status of the answer")
    created_at: Timestamp

    @classmethod
    def from_row(cls, row: AuditEvent) -> AuditEventPublic:
        return cls(
            id=row.id,
            tenant=row.tenant_id,
            key_id=row.key_id,
            method=row.method,
            route=row.route,
            object_id=row.object_id,
            status=row.status,
            created_at=row.created_at,
        )


# -- keys ---------------------------------------------------------------------------------


class KeyCreate(Schema):
    """POST /v1/keys body. `tenant` defaults to the caller's own; another tenant's keys, and
    global admin keys, are a global admin's to make."""

    tenant: str | None = Field(None, max_length=64)
    scopes: list[Scope] = Field(min_length=1, description="admin > train > predict")
    name: NameStr | None = Field(None, max_length=200, description="a label, e.g. who uses it")
    # strict: `true` is not 1 day, nor 1 a global admin (found by tests/fuzz).
    expires_days: float | None = Field(None, gt=0, le=3650, strict=True)
    global_admin: bool = Field(False, strict=True)


class KeyPublic(Schema):
    """An API key, without its secret (which is shown once, at creation)."""

    id: str
    tenant: str
    name: str | None
    scopes: list[Scope]
    global_admin: bool
    created_by: str | None = Field(description="the key id that made it, or 'cli'")
    created_at: Timestamp
    expires_at: Timestamp | None
    revoked_at: Timestamp | None
    last_used_at: Timestamp | None = Field(description="to the minute")

    @classmethod
    def from_row(cls, row: ApiKey) -> KeyPublic:
        return cls(
            id=row.id,
            tenant=row.tenant_id,
            name=row.name,
            scopes=[Scope(s) for s in row.scopes],
            global_admin=row.global_admin,
            created_by=row.created_by,
            created_at=row.created_at,
            expires_at=row.expires_at,
            revoked_at=row.revoked_at,
            last_used_at=row.last_used_at,
        )


class KeyCreated(KeyPublic):
    key: str = Field(description="the key itself: shown this once, never again")


# -- quotas -------------------------------------------------------------------------------


class QuotaUsage(Schema):
    active_jobs: int = Field(description="queued, running and cancelling jobs")
    stored_bytes: int = Field(description="uploaded archives plus model artifacts")


class TenantQuotas(Schema):
    """A tenant's quotas in force (its own where set, else the server's defaults) and what it
    uses of them now."""

    tenant: str
    max_active_jobs: int = Field(description="queued + running + cancelling jobs at once")
    max_stored_bytes: int = Field(description="datasets (archive bytes) + models (artifacts)")
    predict_rate_per_second: float = Field(
        description="predict requests per second per API key, per gateway process"
    )
    overridden: list[str] = Field(
        description="the quotas set for this tenant; the others are the server's defaults"
    )
    usage: QuotaUsage

    @classmethod
    def build(cls, tenant: str, quotas: Quotas, usage: Usage) -> TenantQuotas:
        return cls(
            tenant=tenant,
            max_active_jobs=quotas.max_active_jobs,
            max_stored_bytes=quotas.max_stored_bytes,
            predict_rate_per_second=quotas.predict_rate_per_second,
            overridden=list(quotas.overridden),
            usage=QuotaUsage(active_jobs=usage.active_jobs, stored_bytes=usage.stored_bytes),
        )


class QuotasUpdate(Schema):
    """PUT /v1/tenants/{tenant}/quotas body, partial: a quota left out stays as it is; null
    puts it back to the server's default."""

    # strict: `true` is not a quota of 1, nor "5" one of 5 (found by tests/fuzz).
    max_active_jobs: int | None = Field(None, gt=0, le=MAX_VALUES["max_active_jobs"], strict=True)
    max_stored_bytes: int | None = Field(None, gt=0, le=MAX_VALUES["max_stored_bytes"], strict=True)
    predict_rate_per_second: float | None = Field(
        None, gt=0, le=MAX_VALUES["predict_rate_per_second"], strict=True
    )
