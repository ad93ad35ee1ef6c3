"""Speculation depth per step (SpecServe): how many of their k drafts a round's requests verify.

Each round a chain's requests are verified by one target forward whose rows are padded to
the longest, so what a round costs depends on its batch B and its depth m (the most drafts
any request verifies): `T(m) = O + V(B, 1 + m) + m * d`, with `V` the target's verification
time (profiled once on the runner at start, a grid over batch and width, kept honest by the
ratio of measured to profiled forwards), `d` the drafting time per lockstep step (measured)
and `O` everything else in a round (measured: a round's wall time, start to start, less its
forwards and drafting). What it brings is `sum_r E_r(min(m, k_r))` tokens, with
`E_r(n) = 1 + sum_{j<n} prod_{t<=j} a_rt` from each request's conditional acceptance at
each draft position (its own counts shrunk towards the chain's pooled rate there, shrunk
towards 1/2; until the pool has 8 proposals at each position a proposal reaches one
time in five, the round takes the whole k, which is how those positions get measured). The
round takes the m in 0..max k_r with the most tokens per second (the
goodput model of SpecServe, `sum E / (T_draft(k) + T_verify(B (k + 1)))`) when it beats the
full depth by more than `margin` (10%, the model's own error: within it the k asked for
stands; on the tiny family's n-gram chain at batch 16 the model put k = 4 and the target
alone within 1% of each other, closer than one run's spread on this machine): idle, a forward's
fixed cost dominates and the whole k pays; under load, or when the drafts seldom hold, m
falls, to 0 (the target alone for that round). A request never verifies more than its
own k (the router's or the default), so the policy only ever makes a chain shallower.

Which depth a round takes changes no output: verification is exact for any number of
drafts, and seeded sampling draws by position.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch

NEUTRAL = 0.5  # acceptance before any observation
NEUTRAL_WEIGHT = 2.0  # ... worth this many proposals
EVIDENCE = 8.0  # proposals a chain's pool needs at a draft position before a round may stop short of it
REACHED = 0.2  # ... at the positions a proposal reaches at least this often
EWMA = 0.1  # weight of the newest sample in the measured costs


@dataclass
class Counts:
    """Decayed per-position counts: proposals that reached draft position j, and of them accepted there."""

    reached: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def record(self, drafted: int, accepted: int, decay: float) -> None:
        if decay < 1.0:
            self.reached = [x * decay for x in self.reached]
            self.accepted = [x * decay for x in self.accepted]
        while len(self.reached) < drafted:
            self.reached.append(0.0)
            self.accepted.append(0.0)
        for j in range(min(drafted, accepted + 1)):  # position j is reached when every earlier draft was accepted
            self.reached[j] += 1.0
            if j < accepted:
                self.accepted[j] += 1.0

    def rate(self, j: int, prior: float, weight: float) -> float:
        reached = self.reached[j] if j < len(self.reached) else 0.0
        accepted = self.accepted[j] if j < len(self.accepted) else 0.0
        return (accepted + weight * prior) / (reached + weight)


@dataclass
class VerifyProfile:
    """The target's verification forward time (seconds) over a grid of batch x width (tokens per row)."""

    batches: list[int]
    widths: list[int]
    seconds: list[list[float]]  # [batch index][width index]

    def __post_init__(self) -> None:
        if len(self.batches) < 1 or len(self.widths) < 2 or self.batches != sorted(set(self.batches)) \
                or self.widths != sorted(set(self.widths)) or len(self.seconds) != len(self.batches) \
                or any(len(row) != len(self.widths) for row in self.seconds):
            raise ValueError("a verify profile needs increasing batches, >= 2 increasing widths and a full grid")

    def __call__(self, batch: float, width: float) -> float:
        """Interpolated linearly in both (extrapolated along the nearest edge)."""
        return _lerp(self.batches, [_lerp(self.widths, row, width) for row in self.seconds], batch)


def _lerp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@torch.inference_mode()
def profile_verify(runner, max_batch: int, max_width: int, context: int = 128, repeats: int = 3) -> VerifyProfile:
    """Time the runner's `score` over a grid of batch sizes and widths on throwaway requests
    (`context` tokens each, a cache salt of their own; counters left as they were). The
    class's methods are called, not what an instance may wrap them in (a worker's tracing
    and rollback metrics see none of it)."""
    from shared.engine.sampling import SamplingParams

    ops = type(runner)
    batches = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch} | {max_batch})
    widths = sorted({w for w in (1, 2, 3, 5, 8, 12, 17) if w < max_width} | {max_width, 1, 2})
    context = max(1, min(context, runner.max_len - max(widths) - 1))
    saved = {name: getattr(runner, name) for name in ("forwards", "forward_s", "forward_tokens", "prefix_queried", "prefix_hits")}
    ids = [f"__depth-profile-{i}" for i in range(max_batch)]
    sampling = SamplingParams(cache_salt="__depth-profile")
    prompt = [(7 * i) % max(2, runner.vocab_size - 1) + 1 for i in range(context)]

    def timed(b: int, w: int) -> float:
        t0 = time.perf_counter()
        ops.score(runner, ids[:b], [prompt[:w]] * b)
        synchronize(runner.device)
        spent = time.perf_counter() - t0
        for rid in ids[:b]:
            ops.rollback(runner, rid, context)
        return spent

    try:
        for rid in ids:
            ops.prefill(runner, rid, prompt, sampling)
        for b in batches:  # a first forward of each shape allocates: a pass over the grid first
            for w in widths:
                timed(b, w)
        # the fastest of the repeats (others' work on the machine only adds), then no cell
        # cheaper than a narrower or smaller one (more work never costs less)
        grid = [[min(timed(b, w) for _ in range(repeats)) for w in widths] for b in batches]
        for i, row in enumerate(grid):
            for j in range(len(row)):
                row[j] = max([row[j]] + ([row[j - 1]] if j else []) + ([grid[i - 1][j]] if i else []))
    finally:
        for rid in ids:
            ops.release(runner, rid)
        for name, value in saved.items():
            setattr(runner, name, value)
    return VerifyProfile(batches, widths, grid)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA forward returns before it ran)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DepthPolicy:
    """Chooses each round's depth; learns acceptance and costs from what ran.

    One policy may serve several chains on one target (a server's): the target's profile,
    the round's other costs and the batch are shared; acceptance and drafting cost are kept
    per chain (`key`)."""

    def __init__(self, profile: VerifyProfile, prior_weight: float = 4.0, pool_half_life: float = 200.0,
                 request_half_life: float = 32.0, probe_every: int = 8, margin: float = 0.1) -> None:
        if prior_weight <= 0 or pool_half_life <= 0 or request_half_life <= 0 or probe_every < 1 or margin < 0:
            raise ValueError("depth policy: prior_weight and half-lives > 0, probe_every >= 1, margin >= 0")
        self.margin = margin
        self.profile = profile
        self.prior_weight = prior_weight
        self.pool_decay = 0.5 ** (1.0 / pool_half_life)
        self.request_decay = 0.5 ** (1.0 / request_half_life)
        self.probe_every = probe_every
        self.pools: dict[Hashable, Counts] = {}
        self.requests: dict[str, Counts] = {}
        self.step_s: dict[Hashable, float] = {}  # per chain: seconds per drafting step (lockstep over its requests)
        self.scale = 1.0  # measured / profiled verification time
        self.overhead_s: float | None = None  # a round's time beyond its forwards and drafting
        self.batch: int | None = None  # requests in the next round over every chain (None: the chain's own)
        self.shallow: dict[Hashable, int] = {}  # per chain: consecutive rounds at depth 0
        self.listener = None  # called with (key, depth, deepest k) after each decision (the driver's metrics)
        self._round_end: float | None = None
        self._lock = threading.Lock()
        self._round_model_s = 0.0  # this round's verification and drafting seconds so far
        self._round_s: list[float] = []  # recent round times, to tell an idle gap from a round

    # -- what ran -----------------------------------------------------------------------
    def observe_draft(self, key: Hashable, steps: int, seconds: float) -> None:
        """A chain's models drafted for one round: `steps` lockstep steps (its deepest draft)
        in `seconds`. (N-gram lookup is not reported: it costs a round the same at any depth,
        part of the round's overhead; a line through its seconds against its depth read the
        lookups that found no match, which scan the whole context, as a cost per step.)"""
        with self._lock:  # chains that share no level propose from threads of their own
            self._round_model_s += seconds
        if steps > 0:
            per = seconds / steps
            old = self.step_s.get(key)
            self.step_s[key] = per if old is None else (1 - EWMA) * old + EWMA * per

    def observe_verify(self, batch: int, width: int, seconds: float) -> None:
        """A target forward verified `batch` rows padded to `width` tokens in `seconds`."""
        self._round_model_s += seconds
        predicted = self.profile(batch, width)
        if predicted > 0:
            self.scale = (1 - EWMA) * self.scale + EWMA * min(4.0, max(0.25, seconds / predicted))

    def observe_round(self, now: float) -> None:
        """A round ended at `now` (perf_counter seconds). Its time runs from the previous
        round's end; a gap far longer than the recent rounds is an idle spell, not a cost."""
        last, self._round_end = self._round_end, now
        model_s, self._round_model_s = self._round_model_s, 0.0
        if last is None:
            return
        spent = now - last
        recent = sorted(self._round_s)
        if len(recent) >= 4 and spent > 10 * recent[len(recent) // 2]:
            return
        self._round_s = (self._round_s + [spent])[-32:]
        extra = max(0.0, spent - model_s)
        self.overhead_s = extra if self.overhead_s is None else (1 - EWMA) * self.overhead_s + EWMA * extra

    def record(self, key: Hashable, request_id: str, drafted: int, accepted: int) -> None:
        """The target's verdict on one request's drafts this round."""
        if drafted <= 0:
            return
        self.pools.setdefault(key, Counts()).record(drafted, accepted, self.pool_decay)
        self.requests.setdefault(request_id, Counts()).record(drafted, accepted, self.request_decay)

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    # -- the estimates ------------------------------------------------------------------
    def acceptance(self, key: Hashable, request_id: str, j: int) -> float:
        """Conditional acceptance at draft position j for this request."""
        pool = self.pools.get(key)
        prior = pool.rate(j, NEUTRAL, NEUTRAL_WEIGHT) if pool is not None else NEUTRAL
        own = self.requests.get(request_id)
        return own.rate(j, prior, self.prior_weight) if own is not None else prior

    def expected(self, key: Hashable, request_id: str, depth: int) -> list[float]:
        """E(n) for n = 0..depth: tokens a verification of n drafts emits, in expectation."""
        out, chance = [1.0], 1.0
        for j in range(depth):
            chance *= self.acceptance(key, request_id, j)
            out.append(out[-1] + chance)
        return out

    def measured(self, key: Hashable, depth: int) -> bool:
        """Whether the chain's pool has EVIDENCE proposals at every draft position up to
        `depth` that a proposal reaches one time in five or more (the rates at positions it
        never verified are only the prior: a round that stopped short of them would never
        learn otherwise; the counts decay, so a position left unverified is measured again
        after a while)."""
        pool = self.pools.get(key)
        if pool is None:
            return False
        chance = 1.0
        for j in range(depth):
            if chance < REACHED:
                return True
            if j >= len(pool.reached) or pool.reached[j] < EVIDENCE:
                return False
            chance *= pool.rate(j, NEUTRAL, NEUTRAL_WEIGHT)
        return True

    def round_seconds(self, key: Hashable, batch: int, depth: int) -> float:
        """Predicted wall time of a round of `batch` requests at `depth`."""
        return (self.overhead_s or 0.0) + self.scale * self.profile(batch, 1 + depth) + depth * self.step_s.get(key, 0.0)

    # -- the decision -------------------------------------------------------------------
    def depths(self, key: Hashable, caps: dict[str, int], batch: int = 0) -> dict[str, int]:
        """Drafts each request verifies this round: min(its cap, the round's depth); `batch`:
        the chain's requests this round (with those the policy does not steer)."""
        deepest = max(caps.values(), default=0)
        if deepest <= 0:
            return dict(caps)
        best = self._depth(key, caps, batch, deepest) if self.measured(key, deepest) else deepest  # else: measure it
        if self.listener is not None:
            self.listener(key, best, deepest)
        return {rid: min(cap, best) for rid, cap in caps.items()}

    def _depth(self, key: Hashable, caps: dict[str, int], batch: int, deepest: int) -> int:
        batch = max(self.batch or 0, batch, len(caps))
        others = batch - len(caps)  # rows of other chains in the same forward: a token each at least
        gains = [self.expected(key, rid, cap) for rid, cap in caps.items()]
        rates = [(others + sum(g[min(m, len(g) - 1)] for g in gains)) / max(self.round_seconds(key, batch, m), 1e-9)
                 for m in range(deepest + 1)]
        best = max(range(deepest + 1), key=lambda m: (rates[m], -m))
        if rates[best] < rates[deepest] * (1 + self.margin):  # within the model's error: the k asked for
            best = deepest
        if best == 0:
            self.shallow[key] = self.shallow.get(key, 0) + 1
            if self.shallow[key] >= self.probe_every:  # keep the acceptance measured
                self.shallow[key], best = 0, 1
        else:
            self.shallow[key] = 0
        return best
