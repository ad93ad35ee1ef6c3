"""The router's history on a real PostgreSQL (started here on a free port): migrations up and
down, batched writes, an outage that loses no row, a bounded buffer that counts what it drops,
and a restarted router that resumes its estimates from the history.
"""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta, timezone

import pytest

from tests.stack_fixtures import free_ports
from tests.test_router_decision import simulate_level


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    """(PostgresServer, Settings) on a free port, in a temporary run dir."""
    from shared.settings import DatabaseSettings, Settings
    from shared.stack.servers import PostgresServer

    run_dir = tmp_path_factory.mktemp("router-pg") / ".run"
    (port,) = free_ports(1)
    settings = Settings(run_dir=run_dir, database=DatabaseSettings(port=port))
    server = PostgresServer(settings)
    server.ensure()
    try:
        yield server, settings
    finally:
        server.stop()
        server.purge()


def _columns(server, table: str) -> set[str]:
    out = server.psql(f"SELECT column_name FROM information_schema.columns WHERE table_name = '{table}'", "specmesh")
    return set(out.split())


def _count(server, table: str, where: str = "true") -> int:
    return int(server.psql(f"SELECT count(*) FROM {table} WHERE {where}", "specmesh"))


def test_migrations_up_and_down(pg):
    from shared.db.migrate import downgrade, upgrade
    from shared.db.schema import Base

    server, settings = pg
    upgrade(settings)
    for table in Base.metadata.sorted_tables:
        assert _columns(server, table.name) == {c.name for c in table.columns}, table.name
    assert server.psql("SELECT version_num FROM alembic_version", "specmesh") == "0005"
    downgrade(settings, "0004")
    assert "depths" not in _columns(server, "decisions") and "depths" not in _columns(server, "pair_stats")
    assert "mixed_share" in _columns(server, "decisions")
    downgrade(settings, "0003")
    assert "mixed_share" not in _columns(server, "decisions") and "batch_mean" in _columns(server, "decisions")
    downgrade(settings, "0002")
    assert "batch_mean" not in _columns(server, "decisions") and "reason" in _columns(server, "decisions")
    downgrade(settings, "0001")
    assert "rounds" not in _columns(server, "pair_stats") and "reason" not in _columns(server, "decisions")
    assert "accepted_per_position" in _columns(server, "pair_stats")
    downgrade(settings, "base")
    assert not _columns(server, "decisions")
    upgrade(settings)
    assert "tokens_per_forward" in _columns(server, "model_profiles")


def _outcome(i: int, rng: random.Random, alpha: float = 0.7, cls: str = "code-short"):
    from shared.messages import Outcome

    level = simulate_level(rng, "drafter-code", "target", alpha, 4, 8)
    tokens = 8 + level.accepted + 1
    return Outcome(f"req-{i}", cls, ["drafter-code", "target"], [4], tokens, 40, 5.0, 2.0 + rng.random(), 60.0, [level])


def _profile(rng: random.Random):
    from shared.messages import ModelStep, StepProfile

    batch = rng.choice([1, 4, 8])
    return StepProfile("target-x", 1.0, batch, 0, [ModelStep("target", "cpu", 50, 50 * (1.5 + 0.05 * batch) / 1e3, 50 * batch, batch),
                                                    ModelStep("drafter-code", "cpu", 20, 0.02, 20 * 5 * batch, batch)])


async def test_outage_loses_no_row_and_router_keeps_deciding(pg):
    from services.router.service import Router
    from services.router.store import HistoryStore
    from shared.db.migrate import upgrade

    server, settings = pg
    await asyncio.to_thread(upgrade, settings)
    before = {t: _count(server, t) for t in ("pair_stats", "decisions", "model_profiles")}
    store = HistoryStore(settings.database.sqlalchemy_url, flush_interval_s=0.2)
    await store.start()
    router = Router(settings, store, seed=0)
    rng = random.Random(0)
    try:
        for i in range(20):
            router.on_outcome(_outcome(i, rng))
            router.on_profile(_profile(rng))
        assert await store.flush() == store.written > 0
        assert not store.pending

        await asyncio.to_thread(server.stop)
        for i in range(20, 80):
            router.on_outcome(_outcome(i, rng))
            router.on_profile(_profile(rng))
            router.table()  # deciding from memory while PostgreSQL is down
        await asyncio.sleep(0.6)  # the writer tries and fails
        assert store.db_up is False and len(store.pending) > 0
        buffered = len(store.pending)
        explained = router.explain()
        assert explained.store["database_up"] is False and explained.classes["code-short"]["winner"]["chain"]

        await asyncio.to_thread(server.ensure)
        for _ in range(100):
            if not store.pending:
                break
            await asyncio.sleep(0.2)
        assert not store.pending and store.db_up is True and store.dropped == 0, store.status()["last_error"]
    finally:
        await store.close()
    written_after = {t: _count(server, t) - before[t] for t in before}
    assert written_after["pair_stats"] == 80  # one level per outcome, none lost
    assert written_after["model_profiles"] == 160
    assert _count(server, "decisions", "reason = 'outcome' AND request_id LIKE 'req-%'") >= 80
    assert sum(written_after.values()) == store.written
    assert buffered <= store.written


async def test_full_buffer_drops_oldest_and_counts(pg):
    from services.router.store import HistoryStore

    server, settings = pg
    store = HistoryStore(settings.database.sqlalchemy_url.replace(str(settings.database.port), "1"), buffer_rows=100)
    await store.start()  # a port nothing listens on: PostgreSQL "down"
    try:
        for i in range(150):
            store.add("decisions", {"request_class": "x", "chain": "target", "k": [], "explored": False,
                                    "request_id": f"drop-{i}"})
        assert await store.flush() == 0
        assert store.dropped == 50 and len(store.pending) == 100
        assert store.pending[0][2]["request_id"] == "drop-50"  # the oldest went first
        assert store.status()["dropped"] == 50
    finally:
        store._task.cancel()
        await store.engine.dispose()


async def test_restarted_router_resumes_from_history(pg):
    from services.router.service import Router
    from services.router.store import HistoryStore
    from shared.db.migrate import upgrade

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    server, settings = pg
    await asyncio.to_thread(upgrade, settings)
    server.psql("TRUNCATE pair_stats, model_profiles, decisions", "specmesh")
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    store = HistoryStore(settings.database.sqlalchemy_url, tracer_=provider.get_tracer("test"))
    await store.start()
    first = Router(settings, store, seed=0)
    rng = random.Random(4)
    for i in range(60):
        outcome = _outcome(i, rng, alpha=0.3, cls="prose-long")
        if i % 2:  # steered by the per-round depth policy: 2 rounds at depth 0, 1 at 2, the rest at 4
            outcome.depths = [2, 0, 1, 0, 5]
        first.on_outcome(outcome)
        first.on_profile(_profile(rng))
    await store.flush()
    fresh = Router(settings, store, seed=0)
    assert fresh.estimates.alpha("drafter-code", "target", "prose-long") == 0.5
    replayed = fresh.resume(await store.load_recent(settings.router.history_rows))
    await store.close()
    assert replayed >= 60 + 120
    # Every database round trip is a client span with the semantic-convention attributes.
    operations = {span.attributes["db.operation.name"] for span in spans.get_finished_spans()}
    assert operations == {"INSERT", "SELECT"}
    assert all(span.attributes["db.system.name"] == "postgresql" for span in spans.get_finished_spans())
    for attr in ("alpha",):
        old = getattr(first.estimates.pair("drafter-code", "target", "prose-long"), attr)
        new = getattr(fresh.estimates.pair("drafter-code", "target", "prose-long"), attr)
        assert new == pytest.approx(old, abs=1e-6) and new < 0.4
    assert fresh.estimates.step("target").fit() == pytest.approx(first.estimates.step("target").fit(), rel=1e-6)
    cal_old = first.estimates.calibration_for(("drafter-code", "target"), 1.0)
    cal_new = fresh.estimates.calibration_for(("drafter-code", "target"), 1.0)
    assert cal_new.observations == cal_old.observations > 0
    assert cal_new.ratio() == pytest.approx(cal_old.ratio(), rel=0.05)
    # The depths the rounds took come back too: the draft rate's trials and the rounds' shares.
    assert fresh.estimates.draft_rate("drafter-code", "prose-long") == \
        pytest.approx(first.estimates.draft_rate("drafter-code", "prose-long"), rel=1e-6)
    key = next(key for key in first.estimates.calibration_class if key[-1] == "prose-long")
    old_depths, new_depths = first.estimates.calibration_class[key].depths, fresh.estimates.calibration_class[key].depths
    assert 0 < old_depths[0] < 0.25 and new_depths == pytest.approx(old_depths, abs=1e-9)


async def test_a_refused_row_is_counted_and_does_not_block_the_rest(pg):
    from services.router.store import HistoryStore
    from shared.db.migrate import upgrade

    server, settings = pg
    await asyncio.to_thread(upgrade, settings)
    store = HistoryStore(settings.database.sqlalchemy_url)
    await store.start()
    try:
        for i in range(5):
            chain = "x" * 500 if i == 2 else "target"  # longer than the column allows
            store.add("decisions", {"request_class": "refuse", "chain": chain, "k": [], "explored": False})
        await store.flush()
        assert store.rejected == 1 and not store.pending
    finally:
        await store.close()
    assert _count(server, "decisions", "request_class = 'refuse'") == 4


async def test_replay_decides_from_the_history_as_the_router_that_wrote_it(pg):
    """`specmesh router replay`: a router resumed from PostgreSQL decides what the router that
    wrote the rows decides, per class and batch, and says which chain every class would share."""
    from services.router.decision import decide
    from services.router.replay import load_history, replay
    from shared.db.migrate import upgrade

    server, settings = pg
    await asyncio.to_thread(upgrade, settings)
    writer = await _write_history(server, settings)

    data = replay(settings, await load_history(settings.database.sqlalchemy_url, 5000), [1.0, 16.0])
    assert data["outcomes"] == 40 and data["rows"]["decisions"] == 40 and data["replayed"] >= 40
    idle, loaded = data["batches"]
    want = decide("code-short", writer.estimates, writer.chains, settings.router.k_max, settings.router.margin,
                  batch=1.0, measured_only=True)
    got = idle["classes"]["code-short"]["winner"]
    assert (got["chain"], got["k"]) == (",".join(want.winner.chain), list(want.winner.k))
    assert got["ms_per_token"] == pytest.approx(want.winner.ms_per_token, abs=1e-4)
    assert "shared" not in idle and set(idle["classes"]) == {"code-short", "code-long", "prose-short", "prose-long"}
    assert loaded["shared"]["chain"] and "every class rides one chain" in loaded["shared"]["why"]
    # as of a moment: the rows written after it are left out
    before = await load_history(settings.database.sqlalchemy_url, 5000, datetime(2000, 1, 1, tzinfo=timezone.utc))
    assert all(not rows for rows in before.values())
    now = await load_history(settings.database.sqlalchemy_url, 5000, datetime.now(timezone.utc) + timedelta(seconds=5))
    assert {table: len(rows) for table, rows in now.items()} == data["rows"]


async def _write_history(server, settings):
    """40 code-short outcomes and step profiles, written through a router into emptied tables."""
    from services.router.service import Router
    from services.router.store import HistoryStore

    server.psql("TRUNCATE pair_stats, model_profiles, decisions", "specmesh")
    store = HistoryStore(settings.database.sqlalchemy_url)
    await store.start()
    writer = Router(settings, store, params={}, seed=0)
    rng = random.Random(7)
    for i in range(40):
        writer.on_outcome(_outcome(i, rng, alpha=0.8, cls="code-short"))
        writer.on_profile(_profile(rng))
    await store.flush()
    await store.close()
    return writer


def test_router_replay_command(pg):
    from typer.testing import CliRunner

    from shared.cli.main import app
    from shared.db.migrate import upgrade
    from shared.settings import get_settings

    server, settings = pg
    upgrade(settings)
    asyncio.run(_write_history(server, settings))
    env = {"SPECMESH_DATABASE__URL": settings.database.sqlalchemy_url, "SPECMESH_RUN_DIR": str(settings.run_dir)}
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["router", "replay", "--batch", "1,16", "--class", "code-short"], env=env)
        assert result.exit_code == 0, result.output
        assert "== batch 16" in result.output and "[code-short] ->" in result.output and "[prose-long]" not in result.output
        bad = CliRunner().invoke(app, ["router", "replay", "--batch", "one"], env=env)
        assert bad.exit_code == 2 and "--batch takes numbers" in bad.output
        past = CliRunner().invoke(app, ["router", "replay", "--until", "2000-01-01T00:00:00"], env=env)
        assert past.exit_code == 0 and "0 outcomes" in past.output and "the model's prior" in past.output
        when = CliRunner().invoke(app, ["router", "replay", "--until", "yesterday"], env=env)
        assert when.exit_code == 2 and "--until takes an ISO 8601 time" in when.output
        unknown = CliRunner().invoke(app, ["router", "replay", "--class", "poetry"], env=env)
        assert unknown.exit_code == 2 and "unknown class" in unknown.output
        (port,) = free_ports(1)
        get_settings.cache_clear()
        down = CliRunner().invoke(app, ["router", "replay"], env={
            "SPECMESH_DATABASE__URL": f"postgresql+asyncpg://x:y@127.0.0.1:{port}/none"})
        assert down.exit_code == 1 and "cannot read the router history" in down.output
    finally:
        get_settings.cache_clear()
