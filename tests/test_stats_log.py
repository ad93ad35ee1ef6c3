"""The target's periodic throughput line (services/worker/stats_log.py): what it says, and
that an idle target says nothing. Pure: a fake driver and clock."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from services.worker.stats_log import StatsLog
from shared.settings import Settings


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def driver(jobs=2, waiting=1):
    runner = SimpleNamespace(prefix_queried=0, prefix_hits=0)
    return SimpleNamespace(worker="w1", target=runner, jobs=dict.fromkeys(range(jobs)), waiting=[0] * waiting,
                           settings=Settings())


def test_a_line_per_interval_with_throughput_slots_hits_and_acceptance(caplog):
    clock, d = Clock(), driver()
    stats = StatsLog(10.0, clock)
    stats.emitted(50)
    stats.emitted(50)
    stats.proposed("drafter", 40, 30)
    stats.proposed("ngram", 10, 2)
    d.target.prefix_queried, d.target.prefix_hits = 400, 100
    clock.now += 5
    assert stats.tick(d) is None  # not yet
    clock.now += 5
    with caplog.at_level(logging.INFO, logger="specmesh.worker"):
        line = stats.tick(d)
    assert line == ("target w1: prompt 40.0 tok/s, generation 10.0 tok/s, running 2, waiting 1, slots 12%, "
                    "prefix cache hits 25%, acceptance drafter 75% ngram 20%")
    assert line in caplog.text
    clock.now += 10  # the counters started afresh: only what came since
    d.target.prefix_queried = 500
    stats.emitted(20)
    assert stats.tick(d).startswith("target w1: prompt 10.0 tok/s, generation 2.0 tok/s")


def test_an_idle_target_and_an_interval_of_zero_say_nothing():
    clock, idle = Clock(), driver(jobs=0, waiting=0)
    stats = StatsLog(10.0, clock)
    clock.now += 60
    assert stats.tick(idle) is None
    off = StatsLog(0.0, clock)
    off.emitted(5)
    clock.now += 60
    assert off.tick(driver()) is None
