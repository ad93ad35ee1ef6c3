"""The gateway's backend keeps a stalled request alive while no target takes it, and picks the
router's table for the load its own requests make (pure logic; an in-memory stand-in for
NATS). The real NATS restart is in tests/test_faults.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import nats.errors

from services.gateway.backend import NatsBackend, table_for
from shared.messages import (
    SUBJECT_GENERATE, SUBJECT_STATE_GET, SUBJECT_TOKENS, Assignment, Assignments, GenerateJob, LoadTable, RequestState,
    TokenBatch, TokenLogprob, decode, encode,
)
from shared.settings import Settings


class Bus:
    """Subscriptions kept by subject, publishes dropped; `request` is each test's."""

    def __init__(self):
        self.submits, self.callbacks = [], {}

    async def subscribe(self, subject, cb):
        self.callbacks[subject] = cb
        return SimpleNamespace(unsubscribe=self._noop)

    async def _noop(self):
        return None

    async def publish(self, subject, data, headers=None):
        return None


class FlakyBus(Bus):
    """Takes the first job, then has no responders for `outage` submits, then takes it and answers."""

    def __init__(self, outage: int):
        super().__init__()
        self.outage = outage

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
    backend.settings, backend.nc, backend.stall_s, backend.in_flight = Settings(), bus, 0.05, {}
    job = GenerateJob("r1", [1, 2, 3], max_tokens=2)
    batches = [b async for b in backend.generate(job)]
    assert [t for b in batches for t in b.tokens] == [7, 8] and batches[-1].finished
    assert len(bus.submits) == 4  # taken, two offers nobody took, taken again


class LostBatchBus(Bus):
    """The first batch (tokens 5, 6) is committed but never arrives; the state service has it and
    its log-probabilities (the prompt's too); the job, offered again, resends from token 6 on (a resume's overlap)."""

    async def request(self, subject, data, timeout=None, headers=None):
        if subject == SUBJECT_STATE_GET:
            return SimpleNamespace(data=encode(RequestState("r2", 0, [1], [5, 6], logprobs=[LP[5], LP[6]],
                                                            prompt_logprobs=[LP[7], LP[8]])))
        job = decode(data, GenerateJob)
        self.submits.append(job)
        if len(self.submits) > 1:
            batch = TokenBatch("r2", 0, 1, [6, 7, 8], finished=True, logprobs=[LP[6], LP[7], LP[8]])
            asyncio.get_running_loop().call_later(
                0.01, lambda: asyncio.ensure_future(self.callbacks[f"{SUBJECT_TOKENS}.r2"](SimpleNamespace(data=encode(batch)))))
        return SimpleNamespace(data=encode(RequestState("r2")))


LP = {t: TokenLogprob(-t / 10) for t in range(5, 9)}


async def test_tokens_recovered_from_the_state_keep_their_logprobs():
    bus = LostBatchBus()
    backend = NatsBackend.__new__(NatsBackend)
    backend.settings, backend.nc, backend.stall_s, backend.in_flight = Settings(), bus, 0.05, {}
    batches = [b async for b in backend.generate(GenerateJob("r2", [1, 2, 3], max_tokens=4, logprobs=0))]
    assert [t for b in batches for t in b.tokens] == [5, 6, 7, 8]
    assert [lp for b in batches for lp in b.logprobs] == [LP[5], LP[6], LP[7], LP[8]]
    assert batches[0].prompt_logprobs == [LP[7], LP[8]] and batches[1].prompt_logprobs == []  # the prompt's, once
    assert bus.submits[-1].committed == [5, 6] and bus.submits[-1].logprobs == 0


def load_tables() -> Assignments:
    """Idle: drafter-code for code; from 1.5 requests per target ngram for everything, from 11.5 the target alone."""
    def table(chain: list[str], k: list[int]) -> list[Assignment]:
        return [Assignment(cls, chain, k, 1.0, "shared") for cls in ("code-short", "prose-short")]

    return Assignments(1, [Assignment("code-short", ["drafter-code", "target"], [4], 1.0, "cost")],
                       Assignment("default", ["ngram", "target"], [4], 1.0, "cost"), batch=1.0, targets=2,
                       by_load=[LoadTable(1.5, 2.0, table(["ngram", "target"], [3])),
                                LoadTable(11.5, 16.0, table(["target"], []))])


def test_the_load_a_gateways_own_requests_make_picks_the_table():
    table = load_tables()
    assert table_for(table, 1) is table and table_for(table, 2) is table  # 1 per target: the router's load
    assert table_for(table, 3).min_batch == 1.5 and table_for(table, 22).min_batch == 1.5
    assert table_for(table, 23).min_batch == 11.5
    table.batch = 16.0  # the router already decided at this load: its table stands
    assert table_for(table, 100) is table


async def test_a_burst_takes_the_under_load_assignments_and_a_finished_request_stops_counting():
    bus = FlakyBus(outage=0)
    backend = NatsBackend.__new__(NatsBackend)
    backend.settings, backend.nc, backend.stall_s, backend.in_flight = Settings(), bus, 0.05, {}
    backend.table = None
    assert backend.assignment("code-short") is None  # before the router has spoken
    backend.admit("r0")
    backend.table = load_tables()
    burst = []
    for i in range(1, 24):
        burst.append(backend.assignment("code-short").chain)
        backend.admit(f"r{i}")
    assert burst[:1] == [["drafter-code", "target"]]  # with r0, 2 in flight over 2 targets: the router's load
    assert burst[1:21] == [["ngram", "target"]] * 20 and burst[21:] == [["target"]] * 2
    job = GenerateJob("r0", [1, 2, 3], max_tokens=2)
    assert [t for b in [b async for b in backend.generate(job)] for t in b.tokens] == [7, 8]
    assert "r0" not in backend.in_flight and len(backend.in_flight) == 23
    backend.in_flight = {rid: t - 1e6 for rid, t in backend.in_flight.items()}  # planned, never generated: expire
    backend.admit("r99")
    assert list(backend.in_flight) == ["r99"]
    assert backend.assignment("code-short").chain == ["drafter-code", "target"]  # r99 and this one: 1 per target


class RestartingBus(FlakyBus):
    """NATS restarts while the first submission is on its way: it times out (or finds no
    responder) and the client has reconnected meanwhile; the next one is taken."""

    def __init__(self, error):
        super().__init__(outage=0)
        self.error, self.stats = error, {"reconnects": 0}
        self.is_reconnecting = False

    async def request(self, subject, data, timeout=None, headers=None):
        if subject == SUBJECT_GENERATE and not self.submits:
            self.submits.append(decode(data, GenerateJob))
            self.stats["reconnects"] += 1
            raise self.error
        if subject == SUBJECT_GENERATE and len(self.submits) == 1:  # taken: answer it whole
            job = decode(data, GenerateJob)
            self.submits.append(job)
            batch = TokenBatch(job.request_id, job.epoch, 0, [7, 8], finished=True)
            asyncio.get_running_loop().call_later(
                0.01, lambda: asyncio.ensure_future(self.callbacks[f"{SUBJECT_TOKENS}.{job.request_id}"](
                    SimpleNamespace(data=encode(batch)))))
            return SimpleNamespace(data=encode(RequestState(job.request_id)))
        return await super().request(subject, data, timeout, headers)


async def test_a_submission_cut_by_a_nats_restart_is_sent_again():
    for error in (nats.errors.TimeoutError(), nats.errors.NoRespondersError()):
        bus = RestartingBus(error)
        backend = NatsBackend.__new__(NatsBackend)
        backend.settings, backend.nc, backend.stall_s, backend.in_flight = Settings(), bus, 5.0, {}
        batches = [b async for b in backend.generate(GenerateJob("r1", [1, 2, 3], max_tokens=2))]
        assert [t for b in batches for t in b.tokens] == [7, 8] and len(bus.submits) == 2
    # without a reconnect a timeout is the target's: the client hears it at once
    from services.gateway.backend import NoTargetError

    quiet = FlakyBus(outage=0)

    async def silent(subject, data, timeout=None, headers=None):
        quiet.submits.append(subject)
        raise nats.errors.TimeoutError

    quiet.request = silent
    backend = NatsBackend.__new__(NatsBackend)
    backend.settings, backend.nc, backend.stall_s, backend.in_flight = Settings(), quiet, 5.0, {}
    try:
        [b async for b in backend.generate(GenerateJob("r2", [1, 2, 3], max_tokens=2))]
        raise AssertionError("a submission nobody answered must fail")
    except NoTargetError as exc:
        assert "accepted the request in 5s" in str(exc) and quiet.submits == [SUBJECT_GENERATE]
