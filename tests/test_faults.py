"""Faults in the middle of 16 concurrent generations, on the real stack.

Every request either completes with exactly the target-only output, or fails with a clear
error; no stream repeats or skips a token; the stack recovers without a hand on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from shared.stack.procs import PidFile, wait_until
from tests.stack_fixtures import target_only, token_prompts

pytestmark = pytest.mark.stack

MAX_TOKENS = 40
CHAIN = "drafter,verifier,target"
PENALTIES = {"presence_penalty": 0.4, "frequency_penalty": 0.3, "repetition_penalty": 1.2}


@pytest.fixture(scope="module")
def prompts(tiny_family):
    return token_prompts(tiny_family, 8, seed=11)


@pytest.fixture(scope="module")
def reference(tiny_family, prompts):
    return target_only(tiny_family, prompts, MAX_TOKENS)


@pytest.fixture(scope="module")
def penalized(tiny_family, prompts):
    """Target-only with PENALTIES: a request resumed elsewhere must keep counting its output."""
    return target_only(tiny_family, prompts, MAX_TOKENS, **PENALTIES)


async def stream_one(client: httpx.AsyncClient, prompt: list[int], started: asyncio.Event,
                     **extra) -> tuple[list[int] | None, str | None]:
    """Token ids of one streamed completion, or (None, error message).

    Each token's log-probability comes with it, through a fault too: one per token, and
    (greedy) the likeliest token at each position is the token itself."""
    body = {"model": "specmesh", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "return_token_ids": True, "speculation": {"chain": CHAIN, "k": 3}, "logprobs": 1, **extra}
    tokens: list[int] = []
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return None, (await resp.aread()).decode()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return None, chunk["error"]["message"]
            for choice in chunk.get("choices", []):
                ids = choice.get("token_ids") or []
                logprobs = choice.get("logprobs") or {"tokens": [], "top_logprobs": []}
                assert len(logprobs["tokens"]) == len(ids) and len(logprobs["top_logprobs"]) == len(ids)
                assert [max(top, key=top.get) for top in logprobs["top_logprobs"]] == logprobs["tokens"]
                tokens.extend(ids)
            if tokens:
                started.set()
    return tokens, None


def run_with_fault(settings, prompts, fault, **extra) -> list[tuple[list[int] | None, str | None]]:
    async def go():
        async with httpx.AsyncClient(base_url=settings.gateway.http_url, timeout=180) as client:
            started = asyncio.Event()
            tasks = [asyncio.create_task(stream_one(client, p, started, **extra)) for p in prompts]
            await started.wait()  # tokens are flowing: the fault lands mid-generation
            unfinished = sum(not t.done() for t in tasks)
            await asyncio.get_running_loop().run_in_executor(None, fault)
            results = await asyncio.gather(*tasks)
            assert unfinished > 0, "every request had finished before the fault"
            return results

    return asyncio.run(go())


def kill(settings, name: str) -> None:
    record = PidFile(settings.run_dir, name).read()
    os.kill(record.pid, signal.SIGKILL)


def healthy(settings) -> bool:
    try:
        return httpx.get(f"{settings.gateway.http_url}/health", timeout=5).json()["status"] == "ok"
    except (httpx.HTTPError, ValueError, KeyError):
        return False


def check(results, reference) -> None:
    completed = 0
    for (tokens, error), want in zip(results, reference):
        if tokens is None:
            assert error and len(error) > 10, f"a failure must say why, got {error!r}"
            continue
        assert tokens == want, "a completed stream must equal target-only decoding (no token lost or repeated)"
        completed += 1
    assert completed >= len(reference) // 2, f"only {completed} of {len(reference)} completed"


@pytest.mark.parametrize("victim", ["drafter", "verifier", "state", "router"])
def test_kill_9_of_a_service(stack, prompts, reference, victim):
    _, settings = stack
    before = PidFile(settings.run_dir, victim).read().pid
    results = run_with_fault(settings, prompts, lambda: kill(settings, victim))
    check(results, reference)
    assert wait_until(lambda: healthy(settings), 120, 0.5), "the stack did not recover"
    assert PidFile(settings.run_dir, victim).read().pid != before  # the supervisor restarted it


def test_nats_restart(stack, prompts, reference):
    _, settings = stack
    results = run_with_fault(settings, prompts, lambda: kill(settings, "nats"))
    check(results, reference)
    assert wait_until(lambda: healthy(settings), 120, 0.5)
    # New requests are served exactly after the restart.
    after = run_with_fault(settings, prompts[:4], lambda: None)
    assert [t for t, _ in after] == reference[:4]


def test_postgres_stopped_and_started(stack, prompts, reference):
    """Only the router uses PostgreSQL: generation goes on while it is down."""
    _, settings = stack

    def stop_and_start():  # a fast shutdown; the supervisor starts it again
        os.kill(PidFile(settings.run_dir, "postgres").read().pid, signal.SIGINT)
        time.sleep(2)

    results = run_with_fault(settings, prompts, stop_and_start)
    assert [t for t, _ in results] == reference
    assert wait_until(lambda: healthy(settings), 120, 0.5)


@pytest.fixture(scope="module")
def two_targets(tmp_path_factory):
    """A second stack whose target runs as two replicas, with drafting ahead on."""
    from shared.settings import Settings
    from tests.stack_fixtures import specmesh, stack_env

    # Drafting ahead is on here, so its path meets concurrency and a failover too.
    env = stack_env(tmp_path_factory.mktemp("two-targets") / ".run") | {"SPECMESH_REPLICAS__TARGET": "2",
                                                                        "SPECMESH_SPECULATION__LOOKAHEAD": "true"}
    try:
        specmesh(env, "up", timeout=900)
        saved = {k: os.environ.get(k) for k in env if k.startswith("SPECMESH_")}
        os.environ.update({k: v for k, v in env.items() if k.startswith("SPECMESH_")})
        try:
            yield Settings()
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    finally:
        specmesh(env, "down", "--purge", check=False)


def test_kill_9_of_one_of_two_targets(two_targets, prompts, penalized):
    """Requests on the killed replica resume on the other from their committed tokens (with
    penalties, which count the output from the prompt's end on the new replica too)."""
    settings = two_targets
    results = run_with_fault(settings, prompts, lambda: kill(settings, "target-2"), **PENALTIES)
    check(results, penalized)
    assert wait_until(lambda: healthy(settings), 120, 0.5)


def test_abandoned_requests_free_their_kv(stack, prompts):
    """Clients that hang up mid-stream leave no KV behind at any level (read from /metrics)."""
    from shared.service import connect, ping

    _, settings = stack

    async def metrics_urls() -> dict[str, str]:
        nc = await connect(settings, "test-kv")
        try:
            return {name: (await ping(nc, name, 2.0))["metadata"]["metrics"] for name in ("drafter", "verifier", "target")}
        finally:
            await nc.close()

    def kv_bytes(urls) -> dict[str, float]:
        out = {}
        for name, url in urls.items():
            for line in httpx.get(url, timeout=5).text.splitlines():
                if line.startswith("specmesh_kv_cache_bytes_in_use{"):
                    out[line.split('model="')[1].split('"')[0] + "@" + name] = float(line.rsplit(" ", 1)[1])
        return out

    held: dict[str, float] = {}

    async def abandon():
        async with httpx.AsyncClient(base_url=settings.gateway.http_url, timeout=60) as client:
            async def one(p, measure: bool):
                body = {"model": "specmesh", "prompt": p, "max_tokens": 200, "temperature": 0, "stream": True,
                        "speculation": {"chain": CHAIN, "k": 3}}
                async with client.stream("POST", "/v1/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {"):
                            if measure:  # while this request is live, its KV is counted
                                held.update(await asyncio.get_running_loop().run_in_executor(None, kv_bytes, urls))
                            return  # hang up after the first chunk

            await asyncio.gather(*(one(p, i == 0) for i, p in enumerate(prompts)))

    urls = asyncio.run(metrics_urls())
    asyncio.run(abandon())
    assert any(v > 0 for v in held.values()), held
    assert wait_until(lambda: all(v == 0 for v in kv_bytes(urls).values()), 30, 0.5), kv_bytes(urls)
    assert kv_bytes(urls), "no KV gauges found"


def test_drafting_ahead_gives_identical_output(two_targets, prompts, reference, penalized):
    """With look-ahead on, every chain still reproduces target-only decoding (and with
    penalties: the drafts a replica makes ahead count the tokens before them)."""
    async def go(chain, **extra):
        async with httpx.AsyncClient(base_url=two_targets.gateway.http_url, timeout=180) as client:
            bodies = [{"model": "specmesh", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0,
                       "return_token_ids": True, "speculation": {"chain": chain, "k": 3}, **extra} for p in prompts]
            replies = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
            return [r.json()["choices"][0]["token_ids"] for r in replies]

    for chain in ("drafter,target", "drafter,verifier,target", "ngram,drafter,target"):
        assert asyncio.run(go(chain)) == reference, chain
    assert asyncio.run(go("drafter,verifier,target", **PENALTIES)) == penalized
    assert penalized != reference
