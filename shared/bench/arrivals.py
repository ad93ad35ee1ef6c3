"""Request arrival processes for open-loop load: Poisson and bursty gamma, seeded.

    times = Arrivals("gamma", rate=4.0, shape=0.5).times(duration_s=30, seed=0)

Inter-arrival gaps are exponential (Poisson) or gamma with shape `s` and scale
`1 / (s * rate)` (vLLM's `--burstiness`): the mean gap is `1 / rate` either way, and the
coefficient of variation is `1 / sqrt(s)`, so `s < 1` is burstier than Poisson, `s = 1` is
Poisson and `s > 1` is more regular.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

PROCESSES = ("poisson", "gamma")


@dataclass(frozen=True)
class Arrivals:
    """An arrival process: `kind` poisson | gamma, `rate` requests/s, gamma `shape`."""

    kind: str
    rate: float
    shape: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in PROCESSES:
            raise ValueError(f"arrival process {self.kind!r} is unknown; choose one of: {', '.join(PROCESSES)}")
        if not self.rate > 0:
            raise ValueError(f"arrival rate must be > 0 requests/s, got {self.rate}")
        if not self.shape > 0:
            raise ValueError(f"gamma shape (burstiness) must be > 0, got {self.shape}")

    @property
    def cv(self) -> float:
        """Coefficient of variation of the gaps: 1 for Poisson, 1 / sqrt(shape) for gamma."""
        return 1.0 if self.kind == "poisson" else self.shape ** -0.5

    def gap(self, rng: random.Random) -> float:
        """One inter-arrival gap in seconds."""
        if self.kind == "poisson":
            return rng.expovariate(self.rate)
        return rng.gammavariate(self.shape, 1.0 / (self.shape * self.rate))

    def gaps(self, n: int, seed: int = 0) -> list[float]:
        """`n` gaps; the same seed gives the same gaps."""
        rng = random.Random(seed)
        return [self.gap(rng) for _ in range(n)]

    def times(self, duration_s: float, seed: int = 0, max_requests: int | None = None,
              start_s: float = 0.0) -> list[float]:
        """Arrival times in [start_s, start_s + duration_s), at most `max_requests` of them.

        The first request arrives after one gap, as in a process already running.
        """
        rng = random.Random(seed)
        out: list[float] = []
        t = start_s
        end = start_s + duration_s
        while max_requests is None or len(out) < max_requests:
            t += self.gap(rng)
            if t >= end:
                break
            out.append(t)
        return out


def phased_times(phases: Sequence[tuple[Arrivals, float]], seed: int = 0,
                 max_requests: int | None = None) -> list[tuple[float, int]]:
    """Arrival times of consecutive phases `(process, duration_s)`, as `(time, phase index)`.

    Each phase draws from its own seed (`seed + index`), so changing one phase leaves the
    others' arrivals as they were.
    """
    out: list[tuple[float, int]] = []
    start = 0.0
    for index, (process, duration) in enumerate(phases):
        out += [(t, index) for t in process.times(duration, seed + index, start_s=start)]
        start += duration
    return out[:max_requests] if max_requests is not None else out
