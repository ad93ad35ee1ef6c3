"""The router on the real stack: it publishes assignments, the gateway follows them, outcomes
come back as feedback, history lands in PostgreSQL, and `specmesh router explain` answers.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.stack_fixtures import specmesh

pytestmark = pytest.mark.stack


async def _watch(settings, requests: list[str], seconds: float = 2.5) -> tuple[list, list]:
    """Every assignment table published while `requests` (prompts, no chain) go through the gateway."""
    import httpx

    from shared.messages import SUBJECT_ASSIGNMENTS, Assignments, decode
    from shared.service import connect

    nc = await connect(settings, "test-router-watch")
    seen = []

    async def on_table(msg) -> None:
        seen.append(decode(msg.data, Assignments))

    sub = await nc.subscribe(SUBJECT_ASSIGNMENTS, cb=on_table)
    await asyncio.sleep(seconds)
    answers = []
    async with httpx.AsyncClient(base_url=settings.gateway.http_url, timeout=60) as client:
        for prompt in requests:
            resp = await client.post("/v1/completions", json={"model": "specmesh", "prompt": prompt, "max_tokens": 12,
                                                             "temperature": 0})
            assert resp.status_code == 200, resp.text
            answers.append(resp.json()["speculation"]["chain"])
    await asyncio.sleep(0.2)
    await sub.unsubscribe()
    await nc.close()
    return seen, answers


def test_router_publishes_and_the_gateway_follows(stack):
    from shared.request_class import CLASSES, classify

    env, settings = stack
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    tables, chains = asyncio.run(_watch(settings, [prompt] * 6))
    assert len(tables) >= 2, "the router publishes its table every second"
    versions = [t.version for t in tables]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert {a.request_class for a in tables[-1].assignments} == set(CLASSES) and tables[-1].default is not None

    cls = classify(prompt, 20)
    assigned = {tuple(a.chain) for t in tables for a in t.assignments if a.request_class == cls}
    # The gateway caches the newest table: each request ran on a chain the router assigned to its class.
    assert all(_same(c, assigned) for c in chains), (chains, assigned)

    # The driver's outcomes reached the router; `explain` says so and shows every class.
    result = specmesh(env, "router", "explain", "--json")
    data = json.loads(result.stdout)
    assert data["load"]["outcomes"] >= 6
    assert set(CLASSES) <= set(data["classes"])
    win = data["classes"][cls]
    assert win["candidates"] and win["why"] and win["winner"]["levels"]
    # Discovery asks every few seconds ($SRV.INFO): a worker still starting answers a later round.
    for _ in range(15):
        if "drafter-code" in (data["load"]["available_models"] or []):
            break
        time.sleep(1.0)
        data = json.loads(specmesh(env, "router", "explain", "--json").stdout)
    assert "drafter-code" in data["load"]["available_models"]
    human = specmesh(env, "router", "explain", "--class", cls).stdout
    assert f"[{cls}]" in human and "why:" in human

    # History reaches PostgreSQL (batched, within a couple of flush intervals).
    from shared.stack.servers import PostgresServer

    pg = PostgresServer(settings)

    def count(where: str) -> int:
        return int(pg.psql(f"SELECT count(*) FROM decisions WHERE {where}", settings.database.name))

    for _ in range(30):
        if count("reason = 'outcome'") >= 6:
            break
        time.sleep(0.3)
    assert count("reason = 'outcome'") >= 6
    assert count("request_id IS NULL") >= 5
    assert all(a.alternatives for a in tables[-1].assignments)

    # A request's own TPOT objective travels gateway -> target -> router and is judged there.
    import httpx

    ids = {}
    for slo in (60_000, 0.001):
        resp = httpx.post(f"{settings.gateway.http_url}/v1/completions", timeout=60, json={
            "model": "specmesh", "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "speculation": {"slo_tpot_ms": slo}})
        assert resp.status_code == 200, resp.text
        assert resp.json()["speculation"]["slo_tpot_ms"] == slo
        ids[slo] = resp.json()["id"]
    judged = " OR ".join(f"request_id = '{rid}'" for rid in ids.values())
    for _ in range(30):
        if count(f"({judged}) AND slo_met IS NOT NULL") >= 2:
            break
        time.sleep(0.3)
    assert count(f"request_id = '{ids[60_000]}' AND slo_met") == 1
    assert count(f"request_id = '{ids[0.001]}' AND NOT slo_met") == 1


def _same(chain: list[str], assigned: set) -> bool:
    canon = tuple("drafter-code" if c == "drafter" else c for c in chain)
    return canon in assigned
