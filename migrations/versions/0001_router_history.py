"""Router history: model profiles, pair statistics, decisions.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_profiles",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("tokens_per_step", sa.Integer(), nullable=False),
        sa.Column("step_ms", sa.Float(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
    )
    op.create_index("ix_model_profiles_recorded_at", "model_profiles", ["recorded_at"])
    op.create_index("ix_model_profiles_model", "model_profiles", ["model"])
    op.create_table(
        "pair_stats",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("proposer", sa.String(200), nullable=False),
        sa.Column("verifier", sa.String(200), nullable=False),
        sa.Column("request_class", sa.String(100), nullable=False),
        sa.Column("drafted", sa.Integer(), nullable=False),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("accepted_per_position", sa.JSON(), nullable=False),
        sa.Column("drafted_per_position", sa.JSON(), nullable=False),
        sa.Column("tv_distance", sa.Float(), nullable=True),
    )
    op.create_index("ix_pair_stats_recorded_at", "pair_stats", ["recorded_at"])
    op.create_index("ix_pair_stats_proposer", "pair_stats", ["proposer"])
    op.create_index("ix_pair_stats_verifier", "pair_stats", ["verifier"])
    op.create_index("ix_pair_stats_request_class", "pair_stats", ["request_class"])
    op.create_table(
        "decisions",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("request_class", sa.String(100), nullable=False),
        sa.Column("chain", sa.String(200), nullable=False),
        sa.Column("k", sa.JSON(), nullable=False),
        sa.Column("predicted_ms_per_token", sa.Float(), nullable=True),
        sa.Column("explored", sa.Boolean(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=True),
        sa.Column("tokens_per_s", sa.Float(), nullable=True),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("tpot_ms", sa.Float(), nullable=True),
        sa.Column("slo_met", sa.Boolean(), nullable=True),
    )
    op.create_index("ix_decisions_decided_at", "decisions", ["decided_at"])
    op.create_index("ix_decisions_request_id", "decisions", ["request_id"])
    op.create_index("ix_decisions_request_class", "decisions", ["request_class"])


def downgrade() -> None:
    op.drop_table("decisions")
    op.drop_table("pair_stats")
    op.drop_table("model_profiles")
