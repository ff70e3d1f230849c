"""jobs.deploy_to / deploy_if_better: a deployment a job updates when it succeeds (only if it
scores better than the deployment's target on the job's validation split, if asked), and
jobs.deployment, what happened.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("deploy_to", sa.String(63), nullable=True))
    op.add_column(
        "jobs",
        sa.Column("deploy_if_better", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column("jobs", sa.Column("deployment", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "deployment")
    op.drop_column("jobs", "deploy_if_better")
    op.drop_column("jobs", "deploy_to")
