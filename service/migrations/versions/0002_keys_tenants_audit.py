"""API keys, tenants (quota overrides), the audit trail; models.bytes; rows made before keys
belong to tenant "default".

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
DEFAULT_TENANT = "default"


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("max_active_jobs", sa.Integer),
        sa.Column("max_stored_bytes", sa.BigInteger),
        sa.Column("predict_rate_per_second", sa.Float),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200)),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("global_admin", sa.Boolean, nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(40)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS),
        sa.Column("revoked_at", TS),
        sa.Column("last_used_at", TS),
    )
    op.create_index("ix_api_keys_tenant_created", "api_keys", ["tenant_id", "created_at"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(64)),
        sa.Column("key_id", sa.String(40)),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("route", sa.String(200), nullable=False),
        sa.Column("object_id", sa.String(64)),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_audit_tenant_created", "audit_events", ["tenant_id", "created_at"])
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0"))
    for table in ("datasets", "jobs", "models"):
        op.execute(
            sa.text(f"UPDATE {table} SET tenant_id = :tenant WHERE tenant_id IS NULL").bindparams(
                tenant=DEFAULT_TENANT
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("bytes")
    op.drop_table("audit_events")
    op.drop_table("api_keys")
    op.drop_table("tenants")
