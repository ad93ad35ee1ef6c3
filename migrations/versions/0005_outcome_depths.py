"""Per-round depth: an outcome's rounds by the drafts the depth policy let the target verify.

The router prices what ran at the tokens its rounds emitted at the depths they took, and a
round held at depth 0 is no draft-rate trial; the columns let a restarted router replay both.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("decisions", sa.Column("depths", sa.JSON(), nullable=True))
    op.add_column("pair_stats", sa.Column("depths", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("pair_stats", "depths")
    op.drop_column("decisions", "depths")
