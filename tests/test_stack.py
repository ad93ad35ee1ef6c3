"""The local stack end to end: `up`, every service answers a NATS ping, `/health`, `down` leaves nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request

import pytest

from shared.settings import SERVICES, Settings
from shared.stack.procs import PidFile, port_open, wait_until
from tests.stack_fixtures import specmesh, stack_env

pytestmark = pytest.mark.stack


def _health(settings: Settings) -> dict:
    with urllib.request.urlopen(f"{settings.gateway.http_url}/health", timeout=5) as resp:
        return json.loads(resp.read())


async def _ping_all(settings: Settings) -> dict[str, dict | None]:
    from shared.service import connect, ping

    nc = await connect(settings, "test")
    try:
        return {name: await ping(nc, name, timeout_s=2.0) for name in SERVICES}
    finally:
        await nc.close()


def test_up_status_down_leaves_nothing(tmp_path):
    run_dir = tmp_path / ".run"
    env = stack_env(run_dir)
    settings = Settings(run_dir=run_dir, **{})
    ports = [int(env[k]) for k in env if k.endswith("PORT")]
    try:
        first = specmesh(env, "up", timeout=900)
        assert env["SPECMESH_GATEWAY__PORT"] in first.stdout

        # .run/env has the three URLs.
        lines = dict(line.split("=", 1) for line in (run_dir / "env").read_text().splitlines())
        assert set(lines) == {"SPECMESH_GATEWAY_URL", "SPECMESH_NATS_URL", "SPECMESH_DATABASE_URL"}
        assert lines["SPECMESH_NATS_URL"].endswith(f":{env['SPECMESH_NATS__PORT']}")

        os.environ.update({k: v for k, v in env.items() if k.startswith("SPECMESH_")})
        settings = Settings()
        replies = asyncio.run(_ping_all(settings))
        assert all(replies.values()), {name: bool(reply) for name, reply in replies.items()}
        assert {reply["name"] for reply in replies.values()} == set(SERVICES)

        health = _health(settings)
        assert health["status"] == "ok"
        assert health["services"] == {name: "up" for name in SERVICES}

        status = specmesh(env, "status", "--json")
        assert all(row["state"] == "up" for row in json.loads(status.stdout))

        # `up` twice is harmless: same processes.
        pids = {name: PidFile(run_dir, name).read().pid for name in SERVICES}
        specmesh(env, "up", timeout=300)
        assert {name: PidFile(run_dir, name).read().pid for name in SERVICES} == pids

        # kill -9 of a service and of a server: the supervisor brings them back.
        os.kill(pids["drafter"], signal.SIGKILL)
        nats_pid = PidFile(run_dir, "nats").read().pid
        os.kill(nats_pid, signal.SIGKILL)
        assert wait_until(lambda: (PidFile(run_dir, "drafter").live() or PidFile(run_dir, "drafter").read() or None)
                          and PidFile(run_dir, "drafter").live() is not None
                          and PidFile(run_dir, "drafter").read().pid != pids["drafter"], 60)
        assert wait_until(lambda: (_safe_health(settings) or {}).get("status") == "ok", 120, 0.5)
    finally:
        specmesh(env, "down", check=False)
    for name in (*SERVICES, "nats", "postgres", "supervisor"):
        assert PidFile(run_dir, name).live() is None, name
    left = [port for port in ports if port_open("127.0.0.1", port)]
    assert not left, f"ports still listening after down: {left}"
    assert not (run_dir / "env").exists()

    # A service that cannot start (a bad setting) makes `up` fail at once, with its error.
    bad = env | {"SPECMESH_GATEWAY__CHAT_TEMPLATE": str(tmp_path / "missing.jinja")}
    try:
        failed = specmesh(bad, "up", timeout=240, check=False)
    finally:
        specmesh(env, "down", check=False)
    assert failed.returncode != 0
    assert "gateway exited while starting" in failed.stderr and "missing.jinja" in failed.stderr, failed.stderr
    # Models that cannot be served as configured stop `up` before any service starts, naming why.
    long = env | {"SPECMESH_ENGINE__MAX_LEN": "4096"}  # the tiny family's context is 2048
    try:
        refused = specmesh(long, "up", timeout=240, check=False)
        assert not any(PidFile(run_dir, name).live() for name in SERVICES)
    finally:
        specmesh(env, "down", check=False)
    assert refused.returncode != 0 and "engine.max_len=4096 is longer than its context (2048" in refused.stderr
    specmesh(env, "down", "--purge")
    assert not run_dir.exists()


def _safe_health(settings: Settings) -> dict | None:
    try:
        return _health(settings)
    except OSError:
        return None


def test_status_reports_down_stack(tmp_path):
    env = stack_env(tmp_path / ".run")
    result = specmesh(env, "status", check=False)
    assert result.returncode == 3
    assert "down" in result.stdout


def test_serve_unknown_service_is_refused(tmp_path):
    env = stack_env(tmp_path / ".run")
    result = specmesh(env, "serve", "nosuch", check=False)
    assert result.returncode == 2
    assert "unknown service" in result.stderr


def test_the_cluster_lives_in_one_place_whether_or_not_the_run_dir_exists_yet():
    """`make clean` deletes the cluster `make up` made: the place must not depend on `.run` existing."""
    import shutil
    import tempfile
    from pathlib import Path

    from shared.stack.servers import PostgresServer

    parent = Path(tempfile.mkdtemp(prefix="specmesh-test-", dir="/tmp"))  # reachable by the server's user
    try:
        parent.chmod(0o755)
        run_dir = parent / ".run"
        before = PostgresServer(Settings(run_dir=run_dir)).home
        run_dir.mkdir()
        after = PostgresServer(Settings(run_dir=run_dir)).home
        assert before == after
    finally:
        shutil.rmtree(parent, ignore_errors=True)
