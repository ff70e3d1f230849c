"""The audit trail: one row per mutating API call (who, what, when, result), and one log line.

Plain functions over the `audit_events` table; the web layer's AuditMiddleware
(service.audit_middleware) calls `record` once the answer's status is known, and
GET /v1/audit pages through `list_events`. An event names the caller by key id and tenant,
never by the key itself (docs/security.md, "Audit trail").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.ids import new_id, utcnow
from service.tables import AuditEvent

log = logging.getLogger(__name__)

OBJECT_ID_MAX = 64  # the column's width; a longer "id" is not one of ours
ROUTE_MAX = 200


@dataclass(frozen=True)
class Entry:
    """One call, as the middleware saw it. `route` is the route template
    (/v1/jobs/{job_id}/cancel), or "unmatched" for a path no route has."""

    method: str
    route: str
    status: int
    tenant_id: str | None = None
    key_id: str | None = None
    object_id: str | None = None
    created_at: datetime = field(default_factory=utcnow)

    def line(self) -> str:
        """The log line: `audit tenant=t key=key_... POST /v1/jobs -> 202 object=job_...`."""
        return (
            f"audit tenant={self.tenant_id or '-'} key={self.key_id or '-'} "
            f"{self.method} {self.route} -> {self.status} object={self.object_id or '-'}"
        )


def record(session: Session, entry: Entry) -> AuditEvent:
    """Log `entry` at INFO, then write it (committed). The line comes first, so an event whose
    row cannot be written is still in the log."""
    log.info("%s", entry.line())
    object_id = (
        entry.object_id if entry.object_id and len(entry.object_id) <= OBJECT_ID_MAX else None
    )
    row = AuditEvent(
        id=new_id("aud"),
        tenant_id=entry.tenant_id,
        key_id=entry.key_id,
        method=entry.method[:8],
        route=entry.route[:ROUTE_MAX],
        object_id=object_id,
        status=entry.status,
        created_at=entry.created_at,
    )
    session.add(row)
    session.commit()
    return row


def list_events(tenant_id: str | None) -> sa.Select[AuditEvent]:
    """Events of one tenant, or of all (None: also calls no valid key made); paginate it with
    service.pagination, newest first."""
    query = sa.select(AuditEvent)
    return query if tenant_id is None else query.where(AuditEvent.tenant_id == tenant_id)
