"""What one request measured (`RequestRecord`) and the statistics over many: percentiles,
SLO attainment, goodput, acceptance per level. Pure functions, no I/O, no clock.

Definitions (those of `vllm bench serve`, so numbers compare):

- TTFT: request sent -> first token received at the client.
- TPOT: (end-to-end - TTFT) / (output tokens - 1), per request; undefined for one token.
- ITL: gaps between successive streamed chunks that carry tokens, pooled over requests.
  A speculative round commits several tokens at once, so one chunk may carry several.
- A request meets its SLO when it finished without error, TTFT <= the TTFT objective and
  (if it has a TPOT) TPOT <= the TPOT objective.
- SLO attainment: requests meeting their SLO / requests sent (failures count as misses).
- Goodput: requests meeting their SLO per second of the run's wall time.
- Paired TPOT ratio: a request's TPOT over its twin's in another mode's cell, the twin being
  the request of the same round and arrival slot (so the same prompt and, greedy, the same
  output); the median over pairs, with a bootstrap confidence interval that resamples whole
  rounds (one round of a mode is one stretch of the machine's time).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

QUANTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds."""

    mode: str                      # "off", a static chain "drafter,target", or "adaptive"
    process: str                   # arrival process: poisson | gamma | phased
    rate: float                    # requests/s the arrival process was set to
    scheduled_s: float             # arrival time, seconds after the run (or phase) start
    domain: str = ""               # code | prose
    sent_s: float = 0.0            # when it was actually sent (>= scheduled_s)
    phase: int = 0
    round: int = 0                 # `bench load --repeats`: which round of its cell
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None     # sent -> last token
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    chain: list[str] = field(default_factory=list)   # the chain the request ran on (final chunk)
    k: list[int] = field(default_factory=list)
    levels: list[dict] = field(default_factory=list)  # [{name, drafted, accepted}]

    @property
    def ok(self) -> bool:
        return not self.error and self.ttft_s is not None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        return asdict(self) | {"tpot_s": self.tpot_s}

    @classmethod
    def from_dict(cls, d: dict) -> "RequestRecord":
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Slo:
    """Per-request objectives in seconds."""

    ttft_s: float
    tpot_s: float

    def met(self, r: RequestRecord) -> bool:
        if not r.ok or r.ttft_s > self.ttft_s:
            return False
        tpot = r.tpot_s
        return tpot is None or tpot <= self.tpot_s


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default method); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Iterable[float], quantiles: Sequence[int] = QUANTILES) -> dict:
    """`{"n", "mean", "p50", "p90", "p99"}`; None for the statistics of no values."""
    xs = [v for v in values if v is not None]
    out: dict = {"n": len(xs), "mean": sum(xs) / len(xs) if xs else None}
    for q in quantiles:
        out[f"p{q}"] = percentile(xs, q) if xs else None
    return out


def slo_attainment(records: Sequence[RequestRecord], slo: Slo) -> float | None:
    """Fraction of requests meeting their SLO; None for no requests."""
    if not records:
        return None
    return sum(slo.met(r) for r in records) / len(records)


def goodput(records: Sequence[RequestRecord], slo: Slo, wall_s: float) -> float:
    """Requests meeting their SLO per second of `wall_s`."""
    return sum(slo.met(r) for r in records) / wall_s if wall_s > 0 else 0.0


def acceptance(records: Iterable[RequestRecord]) -> dict[str, dict]:
    """Per level name, summed over requests: `{drafted, accepted, rate}` (rate = accepted / drafted)."""
    totals: dict[str, dict] = {}
    for r in records:
        for level in r.levels:
            t = totals.setdefault(level["name"], {"drafted": 0, "accepted": 0})
            t["drafted"] += int(level.get("drafted", 0))
            t["accepted"] += int(level.get("accepted", 0))
    for t in totals.values():
        t["rate"] = t["accepted"] / t["drafted"] if t["drafted"] else None
    return totals


def chain_label(chain: Sequence[str], k: Sequence[int]) -> str:
    """`drafter,target k=4` (k per proposing level); `?` when the chain was not reported."""
    if not chain:
        return "?"
    return ",".join(chain) + (f" k={'/'.join(map(str, k))}" if k else "")


def chain_counts(records: Iterable[RequestRecord]) -> dict[str, int]:
    """How many requests ran on each chain and k (`"drafter,target k=4"`)."""
    counts: dict[str, int] = {}
    for r in records:
        name = chain_label(r.chain, r.k)
        counts[name] = counts.get(name, 0) + 1
    return counts


def cell_stats(records: Sequence[RequestRecord], slo: Slo, wall_s: float) -> dict:
    """Everything the report shows for one (process, rate, mode) cell."""
    done = [r for r in records if r.ok]
    tokens = sum(r.output_tokens for r in done)
    ms = lambda xs: [1e3 * x for x in xs if x is not None]  # noqa: E731
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "wall_s": wall_s,
        "throughput_rps": len(done) / wall_s if wall_s > 0 else 0.0,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "goodput_rps": goodput(records, slo, wall_s),
        "slo_attainment": slo_attainment(records, slo),
        "ttft_ms": summary(ms(r.ttft_s for r in done)),
        "tpot_ms": summary(ms(r.tpot_s for r in done)),
        "itl_ms": summary(ms(g for r in done for g in r.itl_s)),
        "e2e_ms": summary(ms(r.e2e_s for r in done)),
        "acceptance": acceptance(done),
        "chains": chain_counts(done),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


def paired_ratios(records: Iterable[dict], twins: Iterable[dict]) -> list[float]:
    """TPOT of each of `records` over its twin's in `twins` (records as dicts, as the report
    stores them): the twin has the same round and scheduled time, and so the same prompt.
    Requests without a TPOT on either side, or whose domains differ, make no pair."""
    by_slot = {(t.get("round", 0), t["scheduled_s"]): t for t in twins}
    out = []
    for r in records:
        twin = by_slot.get((r.get("round", 0), r["scheduled_s"]))
        if twin is None or twin.get("domain") != r.get("domain"):
            continue
        a, b = r.get("tpot_s"), twin.get("tpot_s")
        if a and b:
            out.append(a / b)
    return out


def median_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000,
              seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high): the median and its percentile-bootstrap confidence interval at
    `level` (seeded, so a report rebuilt from its JSON says the same); NaNs for no values."""
    return grouped_median_ci([[x] for x in values], level, resamples, seed)


def grouped_median_ci(groups: Sequence[Sequence[float]], level: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """`median_ci` of the pooled values, resampling whole `groups` (values that share a
    condition, such as the requests of one run, are not independent draws)."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be within (0, 1), got {level}")
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        return math.nan, math.nan, math.nan
    rng = random.Random(seed)
    medians = sorted(percentile([x for g in rng.choices(groups, k=len(groups)) for x in g], 50)
                     for _ in range(resamples))
    tail = 100 * (1 - level) / 2
    return percentile([x for g in groups for x in g], 50), percentile(medians, tail), percentile(medians, 100 - tail)