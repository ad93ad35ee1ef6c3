"""A serving process's Python heap: what start-up built is frozen, every collection is timed.

CPython's cyclic garbage collector walks every tracked object of the generations it
collects. A worker that has imported torch and transformers and loaded its model holds
about 380,000 of them, and a full (generation 2) collection takes 100-350 ms on the 2-core
development machine: a pause, at whatever allocation triggers it, in the middle of
whichever requests are in flight. Nothing built at start-up (modules, the model, the
tokenizer, the settings) becomes garbage while the process serves, so `freeze` collects once
and moves what survives into the permanent generation (`gc.freeze`, as vLLM does once its
engine is up); later collections walk only what serving allocated.

`GcPauses` times each collection from `gc.callbacks` and is read, when scraped, as the
Prometheus histogram `specmesh_gc_pause_seconds{generation}` beside the gauge
`specmesh_gc_frozen_objects`. The callback takes no lock: a collection can start inside any
allocation, including one made while a metric's (non-reentrant) lock is held.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import logging
import time

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger("specmesh.heap")

PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def freeze() -> int:
    """Collect once, then exempt every surviving object from later collections; how many were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("heap: %d objects from start-up frozen out of garbage collection", frozen)
    return frozen


class GcPauses(Collector):
    """Every garbage collection's pause in this process, per generation, from `gc.callbacks`."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.buckets = [[0] * (len(PAUSE_BUCKETS) + 1) for _ in range(3)]  # per generation; last: +Inf
        self.sums = [0.0, 0.0, 0.0]
        self._started = 0.0
        gc.callbacks.append(self._on_gc)
        if registry is not None:
            registry.register(self)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self.buckets[generation][bisect.bisect_left(PAUSE_BUCKETS, pause)] += 1
        self.sums[generation] += pause

    def close(self) -> None:
        """Stop timing (the registry keeps the counts so far)."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def count(self, generation: int) -> int:
        return sum(self.buckets[generation])

    def collect(self):
        family = HistogramMetricFamily("specmesh_gc_pause_seconds",
                                       "Pauses of Python's garbage collector, per generation collected.",
                                       labels=["generation"])
        bounds = [*map(str, PAUSE_BUCKETS), "+Inf"]
        for generation in range(3):
            cumulative = list(zip(bounds, itertools.accumulate(self.buckets[generation])))
            family.add_metric([str(generation)], cumulative, self.sums[generation])
        yield family
        yield GaugeMetricFamily("specmesh_gc_frozen_objects", "Objects frozen out of garbage collection (start-up's).",
                                value=gc.get_freeze_count())
