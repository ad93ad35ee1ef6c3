"""Per-round depth and tokens per round: what a restarted router needs to price what ran.

An outcome's rounds by the drafts the depth policy let the target verify (the router prices
what ran at the depths its rounds took, and a round held at depth 0 is no draft-rate
trial), and the model's tokens per round for it when it arrived (the router compares what
a chain's rounds emitted with it).

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
    op.add_column("decisions", sa.Column("tokens_per_round", sa.Float(), nullable=True))
    op.add_column("pair_stats", sa.Column("depths", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("pair_stats", "depths")
    op.drop_column("decisions", "tokens_per_round")
    op.drop_column("decisions", "depths")
