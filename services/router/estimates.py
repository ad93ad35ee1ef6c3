"""What the router believes about the models: acceptance per pair and class, step time per model.

Fed by the drivers' feedback (`Outcome`, `StepProfile`) and, at start, by the history in
PostgreSQL. Every estimate starts from a prior and is smoothed:

- acceptance alpha of a proposer -> verifier pair on a request class, and the tokens a
  verification of k drafts emits from the conditional acceptance at each position: the geometric
  maximum-likelihood estimate from per-position counts (accepted at position j over the
  proposals that reached position j), plus, on sampled positions, the expected acceptance
  1 - TV(p, q) the verifier measured there (the same quantity without the coin flips'
  noise), with counts decayed by `half_life_tokens` (an EWMA in drafted tokens) and shrunk
  towards a neutral prior; and the chance that a proposal goes on to each position at all
  (an n-gram match can end before k), from requests whose k reached past it;
- a bottom proposer's draft rate (proposals per verification: an n-gram drafter finds no
  match on some rounds), from outcomes whose verifier is the target;
- step time of a model as a function of the tokens one forward writes (batch x chunk):
  weighted least squares `ms = a + b * tokens` over the recent samples (SpecServe's
  `T_verify(B * (k + 1))`), a size-based prior until samples arrive;
- the driver's own work per round (commits, streaming, bookkeeping) against the requests in
  the round, and the NATS round trip of a level call against the load: both measured by the
  drivers (pseudo-models `driver` and `hop` in the step profiles) and fitted like step times;
- the current load: requests live on each target worker;
- calibration: realised TPOT over the cost model's prediction per (chain, load bucket),
  which absorbs what the formula leaves out (state-service and gateway work per commit, the
  remote-level approximation); a chain not yet measured at this load borrows the mean
  ratio of the chains that were. The error depends on k too (a round's fixed costs are
  spread over the tokens it emits), so each (chain, k, load bucket) measured keeps its
  own ratio, shrunk towards its chain's (`K_PRIOR_WEIGHT` outcomes' worth);
- what ran, per (chain, k, load bucket) and per class there: the realised TPOT, the time
  per target round (`round_time`), the share of those rounds at each depth (the per-round
  depth policy, `shared/engine/depth.py`, verifies fewer than k drafts at some) and the load
  those ran under (EWMAs), which the decision compares (services/router/decision.py
  `realised_cost`). A round the policy held at depth 0 is no draft-rate trial, and a
  proposal it cut short is no continuation trial;
- per chain and class, what its rounds emitted against the model's tokens per round
  (`Emitted`), which corrects the latter in `realised_cost`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from shared.engine.build import canonical
from shared.messages import DRIVER, HOP, LevelOutcome, ModelStep, Outcome, StepProfile

NEUTRAL_ALPHA = 0.5
PRIOR_TRIALS = 20.0  # the prior weighs like this many draft positions
NGRAM_DRAFT_RATE = 0.5
CONTINUATION_PRIOR = 2.0  # a proposal goes on to the next position: worth this many observations
K_PRIOR_WEIGHT = 2.0  # a (chain, k) calibration starts from its chain's ratio, worth this many outcomes
PRIOR_SLOPE = 0.05  # extra fraction of a one-token step per token written (CPU, small models)
LOAD_STALE_S = 3.0  # no profile from a worker for this long: it is idle
MAX_BATCHES = 4096  # load samples kept for `held_batch` (one per profile: ~1/s per busy worker)
DRIVER_PRIOR_MS = 0.3  # the driver's work per round before any measurement
# What a (chain, k) realised in a class at a load: the mean of its first outcomes, then an EWMA
# of this weight (about the last 1 / REALISED_WEIGHT). bench adaptive, bench family, 16 in
# flight: one chain's tokens/s moves by 5-10% from one 10 s run to the next of the same
# configuration (235, 219, 214 tok/s for `ngram,target`; 194, 223, 202 for
# `drafter-prose,target`), and an EWMA of 0.2 over a class's ~12 outcomes per run kept the
# last run alone: the router took `drafter-prose,target` after its lucky run, at 0.90x.
REALISED_WEIGHT = 0.05
EMITTED_PRIOR_TOKENS = 200.0  # a chain's emitted/modelled ratio in a class starts at 1, worth this many tokens
TRAFFIC_WINDOW = 64.0  # a class's share of requests: over about this many of the latest outcomes


def conditional_counts(level: LevelOutcome) -> tuple[float, float]:
    """(accepted, trials): draft positions accepted and positions reached, over a request's proposals.

    Position 0 is reached by every proposal; position j > 0 by the proposals that had
    j drafts accepted and drafted at least j + 1. Under i.i.d. acceptance alpha,
    accepted / trials is alpha's maximum-likelihood estimate (accepted / drafted is not:
    it falls with k).
    """
    acc, dra = list(level.accepted_per_pos), list(level.drafted_per_pos)
    if not dra:
        return float(level.accepted), float(level.drafted)
    acc += [0] * (len(dra) - len(acc))
    trials = dra[0] + sum(min(acc[j - 1], dra[j]) for j in range(1, len(dra)))
    return float(sum(acc[: len(dra)])), float(trials)


@dataclass
class Acceptance:
    """Smoothed acceptance of one proposer -> verifier pair on one request class."""

    prior: float = NEUTRAL_ALPHA
    accepted: float = 0.0  # decayed counts
    trials: float = 0.0
    accepted_per_pos: list[float] = field(default_factory=list)
    reached_per_pos: list[float] = field(default_factory=list)
    observations: int = 0
    drafted_total: int = 0
    overlap: float = 0.0  # decayed sum of 1 - TV over sampled draft positions
    overlap_positions: float = 0.0
    # at position j >= 1: proposals that drafted position j, over those that drafted j - 1 with
    # k > j (an n-gram match can end before k; a model drafter drafts all k)
    continued_per_pos: list[float] = field(default_factory=list)
    continuable_per_pos: list[float] = field(default_factory=list)

    def observe(self, level: LevelOutcome, half_life_tokens: float, k: int | None = None,
                depths: list[int] | None = None) -> None:
        """One request's verifications of this pair; `depths`: its rounds by the drafts the
        per-round depth policy allowed (`Outcome.depths`), when the policy steered it."""
        accepted, trials = conditional_counts(level)
        if trials <= 0:
            return
        decay = 0.5 ** (level.drafted / half_life_tokens)
        self._observe_continuation(list(level.drafted_per_pos), k, decay, depths)
        self.accepted = self.accepted * decay + accepted
        self.trials = self.trials * decay + trials
        if level.overlap_positions > 0 and 0 <= level.overlap <= level.overlap_positions:
            self.overlap = self.overlap * decay + level.overlap
            self.overlap_positions = self.overlap_positions * decay + level.overlap_positions
        else:
            self.overlap *= decay
            self.overlap_positions *= decay
        acc, dra = list(level.accepted_per_pos), list(level.drafted_per_pos)
        reached = [dra[0]] + [min(acc[j - 1], dra[j]) for j in range(1, len(dra))] if dra else []
        n = max(len(reached), len(self.reached_per_pos))
        for arr in (self.accepted_per_pos, self.reached_per_pos):
            arr.extend([0.0] * (n - len(arr)))
            for j in range(n):
                arr[j] *= decay
        for j, r in enumerate(reached):
            self.reached_per_pos[j] += r
            self.accepted_per_pos[j] += acc[j] if j < len(acc) else 0
        self.observations += 1
        self.drafted_total += level.drafted

    def _observe_continuation(self, drafted: list[int], k: int | None, decay: float,
                              depths: list[int] | None = None) -> None:
        """Decay the continuation counts; add this request's when its k is known (a history row has none).

        Under the depth policy a proposal that stopped at position j may have been cut there:
        of the proposals that drafted position j - 1, those whose round allowed position j
        count (taken as the share of rounds allowing j among those allowing j - 1), so the
        policy's cuts do not pass for the proposer's own (an n-gram match ending).
        """
        for arr in (self.continued_per_pos, self.continuable_per_pos):
            for j in range(len(arr)):
                arr[j] *= decay
        if not k or not drafted:
            return
        allowed = reaching(depths, k)  # rounds whose depth allowed position j, where steered
        for arr in (self.continued_per_pos, self.continuable_per_pos):
            arr.extend([0.0] * (k - len(arr)))
        for j in range(1, k):
            before = drafted[j - 1] if j - 1 < len(drafted) else 0
            if allowed is not None:
                before = before * allowed[j] / allowed[j - 1] if allowed[j - 1] > 0 else 0.0
            self.continuable_per_pos[j] += before
            self.continued_per_pos[j] += min(before, drafted[j] if j < len(drafted) else 0)

    def continuation(self, j: int) -> float:
        """P(a proposal drafts position j | it drafted position j - 1 and k > j), 1 at j = 0; prior 1."""
        if j <= 0 or j >= len(self.continuable_per_pos):
            return 1.0
        return (self.continued_per_pos[j] + CONTINUATION_PRIOR) / (self.continuable_per_pos[j] + CONTINUATION_PRIOR)

    @property
    def alpha(self) -> float:
        """Per-token acceptance from realised and expected (1 - TV) acceptance, shrunk towards the prior; in [0.01, 0.99]."""
        value = (self.accepted + self.overlap + self.prior * PRIOR_TRIALS) / (
            self.trials + self.overlap_positions + PRIOR_TRIALS)
        return min(0.99, max(0.01, value))

    def expected_tokens(self, k: int) -> float:
        """Tokens one verification of k drafts emits: 1 + sum over j < k of P(the first j + 1 drafted and accepted).

        Uses the conditional acceptance measured at each position (accepted there over proposals
        that reached it), shrunk towards `alpha`: an n-gram match that survives its first token
        tends to survive the next (measured here: 0.48 at position 0, 0.66 at 1, 0.83 at 4), which
        the geometric E(alpha, k) misses; and the chance that a proposal drafts position j at
        all (`continuation`): an n-gram match can end before k, and a deeper k then buys
        nothing. Without per-position data it is E(alpha, k).
        """
        alpha = self.alpha
        total, reach = 1.0, 1.0
        for j in range(max(0, k)):
            accepted = self.accepted_per_pos[j] if j < len(self.accepted_per_pos) else 0.0
            reached = self.reached_per_pos[j] if j < len(self.reached_per_pos) else 0.0
            reach *= self.continuation(j) * min(0.99, (accepted + alpha * PRIOR_TRIALS) / (reached + PRIOR_TRIALS))
            total += reach
        return total

    @property
    def expected(self) -> float | None:
        """Mean 1 - TV over the sampled positions seen (None when every request was greedy)."""
        return self.overlap / self.overlap_positions if self.overlap_positions > 1e-9 else None

    def per_position(self) -> list[float | None]:
        return [round(a / r, 4) if r > 0.5 else None for a, r in zip(self.accepted_per_pos, self.reached_per_pos)]

    def continuation_per_position(self) -> list[float]:
        return [round(self.continuation(j), 4) for j in range(len(self.continuable_per_pos))]


@dataclass
class DraftRate:
    """Proposals per verification of a bottom proposer on a class (n-gram: matches found)."""

    prior: float = 1.0
    proposals: float = 0.0
    rounds: float = 0.0

    def observe(self, proposals: int, rounds: int, half_life_rounds: float) -> None:
        decay = 0.5 ** (rounds / half_life_rounds)
        self.proposals = self.proposals * decay + proposals
        self.rounds = self.rounds * decay + rounds

    @property
    def value(self) -> float:
        return min(1.0, max(0.01, (self.proposals + self.prior * 10) / (self.rounds + 10)))


@dataclass
class StepTime:
    """A model's forward time as a function of the tokens the forward writes: ms = a + b * tokens."""

    prior_ms: float
    samples: deque = field(default_factory=lambda: deque(maxlen=120))  # (tokens, ms, weight)
    _fit: tuple[float, float] | None = None

    def observe(self, tokens: float, ms: float, weight: float) -> None:
        if ms > 0 and tokens > 0 and weight > 0 and math.isfinite(ms):
            self.samples.append((float(tokens), float(ms), float(weight)))
            self._fit = None

    def fit(self) -> tuple[float, float]:
        """(a, b) of the weighted least-squares line; the prior's slope when tokens barely vary."""
        if self._fit is None:
            self._fit = self._least_squares()
        return self._fit

    def _least_squares(self) -> tuple[float, float]:
        if not self.samples:
            return self.prior_ms * (1 - PRIOR_SLOPE), self.prior_ms * PRIOR_SLOPE
        w = sum(s[2] for s in self.samples)
        mx = sum(s[0] * s[2] for s in self.samples) / w
        my = sum(s[1] * s[2] for s in self.samples) / w
        sxx = sum(s[2] * (s[0] - mx) ** 2 for s in self.samples)
        sxy = sum(s[2] * (s[0] - mx) * (s[1] - my) for s in self.samples)
        spread = sxx / w
        slope = sxy / sxx if spread > 0.25 else my / max(mx, 1.0) * PRIOR_SLOPE
        slope = max(0.0, slope)
        intercept = my - slope * mx
        if intercept < 0.05 * my:  # a line through (nearly) the origin: keep a fixed cost
            intercept = 0.05 * my
            slope = (my - intercept) / max(mx, 1.0)
        return intercept, slope

    def ms(self, tokens: float) -> float:
        a, b = self.fit()
        return a + b * max(tokens, 1.0)


def prior_step_ms(params: int | None) -> float:
    """A forward's time before any measurement: fixed overhead plus fp32 weights streamed at ~6 GB/s."""
    if not params:
        return 1.0
    return 0.6 + params * 4 / 6e6


def valid_depths(depths) -> list[int] | None:
    """`Outcome.depths` when it describes some rounds (non-negative counts, not all zero), else None."""
    if not depths or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in depths) or sum(depths) <= 0:
        return None
    return list(depths)


def reaching(depths: list[int] | None, k: int) -> list[int] | None:
    """Per position j < k, the rounds whose depth allowed a draft there (None: not steered)."""
    depths = valid_depths(depths)
    if depths is None:
        return None
    return [sum(depths[j + 1:]) for j in range(k)]


def depth_shares(depths: list[int] | None, k: int) -> list[float]:
    """The share of rounds at each depth 0..k; a request the policy did not steer took k in every round."""
    depths = valid_depths(depths)
    if depths is None:
        return [0.0] * k + [1.0]
    shares = [0.0] * (k + 1)
    total = sum(depths)
    for m, n in enumerate(depths):
        shares[min(m, k)] += n / total
    return shares


@dataclass
class Emitted:
    """Tokens a chain's target rounds emitted in one class against the model's tokens per round
    for them (decayed sums over its outcomes, every k and load).

    The model's per-position counts miss what does not factor by position: it takes going on
    to the next position (an n-gram match that does not end) as independent of the drafts
    before being accepted, while a match whose first drafts are accepted (the text repeats)
    tends to go on longer. Bench family, per-round depth on, 16 in flight: `ngram,target`'s
    rounds emitted 1.35-1.72 tokens where the model said 1.29-1.58 (the drafter chains
    within 3%), which put it behind `drafter-code,target` that realised the same TPOT.
    Pooled over k and load, a prompt's luck does not pick a k.
    """

    realised: float = 0.0  # tokens after each request's first
    modelled: float = 0.0  # rounds x the model's tokens per round at the time

    def observe(self, tokens: float, rounds: float, per_round: float, half_life_tokens: float) -> None:
        if tokens <= 0 or rounds <= 0 or per_round <= 0 or not math.isfinite(per_round):
            return
        decay = 0.5 ** (tokens / half_life_tokens)
        self.realised = self.realised * decay + tokens
        self.modelled = self.modelled * decay + rounds * per_round

    def ratio(self) -> float:
        """Emitted over modelled, shrunk to 1 by `EMITTED_PRIOR_TOKENS`, within [1/2, 2]."""
        value = (self.realised + EMITTED_PRIOR_TOKENS) / (self.modelled + EMITTED_PRIOR_TOKENS)
        return min(2.0, max(0.5, value))


BUCKET_FROM = (1.0, 1.5, 2.5, 5.5, 11.5)  # where each load bucket starts: batch 1, 2, 3-5, 6-11, 12 and more
BUCKET_BATCH = (1.0, 2.0, 4.0, 8.0, 16.0)  # a batch in each load bucket


def load_bucket(batch: float) -> int:
    """Load buckets for calibration: batch 1, 2, 3-5, 6-11, 12 and more."""
    return sum(batch >= start for start in BUCKET_FROM[1:])


@dataclass
class Calibration:
    """Realised TPOT over predicted TPOT for one (chain, load bucket), decayed."""

    ratio_sum: float = 0.0
    weight: float = 0.0
    tpot_ms: float | None = None  # EWMA of realised TPOT
    batch: float | None = None  # EWMA of the load those outcomes ran under (same weights as `tpot_ms`)
    round_ms: float | None = None  # EWMA of the time per target round (TPOT x tokens per round), where known
    # EWMA (same weights as `round_ms`) of the share of those rounds at each depth 0..k: the
    # per-round depth policy verifies fewer drafts at some rounds (`depth_shares`)
    depths: list[float] | None = None
    observations: int = 0
    rounds_seen: int = 0  # observations with a round time
    updated: float | None = None  # time.monotonic() of the newest observation

    def observe(self, realised_ms: float, predicted_ms: float, decay: float = 0.9, batch: float = 1.0,
                round_ms: float | None = None, depths: list[float] | None = None) -> None:
        if predicted_ms <= 0 or realised_ms <= 0:
            return
        self.observations += 1
        w = max(1.0 / self.observations, REALISED_WEIGHT)  # the mean of the first ones, then an EWMA
        if round_ms is not None and round_ms > 0 and math.isfinite(round_ms):
            self.rounds_seen += 1
            v = max(1.0 / self.rounds_seen, REALISED_WEIGHT)
            self.round_ms = round_ms if self.round_ms is None else (1 - v) * self.round_ms + v * round_ms
            if depths is not None:
                if self.depths is None or len(self.depths) != len(depths):
                    self.depths = list(depths)
                else:
                    self.depths = [(1 - v) * a + v * b for a, b in zip(self.depths, depths)]
        ratio = min(8.0, max(0.125, realised_ms / predicted_ms))
        self.ratio_sum = self.ratio_sum * decay + ratio
        self.weight = self.weight * decay + 1.0
        self.tpot_ms = realised_ms if self.tpot_ms is None else (1 - w) * self.tpot_ms + w * realised_ms
        self.batch = batch if self.batch is None else (1 - w) * self.batch + w * batch
        self.updated = time.monotonic()

    def needs_outcomes(self, until: int, stale_s: float) -> bool:
        """Fewer than `until` observations, or none for `stale_s` seconds."""
        return self.observations < until or self.updated is None or time.monotonic() - self.updated > stale_s

    def ratio(self, prior: float = 1.0) -> float:
        return (self.ratio_sum + prior) / (self.weight + 1.0)  # one pseudo-observation at the prior


class Estimates:
    """Every estimate the cost model needs, updated from feedback; no I/O."""

    def __init__(self, half_life_tokens: float = 2000.0, profile_window: int = 120, hop_ms: float = 0.4,
                 params: dict[str, int] | None = None, alpha_priors: dict[tuple[str, str, str], float] | None = None):
        self.half_life_tokens = half_life_tokens
        self.profile_window = profile_window
        self.hop_prior_ms = hop_ms
        self.params = dict(params or {})
        self.alpha_priors = dict(alpha_priors or {})
        self.acceptance: dict[tuple[str, str, str], Acceptance] = {}
        self.draft_rates: dict[tuple[str, str], DraftRate] = {}
        self.steps: dict[str, StepTime] = {}
        self.calibration: dict[tuple[tuple[str, ...], int], Calibration] = {}
        self.calibration_k: dict[tuple[tuple[str, ...], tuple[int, ...], int], Calibration] = {}
        self.ran: set[tuple[tuple[str, ...], tuple[int, ...]]] = set()  # (chain, ks) with an outcome at some load
        self.calibration_class: dict[tuple[tuple[str, ...], tuple[int, ...], int, str], Calibration] = {}
        self.load: dict[str, tuple[float, int, int]] = {}  # worker -> (when, live, waiting)
        self.batches: deque[tuple[float, float]] = deque()  # (when, batch) at each profile, for `held_batch`
        self.traffic: dict[str, float] = {}  # class -> its decayed count of recent outcomes (`shares`)
        self.emitted: dict[tuple[tuple[str, ...], str], Emitted] = {}  # (chain, class): tokens a round emitted vs the model
        self.outcomes = 0
        self.version = 0  # counts the observations: a decision from the same version and load is the same
        self.profiles = 0

    # -- reading -------------------------------------------------------------------------
    def pair(self, proposer: str, verifier: str, request_class: str) -> Acceptance:
        key = (canonical(proposer), canonical(verifier), request_class)
        if key not in self.acceptance:
            self.acceptance[key] = Acceptance(prior=self.alpha_priors.get(key, NEUTRAL_ALPHA))
        return self.acceptance[key]

    def alpha(self, proposer: str, verifier: str, request_class: str) -> float:
        return self.pair(proposer, verifier, request_class).alpha

    def expected_tokens(self, proposer: str, verifier: str, request_class: str, k: int) -> float:
        return self.pair(proposer, verifier, request_class).expected_tokens(k)

    def draft_rate(self, proposer: str, request_class: str) -> float:
        key = (canonical(proposer), request_class)
        if key not in self.draft_rates:
            self.draft_rates[key] = DraftRate(prior=NGRAM_DRAFT_RATE if proposer == "ngram" else 1.0)
        return self.draft_rates[key].value

    def step(self, model: str) -> StepTime:
        model = canonical(model)
        if model not in self.steps:
            priors = {DRIVER: DRIVER_PRIOR_MS, HOP: self.hop_prior_ms}
            prior = priors[model] if model in priors else prior_step_ms(self.params.get(model))
            self.steps[model] = StepTime(prior, deque(maxlen=self.profile_window))
        return self.steps[model]

    def hop(self, batch: float) -> float:
        """One level call's cost beyond the replica's forwards at this load (ms)."""
        return self.step(HOP).ms(batch)

    def driver_ms(self, batch: float) -> float:
        """The driver's own work in one round of `batch` requests (ms)."""
        return self.step(DRIVER).ms(batch)

    def step_ms(self, model: str, tokens: float) -> float:
        return self.step(model).ms(tokens)

    def calibration_for(self, chain: tuple[str, ...], batch: float) -> Calibration:
        key = (tuple(canonical(c) for c in chain), load_bucket(batch))
        if key not in self.calibration:
            self.calibration[key] = Calibration()
        return self.calibration[key]

    def calibration_ratio(self, chain: tuple[str, ...], batch: float, ks: tuple[int, ...] | None = None) -> float:
        """Realised/predicted for this chain (and these ks) at this load.

        The chain's prior is the mean over the chains measured here; the ks' prior is the chain's."""
        chain_ratio = self._chain_ratio(chain, batch)
        if not ks:
            return chain_ratio
        mine = self.calibration_k.get(self._k_key(chain, ks, batch))
        if mine is None or mine.weight <= 0:
            return chain_ratio
        return (mine.ratio_sum + K_PRIOR_WEIGHT * chain_ratio) / (mine.weight + K_PRIOR_WEIGHT)

    def realised_tpot(self, chain: tuple[str, ...], ks: tuple[int, ...], batch: float,
                      request_class: str = "") -> float | None:
        """Recent realised TPOT of this chain with these ks at this load (EWMA), None if never run there.

        With a class, the class's own, from its first outcome: code and prose, short and long
        prompts, do not cost the same on one chain (bench family, idle: `drafter-prose,target`
        5.6 ms per token on short prose, 14-16 on long code), so another class's TPOT is no
        estimate of this one's; `ran_here` says whether the model's calibration has outcomes.
        """
        realised = self.realised(chain, ks, batch, request_class)
        return None if realised is None else realised.tpot_ms

    def realised(self, chain: tuple[str, ...], ks: tuple[int, ...], batch: float,
                 request_class: str = "") -> Calibration | None:
        """The outcomes behind `realised_tpot` (their TPOT and the mean load they ran under), None if none."""
        key = self._k_key(chain, ks, batch)
        realised = self.calibration_class.get((*key, request_class)) if request_class else self.calibration_k.get(key)
        return realised if realised is not None and realised.observations > 0 else None

    def emitted_ratio(self, chain: tuple[str, ...], request_class: str) -> float:
        """What the chain's rounds emitted in the class over the model's tokens per round (1: none seen)."""
        seen = self.emitted.get((tuple(chain), request_class))
        return seen.ratio() if seen is not None else 1.0

    def observe_emitted(self, chain: tuple[str, ...], request_class: str, tokens: int, rounds: int | None,
                        per_round: float) -> None:
        """One outcome's tokens after the first over its target rounds, against the model's
        tokens per round for it (`decision.tokens_per_round` at the depths its rounds took)."""
        self.version += 1
        if rounds is None or rounds <= 0 or tokens < 2:
            return
        self.emitted.setdefault((tuple(chain), request_class), Emitted()).observe(
            tokens - 1, rounds, per_round, self.half_life_tokens)

    def ran_here(self, chain: tuple[str, ...], ks: tuple[int, ...], batch: float) -> bool:
        """Whether this chain with these ks has an outcome at this load, in any class."""
        mine = self.calibration_k.get(self._k_key(chain, ks, batch))
        return mine is not None and mine.observations > 0

    def depth_calibration(self, chain: tuple[str, ...], ks: tuple[int, ...], batch: float) -> Calibration:
        """The realised outcomes of this chain with these ks at this load (empty if none)."""
        return self.calibration_k.get(self._k_key(chain, ks, batch)) or Calibration()

    def ratio_nearest(self, chain: tuple[str, ...], ks: tuple[int, ...], batch: float,
                      request_class: str = "") -> float | None:
        """Realised over modelled TPOT of this (chain, k) at the nearest load bucket it ran at
        (the nearer lower one on a tie), the class's own where it has one there, else every
        class's; None if it never ran, or ran here (`ran_here`).

        A load where little has run yet (a lull after a slow chain's wave, a burst) should not
        leave the target alone against the few chains that ran there: a (chain, k) that ran
        at another load competes at the model's prediction here times what it realised over
        the model's prediction there: the model carries the load, the ratio the chain's error.
        """
        if self.ran_here(chain, ks, batch):
            return None
        here = load_bucket(batch)
        chain = tuple(canonical(c) for c in chain)
        for distance in range(1, len(BUCKET_BATCH)):
            for bucket in (here - distance, here + distance):
                if not 0 <= bucket < len(BUCKET_BATCH):
                    continue
                key = (chain, tuple(ks), bucket)
                own = self.calibration_class.get((*key, request_class)) if request_class else None
                realised = own if own is not None and own.weight > 0 else self.calibration_k.get(key)
                if realised is not None and realised.weight > 0:
                    return realised.ratio_sum / realised.weight
        return None

    @staticmethod
    def _k_key(chain: tuple[str, ...], ks: tuple[int, ...], batch: float) -> tuple:
        return tuple(canonical(c) for c in chain), tuple(ks), load_bucket(batch)

    def _chain_ratio(self, chain: tuple[str, ...], batch: float) -> float:
        """The chain's realised/modelled ratio at this load, its prior the mean of the chains
        measured here; where none is, the chain's own at other loads; where it never ran (the
        target alone at a load only chains ran at), the chains' at the nearest load measured:
        the model's error there, not none (a model taken raw beside chains carrying theirs
        would win on its optimism alone)."""
        bucket = load_bucket(batch)
        here = [c for (ch, b), c in self.calibration.items() if b == bucket and c.weight > 0]
        mine = [] if here else [c for (ch, b), c in self.calibration.items() if ch == tuple(chain) and c.weight > 0]
        if here:
            prior = sum(c.ratio_sum for c in here) / sum(c.weight for c in here)
        elif mine:
            prior = sum(c.ratio_sum for c in mine) / sum(c.weight for c in mine)
        else:
            prior = self._nearest_ratio(bucket)
        return self.calibration_for(chain, batch).ratio(prior)

    def _nearest_ratio(self, bucket: int) -> float:
        """The mean realised/modelled ratio over the chains at the nearest load bucket measured (1 if none)."""
        for distance in range(1, len(BUCKET_BATCH)):
            for b in (bucket - distance, bucket + distance):
                there = [c for (ch, bb), c in self.calibration.items() if bb == b and c.weight > 0]
                if there:
                    return sum(c.ratio_sum for c in there) / sum(c.weight for c in there)
        return 1.0

    def batch(self, now: float | None = None) -> float:
        """Mean requests live per busy target worker (1 when idle)."""
        now = time.monotonic() if now is None else now
        live = [v[1] for v in self.load.values() if now - v[0] <= LOAD_STALE_S]
        return max(1.0, sum(live) / len(live)) if live else 1.0

    def targets(self, now: float | None = None) -> int:
        """Target workers that reported their load lately."""
        now = time.monotonic() if now is None else now
        return sum(now - v[0] <= LOAD_STALE_S for v in self.load.values())

    def held_batch(self, hold_s: float, now: float | None = None) -> float:
        """The highest batch seen in the last `hold_s` seconds (at least the current one).

        While it is at the shared-chain batch the router keeps its under-load rules through
        a lull of a loaded period: requests arriving together at the end of one take the
        table of that moment and keep it for their whole life.
        """
        now = time.monotonic() if now is None else now
        while self.batches and now - self.batches[0][0] > hold_s:
            self.batches.popleft()
        return max([self.batch(now), *(b for _, b in self.batches)])

    # -- learning ------------------------------------------------------------------------
    def observe_level(self, level: LevelOutcome, request_class: str, rounds: int | None = None,
                      k: int | None = None, depths: list[int] | None = None) -> None:
        """One request's verifications of a level; `rounds`: the target's, when it verifies the
        level; `depths`: the request's rounds by the drafts the depth policy allowed (the
        level right below the target only)."""
        self.version += 1
        depths = valid_depths(depths)
        self.pair(level.name, level.verifier, request_class).observe(level, self.half_life_tokens, k, depths)
        if rounds is not None and depths is not None:
            rounds -= min(rounds, depths[0])  # a round held at depth 0 gave the proposer no chance to draft
        if rounds is not None and rounds > 0:
            proposals = level.drafted_per_pos[0] if level.drafted_per_pos else 0
            self.draft_rate(level.name, request_class)
            self.draft_rates[(canonical(level.name), request_class)].observe(
                min(proposals, rounds), rounds, self.half_life_tokens / 4)

    @staticmethod
    def rounds(outcome: Outcome, level: LevelOutcome) -> int | None:
        """Verifications the target ran, for the level it verifies directly (else None)."""
        if level.verifier != "target" or outcome.tokens < 2:
            return None
        return max(0, outcome.tokens - 1 - level.accepted)

    def observe_outcome(self, outcome: Outcome) -> None:
        self.version += 1
        self.outcomes += 1
        chain = [canonical(c) for c in outcome.chain]
        for level in outcome.levels:
            name = canonical(level.name)
            bottom = chain and name == chain[0]
            at = chain.index(name) if name in chain else -1
            k = outcome.k[at] if 0 <= at < len(outcome.k) else None
            top = canonical(level.verifier) == "target"
            self.observe_level(level, outcome.request_class, self.rounds(outcome, level) if bottom else None, k,
                               outcome.depths if top else None)

    def observe_traffic(self, request_class: str) -> None:
        """One finished request of `request_class`: the mix of recent requests (`shares`)."""
        self.version += 1
        keep = 1.0 - 1.0 / TRAFFIC_WINDOW
        for cls in self.traffic:
            self.traffic[cls] *= keep
        self.traffic[request_class] = self.traffic.get(request_class, 0.0) + 1.0

    def shares(self, classes) -> dict[str, float]:
        """Each class's share of the recent requests among `classes` (about the last
        `TRAFFIC_WINDOW`); equal shares before any request of theirs."""
        counts = {cls: self.traffic.get(cls, 0.0) for cls in classes}
        total = sum(counts.values())
        if total <= 0:
            return {cls: 1.0 / len(counts) for cls in counts} if counts else {}
        return {cls: n / total for cls, n in counts.items()}

    def observe_step(self, step: ModelStep, batch: float | None = None) -> None:
        """One model's forwards over an interval; a remote level's 'forward' is one call."""
        self.version += 1
        if step.forwards <= 0 or step.seconds <= 0:
            return
        per_call_ms = step.seconds * 1e3 / step.forwards
        tokens_per_call = step.tokens / step.forwards
        batch = max(1.0, batch if batch is not None else step.batch_size or 1.0)
        fwd_per_call = 1.0
        if step.model not in (DRIVER, HOP) and canonical(step.model) != "target":
            # A propose call of k drafts writes feed + k tokens per request in k forwards;
            # a score call writes its chunk in one. Approximate with the propose reading:
            # calibration per chain corrects what this misses.
            fwd_per_call = max(1.0, min(16.0, tokens_per_call / batch - 1.0))
        self.step(step.model).observe(tokens_per_call / fwd_per_call, per_call_ms / fwd_per_call, step.forwards)

    def observe_profile(self, profile: StepProfile, now: float | None = None) -> None:
        self.version += 1
        self.profiles += 1
        now = time.monotonic() if now is None else now
        self.load[profile.worker] = (now, profile.live_requests, profile.waiting_requests)
        self.batches.append((now, self.batch(now)))
        if len(self.batches) > MAX_BATCHES:
            self.batches.popleft()
        for step in profile.steps:
            self.observe_step(step)

    def observe_calibration(self, chain: tuple[str, ...], batch: float, realised_ms: float, predicted_ms: float,
                            ks: tuple[int, ...] | None = None, request_class: str = "",
                            round_ms: float | None = None, depths: list[int] | None = None) -> None:
        """One outcome's realised TPOT against the model's, at the load it ran under; `round_ms`:
        its time per target round (`round_time`), when known; `depths`: its rounds by the
        drafts the depth policy allowed (`Outcome.depths`; none: every round took k)."""
        self.version += 1
        self.calibration_for(chain, batch).observe(realised_ms, predicted_ms, batch=batch)
        if ks is not None:  # () for the target alone
            key = self._k_key(chain, ks, batch)
            shares = depth_shares(depths, ks[-1] if ks else 0)
            self.calibration_k.setdefault(key, Calibration()).observe(realised_ms, predicted_ms, batch=batch,
                                                                      round_ms=round_ms, depths=shares)
            self.ran.add(key[:2])
            if request_class:
                self.calibration_class.setdefault((*key, request_class), Calibration()).observe(
                    realised_ms, predicted_ms, batch=batch, round_ms=round_ms, depths=shares)

    @staticmethod
    def round_time(tpot_ms: float, tokens: int, rounds: int | None) -> float | None:
        """A request's time per target round: its TPOT times the tokens a round emitted (the
        tokens after the first over the rounds that emitted them); None when unknown."""
        if rounds is None or rounds <= 0 or tokens < 2 or tpot_ms <= 0:
            return None
        return tpot_ms * (tokens - 1) / rounds

    @classmethod
    def target_rounds(cls, outcome: Outcome) -> int | None:
        """The target's rounds after the first token: from the level it verifies, else one per token."""
        if not outcome.levels:
            return outcome.tokens - 1 if len(outcome.chain) <= 1 else None
        top = [lv for lv in outcome.levels if canonical(lv.verifier) == "target"]
        return cls.rounds(outcome, top[0]) if len(top) == 1 else None

    # -- reporting -----------------------------------------------------------------------
    def summary(self) -> dict:
        return {
            "batch": round(self.batch(), 3),
            "outcomes": self.outcomes,
            "profiles": self.profiles,
            "step_fits": {m: {"a_ms": round(s.fit()[0], 4), "b_ms_per_token": round(s.fit()[1], 5),
                              "samples": len(s.samples), "prior_ms": round(s.prior_ms, 4)}
                          for m, s in sorted(self.steps.items())},
            "acceptance": {f"{p}->{v}@{c}": {"alpha": round(a.alpha, 4), "observations": a.observations,
                                              "one_minus_tv": None if a.expected is None else round(a.expected, 4),
                                              "drafted": a.drafted_total, "per_position": a.per_position(),
                                              "continuation": a.continuation_per_position()}
                           for (p, v, c), a in sorted(self.acceptance.items()) if a.observations},
            "calibration": {f"{','.join(ch)}@bucket{b}": {"ratio": round(c.ratio(), 4), "observations": c.observations,
                                                         "tpot_ms": None if c.tpot_ms is None else round(c.tpot_ms, 3)}
                            for (ch, b), c in sorted(self.calibration.items()) if c.observations},
            "calibration_k": {f"{','.join(ch)}{list(ks)}@bucket{b}": {"ratio": round(self.calibration_ratio(ch, BUCKET_BATCH[b], ks), 4),
                                                                     "observations": c.observations}
                              for (ch, ks, b), c in sorted(self.calibration_k.items()) if c.observations},
            # tokens a chain's rounds emitted in a class over the model's tokens per round (`Emitted`)
            "emitted": {f"{','.join(ch)}@{c}": {"ratio": round(e.ratio(), 4), "tokens": round(e.realised, 1),
                                                "modelled": round(e.modelled, 1)}
                        for (ch, c), e in sorted(self.emitted.items())},
        }
