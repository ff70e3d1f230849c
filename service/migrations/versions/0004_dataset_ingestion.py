"""Datasets are ingested by a worker (issue 12): status processing -> ready | failed.

New columns: `ingest` (what the worker needs: the archive's kind and the upload limits the
gateway applied), `progress`, the error of a failed ingestion, and the claim (`worker_id`,
`heartbeat_at`, `attempts`, `sent_at`) the reconciler repairs, as jobs have.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows made before are ready datasets: every new column is NULL (or 0) for them.
    op.add_column("datasets", sa.Column("ingest", sa.JSON, nullable=True))
    op.add_column("datasets", sa.Column("progress", sa.JSON, nullable=True))
    op.add_column("datasets", sa.Column("error_code", sa.String(64), nullable=True))
    op.add_column("datasets", sa.Column("error_message", sa.Text, nullable=True))
    op.add_column("datasets", sa.Column("error_details", sa.JSON, nullable=True))
    op.add_column("datasets", sa.Column("worker_id", sa.String(200), nullable=True))
    op.add_column("datasets", sa.Column("heartbeat_at", sa.DateTime(timezone=True)))
    op.add_column("datasets", sa.Column("sent_at", sa.DateTime(timezone=True)))
    op.add_column("datasets", sa.Column("finished_at", sa.DateTime(timezone=True)))
    op.add_column("datasets", sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
    # The reconciler's query: processing datasets, by heartbeat.
    op.create_index("ix_datasets_status_heartbeat", "datasets", ["status", "heartbeat_at"])


def downgrade() -> None:
    op.drop_index("ix_datasets_status_heartbeat", "datasets")
    for column in (
        "attempts", "finished_at", "sent_at", "heartbeat_at", "worker_id",
        "error_details", "error_message", "error_code", "progress", "ingest",
    ):  # fmt: skip
        op.drop_column("datasets", column)
