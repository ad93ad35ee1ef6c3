"""Outcome load: the batch size when an outcome arrived, so calibration per load replays exactly.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("decisions", sa.Column("batch_mean", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("decisions", "batch_mean")
