"""The driver's view of a remote level, over a loopback transport: a real `LevelServer` and
runner behind a fake `nc.request`, so the calls a chain makes can be counted (pure logic;
tests/test_services.py runs the same code over real NATS)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from services.worker.level_server import LevelServer
from services.worker.remote import RemoteRunner
from shared.engine.runner import LeanRunner, load_hf_model
from shared.messages import LevelCall, decode, encode
from tests.device import DEVICE
from tests.test_engine_runner import VOCAB, _save


class Loopback:
    """`nc.request` answered in-process by a level server; every call kept."""

    def __init__(self, server: LevelServer):
        self.server = server
        self.calls: list[LevelCall] = []

    async def request(self, subject: str, data: bytes, timeout: float):
        call = decode(data, LevelCall)
        self.calls.append(call)
        return SimpleNamespace(data=encode(self.server.handle(call)))


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_hf_model(_save(tmp_path_factory.mktemp("remote"), "llama"))


def test_a_request_opens_on_its_first_call_from_its_prompt(model, loop):
    nc = Loopback(LevelServer(LeanRunner(model, DEVICE, max_batch=4, max_len=128), "w1"))
    remote = RemoteRunner("drafter-code", nc, loop, VOCAB, epochs={}, max_len=128)
    local = LeanRunner(model, DEVICE, max_batch=4, max_len=128)
    prompt = list(range(5, 18))

    remote.prefill("r1", prompt)
    assert nc.calls == [] and remote.length("r1") == len(prompt)  # no round trip of its own
    local.prefill("r1", prompt)
    want = local.propose(["r1"], [[7]], 4)[0].tokens
    got = remote.propose(["r1"], [[7]], 4)[0].tokens
    assert got == want  # the replica opened the cache from the context, then drafted
    (call,) = nc.calls
    assert call.op == "propose" and call.items[0].context == prompt and call.items[0].position == len(prompt)
    assert remote.forward_tokens == len(prompt) + 1 + len(got)  # its forward prefilled the context too

    remote.score(["r1"], [[3, 4]])
    assert nc.calls[-1].op == "score" and nc.calls[-1].items[0].context == []  # opened: no context again


def test_a_request_released_before_its_first_call_costs_no_message(model, loop):
    nc = Loopback(LevelServer(LeanRunner(model, DEVICE, max_batch=4, max_len=128), "w1"))
    remote = RemoteRunner("verifier", nc, loop, VOCAB, epochs={}, max_len=128)
    remote.prefill("r1", [1, 2, 3])
    remote.score(["r1"], [[4]])  # opened on the replica
    remote.prefill("r2", [5, 6, 7])
    remote.release("r2")
    remote.release("r1")
    deadline = time.monotonic() + 5
    while not any(c.op == "release" for c in nc.calls) and time.monotonic() < deadline:
        time.sleep(0.01)
    released = [i.request_id for c in nc.calls if c.op == "release" for i in c.items]
    assert released == ["r1"] and "r2" not in remote.mirror and not remote.unopened
