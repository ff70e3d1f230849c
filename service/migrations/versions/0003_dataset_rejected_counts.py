"""datasets.rejected_counts: rejected members per reason; `rejected` keeps only the first ones
(the full list is a file in the dataset's folder, paged by GET /v1/datasets/{id}/rejected).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for datasets made before: their `rejected` list is whole, the counts come from it.
    op.add_column("datasets", sa.Column("rejected_counts", sa.JSON, nullable=True))


def downgrade() -> None:
    op.drop_column("datasets", "rejected_counts")
