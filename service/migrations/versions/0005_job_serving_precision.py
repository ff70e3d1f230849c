"""jobs.serving_precision: "fp32" (the default) or "int8" (bitcore.quantize: the model is
served in int8 only if the int8 guard passes on its validation split).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Jobs made before asked for nothing else: float32.
    op.add_column(
        "jobs",
        sa.Column("serving_precision", sa.String(8), nullable=False, server_default="fp32"),
    )


def downgrade() -> None:
    op.drop_column("jobs", "serving_precision")
