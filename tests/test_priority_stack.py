"""Priority preemption through the services: a stack whose target holds one request
(`SPECMESH_ENGINE__MAX_BATCH=1`). A long request of priority 5 is streaming when one of
priority -1 arrives: the urgent one is answered before the long one ends (without
preemption it would wait for it), and both are the target alone's, token for token: the
preempted request resumed from its committed tokens, its stream only paused."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.stack_fixtures import specmesh, stack_env, target_only, token_prompts

pytestmark = pytest.mark.stack

LONG = 400  # tokens of the low-priority request: long enough to be running when the urgent one comes


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory):
    env = stack_env(tmp_path_factory.mktemp("one-slot") / ".run") | {"SPECMESH_ENGINE__MAX_BATCH": "1"}
    try:
        specmesh(env, "up", timeout=900)
        yield f"http://127.0.0.1:{env['SPECMESH_GATEWAY__PORT']}"
    finally:
        specmesh(env, "down", "--purge", check=False)


def test_an_urgent_request_preempts_the_running_one_and_both_are_the_target_alones(one_slot, tiny_family):
    low_prompt, urgent_prompt = token_prompts(tiny_family, 1, seed=21)
    want_low = target_only(tiny_family, [low_prompt], LONG)[0]
    want_urgent = target_only(tiny_family, [urgent_prompt], 16)[0]
    order: list[str] = []

    async def run() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=one_slot, timeout=300) as client:
            body = {"model": "specmesh", "prompt": low_prompt, "max_tokens": LONG, "temperature": 0, "ignore_eos": True,
                    "stream": True, "return_token_ids": True, "priority": 5, "speculation": {"chain": "drafter,target"}}
            low: list[int] = []
            urgent_task = None
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    low += json.loads(line[6:])["choices"][0].get("token_ids") or []
                    if urgent_task is None and len(low) >= 8:  # running: now the urgent one
                        urgent_task = asyncio.ensure_future(client.post("/v1/completions", json={
                            "model": "specmesh", "prompt": urgent_prompt, "max_tokens": 16, "temperature": 0,
                            "return_token_ids": True, "priority": -1}))
                        urgent_task.add_done_callback(lambda _: order.append("urgent"))
            order.append("low")
            urgent = (await urgent_task).json()["choices"][0]["token_ids"]
            return low, urgent

    low, urgent = asyncio.run(run())
    assert urgent == want_urgent and low == want_low
    assert order == ["urgent", "low"]  # one slot: only a preemption lets the urgent request finish first
