"""The committer's answers-driven timings (pure logic; an in-memory stand-in for NATS)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from services.worker.committer import Committer
from shared.messages import Commit, RequestState, decode, encode


class FakeState:
    """Answers each commit after `delay_s`, or refuses the ones at `refuse` positions."""

    def __init__(self, delay_s: float = 0.01, refuse: tuple[int, ...] = ()):
        self.delay_s, self.refuse, self.seen = delay_s, refuse, []

    async def request(self, subject, data, timeout=None, headers=None):
        commit = decode(data, Commit)
        self.seen.append(commit.position)
        await asyncio.sleep(self.delay_s)
        error = "stale epoch" if commit.position in self.refuse else None
        return SimpleNamespace(data=encode(RequestState(commit.request_id, error=error)))


async def _run(state: FakeState) -> tuple[list, float]:
    loop = asyncio.get_running_loop()
    committer = Committer(state, "w", loop)
    got: list = []
    committer.when_finished("r", got.append)
    started = time.perf_counter()
    for position, tokens, last in ((0, [1, 2], False), (2, [3], False), (3, [4, 5, 6], True)):
        committer.commit(Commit("r", 0, position, tokens, finished=last))
    for _ in range(200):
        if got:
            break
        await asyncio.sleep(0.01)
    return got, started


async def test_finish_hook_gets_first_and_last_answer_and_the_tokens_answered():
    state = FakeState(delay_s=0.02)
    got, started = await _run(state)
    assert state.seen == [0, 2, 3]  # in order, one at a time
    (first, last, tokens), = got
    assert tokens == 6
    assert started + 0.02 <= first < last and last - first >= 0.04  # the second and third answers came later


async def test_a_refused_commit_gives_the_hook_nothing_to_trust():
    got, _ = await _run(FakeState(refuse=(2,)))
    assert got == [None]


async def test_a_request_forgotten_before_its_last_commit_leaves_nothing_behind():
    loop = asyncio.get_running_loop()
    state = FakeState(delay_s=0.02)
    committer = Committer(state, "w", loop)
    committer.when_finished("r", lambda acked: None)
    committer.commit(Commit("r", 0, 0, [1, 2]))
    committer.commit(Commit("r", 0, 2, [3]))
    committer.forget("r")  # cancelled: no finished commit will come
    committer.forget("never-seen")
    for _ in range(200):
        await asyncio.sleep(0.01)
        if len(state.seen) == 2 and not committer.queues:
            break
    assert state.seen == [0, 2]  # what was queued was still sent
    assert committer.queues == {} and committer.acked == {} and committer.on_finished == {}
    senders = [t for t in asyncio.all_tasks() if "_sender" in repr(t.get_coro())]
    assert senders == []


async def test_a_request_back_before_its_sender_ended_keeps_its_commits_in_order():
    loop = asyncio.get_running_loop()
    state = FakeState(delay_s=0.02)
    committer = Committer(state, "w", loop)
    committer.commit(Commit("r", 0, 0, [1, 2]))
    committer.forget("r")
    committer.commit(Commit("r", 1, 2, [3], finished=True))  # resumed here while the first was in flight
    for _ in range(200):
        await asyncio.sleep(0.01)
        if len(state.seen) == 2 and not committer.queues:
            break
    assert state.seen == [0, 2] and committer.queues == {}
