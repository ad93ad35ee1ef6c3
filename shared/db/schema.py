"""Tables the router keeps: model profiles, pair statistics, decisions and their outcomes.

Alembic migrations under `migrations/` create exactly these tables (0001: the tables,
0002-0005: the columns the router needs to resume its estimates); `tests/test_router_store.py`
checks that the two agree.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Integer, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ModelProfile(Base):
    """One measurement of a model's step time at a batch size and chunk length."""

    __tablename__ = "model_profiles"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    device: Mapped[str] = mapped_column(String(64))
    batch_size: Mapped[int] = mapped_column(Integer)
    tokens_per_step: Mapped[int] = mapped_column(Integer)
    step_ms: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer, default=1)
    # 0002: the exact sample the step-time fit uses (batch_size and tokens_per_step are rounded)
    worker: Mapped[str | None] = mapped_column(String(64), nullable=True)
    batch_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens_per_forward: Mapped[float | None] = mapped_column(Float, nullable=True)
    live_requests: Mapped[int | None] = mapped_column(Integer, nullable=True)


class PairStat(Base):
    """Verification outcomes of one proposer/verifier pair on one request class."""

    __tablename__ = "pair_stats"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)
    proposer: Mapped[str] = mapped_column(String(200), index=True)
    verifier: Mapped[str] = mapped_column(String(200), index=True)
    request_class: Mapped[str] = mapped_column(String(100), index=True)
    drafted: Mapped[int] = mapped_column(Integer)
    accepted: Mapped[int] = mapped_column(Integer)
    accepted_per_position: Mapped[list] = mapped_column(JSON, default=list)
    drafted_per_position: Mapped[list] = mapped_column(JSON, default=list)
    tv_distance: Mapped[float | None] = mapped_column(Float, nullable=True)
    # 0002: the request it came from and the verifier's rounds (for a proposer's draft rate)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rounds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    depths: Mapped[list | None] = mapped_column(JSON, nullable=True)  # 0005: rounds by depth (the target's level)


class Decision(Base):
    """A chain assignment and, once the request finished, how it went."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    request_class: Mapped[str] = mapped_column(String(100), index=True)
    chain: Mapped[str] = mapped_column(String(200))
    k: Mapped[list] = mapped_column(JSON)
    predicted_ms_per_token: Mapped[float | None] = mapped_column(Float, nullable=True)
    explored: Mapped[bool] = mapped_column(Boolean, default=False)
    tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    tpot_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    slo_met: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    # 0002: an assignment row (request_id NULL) or an outcome row; why; the table version
    reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    duration_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    batch_mean: Mapped[float | None] = mapped_column(Float, nullable=True)  # 0003: load when the outcome arrived
    mixed_share: Mapped[float | None] = mapped_column(Float, nullable=True)  # 0004: rounds shared with other chains
    depths: Mapped[list | None] = mapped_column(JSON, nullable=True)  # 0005: rounds by the depth the policy allowed
    tokens_per_round: Mapped[float | None] = mapped_column(Float, nullable=True)  # 0005: the model's, then
