"""Router resume: the exact samples behind the estimates, and why each decision was taken.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

COLUMNS = {
    "model_profiles": [
        sa.Column("worker", sa.String(64), nullable=True),
        sa.Column("batch_mean", sa.Float(), nullable=True),
        sa.Column("tokens_per_forward", sa.Float(), nullable=True),
        sa.Column("live_requests", sa.Integer(), nullable=True),
    ],
    "pair_stats": [
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("rounds", sa.Integer(), nullable=True),
    ],
    "decisions": [
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
    ],
}


def upgrade() -> None:
    for table, columns in COLUMNS.items():
        for column in columns:
            op.add_column(table, column)


def downgrade() -> None:
    for table, columns in COLUMNS.items():
        for column in reversed(columns):
            op.drop_column(table, column.name)
