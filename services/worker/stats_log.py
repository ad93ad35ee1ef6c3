"""The target's periodic log line, as vLLM's engine writes one: every `engine.log_stats_interval_s`
while it has work, its prompt and generation throughput, requests running and waiting, the
share of its request slots in use, the prefix cache's hits and each proposing level's
acceptance over the interval:

    target worker-1: prompt 412.0 tok/s, generation 96.3 tok/s, running 4, waiting 0,
    slots 25%, prefix cache hits 61%, acceptance ngram 34% drafter 58%
"""

from __future__ import annotations

import logging
import time
from collections import Counter

log = logging.getLogger("specmesh.worker")


class StatsLog:
    """Counts between two lines; `tick(driver)` writes one when the interval has passed and
    anything happened (an idle target stays quiet)."""

    def __init__(self, interval_s: float, clock=time.monotonic):
        self.interval_s, self.clock = interval_s, clock
        self.since = clock()
        self.generated = 0
        self.drafted: Counter = Counter()
        self.accepted: Counter = Counter()
        self._prompt = self._hits = 0  # the runner's counters at the last line

    def emitted(self, tokens: int) -> None:
        self.generated += tokens

    def proposed(self, level: str, drafted: int, accepted: int) -> None:
        self.drafted[level] += drafted
        self.accepted[level] += accepted

    def tick(self, driver) -> str | None:
        """The line, logged, if it is time for one (else None)."""
        now = self.clock()
        if self.interval_s <= 0 or now - self.since < self.interval_s:
            return None
        runner = driver.target
        prompt, hits = runner.prefix_queried - self._prompt, runner.prefix_hits - self._hits
        busy = self.generated or prompt or driver.jobs or driver.waiting
        line = self._line(driver, now - self.since, prompt, hits) if busy else None
        self.since, self.generated = now, 0
        self._prompt, self._hits = runner.prefix_queried, runner.prefix_hits
        self.drafted.clear()
        self.accepted.clear()
        if line:
            log.info("%s", line)
        return line

    def _line(self, driver, seconds: float, prompt: int, hits: int) -> str:
        slots = len(driver.jobs) / max(1, driver.settings.engine.max_batch)
        acceptance = " ".join(f"{level} {self.accepted[level] / n:.0%}" for level, n in sorted(self.drafted.items()) if n)
        return (f"target {driver.worker}: prompt {prompt / seconds:.1f} tok/s, generation "
                f"{self.generated / seconds:.1f} tok/s, running {len(driver.jobs)}, waiting {len(driver.waiting)}, "
                f"slots {slots:.0%}, prefix cache hits {hits / prompt if prompt else 0:.0%}"
                + (f", acceptance {acceptance}" if acceptance else ""))
