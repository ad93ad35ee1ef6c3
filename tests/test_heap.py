"""The serving heap: start-up's objects frozen out of collection, every collection's pause counted."""

import gc

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from shared.heap import PAUSE_BUCKETS, GcPauses, freeze


@pytest.fixture
def thawed():
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the test run collects as usual


def _samples(registry) -> dict:
    from prometheus_client import generate_latest

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}


def test_freeze_exempts_what_lives_now_and_not_what_comes_later(thawed):
    startup = [[i] for i in range(20_000)]  # lists are tracked by the collector
    frozen = freeze()
    assert frozen == gc.get_freeze_count() >= len(startup)
    later = [[i] for i in range(5_000)]
    assert gc.get_freeze_count() == frozen and later  # what serving allocates is collected as before
    garbage = [None]
    garbage[0] = garbage  # a cycle made after the freeze is still found
    del garbage
    assert gc.collect() >= 1


def test_every_collection_is_counted_per_generation_and_scraped_as_a_histogram(thawed):
    registry = CollectorRegistry()
    pauses = GcPauses(registry)
    try:
        before = [pauses.count(g) for g in range(3)]
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        assert [pauses.count(g) - b for g, b in enumerate(before)] == [1, 0, 2]
        freeze()
        samples = _samples(registry)
    finally:
        pauses.close()
    assert pauses._on_gc not in gc.callbacks
    assert samples[("specmesh_gc_pause_seconds_count", (("generation", "2"),))] == pauses.count(2) >= 3
    assert samples[("specmesh_gc_pause_seconds_bucket", (("generation", "2"), ("le", "+Inf")))] == pauses.count(2)
    buckets = [samples[("specmesh_gc_pause_seconds_bucket", (("generation", "2"), ("le", str(b))))]
               for b in PAUSE_BUCKETS]
    assert buckets == sorted(buckets)  # cumulative
    assert samples[("specmesh_gc_pause_seconds_sum", (("generation", "2"),))] > 0
    assert samples[("specmesh_gc_frozen_objects", ())] == pytest.approx(gc.get_freeze_count(), rel=0.01)
    assert gc.get_freeze_count() > 0
    gc.collect(2)
    assert pauses.count(2) == samples[("specmesh_gc_pause_seconds_count", (("generation", "2"),))]  # closed: no more
