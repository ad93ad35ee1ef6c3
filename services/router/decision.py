"""The decision: per request class, the candidate (chain, k per level) with the lowest predicted cost.

Candidates are every chain the gateway serves whose models are up, with k per proposing
level in 1..k_max, and the target alone (k = 0). Rules, in order:

1. with a TPOT objective, only candidates predicted to meet it qualify (none does: all do,
   and the reason says so);
2. the cheapest qualifying candidate wins, but speculation must beat the target alone by
   `margin` (SpecServe: never slower than no speculation; under load the target's step at
   B (k + 1) tokens grows and the target alone wins);
3. CoSine's specialist: among the drafters, the one with the best measured acceptance on
   the class is the one whose chains predict cheapest (the ranking says which);
4. exploration: with probability `explore_rate` per class and interval, another candidate
   (the least observed chain at this load first) is assigned instead for that interval,
   reason `explore`, if that chain has fewer than `explore_until` outcomes at this load or
   none for `explore_stale_s` (a known chain is not tried again and again), and is priced
   (at what it realised here, where it did) within `explore_within` of the winner: 2x for a
   chain never run here, narrowing with its outcomes here (a chain known to be slow is not
   tried again when its outcomes go stale); the router passes a rate of 0 under load
   (`router.explore_max_batch`);
   depth: with probability `explore_depth_rate` per class and interval, at any load, the
   winning chain with k one step up or down on one level (`explore_depth`), while that k has
   few or stale outcomes at this load and is priced within the same bound: only measured
   (chain, k) compete (below), so without it a chain would keep the k it first ran with;
5. under load (`router.shared_chain_batch`), one chain for every class (`shared`): a target
   round drafts every chain present, then verifies all requests in one forward, so a round
   with two chains waits for both proposals and every request in it pays for the slower.
   The chain with the lowest predicted cost over the classes, each weighted by its share of
   the recent requests (`Estimates.shares`), wins, against the
   target alone with the same margin; the chain last shared at this load stays unless
   another beats it by `switch_margin` (a switch leaves the requests in flight on the old
   chain, and rounds with both wait for both). Every class takes one k on it too, the one
   with the lowest cost so weighted (`common_k`): the round's forward pads every request's chunk
   to the longest, so one class at a deeper k makes every request pay for its width; depth
   trials then move every class at once (`explore_shared_depth`);
6. hysteresis: a class keeps the (chain, k) it last won at a load while that one is priced
   within `router.class_switch_margin` of the cheapest (`hold`).

The router decides with `measured_only` at every load: once (chain, k) have realised
outcomes, only they (and the target alone) compete: each at what it realised in this
class at this load (its rounds' time over the tokens a round emits by the class's pooled
acceptance, `realised_cost`; moved to the current batch by the model: a load bucket spans
batches); one that ran here in other classes only, at the model's prediction
for this class times what it realised over the model here (code and prose, short and long
prompts, do not cost the same on one chain: the model carries the class, the ratio the
chain's error); one that ran only at other loads at the model's prediction here times what
the chains measured here realised over their model (the model's error moves with the load
more than from chain to chain), or, where nothing ran here, times what it realised over
the model's prediction at the nearest load it ran at. The
model's prediction, calibrated from other chains or other k, is
a guess each request pays for when it is wrong (the calibration of a k never run is
borrowed from its chain's other k, and an optimistic guess is tried, found slower, and
replaced by the next one); what has not run here is reached by exploration, which draws
from the model's ranking. One exception: a k one step from a (chain, k) this class measured
here competes at that one's realised cost times the model's ratio between the two k, plus
the margin, whatever other classes or loads measured of it: the same chain, the same models
and hops, so the model only says what one more or one fewer drafted token does, where
another class's ratio carries that class's error (the model's error differs from class to
class on one chain); taken, it is measured, and its own neighbours are next (a hill climb
over k that follows the model where it gains more than the margin).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field, replace

from services.router.cost_model import Prediction, predict
from shared.engine.build import canonical, models_of

TARGET_ALONE = ("target",)
EXPLORE_WITHIN = 2.0  # explore only chains priced within this factor of the winner (one never run here)


def explore_within(outcomes: int) -> float:
    """How far above the winner's price a chain (or k) may be priced and still be tried, given
    its `outcomes` at this load: `EXPLORE_WITHIN` for one never run here, narrowing as
    1/sqrt(1 + outcomes) (an upper confidence bound: what has run here is priced by what it
    realised, and its price is known the better the more it ran).

    Without it a chain known to be slow was tried again whenever its outcomes went stale: on
    the bench family at one request in flight, `drafter-prose,target` (0.67x the tokens/s of
    `ngram,target`, both measured there) took 4 of adaptive's 80 requests in one low phase.
    A chain within 2x with 10 outcomes is tried only within 1.30x, with 3 within 1.5x.
    """
    return 1.0 + (EXPLORE_WITHIN - 1.0) / math.sqrt(1.0 + max(0, outcomes))


def served_chains() -> list[tuple[str, ...]]:
    """The gateway's served chains (services/gateway/backend.py), canonical names, without repeats."""
    from services.gateway.backend import NatsBackend

    out: list[tuple[str, ...]] = []
    for chain in NatsBackend.chains(NatsBackend.__new__(NatsBackend)):
        key = tuple(canonical(c) for c in chain)
        if key not in out:
            out.append(key)
    return out


def candidates(chains: list[tuple[str, ...]], k_max: int, available: set[str] | None = None) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(chain, ks) for every chain whose models are available and every k in 1..k_max per level."""
    out = [(TARGET_ALONE, ())]
    for chain in chains:
        if tuple(chain) == TARGET_ALONE:
            continue
        if available is not None and any(m not in available and m != "target" for n in chain for m in models_of(n)):
            continue
        for ks in itertools.product(range(1, k_max + 1), repeat=len(chain) - 1):
            out.append((tuple(chain), ks))
    return out


@dataclass
class Choice:
    """What the router assigns to one request class, and why."""

    request_class: str
    winner: Prediction
    reason: str  # "cost" | "target-alone" | "slo" | "slo-unmet" | "explore" | "shared"
    why: str
    explored: bool = False
    best: Prediction | None = None  # the cost winner (differs from `winner` when exploring)
    ranking: list[Prediction] = field(default_factory=list)  # best k per chain, cheapest first
    specialist: str | None = None
    shared: bool = False  # rule 5: the one chain every class rides under load
    options: list[Prediction] = field(default_factory=list, repr=False)  # every (chain, k) priced (rule 5's one k)

    def as_dict(self) -> dict:
        return {"request_class": self.request_class, "winner": self.winner.as_dict(), "reason": self.reason,
                "why": self.why, "explored": self.explored, "specialist": self.specialist, "shared": self.shared,
                "candidates": [p.as_dict() for p in self.ranking]}


def specialist(request_class: str, estimates, drafters=("drafter-code", "drafter-prose"),
               available: set[str] | None = None) -> str | None:
    """CoSine: the drafter with the best measured acceptance by the target on this class."""
    options = [d for d in drafters if available is None or d in available]
    if not options:
        return None
    return max(options, key=lambda d: estimates.alpha(d, "target", request_class))


def best_per_chain(preds: list[Prediction]) -> list[Prediction]:
    """The cheapest k of each chain, cheapest chain first."""
    best: dict[tuple[str, ...], Prediction] = {}
    for p in preds:
        if p.chain not in best or p.ms_per_token < best[p.chain].ms_per_token:
            best[p.chain] = p
    return sorted(best.values(), key=lambda p: p.ms_per_token)


def decide(request_class: str, estimates, chains: list[tuple[str, ...]], k_max: int = 6, margin: float = 0.02,
           slo_tpot_ms: float = 0.0, available: set[str] | None = None, explore_rate: float = 0.0,
           rng: random.Random | None = None, batch: float | None = None, measured_only: bool = False,
           explore_until: int = 10, explore_stale_s: float = 600.0) -> Choice:
    """The assignment for `request_class` under the current estimates (pure, no I/O).

    `measured_only`: only candidates whose (chain, k) has realised outcomes (and the target
    alone), when there are any, each at the class's realised cost at this load (its rounds'
    time over the tokens a round emits, `realised_cost`; times the model's ratio between
    this batch and the mean batch those outcomes ran at), or the
    model's for this class here scaled by what ran here realised against it (by its own
    ratio at the nearest load it ran at where nothing ran here): a k never run
    is a guess every request would pay for, and the model's
    error moves with its step fits; but a k one step from one this class measured here
    competes at that one's realised cost times the model's ratio between the two, plus
    `margin` (before any other price of it).
    Exploration tries chains of the model's ranking with fewer than `explore_until`
    outcomes at this load, or none for `explore_stale_s`.
    """
    batch = estimates.batch() if batch is None else batch
    pool = candidates(chains, k_max, available)
    every: list[Prediction] = []

    def modelled_all() -> list[Prediction]:  # the model's prediction of every candidate, made once when needed
        if not every:
            every.extend(predict(chain, ks, request_class, estimates, batch) for chain, ks in pool)
        return every

    preds: list[Prediction] | None = None
    if measured_only:
        realised, here, elsewhere = {}, set(), {}
        for chain, ks in pool:
            if (chain, ks) not in estimates.ran:  # never ran at any load: none below answers
                continue
            seen = estimates.realised(chain, ks, batch, request_class)
            if seen is not None:
                realised[(chain, ks)] = seen
            elif estimates.ran_here(chain, ks, batch):  # here, in other classes only
                here.add((chain, ks))
            elif (ratio := estimates.ratio_nearest(chain, ks, batch, request_class)) is not None:
                elsewhere[(chain, ks)] = ratio
        if any(chain != TARGET_ALONE for chain, _ in [*realised, *here, *elsewhere]):
            preds = []
            modelled: dict[tuple, Prediction] = {}

            def model(key: tuple) -> Prediction:
                if key not in modelled:
                    modelled[key] = predict(key[0], key[1], request_class, estimates, batch)
                return modelled[key]

            # What each (chain, k) realised in this class here, moved to this batch by the model:
            # a load bucket spans batches (1-1.5, 12 and up), and outcomes at its top are slower
            # than at its bottom whatever the chain; compared raw, the (chain, k) that happened
            # to run at the lighter moments would look the cheaper. Where the rounds' time is
            # known: that time over the tokens a round emits by the class's acceptance, pooled
            # over every k (`realised_cost`).
            realised = {key: realised_cost(key, seen, request_class, estimates)
                        * load_shift(request_class, estimates, key, seen.batch, batch, model(key).model_ms)
                        for key, seen in realised.items()}

            # One step of k from a (chain, k) this class measured here: its realised cost times the
            # model's ratio between the two k, plus the margin (the same chain, models and hops: the
            # model says only what one more or one fewer drafted token does). It stands in for the
            # other prices of that (chain, k) below too: the model's error differs from class to
            # class on one chain (bench family, idle: code-long realised 1.3x the model on
            # `drafter-code,target` where code-short realised 0.9x), so the class's own neighbour
            # is the nearer evidence than other classes' ratio or another load's.
            in_pool, stepped = set(pool), {}
            for (chain, ks), cost in realised.items():
                for key in ((chain, n) for n in neighbours(ks, k_max)):
                    if key in realised or key not in in_pool:
                        continue
                    guess = cost * model(key).model_ms / max(model((chain, ks)).model_ms, 1e-9) * (1 + margin)
                    stepped[key] = min(guess, stepped.get(key, guess))
            for chain, ks in pool:
                key = (chain, ks)
                if key not in realised and key not in here and key not in elsewhere and key not in stepped \
                        and chain != TARGET_ALONE:
                    continue
                p = model(key)
                if key in realised:  # what it cost this class at this load, not what the model says now
                    p = replace(p, ms_per_token=realised[key], calibration=realised[key] / max(p.model_ms, 1e-9))
                elif key in stepped:
                    p = replace(p, ms_per_token=stepped[key], calibration=stepped[key] / max(p.model_ms, 1e-9))
                elif key in elsewhere and not realised and not here:  # nothing ran at this load: the
                    # model here, scaled by what it realised at the load nearest; otherwise `p` is
                    # the model for this class scaled by what ran at this load realised against
                    # it (its own outcomes in other classes first; the model's error moves with
                    # the load more than from chain to chain)
                    p = replace(p, ms_per_token=p.model_ms * elsewhere[key], calibration=elsewhere[key])
                preds.append(p)
    if preds is None:
        preds = modelled_all()
    ranking = best_per_chain(preds)
    alone = next(p for p in ranking if p.chain == TARGET_ALONE)
    qualified = [p for p in ranking if not slo_tpot_ms or p.ms_per_token <= slo_tpot_ms]
    slo_note = ""
    if slo_tpot_ms and not qualified:
        qualified, slo_note = ranking, f"; no candidate meets the {slo_tpot_ms:g} ms TPOT objective"
    cheapest = qualified[0]
    if cheapest.chain != TARGET_ALONE and alone in qualified and cheapest.ms_per_token > alone.ms_per_token * (1 - margin):
        winner, reason = alone, "target-alone"
        why = (f"target alone {alone.ms_per_token:.3f} ms/token; the best chain {','.join(cheapest.chain)} "
               f"k={list(cheapest.k)} ({cheapest.ms_per_token:.3f}) does not beat it by {margin:.0%} at batch {batch:.1f}")
    else:
        winner = cheapest
        reason = "target-alone" if cheapest.chain == TARGET_ALONE else "cost"
        runner_up = next((p for p in qualified[1:]), None)
        why = f"lowest predicted cost {winner.ms_per_token:.3f} ms/token at batch {batch:.1f}"
        if runner_up is not None:
            why += f"; next {','.join(runner_up.chain)} k={list(runner_up.k)} at {runner_up.ms_per_token:.3f}"
        if winner.chain != TARGET_ALONE:
            why += f"; {alone.ms_per_token / winner.ms_per_token:.2f}x the target alone"
    if slo_tpot_ms:
        reason = "slo-unmet" if slo_note else ("slo" if reason == "cost" else reason)
        why += slo_note or f"; meets the {slo_tpot_ms:g} ms TPOT objective"
    choice = Choice(request_class, winner, reason, why, best=winner, ranking=ranking,
                    specialist=specialist(request_class, estimates, available=available), options=preds)
    others = []
    if explore_rate > 0 and rng is not None and len({chain for chain, _ in pool}) > 1 and rng.random() < explore_rate:
        # from the model's ranking (what has not run here is not among the measured), each chain
        # priced at what it realised here where it did, within `explore_within` of the winner
        priced = {p.chain: p.ms_per_token for p in ranking}
        for p in best_per_chain(modelled_all()):
            seen_here = estimates.calibration_for(p.chain, batch)
            if p.chain != winner.chain and seen_here.needs_outcomes(explore_until, explore_stale_s) \
                    and priced.get(p.chain, p.ms_per_token) <= explore_within(seen_here.observations) * winner.ms_per_token:
                others.append(p)
    if others:
        seen = {p.chain: estimates.calibration_for(p.chain, batch).observations for p in others}
        fewest = min(seen.values())
        pick = rng.choice([p for p in others if seen[p.chain] == fewest])
        choice.winner, choice.reason, choice.explored = pick, "explore", True
        choice.why = (f"exploring {','.join(pick.chain)} ({seen[pick.chain]} outcomes so far) for one interval; "
                      f"the cost winner is {','.join(winner.chain)} k={list(winner.k)}: " + why)
    return choice


def hold(choice: Choice, incumbent: tuple[tuple[str, ...], tuple[int, ...]] | None, switch_margin: float,
         slo_tpot_ms: float = 0.0) -> Choice:
    """The class keeps `incumbent` (chain, k), its last cost winner at this load, while it is
    priced within `switch_margin` of the cheapest (and meets the TPOT objective, if any).

    The prices move by a few percent with each request's luck: on the tiny family at 1 req/s
    `ngram,target` k = 3, 4, 5 and 6 were priced within 3% of each other, and the class went
    from one to the next as each one's estimate dipped (adaptive's requests rode k = 3 x20,
    4 x17, 5 x1, TPOT p50 1.46 ms against the static k = 4's 1.39). Explorations are left as
    they are."""
    if incumbent is None or choice.explored or switch_margin <= 0:
        return choice
    best = choice.best or choice.winner
    if (best.chain, best.k) == incumbent:
        return choice
    kept = next((p for p in choice.options if (p.chain, p.k) == incumbent), None)
    if kept is None or kept.ms_per_token > best.ms_per_token * (1 + switch_margin) \
            or (slo_tpot_ms and kept.ms_per_token > slo_tpot_ms):
        return choice
    why = (f"kept {','.join(kept.chain)} k={list(kept.k)} at {kept.ms_per_token:.3f} ms/token, within "
           f"{switch_margin:.0%} of the cheapest ({','.join(best.chain)} k={list(best.k)} at {best.ms_per_token:.3f})")
    reason = "target-alone" if kept.chain == TARGET_ALONE else ("slo" if choice.reason == "slo" else "cost")
    return replace(choice, winner=kept, best=kept, reason=reason, why=why)


def tokens_per_round(chain: tuple[str, ...], ks: tuple[int, ...], request_class: str, estimates,
                     depths: list[float] | None = None) -> float:
    """Tokens one target round emits for the class: 1 + (proposals per round) x (accepted per proposal).

    `depths`: the share of rounds at each depth 0..k the per-round depth policy took (a round
    at depth m verifies at most m drafts); None: every round verified k.
    """
    if chain == TARGET_ALONE or not ks:
        return 1.0
    proposer = chain[-2]
    rate = estimates.draft_rate(proposer, request_class) if len(chain) == 2 else 1.0
    if depths is None:
        depths = [0.0] * ks[-1] + [1.0]
    gain = sum(share * (estimates.expected_tokens(proposer, chain[-1], request_class, m) - 1.0)
               for m, share in enumerate(depths) if share > 0)
    return 1.0 + rate * gain


def predict_at_depths(chain: tuple[str, ...], ks: tuple[int, ...], request_class: str, estimates, batch: float,
                      shares: list[float]) -> float:
    """The model's ms per token (uncalibrated) for rounds that verified at most m of the top
    proposer's k drafts at `shares[m]` of them (the per-round depth policy): the rounds' mean
    time over their mean tokens, a round at depth m being one of `ks` with the top k set to m
    (at 0, the target's alone)."""
    time_ms = tokens = 0.0
    for m, share in enumerate(shares):
        if share > 0:
            at = (*ks[:-1], m)
            per_round = tokens_per_round(chain, at, request_class, estimates)
            time_ms += share * predict(chain, at, request_class, estimates, batch, calibrated=False).model_ms * per_round
            tokens += share * per_round
    return time_ms / tokens if tokens > 0 else predict(chain, ks, request_class, estimates, batch, calibrated=False).model_ms


def realised_cost(key: tuple, seen, request_class: str, estimates) -> float:
    """What a (chain, k) costs this class per token, from its realised outcomes (at their load).

    The time of its rounds (measured per chain, k and class) over the tokens a round emits,
    from the class's acceptance pooled over every request and k: a request's TPOT is mostly
    its prompt's luck (an n-gram chain emits 1 to 3 tokens a round from one prompt to the
    next, the round's time barely moves), so the k that ran the last few lucky prompts would
    win on luck. The model's tokens a round emits are taken at the depths the rounds took
    (rounds the per-round depth policy cut cost less and emit less: priced at k, a chain
    whose rounds the policy mostly held at depth 0 looked three times cheaper than it was),
    times what the chain's rounds emitted in the class against the model
    (`Estimates.emitted_ratio`, pooled over k and load). Without the rounds' time (history
    without it), the realised TPOT.
    """
    if seen.round_ms is None:
        return seen.tpot_ms
    per_round = tokens_per_round(key[0], key[1], request_class, estimates, seen.depths)
    return seen.round_ms / (per_round * estimates.emitted_ratio(key[0], request_class))


LOAD_SHIFT_MAX = 2.0  # at most this factor either way when moving a realised TPOT to another batch


def load_shift(request_class: str, estimates, key: tuple, seen_batch: float | None, batch: float,
               model_ms: float) -> float:
    """The model's TPOT of `key` at `batch` over its TPOT at `seen_batch` (where its outcomes ran), bounded."""
    if seen_batch is None or abs(seen_batch - batch) < 1e-6:
        return 1.0
    there = predict(key[0], key[1], request_class, estimates, seen_batch, calibrated=False).model_ms
    return min(LOAD_SHIFT_MAX, max(1 / LOAD_SHIFT_MAX, model_ms / max(there, 1e-9)))


def neighbours(ks: tuple[int, ...], k_max: int) -> list[tuple[int, ...]]:
    """Every ks one step up or down from `ks` on one level, within 1..k_max."""
    out = []
    for i, k in enumerate(ks):
        for step in (-1, 1):
            if 1 <= k + step <= k_max:
                out.append((*ks[:i], k + step, *ks[i + 1:]))
    return out


def depth_trial(chain: tuple[str, ...], ks: tuple[int, ...], estimates, batch: float, k_max: int, rng: random.Random,
                until: int, stale_s: float, over=None) -> tuple[tuple[int, ...], int] | None:
    """The neighbour of `ks` to try on `chain` and its outcomes so far at this load: the one with
    the fewest, among those with fewer than `until` or none for `stale_s` and, given `over`
    (a neighbour's price over the winner's), priced within `explore_within` of the winner;
    None if every one is known (or too dear to try)."""
    seen = {n: estimates.depth_calibration(chain, n, batch) for n in neighbours(ks, k_max)}
    open_ = {n: c.observations for n, c in seen.items() if c.needs_outcomes(until, stale_s)
             and (over is None or over(n) <= explore_within(c.observations))}
    if not open_:
        return None
    fewest = min(open_.values())
    return rng.choice(sorted(n for n, count in open_.items() if count == fewest)), fewest


def _price(choice: Choice, ks: tuple[int, ...], estimates, batch: float) -> float:
    """The winning chain at `ks` for the choice's class: as the decision priced it (what it
    realised here, or one step from what did), else the model's."""
    chain = choice.winner.chain
    known = next((p.ms_per_token for p in choice.options if p.chain == chain and p.k == ks), None)
    return known if known is not None else predict(chain, ks, choice.request_class, estimates, batch).ms_per_token


def explore_depth(choice: Choice, estimates, batch: float, k_max: int, rng: random.Random, rate: float,
                  until: int = 10, stale_s: float = 600.0) -> Choice:
    """With probability `rate`, the winning chain at a neighbouring k (reason `explore`).

    Only (chain, k) with realised outcomes at a load compete there, so depth is learnt by
    trying it (`depth_trial`). Once every neighbour is known the winner stays, until a
    neighbour realises less and wins, and its own neighbours are tried next: a hill climb
    over k per level. A table where every class shares one chain at one k tries depth for
    every class at once instead (`explore_shared_depth`).
    """
    winner = choice.winner
    if rate <= 0 or choice.explored or winner.chain == TARGET_ALONE or rng.random() >= rate:
        return choice
    trial = depth_trial(winner.chain, winner.k, estimates, batch, k_max, rng, until, stale_s,
                        over=lambda ks: _price(choice, ks, estimates, batch) / max(winner.ms_per_token, 1e-9))
    if trial is None:
        return choice
    ks, fewest = trial
    pick = predict(winner.chain, ks, choice.request_class, estimates, batch)
    why = (f"exploring depth: {','.join(winner.chain)} k={list(ks)} ({fewest} outcomes so far at this load) for one "
           f"interval; the winner is k={list(winner.k)}: " + choice.why)
    return replace(choice, winner=pick, reason="explore", why=why, explored=True)


def explore_shared_depth(choices: dict[str, Choice], estimates, batch: float, k_max: int, rng: random.Random,
                         rate: float, until: int = 10, stale_s: float = 600.0) -> dict[str, Choice]:
    """`explore_depth` for a table where every class rides one chain at one k (rule 5): with
    probability `rate`, every class moves to the same neighbouring k (`depth_trial`), so the
    rounds keep one width. None of this when the classes do not share one (chain, k)."""
    winners = {(c.winner.chain, c.winner.k) for c in choices.values()}
    if rate <= 0 or len(winners) != 1 or any(c.explored for c in choices.values()):
        return choices
    ((chain, ks),) = winners
    if chain == TARGET_ALONE or rng.random() >= rate:
        return choices
    trial = depth_trial(chain, ks, estimates, batch, k_max, rng, until, stale_s,
                        over=lambda n: sum(_price(c, n, estimates, batch) / max(c.winner.ms_per_token, 1e-9)
                                           for c in choices.values()) / len(choices))
    if trial is None:
        return choices
    pick, fewest = trial
    why = (f"exploring depth for every class: {','.join(chain)} k={list(pick)} ({fewest} outcomes so far at this "
           f"load) for one interval; the shared k is {list(ks)}: ")
    return {cls: replace(c, winner=predict(chain, pick, cls, estimates, batch), reason="explore", why=why + c.why,
                         explored=True) for cls, c in choices.items()}


def shared(choices: dict[str, Choice], batch: float, margin: float = 0.02, incumbent: tuple[str, ...] | None = None,
           switch_margin: float = 0.0, incumbent_k: tuple[int, ...] | None = None,
           shares: dict[str, float] | None = None, k_switch_margin: float | None = None) -> dict[str, Choice]:
    """Rule 5: every class on the one chain with the lowest predicted cost over the classes,
    each class weighted by its share of the recent requests (`shares`; equal without).

    A round verifies the requests in flight, so what a chain costs under load is its cost per
    class in the mix of those requests: a class nobody sends (the `default` class of a
    workload whose every prompt has a domain) weighs nothing, where an unweighted sum let its
    model-only prices swing the choice by a tenth. The target alone wins unless the chain
    beats it by `margin`. Explorations
    and per-class SLO rankings are replaced. The `incumbent` (the chain last shared at this
    load, or the target alone) stays unless the winner beats it by `switch_margin`: a switch
    leaves every request in flight on the old chain for its life, and a round with both
    waits for both proposals.

    Every class also takes one k on that chain, the one with the lowest cost summed over the
    classes among those priced for every class (else each class keeps its best): a round
    verifies its requests in one forward over chunks padded to the longest, so a class at
    k = 6 makes each request in its rounds pay for 7 positions. `incumbent_k` (the k last
    shared with that chain) is held by `k_switch_margin` (None: the same `switch_margin`).
    """
    per_class = {cls: {p.chain: p for p in c.ranking} for cls, c in choices.items()}
    common = set.intersection(*(set(r) for r in per_class.values())) if per_class else set()
    if not common:
        return choices
    weights = _weights(choices, shares)
    totals = {chain: sum(weights[cls] * r[chain].ms_per_token for cls, r in per_class.items()) for chain in common}
    best = min(sorted(totals), key=totals.get)  # sorted: ties go the same way every time
    alone = totals.get(TARGET_ALONE)
    if alone is not None and best != TARGET_ALONE and totals[best] > alone * (1 - margin):
        best = TARGET_ALONE
    # the incumbent stays within the switch margin, the target alone included either way: a
    # chain and the target alone a few percent apart under load swapped every second or two
    held = incumbent is not None and incumbent != best and incumbent in totals \
        and totals[incumbent] <= totals[best] * (1 + switch_margin)
    if held:
        best = incumbent
    runner_up = min((c for c in totals if c != best), key=totals.get, default=None)
    one_k = common_k(choices, best, incumbent_k if incumbent == best else None,
                     switch_margin if k_switch_margin is None else k_switch_margin, weights)
    out = {}
    for cls, c in choices.items():
        winner = one_k[0][cls] if one_k else per_class[cls][best]
        own = c.ranking[0]
        why = (f"under load (batch {batch:.1f}) every class rides one chain, since a round waits for each chain's "
               f"proposal: {','.join(best)} at {totals[best]:.3f} ms/token over the classes by their share of "
               f"requests")
        if runner_up is not None:
            why += f", next {','.join(runner_up)} at {totals[runner_up]:.3f}"
        if held:
            why += f" (kept: the chain shared at this load, within {switch_margin:.0%} of the cheapest)"
        if one_k:
            why += f"; one k for every class (chunks are padded to the longest): {one_k[1]}"
        if own.chain != best:
            why += f"; alone this class would take {','.join(own.chain)} k={list(own.k)} at {own.ms_per_token:.3f}"
        out[cls] = Choice(cls, winner, "target-alone" if best == TARGET_ALONE else "shared", why, best=winner,
                          ranking=c.ranking, specialist=c.specialist, shared=True, options=c.options)
    return out


def _weights(choices: dict[str, Choice], shares: dict[str, float] | None) -> dict[str, float]:
    """Each class's weight in rule 5's cost: its share of the requests, equal shares without."""
    if not shares or sum(shares.get(cls, 0.0) for cls in choices) <= 0:
        return {cls: 1.0 / len(choices) for cls in choices}
    total = sum(shares.get(cls, 0.0) for cls in choices)
    return {cls: shares.get(cls, 0.0) / total for cls in choices}


def common_k(choices: dict[str, Choice], chain: tuple[str, ...], incumbent_k: tuple[int, ...] | None,
             switch_margin: float, weights: dict[str, float] | None = None) -> tuple[dict[str, Prediction], str] | None:
    """Every class's prediction of `chain` at the one k with the lowest cost over the classes
    (weighted by `weights`, equal without), among the k priced for every class, and why; None
    for the target alone or when no k is priced for every class. `incumbent_k` stays within
    `switch_margin` of the cheapest."""
    weights = _weights(choices, weights)
    if chain == TARGET_ALONE:
        return None
    priced: dict[tuple[int, ...], dict[str, Prediction]] = {}
    for cls, c in choices.items():
        for p in c.options or c.ranking:
            if p.chain == chain:
                mine = priced.setdefault(p.k, {})
                if cls not in mine or p.ms_per_token < mine[cls].ms_per_token:
                    mine[cls] = p
    totals = {ks: sum(weights[cls] * p.ms_per_token for cls, p in by_class.items())
              for ks, by_class in priced.items() if len(by_class) == len(choices)}
    if not totals:
        return None
    best = min(sorted(totals), key=totals.get)
    why = f"k={list(best)} at {totals[best]:.3f}"
    if incumbent_k is not None and incumbent_k != best and incumbent_k in totals \
            and totals[incumbent_k] <= totals[best] * (1 + switch_margin):
        why = f"k={list(incumbent_k)} at {totals[incumbent_k]:.3f} (kept: within {switch_margin:.0%} of k={list(best)})"
        best = incumbent_k
    return priced[best], why
