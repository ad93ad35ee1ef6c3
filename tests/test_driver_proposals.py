"""The driver's proposals in a round with several chains: which chains may propose at once
(`independent`), and that they do, each chain's outcome handed back in order. Pure: fake
chains, no models, no NATS; the stack suites check the outputs stay the target's."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from services.worker.driver import Driver, independent
from services.worker.remote import LevelUnavailable
from shared.settings import Settings


def test_chains_that_share_a_lower_level_propose_in_one_group():
    keys = [("drafter", "target"), ("verifier", "target"), ("ngram", "target"), ("drafter-prose", "target"),
            ("drafter-code", "verifier", "target"), ("target",)]
    # `drafter` is drafter-code; the last-but-one chain joins drafter and verifier into one group
    assert independent(keys) == [[0, 1, 4], [2], [3], [5]]
    # fused runs both drafters: it joins them
    assert independent([("drafter-prose", "target"), ("drafter-code", "target"), ("fused", "target")]) == [[0, 1, 2]]
    # n-gram proposers are each chain's own
    assert independent([("ngram", "target"), ("ngram", "drafter-prose", "target")]) == [[0], [1]]
    assert independent([]) == []


class FakeChain:
    """`propose()` waits at a barrier the other chains of its round must reach too."""

    def __init__(self, barrier: threading.Barrier | None, result=None, error: Exception | None = None):
        self.barrier, self.result, self.error = barrier, result, error
        self.thread = None

    def propose(self):
        self.thread = threading.current_thread().name
        if self.barrier is not None:
            self.barrier.wait()  # BrokenBarrierError after its timeout if the others never come
        if self.error is not None:
            raise self.error
        return self.result


def driver(parallel: bool) -> Driver:
    settings = Settings()
    settings.speculation.parallel_chains = parallel
    target = SimpleNamespace(vocab_size=8, eos_token_id=None)
    return Driver("test", target, nc=None, loop=None, settings=settings)


def test_independent_chains_propose_at_once_and_come_back_in_order():
    d = driver(parallel=True)
    barrier = threading.Barrier(3, timeout=10)
    lost = LevelUnavailable("verifier", "TimeoutError")
    live = [(("drafter-code", "target"), FakeChain(barrier, "a")),
            (("verifier", "target"), FakeChain(barrier, error=lost)),
            (("drafter-prose", "target"), FakeChain(barrier, None))]
    try:
        assert d._propose(live) == ["a", lost, None]  # all three met at the barrier: they ran at once
    finally:
        d.stop()
    assert len({chain.thread for _, chain in live}) == 3


def test_chains_sharing_a_level_propose_one_after_the_other():
    d = driver(parallel=True)
    order = []

    class Logged(FakeChain):
        def propose(self):
            order.append(self.result)
            return super().propose()

    live = [(("drafter-code", "target"), Logged(None, "first")),
            (("drafter-code", "verifier", "target"), Logged(None, "second"))]
    assert d._propose(live) == ["first", "second"] and order == ["first", "second"]
    assert live[0][1].thread == live[1][1].thread == threading.current_thread().name
    d.stop()


def test_with_parallel_chains_off_every_chain_proposes_in_the_driver_thread():
    d = driver(parallel=False)
    barrier = threading.Barrier(2, timeout=0.2)
    live = [(("drafter-code", "target"), FakeChain(barrier, "a")), (("verifier", "target"), FakeChain(barrier, "b"))]
    first, second = d._propose(live)
    # one after the other: the first waited alone at the barrier until it broke
    assert isinstance(first, threading.BrokenBarrierError) and isinstance(second, threading.BrokenBarrierError)
    assert {chain.thread for _, chain in live} == {threading.current_thread().name}
    d.stop()


def test_a_bug_in_one_chain_comes_back_as_its_exception_and_the_others_still_propose():
    d = driver(parallel=True)
    bug = ZeroDivisionError("bug")
    live = [(("drafter-code", "target"), FakeChain(None, error=bug)), (("verifier", "target"), FakeChain(None, "ok"))]
    assert d._propose(live) == [bug, "ok"]
    d.stop()


@pytest.mark.parametrize("parallel", [True, False])
def test_no_live_chain_proposes_nothing(parallel):
    d = driver(parallel)
    assert d._propose([]) == []
    d.stop()


def test_calls_made_at_once_count_once_in_the_model_seconds():
    """The driver's per-round overhead (wall time beyond forwards and level calls) must not
    go negative, and so to zero, because two chains' calls overlapped."""
    import time

    d = driver(parallel=True)
    d.target.forward_s = 0.0
    barrier = threading.Barrier(2, timeout=10)

    class Calling(FakeChain):
        def __init__(self, remote):
            super().__init__(barrier, "ok")
            self.remote = remote

        def propose(self):
            super().propose()  # both chains are inside their calls from here on
            t0 = time.perf_counter()
            time.sleep(0.05)
            self.remote.call_s += time.perf_counter() - t0
            return self.result

    d.remotes = {"drafter-code": SimpleNamespace(call_s=0.0), "verifier": SimpleNamespace(call_s=0.0)}
    live = [(("drafter-code", "target"), Calling(d.remotes["drafter-code"])),
            (("verifier", "target"), Calling(d.remotes["verifier"]))]
    assert d._propose(live) == ["ok", "ok"]
    summed = sum(r.call_s for r in d.remotes.values())
    assert d._overlap_s > 0 and d._model_seconds() == pytest.approx(summed - d._overlap_s)
    assert d._model_seconds() < summed
    d.stop()
