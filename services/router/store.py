"""The router's history in PostgreSQL: batched asynchronous writes that survive an outage.

Rows go into a bounded in-memory buffer (`add` never blocks, never touches the network);
a writer task flushes them every `flush_interval_s` (or as soon as `batch_rows` wait) in
one transaction. A row leaves the buffer only once its transaction has committed, so
while PostgreSQL is down nothing is lost: rows wait and are written when it returns. If
the buffer is full, the oldest rows are dropped and counted in `dropped` (and logged):
never silently. A row PostgreSQL itself refuses (a bad value) is dropped, counted in
`rejected` and logged, so it cannot block the rows behind it. `load_recent` reads the newest rows back so a restarted router resumes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from datetime import datetime, timezone

from sqlalchemy import insert, select

from shared.db.schema import Decision, ModelProfile, PairStat
from shared.tracing import SpanKind, tracer

log = logging.getLogger("specmesh.router.store")

TABLES = {"model_profiles": ModelProfile, "pair_stats": PairStat, "decisions": Decision}
STAMP = {"model_profiles": "recorded_at", "pair_stats": "recorded_at", "decisions": "decided_at"}


def _unreachable(exc: Exception) -> bool:
    """Whether `exc` means "retry later" (PostgreSQL down, restarting, a dropped connection)
    rather than "this row is refused" (a bad value, a constraint): only the latter drops rows."""
    from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError, StatementError

    if isinstance(exc, (DataError, IntegrityError, ProgrammingError)):
        return False
    if isinstance(exc, StatementError) and not isinstance(exc, DBAPIError):
        return False  # refused before reaching the database (e.g. a value that cannot be bound)
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None), "sqlstate", None)
    if isinstance(state, str) and state[:2] in ("22", "23", "42"):
        return False  # SQLSTATE data exception, integrity violation, syntax or undefined object
    return True


class HistoryStore:
    """Buffered writer and reader of the router's tables."""

    def __init__(self, url: str, flush_interval_s: float = 1.0, batch_rows: int = 1000, buffer_rows: int = 100000,
                 tracer_=None):
        self.url = url
        self.tracer = tracer_ or tracer(None)  # a client span per database round trip
        self.flush_interval_s = flush_interval_s
        self.batch_rows = batch_rows
        self.buffer_rows = buffer_rows
        self.pending: deque[tuple[int, str, dict]] = deque()
        self.seq = 0
        self.written = 0
        self.dropped = 0  # rows pushed out of a full buffer
        self.rejected = 0  # rows PostgreSQL refused (bad values): dropped, counted, logged
        self.failures = 0
        self.db_up: bool | None = None
        self.last_error: str | None = None
        self.engine = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    # -- buffering -----------------------------------------------------------------------
    def add(self, table: str, row: dict) -> None:
        """Queue one row for `table`; stamped now, so a late flush keeps the time it happened."""
        row = dict(row)
        row.setdefault(STAMP[table], datetime.now(timezone.utc))
        if len(self.pending) >= self.buffer_rows:
            self.pending.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("history buffer full (%d rows, PostgreSQL down?): %d rows dropped so far",
                            self.buffer_rows, self.dropped)
        self.seq += 1
        self.pending.append((self.seq, table, row))
        if len(self.pending) >= self.batch_rows:
            self._wake.set()

    def status(self) -> dict:
        return {"buffered": len(self.pending), "written": self.written, "dropped": self.dropped,
                "rejected": self.rejected, "failures": self.failures, "database_up": self.db_up, "last_error": self.last_error}

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        from sqlalchemy.ext.asyncio import create_async_engine

        self.engine = create_async_engine(self.url, pool_pre_ping=True, pool_size=2, max_overflow=0,
                                          connect_args={"timeout": 3})
        self._task = asyncio.create_task(self._run(), name="history-writer")

    async def close(self, timeout_s: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            await asyncio.wait_for(self.flush(), timeout_s)
        except (asyncio.TimeoutError, Exception) as exc:  # shutting down: say what stays unwritten
            log.warning("history not flushed at shutdown (%s): %d rows lost", exc, len(self.pending))
        if self.pending:
            log.warning("%d history rows unwritten at shutdown", len(self.pending))
        if self.engine is not None:
            await self.engine.dispose()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> int:
        """Write everything buffered, in batches; stops at the first failure (rows stay). Rows written."""
        done = 0
        async with self._lock:
            while self.pending:
                batch = list(self.pending)[: self.batch_rows]
                try:
                    await self._write(batch)
                except Exception as exc:  # PostgreSQL down or restarting: keep the rows, retry later
                    self.failures += 1
                    if not _unreachable(exc):
                        # The database answered but refused the batch: find the refused rows,
                        # drop and count them, so one bad row never blocks the history.
                        log.warning("PostgreSQL refused a history batch (%s); writing it row by row", exc)
                        written, refused = await self._write_each(batch)
                        if refused is None:
                            return done
                        self.rejected += refused
                        self.db_up = True
                        self._forget(batch[-1][0])
                        self.written += written
                        done += written
                        continue
                    if self.db_up is not False:
                        log.warning("PostgreSQL unreachable (%s); buffering history (%d rows)",
                                    type(exc).__name__, len(self.pending))
                    self.db_up = False
                    self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                    return done
                if self.db_up is False:
                    log.info("PostgreSQL back; flushing %d buffered rows", len(self.pending))
                self.db_up = True
                self._forget(batch[-1][0])
                self.written += len(batch)
                done += len(batch)
        return done

    def _forget(self, last_seq: int) -> None:
        while self.pending and self.pending[0][0] <= last_seq:
            self.pending.popleft()

    async def _write(self, batch: list[tuple[int, str, dict]]) -> None:
        """One transaction; rows of a table share their keys (absent ones are NULL)."""
        by_table: dict[str, list[dict]] = {}
        for _, table, row in batch:
            by_table.setdefault(table, []).append(row)
        attributes = {"db.system.name": "postgresql", "db.operation.name": "INSERT",
                      "db.collection.name": ",".join(sorted(by_table)), "specmesh.rows": len(batch)}
        with self.tracer.start_as_current_span("INSERT router history", kind=SpanKind.CLIENT, attributes=attributes):
            async with self.engine.begin() as conn:
                for table, rows in by_table.items():
                    keys = set().union(*rows)
                    await conn.execute(insert(TABLES[table].__table__), [{k: r.get(k) for k in keys} for r in rows])

    async def _write_each(self, batch: list[tuple[int, str, dict]]) -> tuple[int, int | None]:
        """(written, refused) writing one row per transaction; refused None if PostgreSQL went away."""
        written = refused = 0
        for item in batch:
            try:
                await self._write([item])
                written += 1
            except Exception as exc:
                if _unreachable(exc):
                    return written, None
                refused += 1
                log.warning("history row refused by PostgreSQL and dropped (%s): %s", exc, item[2])
        return written, refused

    # -- reading -------------------------------------------------------------------------
    async def load_recent(self, rows: int, until: datetime | None = None) -> dict[str, list[dict]]:
        """The newest `rows` rows of each table, oldest first, written at or before `until` if
        given (raises if PostgreSQL is unreachable)."""
        out: dict[str, list[dict]] = {}
        attributes = {"db.system.name": "postgresql", "db.operation.name": "SELECT",
                      "db.collection.name": ",".join(TABLES), "specmesh.rows": rows}
        with self.tracer.start_as_current_span("SELECT router history", kind=SpanKind.CLIENT, attributes=attributes):
            async with self.engine.connect() as conn:
                for name, model in TABLES.items():
                    table = model.__table__
                    query = select(table)
                    if until is not None:
                        stamp = table.c.decided_at if "decided_at" in table.c else table.c.recorded_at
                        query = query.where(stamp <= until)
                    result = await conn.execute(query.order_by(table.c.id.desc()).limit(rows))
                    out[name] = [dict(r._mapping) for r in reversed(result.all())]
        return out
