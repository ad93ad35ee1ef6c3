"""Outcome mixing: the share of a request's rounds that also verified other chains.

Such an outcome is not calibrated (its TPOT was set by the other chains' proposals); the
column lets a restarted router replay calibration exactly.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("decisions", sa.Column("mixed_share", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("decisions", "mixed_share")
