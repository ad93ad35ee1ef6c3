"""The gateway's backend keeps a stalled request alive while no target takes it (pure logic;
an in-memory stand-in for NATS). The real NATS restart is in tests/test_faults.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import nats.errors

from services.gateway.backend import NatsBackend
from shared.messages import SUBJECT_GENERATE, SUBJECT_TOKENS, GenerateJob, RequestState, TokenBatch, decode, encode
from shared.settings import Settings


class FlakyBus:
    """Takes the first job, then has no responders for `outage` submits, then takes it and answers."""

    def __init__(self, outage: int):
        self.outage, self.submits, self.callbacks = outage, [], {}

    async def subscribe(self, subject, cb):
        self.callbacks[subject] = cb
        return SimpleNamespace(unsubscribe=self._noop)

    async def _noop(self):
        return None

    async def publish(self, subject, data, headers=None):
        return None

    async def request(self, subject, data, timeout=None, headers=None):
        if subject != SUBJECT_GENERATE:
            raise nats.errors.TimeoutError  # the state service is unreachable too
        job = decode(data, GenerateJob)
        self.submits.append(job)
        if 1 < len(self.submits) <= 1 + self.outage:
            raise nats.errors.NoRespondersError
        if len(self.submits) > 1:  # taken again: the request completes from what was committed
            batch = TokenBatch(job.request_id, job.epoch, len(job.committed), [7, 8], finished=True)
            asyncio.get_running_loop().call_later(
                0.01, lambda: asyncio.ensure_future(self.callbacks[f"{SUBJECT_TOKENS}.{job.request_id}"](
                    SimpleNamespace(data=encode(batch)))))
        return SimpleNamespace(data=encode(RequestState(job.request_id)))


async def test_a_stalled_request_waits_out_a_time_with_no_target():
    bus = FlakyBus(outage=2)
    backend = NatsBackend.__new__(NatsBackend)
    backend.settings, backend.nc, backend.stall_s = Settings(), bus, 0.05
    job = GenerateJob("r1", [1, 2, 3], max_tokens=2)
    batches = [b async for b in backend.generate(job)]
    assert [t for b in batches for t in b.tokens] == [7, 8] and batches[-1].finished
    assert len(bus.submits) == 4  # taken, two offers nobody took, taken again
