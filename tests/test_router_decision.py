"""The router's estimates and decision, in memory: the winner is the cost model's argmin.

The reference cost here is written out from BRIEF section 3 independently of
services/router/cost_model.py, over every candidate, so a bug in either shows.
"""

from __future__ import annotations

import random

import pytest

from services.router.cost_model import expected_tokens, predict, tau
from services.router.decision import TARGET_ALONE, candidates, decide, predict_at_depths, realised_cost, served_chains
from services.router.estimates import Acceptance, Estimates, StepTime, conditional_counts
from shared.messages import DRIVER, HOP, LevelOutcome, ModelStep, Outcome, StepProfile

K_MAX = 4


def simulate_level(rng: random.Random, proposer: str, verifier: str, alpha: float, k: int, proposals: int) -> LevelOutcome:
    """Per-position counts of `proposals` drafts of k tokens, each accepted with probability alpha."""
    acc, dra = [0] * k, [0] * k
    accepted = 0
    for _ in range(proposals):
        for j in range(k):
            dra[j] += 1
        for j in range(k):
            if rng.random() < alpha:
                acc[j] += 1
                accepted += 1
            else:
                break
    return LevelOutcome(proposer, verifier, proposals * k, accepted, dra, acc)


def synthetic(profile: dict[str, tuple[float, float]], alphas: dict[tuple[str, str, str], float], hop_ms: float = 0.0,
              live: int = 1, seed: int = 0) -> Estimates:
    """Estimates fed with exact step lines (ms = a + b * tokens) and long acceptance streams."""
    est = Estimates(half_life_tokens=1e9, hop_ms=hop_ms)
    for model, (a, b) in profile.items():
        for tokens in (1, 2, 4, 8, 16, 32, 64):
            est.step(model).observe(tokens, a + b * tokens, 10)
    rng = random.Random(seed)
    for (p, v, cls), alpha in alphas.items():
        for _ in range(40):
            est.observe_level(simulate_level(rng, p, v, alpha, 4, 200), cls)
    est.load["t1"] = (1e18, live, 0)
    return est


def reference_cost(est: Estimates, chain, ks, cls: str, batch: float) -> float:
    """tau_N from BRIEF section 3, every level remote except ngram/target, hop 0, draft rate 1;
    each target round also pays the driver's work for the batch (PROFILE's `driver` line)."""
    a, b = PROFILE["driver"]
    if not ks:
        return est.step_ms("target", batch) + a + b * batch
    t = [est.step_ms(m, batch * (1 + (ks[i - 1] if i else 0))) for i, m in enumerate(chain)]
    t[-1] += a + b * batch
    cost = t[0]
    for i in range(len(chain) - 1):
        cost = (ks[i] * cost + t[i + 1]) / reference_expected(est, chain[i], chain[i + 1], cls, ks[i])
    return cost


def reference_expected(est: Estimates, proposer: str, verifier: str, cls: str, k: int) -> float:
    """1 + sum_j prod_{i <= j} a_i, a_i = accepted at position i over proposals reaching it, shrunk to alpha."""
    pair = est.pair(proposer, verifier, cls)
    alpha, total, reach = pair.alpha, 1.0, 1.0
    for j in range(k):
        seen = j < len(pair.reached_per_pos)
        reach *= ((pair.accepted_per_pos[j] if seen else 0) + 20 * alpha) / ((pair.reached_per_pos[j] if seen else 0) + 20)
        total += reach
    return total


PROFILE = {"target": (2.0, 0.05), "verifier": (0.8, 0.02), "drafter-code": (0.3, 0.005), "drafter-prose": (0.3, 0.005),
           "driver": (0.4, 0.1)}
ALPHAS = {
    ("drafter-code", "target", "code-short"): 0.75, ("drafter-prose", "target", "code-short"): 0.35,
    ("drafter-code", "target", "prose-short"): 0.3, ("drafter-prose", "target", "prose-short"): 0.7,
    ("verifier", "target", "code-short"): 0.85, ("verifier", "target", "prose-short"): 0.8,
    ("drafter-code", "verifier", "code-short"): 0.8, ("drafter-prose", "verifier", "prose-short"): 0.75,
    ("drafter-code", "verifier", "prose-short"): 0.35, ("drafter-prose", "verifier", "code-short"): 0.3,
}
CHAINS = [c for c in served_chains() if "ngram" not in c]


def test_formulas():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 4) == 5
    # tau_1 = t_1; tau_2 = (k tau_1 + t_2) / E
    assert tau([1.0, 10.0], [0.5], [3]) == pytest.approx((3 * 1.0 + 10.0) / 1.875)
    assert tau([1.0, 3.0, 10.0], [0.6, 0.8], [2, 3]) == pytest.approx(
        (3 * ((2 * 1.0 + 3.0) / expected_tokens(0.6, 2)) + 10.0) / expected_tokens(0.8, 3))


def test_served_chains_are_canonical_and_include_target_alone():
    chains = served_chains()
    assert TARGET_ALONE in chains and ("drafter-code", "target") in chains
    assert all("drafter" not in c for c in chains) and len(set(chains)) == len(chains)


@pytest.mark.parametrize("cls", ["code-short", "prose-short"])
@pytest.mark.parametrize("live", [1, 4, 16])
def test_decision_is_the_cost_models_argmin(cls, live):
    est = synthetic(PROFILE, ALPHAS, live=live)
    choice = decide(cls, est, CHAINS, k_max=K_MAX, margin=0.0)
    costs = {(c, ks): reference_cost(est, c, ks, cls, float(live)) for c, ks in candidates(CHAINS, K_MAX)}
    best = min(costs, key=costs.get)
    assert (choice.winner.chain, choice.winner.k) == best
    assert choice.winner.ms_per_token == pytest.approx(costs[best], rel=1e-9)
    assert [p.ms_per_token for p in choice.ranking] == sorted(p.ms_per_token for p in choice.ranking)


def test_specialist_drafter_per_class():
    est = synthetic(PROFILE, ALPHAS)
    two_level = [("drafter-code", "target"), ("drafter-prose", "target"), TARGET_ALONE]
    assert decide("code-short", est, two_level, K_MAX).winner.chain == ("drafter-code", "target")
    assert decide("prose-short", est, two_level, K_MAX).winner.chain == ("drafter-prose", "target")
    assert decide("code-short", est, two_level, K_MAX).specialist == "drafter-code"
    assert decide("prose-short", est, two_level, K_MAX).specialist == "drafter-prose"


def test_under_load_speculation_turns_off():
    """The target's step grows with the tokens a forward writes: at high batch the target alone wins."""
    profile = {"target": (1.0, 0.25), "drafter-code": (0.2, 0.01)}
    alphas = {("drafter-code", "target", "code-short"): 0.7}
    chains = [("drafter-code", "target"), TARGET_ALONE]
    low = decide("code-short", synthetic(profile, alphas, live=1), chains, K_MAX)
    high = decide("code-short", synthetic(profile, alphas, live=16), chains, K_MAX)
    assert low.winner.chain == ("drafter-code", "target") and low.reason == "cost"
    assert high.winner.chain == TARGET_ALONE and high.reason == "target-alone"
    assert high.winner.k == ()


def test_margin_prefers_target_alone_when_gain_is_small():
    profile = {"target": (1.0, 0.0), "drafter-code": (0.3, 0.0)}
    est = synthetic(profile, {("drafter-code", "target", "code-short"): 0.45})
    chains = [("drafter-code", "target"), TARGET_ALONE]
    free = decide("code-short", est, chains, K_MAX, margin=0.0)
    assert free.winner.chain != TARGET_ALONE
    alone = next(p for p in free.ranking if p.chain == TARGET_ALONE).ms_per_token
    gain = 1 - free.winner.ms_per_token / alone
    assert decide("code-short", est, chains, K_MAX, margin=gain + 0.01).winner.chain == TARGET_ALONE


def test_slo_filters_candidates_and_reports_unmet():
    est = synthetic(PROFILE, ALPHAS)
    ok = decide("code-short", est, CHAINS, K_MAX, slo_tpot_ms=100.0)
    assert ok.reason == "slo" and "meets" in ok.why
    unmet = decide("code-short", est, CHAINS, K_MAX, slo_tpot_ms=0.001)
    assert unmet.reason == "slo-unmet" and unmet.winner == ok.winner


def test_exploration_picks_another_chain_at_about_the_rate():
    est = synthetic(PROFILE, ALPHAS)
    rng = random.Random(1)
    picks = [decide("code-short", est, CHAINS, K_MAX, explore_rate=0.2, rng=rng) for _ in range(300)]
    explored = [c for c in picks if c.explored]
    assert 30 <= len(explored) <= 90
    assert all(c.reason == "explore" and c.winner.chain != c.best.chain for c in explored)
    assert not any(c.explored for c in (decide("code-short", est, CHAINS, K_MAX, explore_rate=0.0, rng=rng) for _ in range(50)))


def test_a_chain_known_at_this_load_is_explored_again_only_once_stale():
    est = synthetic(PROFILE, ALPHAS)
    rng = random.Random(1)
    for chain in CHAINS:  # every chain has its outcomes at batch 1
        for _ in range(10):
            est.observe_calibration(chain, 1.0, 5.0, 5.0)
    picks = [decide("code-short", est, CHAINS, K_MAX, explore_rate=1.0, rng=rng, batch=1.0) for _ in range(50)]
    assert not any(c.explored for c in picks)
    assert any(c.explored for c in (decide("code-short", est, CHAINS, K_MAX, explore_rate=1.0, rng=rng, batch=1.0,
                                           explore_stale_s=1e-9) for _ in range(5)))
    assert any(c.explored for c in (decide("code-short", est, CHAINS, K_MAX, explore_rate=1.0, rng=rng, batch=1.0,
                                           explore_until=11) for _ in range(5)))


def test_under_load_only_what_ran_at_that_load_competes():
    est = synthetic(PROFILE, ALPHAS, live=8)
    free = decide("code-short", est, CHAINS, K_MAX, batch=8.0)
    assert free.winner.chain != TARGET_ALONE
    ran = ("verifier", "target")
    assert free.winner.chain != ran
    est.observe_calibration(ran, 8.0, 5.0, 5.0, (2,), "code-short")  # chains that never ran do not compete
    choice = decide("code-short", est, CHAINS, K_MAX, batch=8.0, measured_only=True)
    assert {p.chain for p in choice.ranking} == {ran, TARGET_ALONE}
    assert choice.winner.chain in (ran, TARGET_ALONE) and choice.ranking[0].k in ((2,), ())
    by_chain = {p.chain: p for p in choice.ranking}
    assert by_chain[ran].ms_per_token == 5.0  # at the TPOT it realised there, not the model's
    est.observe_calibration(TARGET_ALONE, 8.0, 4.0, 9.0, (), "code-short")
    again = decide("code-short", est, CHAINS, K_MAX, batch=8.0, measured_only=True)
    assert again.winner.chain == TARGET_ALONE and again.winner.ms_per_token == 4.0
    nothing = synthetic(PROFILE, ALPHAS, live=8)  # nothing ran there yet: every candidate competes
    assert decide("code-short", nothing, CHAINS, K_MAX, batch=8.0, measured_only=True).winner == free.winner


def test_unavailable_models_are_not_candidates():
    est = synthetic(PROFILE, ALPHAS)
    choice = decide("prose-short", est, served_chains(), K_MAX, available={"drafter-code", "verifier"})
    assert all("drafter-prose" not in p.chain for p in choice.ranking)
    assert all("fused" not in p.chain for p in choice.ranking)  # fused needs both drafters
    assert any(p.chain[0] == "ngram" for p in choice.ranking)


def test_fused_level_costs_both_drafters_and_competes_on_its_own_acceptance():
    def fed(fused_alpha: float, hop_ms: float) -> Estimates:
        est = synthetic(PROFILE, ALPHAS, hop_ms=hop_ms)
        rng = random.Random(2)
        for _ in range(40):
            est.observe_level(simulate_level(rng, "fused", "target", fused_alpha, 4, 200), "code-short")
        return est

    est = fed(0.9, 0.4)
    pred = predict(("fused", "target"), (4,), "code-short", est, 1.0)
    both = est.step_ms("drafter-code", 1) + est.step_ms("drafter-prose", 1) + 2 * 0.4  # one call per drafter per position
    assert pred.levels[0]["step_ms"] == pytest.approx(both, abs=1e-3)
    assert pred.levels[0]["alpha"] == pytest.approx(0.9, abs=0.02)
    single = predict(("drafter-code", "target"), (4,), "code-short", est, 1.0)
    assert single.ms_per_token < pred.ms_per_token  # 0.9 vs 0.75 acceptance does not pay for twice the steps and hops
    close = fed(0.97, 0.0)
    assert (predict(("fused", "target"), (4,), "code-short", close, 1.0).ms_per_token
            < predict(("drafter-code", "target"), (4,), "code-short", close, 1.0).ms_per_token)  # in one process it can


# -- estimates ---------------------------------------------------------------------------------
def test_conditional_counts_are_the_geometric_mle():
    level = simulate_level(random.Random(3), "d", "t", 0.6, 5, 4000)
    accepted, trials = conditional_counts(level)
    assert accepted / trials == pytest.approx(0.6, abs=0.02)
    assert level.accepted / level.drafted < 0.4  # accepted/drafted is not alpha


def test_acceptance_converges_and_follows_a_change():
    rng = random.Random(7)
    est = Estimates(half_life_tokens=400)
    for _ in range(60):
        est.observe_level(simulate_level(rng, "drafter-code", "target", 0.8, 4, 20), "code-short")
    assert est.alpha("drafter-code", "target", "code-short") == pytest.approx(0.8, abs=0.05)
    for _ in range(60):
        est.observe_level(simulate_level(rng, "drafter-code", "target", 0.4, 4, 20), "code-short")
    assert est.alpha("drafter-code", "target", "code-short") == pytest.approx(0.4, abs=0.06)
    per_pos = est.pair("drafter-code", "target", "code-short").per_position()
    assert all(abs(p - 0.4) < 0.15 for p in per_pos if p is not None)
    # an unseen pair keeps the neutral prior
    assert est.alpha("drafter-prose", "target", "code-short") == 0.5


def test_outcome_stream_drives_alpha_and_draft_rate():
    rng = random.Random(11)
    est = Estimates(half_life_tokens=5000)
    for i in range(200):
        lv = simulate_level(rng, "ngram", "target", 0.6, 4, 6)  # 6 proposals over 12 rounds: rate 0.5
        tokens = 12 + lv.accepted + 1
        est.observe_outcome(Outcome(f"r{i}", "code-long", ["ngram", "target"], [4], tokens, 50, 1.0, 1.0, 10.0, [lv]))
    assert est.alpha("ngram", "target", "code-long") == pytest.approx(0.6, abs=0.04)
    assert est.draft_rate("ngram", "code-long") == pytest.approx(0.5, abs=0.05)


def test_step_time_fit_recovers_the_line_from_noisy_profiles():
    rng = random.Random(5)
    est = Estimates(profile_window=200)
    for _ in range(150):
        batch = rng.choice([1, 2, 4, 8, 16])
        tokens = batch * rng.choice([1, 5])
        ms = (2.0 + 0.1 * tokens) * rng.uniform(0.95, 1.05)
        est.observe_profile(StepProfile("t1", 1.0, batch, 0, [ModelStep("target", "cpu", 100, ms * 100 / 1e3, tokens * 100, batch)]))
    a, b = est.step("target").fit()
    assert a == pytest.approx(2.0, rel=0.1) and b == pytest.approx(0.1, rel=0.1)
    assert est.batch() >= 1.0


def test_step_time_prior_before_samples_and_flat_fit():
    step = StepTime(prior_ms=2.0)
    assert step.ms(1) == pytest.approx(2.0)
    for _ in range(5):
        step.observe(1, 3.0, 1)
    assert step.ms(1) == pytest.approx(3.0, rel=0.01) and step.fit()[1] >= 0


def test_calibration_scales_the_prediction():
    est = synthetic(PROFILE, ALPHAS)
    raw = predict(("drafter-code", "target"), (3,), "code-short", est, calibrated=False)
    for _ in range(50):
        est.observe_calibration(("drafter-code", "target"), 1.0, raw.model_ms * 2, raw.model_ms)
    cal = predict(("drafter-code", "target"), (3,), "code-short", est)
    assert cal.calibration == pytest.approx(2.0, rel=0.05) and cal.ms_per_token == pytest.approx(2 * raw.model_ms, rel=0.05)
    # a chain not measured at this load borrows the measured chains' ratio; another load is separate
    assert predict(("verifier", "target"), (2,), "code-short", est).calibration == pytest.approx(2.0, rel=0.05)
    for _ in range(50):
        est.observe_calibration(("drafter-code", "target"), 16.0, raw.model_ms * 3, raw.model_ms)
    assert est.calibration_ratio(("drafter-code", "target"), 16.0) == pytest.approx(3.0, rel=0.05)
    assert est.calibration_ratio(("drafter-code", "target"), 1.0) == pytest.approx(2.0, rel=0.05)


def test_prediction_levels_explain_their_inputs():
    est = synthetic(PROFILE, ALPHAS, hop_ms=0.4)
    p = predict(("drafter-code", "verifier", "target"), (3, 2), "code-short", est)
    assert [lv["model"] for lv in p.levels] == ["drafter-code", "verifier", "target"]
    assert p.levels[0]["k"] == 3 and p.levels[1]["k"] == 2 and "alpha" in p.levels[0] and "alpha" not in p.levels[2]
    assert p.levels[0]["step_ms"] == pytest.approx(est.step_ms("drafter-code", 1) + 0.4 / 3, rel=1e-3)
    assert p.levels[1]["step_ms"] == pytest.approx(est.step_ms("verifier", 4) + 0.4, rel=1e-3)


def test_expected_tokens_follow_the_acceptance_measured_at_each_position():
    """A match that survives its first token tends to survive the next (n-gram): the pooled alpha
    overrates position 0 and E(alpha, k) gets the shape wrong; position by position it does not."""
    sticky = Acceptance()
    for _ in range(50):  # position 0 accepted half the time, position 1 four in five, then all
        sticky.observe(LevelOutcome("ngram", "target", 40, 0, [10, 10, 10, 10], [5, 4, 4, 4]), 1e9)
    assert sticky.expected_tokens(0) == 1.0
    assert sticky.expected_tokens(1) == pytest.approx(1.5, rel=0.02)
    assert sticky.expected_tokens(1) < expected_tokens(sticky.alpha, 1) - 0.2
    assert sticky.expected_tokens(4) == pytest.approx(1 + 0.5 + 0.4 + 0.4 + 0.4, rel=0.02)
    assert Acceptance(prior=0.6).expected_tokens(3) == pytest.approx(expected_tokens(0.6, 3))  # no data: geometric


def test_acceptance_prior_is_shrunk():
    acc = Acceptance(prior=0.5)
    assert acc.alpha == 0.5
    acc.observe(LevelOutcome("d", "t", 4, 4, [1, 1, 1, 1], [1, 1, 1, 1]), 1000)
    assert 0.5 < acc.alpha < 0.7  # four accepted positions move a 20-position prior only a little


def test_tv_overlap_sharpens_a_pairs_acceptance():
    """Sampled outcomes carry 1 - TV per drafted position; with few coin flips it dominates the estimate."""
    rng = random.Random(5)
    est = Estimates(half_life_tokens=5000)
    for _ in range(3):  # 3 short requests: realised acceptance alone would stay near the 0.5 prior
        lv = simulate_level(rng, "drafter-prose", "target", 0.85, 4, 2)
        lv.overlap, lv.overlap_positions = 0.85 * lv.drafted * 20, lv.drafted * 20  # long sampled runs measured
        est.observe_level(lv, "prose-short")
    pair = est.pair("drafter-prose", "target", "prose-short")
    assert pair.expected == pytest.approx(0.85)
    assert est.alpha("drafter-prose", "target", "prose-short") == pytest.approx(0.85, abs=0.05)
    greedy = Estimates(half_life_tokens=5000)
    rng = random.Random(5)
    for _ in range(3):
        greedy.observe_level(simulate_level(rng, "drafter-prose", "target", 0.85, 4, 2), "prose-short")
    assert greedy.pair("drafter-prose", "target", "prose-short").expected is None
    assert abs(greedy.alpha("drafter-prose", "target", "prose-short") - 0.85) > 0.05
    bogus = simulate_level(rng, "drafter-prose", "target", 0.85, 4, 2)
    bogus.overlap, bogus.overlap_positions = 99.0, 1  # impossible (> positions): ignored
    before = est.pair("drafter-prose", "target", "prose-short").overlap
    est.observe_level(bogus, "prose-short")
    assert est.pair("drafter-prose", "target", "prose-short").overlap <= before


def test_driver_work_and_hops_are_learned_from_profiles_and_priced_per_round():
    """The drivers report their own work per round and the calls' round trips; both enter the cost."""
    est = synthetic({m: line for m, line in PROFILE.items() if m != DRIVER}, ALPHAS, hop_ms=0.4)
    assert est.hop(1) == pytest.approx(0.4, rel=0.01)  # the setting is the prior
    for batch in (1, 2, 4, 8, 16):
        rounds, calls = 50, 40
        est.observe_profile(StepProfile("t1", 1.0, batch, 0, [
            ModelStep(DRIVER, "cpu", rounds, rounds * (1.0 + 0.5 * batch) / 1e3, rounds * batch, batch),
            ModelStep(HOP, "nats", calls, calls * (2.0 + 0.25 * batch) / 1e3, calls * batch, batch),
        ]))
    assert est.driver_ms(8) == pytest.approx(1.0 + 0.5 * 8, rel=0.05)
    assert est.hop(8) == pytest.approx(2.0 + 0.25 * 8, rel=0.05)
    assert DRIVER not in est.summary()["acceptance"] and est.step("target").fit() == pytest.approx((2.0, 0.05))
    est.load["t1"] = (1e18, 8, 0)
    p = predict(("drafter-code", "target"), (1,), "code-short", est, calibrated=False)
    assert p.levels[0]["hop_ms"] == pytest.approx(est.hop(8)) and p.levels[-1]["driver_ms"] == pytest.approx(est.driver_ms(8))
    # Per round the driver's work is paid once: k = 1 pays it on fewer tokens than k = 4.
    t_d = est.step_ms("drafter-code", 8) + est.hop(8)
    t_t = est.step_ms("target", 16) + est.driver_ms(8)
    assert p.model_ms == pytest.approx((t_d + t_t) / reference_expected(est, "drafter-code", "target", "code-short", 1))
    # A costly driver round moves the decision towards more tokens per round.
    cheap = synthetic(PROFILE, ALPHAS, hop_ms=0.4, live=8)
    assert decide("code-short", est, CHAINS, K_MAX).winner.k[0] >= decide("code-short", cheap, CHAINS, K_MAX).winner.k[0]


def test_table_carries_alternatives_and_exploration_waits_for_low_load():
    from services.router.service import ALTERNATIVES, Router
    from shared.settings import RouterSettings, Settings

    settings = Settings(router=RouterSettings(explore_rate=1.0, explore_depth_rate=0.0, explore_max_batch=2.0, shared_chain_batch=100.0))
    router = Router(settings, store=None, params={}, seed=0)
    router.estimates = synthetic(PROFILE, ALPHAS, live=8)
    table = router.table()
    for entry in table.assignments:  # under load: the cost winner, never a trial
        assert entry.reason != "explore"
        assert 1 < len(entry.alternatives) <= ALTERNATIVES
        assert (entry.alternatives[0].chain, entry.alternatives[0].k) == (entry.chain, entry.k)
        costs = [c.predicted_ms_per_token for c in entry.alternatives]
        assert costs == sorted(costs)
    router.estimates.load["t1"] = (1e18, 1, 0)
    assert any(e.reason == "explore" for e in router.table().assignments)  # idle: trials run


def test_under_load_every_class_rides_the_chain_cheapest_over_all_classes():
    from services.router.service import Router
    from shared.settings import RouterSettings, Settings

    def router_at(live: int, shared_from: float) -> Router:
        router = Router(Settings(router=RouterSettings(explore_rate=0.0, explore_depth_rate=0.0, shared_chain_batch=shared_from)),
                        store=None, params={}, seed=0)
        router.chains = CHAINS
        router.estimates = synthetic(PROFILE, ALPHAS, live=live)
        return router

    own = router_at(4, 100.0).decide_all()
    assert len({c.winner.chain for c in own.values()}) > 1  # alone, code and prose take their specialists
    choices = router_at(4, 1.5).decide_all()
    chains = {c.winner.chain for c in choices.values()}
    assert len(chains) == 1
    (chain,) = chains
    per_class = {cls: {p.chain: p for p in c.ranking} for cls, c in own.items()}
    totals = {ch: sum(r[ch].ms_per_token for r in per_class.values()) for ch in per_class["code-short"]}
    assert chain == min(totals, key=totals.get)
    # one k too, the cheapest summed over the classes: a round's forward pads every chunk to the longest
    by_k: dict[tuple, float] = {}
    for c in own.values():
        for p in c.options:
            if p.chain == chain:
                by_k[p.k] = by_k.get(p.k, 0.0) + p.ms_per_token
    one_k = min(by_k, key=by_k.get)
    assert len({per_class[cls][chain].k for cls in own}) > 1  # alone, the classes would take different k
    for cls, c in choices.items():
        assert c.shared and c.reason in ("shared", "target-alone")
        assert (c.winner.chain, c.winner.k) == (chain, one_k)
    table = router_at(4, 1.5).table()
    assert all([(a.chain, a.k) for a in e.alternatives] == [(e.chain, e.k)] for e in table.assignments)
    assert {c.winner.chain for c in router_at(1, 1.5).decide_all().values()} == {c.winner.chain for c in own.values()}


def test_each_class_takes_the_chain_it_ran_fastest_on():
    est = synthetic(PROFILE, ALPHAS)
    code, prose = ("drafter-code", "target"), ("drafter-prose", "target")
    for cls, fast, slow in (("code-short", prose, code), ("prose-short", code, prose)):  # against the model's guess
        for _ in range(3):
            est.observe_calibration(fast, 1.0, 3.0, 5.0, (4,), cls)
            est.observe_calibration(slow, 1.0, 6.0, 5.0, (4,), cls)
    for cls in ("code-short", "prose-short"):
        est.observe_calibration(TARGET_ALONE, 1.0, 8.0, 8.0, (), cls)
    assert decide("code-short", est, CHAINS, K_MAX, batch=1.0).winner.chain == code  # the model's pick
    assert decide("code-short", est, CHAINS, K_MAX, batch=1.0, measured_only=True).winner.chain == prose
    assert decide("prose-short", est, CHAINS, K_MAX, batch=1.0, measured_only=True).winner.chain == code
    # a class's first outcome is its own
    est.observe_calibration(code, 1.0, 1.0, 5.0, (4,), "code-long")
    assert est.realised_tpot(code, (4,), 1.0, "code-long") == 1.0
    assert est.realised_tpot(code, (4,), 1.0) != 1.0


def test_a_chain_fast_on_one_class_competes_on_another_at_the_model_for_that_class():
    """bench adaptive, bench family, idle: `drafter-prose,target` ran 5.6 ms per token on short
    prose; code-long, with no outcome of its own on it, took it at that TPOT (every class's
    EWMA) and realised 14-22 ms against `ngram,target`'s ~9 (here the code drafter stands for
    it), at k = 5 then 6, each new k again at short prose's TPOT. Another class's TPOT is no
    estimate: the model for this class (its acceptance), times the chain's realised/modelled
    ratio here, is."""
    est = synthetic(PROFILE, ALPHAS)
    prose, other = ("drafter-prose", "target"), ("drafter-code", "target")
    for ks in ((4,), (5,)):
        model = predict(prose, ks, "prose-short", est, 1.0, calibrated=False).model_ms
        for _ in range(5):
            est.observe_calibration(prose, 1.0, 0.5 * model, model, ks, "prose-short")  # fast on its domain
    other_model = predict(other, (4,), "code-long", est, 1.0, calibrated=False).model_ms
    for _ in range(3):
        est.observe_calibration(other, 1.0, other_model, other_model, (4,), "code-long")
        est.observe_calibration(TARGET_ALONE, 1.0, 2 * other_model, 2 * other_model, (), "code-long")
    assert est.realised_tpot(prose, (4,), 1.0, "code-long") is None and est.ran_here(prose, (4,), 1.0)
    assert est.ratio_nearest(prose, (4,), 1.0, "code-long") is None  # it ran here
    choice = decide("code-long", est, CHAINS, K_MAX, batch=1.0, measured_only=True)
    mine = next(p for p in choice.ranking if p.chain == prose)
    modelled = predict(prose, mine.k, "code-long", est, 1.0, calibrated=False).model_ms
    assert mine.ms_per_token == pytest.approx(modelled * est.calibration_ratio(prose, 1.0, mine.k))
    assert mine.ms_per_token > est.realised_tpot(prose, mine.k, 1.0)  # not short prose's TPOT
    # once it ran on the class, slowly, the class's own outcome is what it competes at
    for ks in ((4,), (5,)):
        est.observe_calibration(prose, 1.0, 3 * other_model, other_model, ks, "code-long")
    choice = decide("code-long", est, CHAINS, K_MAX, batch=1.0, measured_only=True)
    assert choice.winner.chain == other
    assert est.realised_tpot(prose, (4,), 1.0, "code-long") == pytest.approx(3 * other_model)
    assert next(p for p in choice.ranking if p.chain == prose).ms_per_token > 2 * other_model  # k = 4, 5 or a step


def test_a_chain_that_ran_at_another_load_competes_at_the_model_scaled_by_what_ran_here():
    est = synthetic(PROFILE, ALPHAS)
    fast, slow = ("drafter-code", "target"), ("drafter-code", "verifier", "target")
    model = {b: predict(fast, (4,), "code-short", est, b, calibrated=False).model_ms for b in (1.0, 4.0)}
    for _ in range(3):
        est.observe_calibration(fast, 1.0, 0.5 * model[1.0], model[1.0], (4,), "code-short")  # batch 1 only: half the model
    assert est.realised_tpot(fast, (4,), 4.0, "code-short") is None  # two buckets up: never ran there
    # Nothing ran at batch 4: the model there, times the chain's own ratio at the nearest load.
    choice = decide("code-short", est, CHAINS, K_MAX, batch=4.0, measured_only=True)
    assert choice.winner.chain == fast and choice.winner.ms_per_token == pytest.approx(0.5 * model[4.0])
    assert est.ratio_nearest(fast, (4,), 4.0, "code-short") == pytest.approx(0.5)
    assert est.ratio_nearest(fast, (4,), 1.0, "code-short") is None  # it ran here: realised_tpot answers
    assert est.ratio_nearest(fast, (3,), 4.0) is None  # this k never ran
    # Once chains ran at batch 4, at 3x the model: the model's error there is theirs (bench adaptive,
    # bench family: every chain 1.5-2.1x at batch 16, 0.7-1.4x at batch 1; the target alone, run
    # only idle so far at 0.73, won the burst at 33 ms per token predicted and realised 113-140).
    for _ in range(3):
        est.observe_calibration(slow, 4.0, 30.0, 10.0, (4, 4), "code-short")
        est.observe_calibration(TARGET_ALONE, 4.0, 9.0, 3.0, (), "code-short")
    choice = decide("code-short", est, CHAINS, K_MAX, batch=4.0, measured_only=True)
    here = est.calibration_ratio(fast, 4.0, (4,))
    assert here == pytest.approx(3.0, rel=0.05)
    mine = next(p for p in choice.ranking if p.chain == fast)
    assert mine.ms_per_token == pytest.approx(model[4.0] * here)
    assert {p.chain for p in choice.ranking} == {fast, slow, TARGET_ALONE}


def test_exploration_is_bounded_by_what_a_chain_realised_here_and_how_often():
    """A stale chain measured slow here is not tried again; one measured near the winner is."""
    from services.router.decision import EXPLORE_WITHIN, explore_within

    assert explore_within(0) == EXPLORE_WITHIN and explore_within(3) == pytest.approx(1.5)
    assert explore_within(10) == pytest.approx(1 + 1 / 11 ** 0.5) and explore_within(-1) == EXPLORE_WITHIN
    est = synthetic(PROFILE, ALPHAS)
    fast, near, slow = ("drafter-code", "target"), ("verifier", "target"), ("drafter-code", "verifier", "target")
    for chain, ks, ms in ((fast, (2,), 3.0), (near, (2,), 3.3), (slow, (2, 2), 4.8)):  # 1x, 1.1x, 1.6x the winner
        for _ in range(10):
            est.observe_calibration(chain, 1.0, ms, 3.0, ks, "code-short")
    for _ in range(10):
        est.observe_calibration(TARGET_ALONE, 1.0, 9.0, 9.0, (), "code-short")
    rng = random.Random(1)
    chains = [fast, near, slow, TARGET_ALONE]
    picks = [decide("code-short", est, chains, K_MAX, batch=1.0, measured_only=True, explore_rate=1.0, rng=rng,
                    explore_stale_s=1e-9) for _ in range(40)]
    assert all(c.best.chain == fast for c in picks)
    assert {c.winner.chain for c in picks if c.explored} == {near}  # stale, both: only the near one is tried
    assert not any(c.explored for c in (decide("code-short", est, chains, K_MAX, batch=1.0, measured_only=True,
                                                explore_rate=1.0, rng=rng) for _ in range(20)))  # fresh: none
    # the same slow chain with no outcome here (2x bound) is tried
    est.calibration.pop((slow, 0))
    tried = {decide("code-short", est, chains, K_MAX, batch=1.0, measured_only=True, explore_rate=1.0, rng=rng,
                    explore_stale_s=1e-9).winner.chain for _ in range(40)}
    assert slow in tried


def test_a_depth_known_dear_is_not_tried_again_when_stale():
    from services.router.decision import explore_depth

    est = synthetic(PROFILE, ALPHAS)
    chain = ("drafter-code", "target")
    for _ in range(10):
        est.observe_calibration(chain, 1.0, 3.0, 3.0, (3,), "code-short")
        est.observe_calibration(chain, 1.0, 4.8, 3.0, (2,), "code-short")  # 1.6x the winner: known dear
        est.observe_calibration(TARGET_ALONE, 1.0, 9.0, 9.0, (), "code-short")
    choice = decide("code-short", est, [chain, TARGET_ALONE], K_MAX, batch=1.0, measured_only=True)
    assert choice.winner.k == (3,)
    rng = random.Random(0)
    # k = 4 never ran: tried; k = 2 ran 10 times at 1.6x: not, stale or not
    assert {explore_depth(choice, est, 1.0, K_MAX, rng, rate=1.0, until=10, stale_s=1e-9).winner.k
            for _ in range(30)} == {(4,)}
    for _ in range(10):
        est.observe_calibration(chain, 1.0, 3.1, 3.0, (4,), "code-short")
    choice = decide("code-short", est, [chain, TARGET_ALONE], K_MAX, batch=1.0, measured_only=True)
    assert choice.winner.k == (3,)
    assert {explore_depth(choice, est, 1.0, K_MAX, rng, rate=1.0, until=10, stale_s=1e-9).winner.k
            for _ in range(30)} == {(4,)}  # stale: the near one again, never the dear one
    assert explore_depth(choice, est, 1.0, K_MAX, rng, rate=1.0, until=10) is choice  # fresh: nothing


def test_a_depth_known_dear_is_not_tried_for_every_class_on_the_shared_chain():
    from services.router.decision import explore_shared_depth

    est = synthetic(PROFILE, ALPHAS, live=16)
    chain = ("drafter-code", "target")
    for cls in ("code-short", "prose-short"):
        for _ in range(10):
            est.observe_calibration(chain, 16.0, 30.0, 30.0, (3,), cls)
            est.observe_calibration(chain, 16.0, 48.0, 30.0, (2,), cls)  # 1.6x: known dear
            est.observe_calibration(chain, 16.0, 31.0, 30.0, (4,), cls)  # near
            est.observe_calibration(TARGET_ALONE, 16.0, 90.0, 90.0, (), cls)
    choices = {cls: decide(cls, est, [chain, TARGET_ALONE], K_MAX, batch=16.0, measured_only=True)
               for cls in ("code-short", "prose-short")}
    assert {(c.winner.chain, c.winner.k) for c in choices.values()} == {(chain, (3,))}
    rng = random.Random(0)
    picks = [explore_shared_depth(choices, est, 16.0, K_MAX, rng, rate=1.0, until=10, stale_s=1e-9) for _ in range(30)]
    assert {c.winner.k for p in picks for c in p.values()} == {(4,)}  # both stale, as often seen: only the near one
    assert explore_shared_depth(choices, est, 16.0, K_MAX, rng, rate=1.0, until=10) is choices  # fresh: nothing


def test_exploration_reaches_chains_that_never_ran_when_only_measured_ones_compete():
    est = synthetic(PROFILE, ALPHAS)
    ran = ("verifier", "target")
    for _ in range(20):
        est.observe_calibration(ran, 1.0, 3.0, 3.0, (2,), "code-short")
    rng = random.Random(1)
    picks = {decide("code-short", est, CHAINS, K_MAX, batch=1.0, measured_only=True, explore_rate=1.0, rng=rng).winner.chain
             for _ in range(20)}
    assert picks - {ran, TARGET_ALONE}  # chains with no outcome here are tried


def test_the_batch_is_held_through_a_lull():
    est = Estimates()
    est.observe_profile(StepProfile("t1", 1.0, 16, 0), now=100.0)
    est.observe_profile(StepProfile("t1", 1.0, 4, 0), now=101.0)
    assert est.batch(now=105.0) == 1.0  # no profile for 4 s: idle
    assert est.held_batch(10.0, now=105.0) == 16.0
    assert est.held_batch(10.0, now=110.5) == 4.0  # the 16 is older than 10 s
    assert est.held_batch(10.0, now=112.0) == 1.0
    assert est.held_batch(0.0, now=101.0) == 4.0  # no hold: the current batch


def test_a_burst_after_a_lull_gets_the_under_load_table():
    import time

    from services.router.service import Router
    from shared.settings import RouterSettings, Settings

    def router(hold_s: float, explore_rate: float = 0.0) -> Router:
        r = Router(Settings(router=RouterSettings(explore_rate=explore_rate, explore_depth_rate=0.0,
                                                  shared_chain_batch=1.5, load_hold_s=hold_s)),
                   store=None, params={}, seed=0)
        r.chains = CHAINS
        r.estimates = synthetic(PROFILE, ALPHAS)
        r.estimates.load.clear()
        r.estimates.observe_profile(StepProfile("t1", 1.0, 8, 0), now=time.monotonic() - 5.0)  # busy 5 s ago
        return r

    assert all(c.shared for c in router(30.0).decide_all().values())
    assert not any(c.shared for c in router(0.0).decide_all().values())
    assert router(30.0).explain().load["held_batch"] == 8.0
    # the under-load rules, at the load of now: one chain, no trials, costs at batch 1
    held = router(30.0, explore_rate=1.0).decide_all()
    assert all(c.shared and not c.explored and c.winner.batch == 1.0 for c in held.values())
    assert any(c.explored for c in router(0.0, explore_rate=1.0).decide_all().values())


def test_calibration_per_k_is_shrunk_to_its_chains():
    est = synthetic(PROFILE, ALPHAS)
    chain = ("drafter-code", "target")
    for _ in range(30):
        est.observe_calibration(chain, 1.0, 30.0, 10.0, (1,))  # k = 1 realises 3x its prediction
        est.observe_calibration(chain, 1.0, 10.0, 10.0, (4,))  # k = 4 exactly its prediction
    chain_ratio = est.calibration_ratio(chain, 1.0)
    assert 1.5 < chain_ratio < 2.5
    # Decayed weight ~10 outcomes each, against the chain's ratio worth 2.
    assert est.calibration_ratio(chain, 1.0, (1,)) == pytest.approx((10 * 3.0 + 2 * chain_ratio) / 12, rel=0.02)
    assert est.calibration_ratio(chain, 1.0, (4,)) == pytest.approx((10 * 1.0 + 2 * chain_ratio) / 12, rel=0.02)
    assert est.calibration_ratio(chain, 1.0, (2,)) == chain_ratio  # never measured: the chain's ratio
    raw = predict(chain, (1,), "code-short", est, batch=1.0, calibrated=False).model_ms
    assert predict(chain, (1,), "code-short", est, batch=1.0).ms_per_token == pytest.approx(
        raw * est.calibration_ratio(chain, 1.0, (1,)))


def test_an_outcome_is_calibrated_at_the_load_it_ran_under():
    from services.router.estimates import load_bucket
    from services.router.service import Router
    from shared.settings import Settings

    router = Router(Settings(), store=None, params={}, seed=0)
    router.estimates = synthetic(PROFILE, ALPHAS, live=1)  # idle now
    level = LevelOutcome("drafter-code", "target", 30, 20, [10, 10, 10], [8, 7, 5])
    router.on_outcome(Outcome("r1", "code-short", ["drafter-code", "target"], [3], 32, 10, 20.0, 9.0, 300.0,
                              [level], "length", "t1", batch_mean=9.0))
    measured = {(chain, bucket) for (chain, bucket), c in router.estimates.calibration.items() if c.observations}
    assert measured == {(("drafter-code", "target"), load_bucket(9.0))} and load_bucket(9.0) != load_bucket(1.0)


def test_an_outcome_whose_rounds_carried_other_chains_is_not_calibrated():
    from services.router.service import MIXED_MAX, Router
    from shared.settings import Settings

    router = Router(Settings(), store=None, params={}, seed=0)
    router.estimates = synthetic(PROFILE, ALPHAS, live=1)
    level = LevelOutcome("drafter-code", "target", 30, 20, [10, 10, 10], [8, 7, 5])

    def outcome(rid: str, mixed: float) -> Outcome:
        return Outcome(rid, "code-short", ["drafter-code", "target"], [3], 32, 10, 20.0, 9.0, 300.0, [level],
                       "length", "t1", batch_mean=4.0, mixed_share=mixed)

    router.on_outcome(outcome("r1", 0.9))  # its TPOT was the slowest chain's in each round
    assert not any(c.observations for c in router.estimates.calibration.values())
    assert router.estimates.pair("drafter-code", "target", "code-short").observations  # acceptance still counts
    router.on_outcome(outcome("r2", MIXED_MAX))
    assert sum(c.observations for c in router.estimates.calibration.values()) == 1
    replayed = Router(Settings(), store=None, params={}, seed=0)
    rows = [{"reason": "outcome", "chain": "drafter-code,target", "k": [3], "tokens": 32, "tpot_ms": 9.0,
             "predicted_ms_per_token": 4.0, "batch_mean": 4.0, "mixed_share": m} for m in (0.9, 0.0, None)]
    replayed.resume({"decisions": rows})
    assert sum(c.observations for c in replayed.estimates.calibration.values()) == 2


def test_neighbouring_depths_are_one_step_on_one_level():
    from services.router.decision import neighbours

    assert neighbours((4,), 6) == [(3,), (5,)]
    assert neighbours((1,), 6) == [(2,)] and neighbours((6,), 6) == [(5,)]
    assert neighbours((1, 3), 3) == [(2, 3), (1, 2)]


def test_depth_is_explored_around_the_winner_at_any_load_until_each_neighbour_is_known():
    from services.router.decision import explore_depth

    est = synthetic(PROFILE, ALPHAS, live=8)
    chain = ("drafter-code", "target")
    for batch in (1.0, 8.0):
        for _ in range(3):
            est.observe_calibration(chain, batch, 2.0, 2.0, (4,), "code-short")
            est.observe_calibration(TARGET_ALONE, batch, 9.0, 9.0, (), "code-short")
    rng = random.Random(0)
    for batch in (1.0, 8.0):  # idle and under load alike
        choice = decide("code-short", est, CHAINS, K_MAX, batch=batch, measured_only=True)
        assert (choice.winner.chain, choice.winner.k) == (chain, (4,))
        tried = explore_depth(choice, est, batch, K_MAX, rng, rate=1.0, until=2)
        assert tried.explored and tried.reason == "explore" and tried.winner.chain == chain and tried.winner.k == (3,)
        assert "exploring depth" in tried.why and tried.best is choice.best
        assert explore_depth(choice, est, batch, K_MAX, rng, rate=0.0) is choice
    # k = 3 (K_MAX = 4: the only neighbour) known at idle: nothing more to try there, still under load
    for _ in range(2):
        est.observe_calibration(chain, 1.0, 3.0, 2.0, (3,), "code-short")
    idle = decide("code-short", est, CHAINS, K_MAX, batch=1.0, measured_only=True)
    assert idle.winner.k == (4,) and explore_depth(idle, est, 1.0, K_MAX, rng, rate=1.0, until=2) is idle
    loaded = decide("code-short", est, CHAINS, K_MAX, batch=8.0, measured_only=True)
    assert explore_depth(loaded, est, 8.0, K_MAX, rng, rate=1.0, until=2).winner.k == (3,)
    # the target alone has no depth to try
    alone = decide("code-long", Estimates(), [TARGET_ALONE], K_MAX, batch=1.0)
    assert explore_depth(alone, est, 1.0, K_MAX, rng, rate=1.0) is alone


def test_a_depth_that_realises_less_wins_and_its_neighbours_are_tried_next():
    est = synthetic(PROFILE, ALPHAS)
    chain = ("drafter-code", "target")
    for _ in range(3):
        est.observe_calibration(chain, 1.0, 3.0, 3.0, (2,), "code-short")
        est.observe_calibration(chain, 1.0, 2.5, 3.0, (3,), "code-short")  # the trial one step up ran faster
        est.observe_calibration(TARGET_ALONE, 1.0, 9.0, 9.0, (), "code-short")
    from services.router.decision import explore_depth

    choice = decide("code-short", est, CHAINS, K_MAX, batch=1.0, measured_only=True)
    assert (choice.winner.chain, choice.winner.k, choice.winner.ms_per_token) == (chain, (3,), 2.5)
    assert explore_depth(choice, est, 1.0, K_MAX, random.Random(0), rate=1.0, until=3).winner.k == (4,)


def test_realised_tpots_inside_a_load_bucket_are_compared_at_one_batch():
    """k = 4 ran at the top of the idle bucket (batch 1.4: a loaded run's lulls), k = 3 at its
    bottom: raw, k = 4's TPOT is the higher; at the batch of the decision, by the model, it is lower."""
    est = synthetic(PROFILE, ALPHAS)
    chain = ("drafter-code", "target")

    def model(ks, batch):
        return predict(chain, ks, "code-short", est, batch, calibrated=False).model_ms

    for _ in range(3):
        est.observe_calibration(chain, 1.4, 0.99 * model((4,), 1.4), model((4,), 1.4), (4,), "code-short")
        est.observe_calibration(chain, 1.0, model((3,), 1.0), model((3,), 1.0), (3,), "code-short")
        est.observe_calibration(TARGET_ALONE, 1.0, 9.0, 9.0, (), "code-short")
    assert est.realised_tpot(chain, (4,), 1.0, "code-short") > est.realised_tpot(chain, (3,), 1.0, "code-short")
    assert est.realised(chain, (4,), 1.0, "code-short").batch == pytest.approx(1.4)
    choice = decide("code-short", est, CHAINS, K_MAX, batch=1.0, measured_only=True)
    assert (choice.winner.chain, choice.winner.k) == (chain, (4,))
    assert choice.winner.ms_per_token == pytest.approx(0.99 * model((4,), 1.0))
    ranked = {p.k: p.ms_per_token for p in
              decide("code-short", est, [chain], K_MAX, batch=1.4, measured_only=True).ranking if p.chain == chain}
    assert ranked[(4,)] == pytest.approx(0.99 * model((4,), 1.4))  # at the batch it ran at: as realised


def test_the_router_explores_depth_under_load_on_the_shared_chain():
    from services.router.service import Router
    from shared.settings import RouterSettings, Settings

    router = Router(Settings(router=RouterSettings(explore_rate=1.0, explore_depth_rate=1.0, shared_chain_batch=1.5)),
                    store=None, params={}, seed=0)
    router.chains = CHAINS
    router.estimates = synthetic(PROFILE, ALPHAS, live=8)
    plain = {cls: c.winner for cls, c in router.decide_all(explore=False).items()}
    assert len({(p.chain, p.k) for p in plain.values()}) == 1  # one chain at one k for every class
    choices = router.decide_all()
    assert len({(c.winner.chain, c.winner.k) for c in choices.values()}) == 1  # still: every class tries the same k
    for cls, c in choices.items():
        assert c.explored and c.shared and c.reason == "explore" and c.winner.chain == plain[cls].chain
        assert "exploring depth for every class" in c.why
        assert sum(abs(a - b) for a, b in zip(c.winner.k, plain[cls].k)) == 1  # one step on one level


def test_once_chains_ran_the_model_predicts_only_them_unless_exploring(monkeypatch):
    import services.router.decision as decision

    est = synthetic(PROFILE, ALPHAS)
    for ks in ((3,), (4,)):
        est.observe_calibration(("drafter-code", "target"), 1.0, 2.0, 2.0, ks, "code-short")
    calls = []
    real = decision.predict
    monkeypatch.setattr(decision, "predict", lambda *a, **kw: calls.append(a[:2]) or real(*a, **kw))
    pool = len(candidates(CHAINS, K_MAX))
    choice = decide("code-short", est, CHAINS, K_MAX, batch=1.0, measured_only=True)
    # two measured k, the one k a step from them (2; K_MAX is 4), the target alone
    assert choice.winner.chain == ("drafter-code", "target") and len(calls) == 4
    calls.clear()
    decide("code-short", est, CHAINS, K_MAX, batch=1.0, measured_only=True, explore_rate=1.0, rng=random.Random(0))
    assert len(calls) == 4 + pool  # a trial draws from the model's ranking of every candidate
    calls.clear()
    decide("code-short", Estimates(), CHAINS, K_MAX, batch=1.0, measured_only=True)
    assert len(calls) == pool  # nothing ran: the model decides


def test_the_table_carries_the_under_load_assignments_of_each_higher_load():
    from services.router.service import Router
    from shared.messages import Assignments, decode, encode
    from shared.settings import RouterSettings, Settings

    router = Router(Settings(router=RouterSettings(explore_rate=0.0, explore_depth_rate=0.0, shared_chain_batch=1.5)),
                    store=None, params={}, seed=0)
    router.chains = CHAINS
    router.estimates = synthetic(PROFILE, ALPHAS, live=1)
    assert router.table().by_load == []  # nothing ran: no load tables (the model alone would decide them)
    code = ("drafter-code", "target")
    for cls in ("code-short", "prose-short"):
        for _ in range(3):
            router.estimates.observe_calibration(code, 1.0, 2.0, 5.0, (4,), cls)  # idle: the drafter wins
            router.estimates.observe_calibration(TARGET_ALONE, 1.0, 8.0, 8.0, (), cls)
            router.estimates.observe_calibration(code, 16.0, 40.0, 5.0, (4,), cls)  # at batch 16 it is slower
            router.estimates.observe_calibration(TARGET_ALONE, 16.0, 20.0, 8.0, (), cls)  # than the target alone
    table = decode(encode(router.table()), Assignments)
    assert (table.batch, table.targets) == (1.0, 1)
    assert {a.request_class: tuple(a.chain) for a in table.assignments}["code-short"] == code
    assert [t.min_batch for t in table.by_load] == [1.5, 2.5, 5.5, 11.5]
    assert [t.batch for t in table.by_load] == [2.0, 4.0, 8.0, 16.0]
    loaded = table.by_load[-1]
    assert {tuple(a.chain) for a in loaded.assignments} == {TARGET_ALONE}  # one chain for every class: measured
    assert all(a.alternatives and len(a.alternatives) == 1 for a in loaded.assignments)
    assert "from batch 11.5 (decided at 16)" in router.explain().load["by_load"]
    # Only loads above the current one, and only under load (from shared_chain_batch).
    router.estimates.load["t1"] = (1e18, 4, 0)
    assert [t.min_batch for t in router.table().by_load] == [5.5, 11.5]
    router.cfg = router.cfg.model_copy(update={"shared_chain_batch": 6.0})
    assert [t.min_batch for t in router.table().by_load] == [11.5]


def test_a_chain_that_never_ran_borrows_the_model_error_of_the_nearest_load_measured():
    est = synthetic(PROFILE, ALPHAS)
    assert est.calibration_ratio(TARGET_ALONE, 16.0, ()) == 1.0  # nothing measured anywhere: the model
    chain = ("drafter-code", "target")
    est.observe_calibration(chain, 1.0, 20.0, 10.0, (4,))  # the model is 2x optimistic at batch 1
    assert est.calibration_ratio(TARGET_ALONE, 1.0, ()) == pytest.approx(2.0)  # the chains measured here
    assert est.calibration_ratio(TARGET_ALONE, 16.0, ()) == pytest.approx(2.0)  # the nearest load measured
    est.observe_calibration(chain, 4.0, 15.0, 10.0, (4,))
    assert est.calibration_ratio(TARGET_ALONE, 16.0, ()) == pytest.approx(1.5)  # batch 4 is nearer than 1
    assert est.calibration_ratio(chain, 16.0, (4,)) == pytest.approx(1.75)  # a chain that ran: its own, elsewhere


def test_a_k_one_step_from_a_measured_one_competes_at_its_realised_tpot_times_the_models_ratio():
    est = synthetic(PROFILE, ALPHAS)
    chain = ("drafter-code", "target")
    model = {k: predict(chain, (k,), "prose-short", est, 1.0, calibrated=False).model_ms for k in range(1, 7)}
    assert model[3] < 0.98 * model[4] and model[2] < 0.98 * model[3]  # prose on the code drafter: fewer tokens pay
    for _ in range(3):
        est.observe_calibration(chain, 1.0, 10.0, model[4], (4,), "prose-short")  # measured at k = 4 only
        est.observe_calibration(TARGET_ALONE, 1.0, 30.0, 30.0, (), "prose-short")
    choice = decide("prose-short", est, [chain, TARGET_ALONE], 6, margin=0.02, batch=1.0, measured_only=True)
    assert choice.winner.k == (3,)  # one step down, not the model's best (1) never measured
    assert choice.winner.ms_per_token == pytest.approx(10.0 * model[3] / model[4] * 1.02)
    assert {p.k for p in choice.ranking} == {(3,), ()}  # best per chain: k = 3 over k = 4 and 5
    # Once k = 3 ran, k = 2 is the step from it.
    for _ in range(3):
        est.observe_calibration(chain, 1.0, 10.0 * model[3] / model[4], model[3], (3,), "prose-short")
    assert decide("prose-short", est, [chain, TARGET_ALONE], 6, batch=1.0, measured_only=True).winner.k == (2,)
    # A step the model says gains less than the margin is not taken: code on the code drafter, from k = 5.
    code = synthetic(PROFILE, ALPHAS)
    at = {k: predict(chain, (k,), "code-short", code, 1.0, calibrated=False).model_ms for k in (4, 5, 6)}
    assert at[4] < at[5] < at[4] * 1.02 and at[5] < at[6]  # k = 4 gains, by less than 2%
    for _ in range(3):
        code.observe_calibration(chain, 1.0, 10.0, at[5], (5,), "code-short")
        code.observe_calibration(TARGET_ALONE, 1.0, 30.0, 30.0, (), "code-short")
    assert decide("code-short", code, [chain, TARGET_ALONE], 6, batch=1.0, measured_only=True).winner.k == (5,)
    assert decide("code-short", code, [chain, TARGET_ALONE], 6, margin=0.0, batch=1.0,
                  measured_only=True).winner.k == (4,)


def test_under_load_the_shared_chain_is_held_against_one_cheaper_by_less_than_the_switch_margin():
    """bench adaptive, sustained high phase (48 requests at 16 in flight): 81 class decisions
    put a drafter chain in place of `ngram,target` as the shared chain on sums a few percent
    apart, and each switch left the requests in flight on the old chain for their life, so
    rounds waited for both chains' proposals."""
    from services.router.cost_model import Prediction
    from services.router.decision import Choice, shared

    ngram, code = ("ngram", "target"), ("drafter-code", "target")

    def choices(code_ms: float) -> dict[str, Choice]:
        out = {}
        for cls in ("code-short", "prose-short"):
            ranking = sorted([Prediction(ngram, (4,), 10.0, 10.0, 1.0, 16.0), Prediction(code, (4,), code_ms, code_ms, 1.0, 16.0),
                              Prediction(TARGET_ALONE, (), 30.0, 30.0, 1.0, 16.0)], key=lambda p: p.ms_per_token)
            out[cls] = Choice(cls, ranking[0], "cost", "", best=ranking[0], ranking=ranking)
        return out

    assert {c.winner.chain for c in shared(choices(9.8), 16.0).values()} == {code}  # no incumbent: the cheapest
    held = shared(choices(9.8), 16.0, incumbent=ngram, switch_margin=0.05)
    assert {c.winner.chain for c in held.values()} == {ngram} and all("kept" in c.why for c in held.values())
    assert {c.winner.chain for c in shared(choices(9.0), 16.0, incumbent=ngram, switch_margin=0.05).values()} == {code}
    assert {c.winner.chain for c in shared(choices(9.8), 16.0, incumbent=ngram).values()} == {code}  # no margin: off

    # the target alone and the shared chain a few percent apart: whichever holds stays (bench
    # adaptive, high phase: the target alone took a second every ten, 34 of 144 requests)
    def near_alone(alone_ms: float) -> dict[str, Choice]:
        out = {}
        for cls in ("code-short", "prose-short"):
            ranking = sorted([Prediction(ngram, (4,), 10.0, 10.0, 1.0, 16.0),
                              Prediction(TARGET_ALONE, (), alone_ms, alone_ms, 1.0, 16.0)], key=lambda p: p.ms_per_token)
            out[cls] = Choice(cls, ranking[0], "cost", "", best=ranking[0], ranking=ranking)
        return out

    assert {c.winner.chain for c in shared(near_alone(10.1), 16.0, margin=0.02).values()} == {TARGET_ALONE}  # SpecServe
    assert {c.winner.chain for c in shared(near_alone(10.1), 16.0, 0.02, ngram, 0.05).values()} == {ngram}
    assert {c.winner.chain for c in shared(near_alone(9.9), 16.0, 0.02, ngram, 0.05).values()} == {ngram}
    assert {c.winner.chain for c in shared(near_alone(9.0), 16.0, 0.02, ngram, 0.05).values()} == {TARGET_ALONE}
    assert {c.winner.chain for c in shared(near_alone(10.3), 16.0, 0.02, TARGET_ALONE, 0.05).values()} == {TARGET_ALONE}
    assert {c.winner.chain for c in shared(near_alone(11.0), 16.0, 0.02, TARGET_ALONE, 0.05).values()} == {ngram}


def test_the_router_holds_the_chain_it_shared_at_each_load():
    from services.router.estimates import load_bucket
    from services.router.service import Router
    from shared.settings import RouterSettings, Settings

    router = Router(Settings(router=RouterSettings(explore_rate=0.0, explore_depth_rate=0.0, shared_chain_batch=1.0,
                                                   shared_switch_margin=0.5)), store=None, params={}, seed=0)
    router.chains = CHAINS
    router.estimates = synthetic(PROFILE, ALPHAS, live=4)
    first = router.decide_all()
    (chain,) = {c.winner.chain for c in first.values()}
    bucket = load_bucket(router.estimates.batch())
    assert router.shared_chains[bucket] == chain
    assert router.shared_ks[bucket] == first["code-short"].winner.k  # and the one k every class took on it
    totals = {ch: sum(next(p for p in c.ranking if p.chain == ch).ms_per_token for c in first.values())
              for ch in {p.chain for p in first["code-short"].ranking}
              if all(any(p.chain == ch for p in c.ranking) for c in first.values())}
    runner_up = min((ch for ch in totals if ch not in (chain, TARGET_ALONE)), key=totals.get)
    assert totals[runner_up] <= 1.5 * totals[chain]
    router.shared_chains[bucket] = runner_up  # shared at this load before: held within 50%
    assert {c.winner.chain for c in router.decide_all().values()} == {runner_up}
    router.cfg = router.cfg.model_copy(update={"shared_switch_margin": 0.0})
    assert {c.winner.chain for c in router.decide_all().values()} == {chain}
    assert router.shared_chains[bucket] == chain


def test_under_load_every_class_takes_one_k_on_the_shared_chain():
    """A round verifies its requests in one forward over chunks padded to the longest: a class
    at k = 6 beside one at k = 4 makes every request pay for 7 positions (bench adaptive, high
    phase: `ngram,target` at k = 4, 5 and 6 at once)."""
    from services.router.cost_model import Prediction
    from services.router.decision import Choice, explore_shared_depth, shared

    ngram = ("ngram", "target")

    def choices(costs: dict[str, dict[int, float]]) -> dict[str, Choice]:
        out = {}
        for cls, by_k in costs.items():
            options = [Prediction(ngram, (k,), ms, ms, 1.0, 16.0) for k, ms in by_k.items()]
            options.append(Prediction(TARGET_ALONE, (), 30.0, 30.0, 1.0, 16.0))
            ranking = sorted([min(options[:-1], key=lambda p: p.ms_per_token), options[-1]], key=lambda p: p.ms_per_token)
            out[cls] = Choice(cls, ranking[0], "cost", "", best=ranking[0], ranking=ranking, options=options)
        return out

    costs = {"code-short": {4: 10.0, 6: 9.5, 3: 9.0}, "prose-short": {4: 9.0, 6: 11.0}}  # k = 3 not priced for prose
    out = shared(choices(costs), 16.0)
    assert {(c.winner.chain, c.winner.k) for c in out.values()} == {(ngram, (4,))}  # 19.0 against 20.5
    assert out["code-short"].winner.ms_per_token == 10.0 and "one k for every class" in out["code-short"].why
    held = shared(choices(costs), 16.0, incumbent=ngram, switch_margin=0.1, incumbent_k=(6,))
    assert {c.winner.k for c in held.values()} == {(6,)} and "kept: within 10%" in held["prose-short"].why
    assert {c.winner.k for c in shared(choices(costs), 16.0, incumbent=ngram, switch_margin=0.05,
                                       incumbent_k=(6,)).values()} == {(4,)}
    # the k may have a margin of its own: the chain held by 10%, the k by 5%
    apart_margins = shared(choices(costs), 16.0, incumbent=ngram, switch_margin=0.1, incumbent_k=(6,), k_switch_margin=0.05)
    assert {(c.winner.chain, c.winner.k) for c in apart_margins.values()} == {(ngram, (4,))}
    # no k priced for every class: each keeps its own best
    apart = shared(choices({"code-short": {6: 9.5}, "prose-short": {4: 9.0}}), 16.0)
    assert {cls: c.winner.k for cls, c in apart.items()} == {"code-short": (6,), "prose-short": (4,)}
    assert explore_shared_depth(apart, Estimates(), 16.0, 6, random.Random(0), rate=1.0) is apart
    assert explore_shared_depth(out, Estimates(), 16.0, 6, random.Random(0), rate=0.0) is out


def test_a_proposal_that_ends_before_k_buys_nothing_deeper():
    """An n-gram match can end before k: half the proposals at k = 6 draft 2 tokens. Every
    drafted token is accepted, so a round emits 1 + (2 + 6) / 2 = 5 tokens, not 7."""
    short = Acceptance()
    for _ in range(200):  # 20 proposals each: 10 of 2 tokens, 10 of 6
        short.observe(LevelOutcome("ngram", "target", 80, 80, [20, 20, 10, 10, 10, 10], [20, 20, 10, 10, 10, 10]), 1e9, k=6)
    assert short.continuation_per_position()[:3] == [1.0, pytest.approx(1.0, abs=1e-3), pytest.approx(0.5, abs=1e-3)]
    assert short.expected_tokens(6) == pytest.approx(5.0, rel=0.03)
    assert short.expected_tokens(2) == pytest.approx(3.0, rel=0.03)  # both positions always drafted
    unknown = Acceptance()  # the same counts without k (history rows): no continuation measured
    for _ in range(200):
        unknown.observe(LevelOutcome("ngram", "target", 80, 80, [20, 20, 10, 10, 10, 10], [20, 20, 10, 10, 10, 10]), 1e9)
    assert unknown.expected_tokens(6) > 6.5
    capped = Acceptance()  # k = 2 drafts at most 2: that is no short match
    for _ in range(200):
        capped.observe(LevelOutcome("ngram", "target", 40, 40, [20, 20], [20, 20]), 1e9, k=2)
    assert capped.continuation_per_position() == [1.0, pytest.approx(1.0, abs=1e-3)] and capped.continuation(4) == 1.0
    est = Estimates(half_life_tokens=1e9)  # outcomes carry each level's k to the estimates
    est.observe_outcome(Outcome("r1", "code-short", ["ngram", "target"], [6], 41, 10, 20.0, 2.0, 100.0,
                                [LevelOutcome("ngram", "target", 40, 40, [10, 10, 5, 5, 5, 5], [10, 10, 5, 5, 5, 5])]))
    assert est.pair("ngram", "target", "code-short").continuation(2) < 0.8


def test_what_ran_competes_at_its_rounds_time_over_the_tokens_a_round_emits():
    """k = 5 ran a few lucky prompts (38 drafts accepted of 50 tokens: 2.9 ms per token) beside
    k = 4's (30 of 50: 4.0). Its rounds took longer (12 ms against 10), and the class's matches
    end by position 4, so k = 5 emits no more per round than k = 4: k = 4 is the cheaper."""
    from services.router.service import Router
    from shared.settings import RouterSettings, Settings

    router = Router(Settings(router=RouterSettings(explore_rate=0.0, explore_depth_rate=0.0)), store=None, params={}, seed=0)
    est = router.estimates = Estimates(half_life_tokens=1e9)
    chain, cls = ("ngram", "target"), "code-short"
    plain = LevelOutcome("ngram", "target", 40, 30, [10, 10, 10, 10], [9, 8, 7, 6])  # 20 rounds
    lucky = LevelOutcome("ngram", "target", 48, 38, [12, 12, 12, 12, 0], [11, 10, 9, 8, 0])  # 12 rounds

    def outcome(rid: str, ks: list[int], tpot: float, levels: list[LevelOutcome]) -> Outcome:
        return Outcome(rid, cls, list(chain) if ks else ["target"], ks, 51, 10, 20.0, tpot, 300.0, levels, "length", "t1",
                       batch_mean=1.0)

    for i in range(5):
        router.on_outcome(outcome(f"a{i}", [4], 10.0 * 20 / 50, [plain]))
        router.on_outcome(outcome(f"b{i}", [5], 12.0 * 12 / 50, [lucky]))
    router.on_outcome(outcome("t", [], 9.0, []))
    four, five = est.realised(chain, (4,), 1.0, cls), est.realised(chain, (5,), 1.0, cls)
    assert (four.round_ms, five.round_ms) == (pytest.approx(10.0), pytest.approx(12.0))
    assert est.realised(("target",), (), 1.0, cls).round_ms == pytest.approx(9.0)  # one token a round
    assert five.tpot_ms < four.tpot_ms  # by TPOT k = 5 looks the cheaper
    choice = decide(cls, est, [chain], 6, batch=1.0, measured_only=True)
    costs = {p.k: p.ms_per_token for p in choice.options if p.chain == chain}
    per_round = 1 + est.draft_rate("ngram", cls) * (est.expected_tokens("ngram", "target", cls, 4) - 1)
    # times what this chain's rounds emitted in the class against the model, pooled over k
    # (both k's outcomes: a ratio common to them, so it does not pick between them)
    assert est.emitted_ratio(chain, cls) > 1.0
    assert costs[(4,)] == pytest.approx(10.0 / (per_round * est.emitted_ratio(chain, cls)))
    assert costs[(4,)] < costs[(5,)] and choice.winner.k == (4,)
    # a restarted router takes the rounds from the history: the bottom level's row of the request
    replayed = Router(Settings(), store=None, params={}, seed=0)
    replayed.resume({
        "pair_stats": [{"proposer": "ngram", "verifier": "target", "request_class": cls, "drafted": 40, "accepted": 30,
                        "accepted_per_position": [9, 8, 7, 6], "drafted_per_position": [10, 10, 10, 10],
                        "tv_distance": None, "request_id": "a0", "rounds": 20}],
        "decisions": [{"reason": "outcome", "chain": "ngram,target", "k": [4], "tokens": 51, "tpot_ms": 4.0,
                       "predicted_ms_per_token": 3.0, "batch_mean": 1.0, "request_id": "a0", "request_class": cls},
                      {"reason": "outcome", "chain": "target", "k": [], "tokens": 11, "tpot_ms": 9.0,
                       "predicted_ms_per_token": 9.0, "batch_mean": 1.0, "request_id": "t0", "request_class": cls}]})
    assert replayed.estimates.realised(chain, (4,), 1.0, cls).round_ms == pytest.approx(10.0)
    assert replayed.estimates.realised(("target",), (), 1.0, cls).round_ms == pytest.approx(9.0)


def test_a_k_one_step_from_what_the_class_measured_is_priced_from_it_not_from_other_classes():
    """bench adaptive, bench family, idle: code-long had run `drafter-code,target` at k = 4 only,
    realising 1.3x the model; code-short had tried k = 3 once, at 0.9x. code-long then took
    k = 3 at the model times code-short's ratio (7.1 ms per token, the winner against
    `ngram,target`'s 8.1) and realised 9.7 and 12.8. The model's error differs from class to
    class on one chain: the class's own k = 4, one step of the model away, is the nearer
    evidence."""
    est = synthetic(PROFILE, ALPHAS)
    chain = ("drafter-code", "target")
    model = {k: {cls: predict(chain, (k,), cls, est, 1.0, calibrated=False).model_ms for cls in ("code-long", "code-short")}
             for k in (3, 4)}
    for _ in range(3):
        est.observe_calibration(chain, 1.0, 1.3 * model[4]["code-long"], model[4]["code-long"], (4,), "code-long")
        est.observe_calibration(TARGET_ALONE, 1.0, 50.0, 50.0, (), "code-long")
    est.observe_calibration(chain, 1.0, 0.9 * model[3]["code-short"], model[3]["code-short"], (3,), "code-short")
    assert est.ran_here(chain, (3,), 1.0) and est.realised_tpot(chain, (3,), 1.0, "code-long") is None
    choice = decide("code-long", est, [chain, TARGET_ALONE], 6, margin=0.02, batch=1.0, measured_only=True)
    three = next(p for p in choice.options if p.chain == chain and p.k == (3,))
    step = 1.3 * model[4]["code-long"] * model[3]["code-long"] / model[4]["code-long"] * 1.02
    assert three.ms_per_token == pytest.approx(step)
    assert three.ms_per_token > 1.2 * model[3]["code-long"]  # not the model times code-short's 0.9
    # a k two steps away that other classes ran keeps the model times what they realised
    est.observe_calibration(chain, 1.0, 0.9 * model[3]["code-short"], model[3]["code-short"], (6,), "code-short")
    choice = decide("code-long", est, [chain, TARGET_ALONE], 6, margin=0.02, batch=1.0, measured_only=True)
    six = next(p for p in choice.options if p.chain == chain and p.k == (6,))
    assert six.ms_per_token == pytest.approx(predict(chain, (6,), "code-long", est, 1.0).ms_per_token)


def test_under_load_each_class_weighs_by_its_share_of_the_requests():
    """bench adaptive, high phase: every prompt has a domain, yet the `default` class counted as
    much as each of the four in the shared chain's sum, at prices swinging by 30 ms per token
    from one second to the next (model-only), and chose the shared chain as often as the
    classes that ran. A round's requests are the mix of recent requests: each class weighs by
    its share of them."""
    from services.router.cost_model import Prediction
    from services.router.decision import Choice, shared
    from services.router.service import DEFAULT_CLASS, Router
    from shared.settings import RouterSettings, Settings

    ngram, drafter = ("ngram", "target"), ("drafter-code", "target")

    def choices(costs: dict[str, dict[tuple, float]]) -> dict[str, Choice]:
        out = {}
        for cls, by_chain in costs.items():
            ranking = sorted((Prediction(ch, (4,), ms, ms, 1.0, 16.0) for ch, ms in by_chain.items()),
                             key=lambda p: p.ms_per_token)
            ranking.append(Prediction(TARGET_ALONE, (), 500.0, 500.0, 1.0, 16.0))
            out[cls] = Choice(cls, ranking[0], "cost", "", best=ranking[0], ranking=ranking, options=ranking)
        return out

    costs = {"code-short": {ngram: 60.0, drafter: 55.0}, "prose-short": {ngram: 60.0, drafter: 70.0},
             DEFAULT_CLASS: {ngram: 100.0, drafter: 70.0}}
    assert {c.winner.chain for c in shared(choices(costs), 16.0).values()} == {drafter}  # 195 against 220
    mix = {"code-short": 0.5, "prose-short": 0.5, DEFAULT_CLASS: 0.0}
    out = shared(choices(costs), 16.0, shares=mix)
    assert {c.winner.chain for c in out.values()} == {ngram}  # 60 against 62.5
    assert "at 60.000 ms/token over the classes by their share of requests" in out["code-short"].why
    assert {c.winner.chain for c in shared(choices(costs), 16.0, shares={"code-short": 1.0}).values()} == {drafter}

    est = Estimates()
    assert est.shares(["a", "b"]) == {"a": 0.5, "b": 0.5}  # nothing seen: equal
    for cls in ["a"] * 30 + ["b"] * 10:
        est.observe_traffic(cls)
    shares = est.shares(["a", "b", "c"])
    assert shares["c"] == 0.0 and 0.65 < shares["a"] < 0.75  # the older weigh a little less and sum(shares.values()) == pytest.approx(1.0)
    for _ in range(400):  # the mix moves on: the old requests fade
        est.observe_traffic("b")
    assert est.shares(["a", "b"])["b"] > 0.99
    # the router feeds it from every outcome and from the history it resumes
    router = Router(Settings(router=RouterSettings()), store=None, params={}, seed=0)
    router.on_outcome(Outcome("r1", "code-short", ["ngram", "target"], [4], 48, 100, 10.0, 5.0, 300.0))
    assert router.estimates.shares(["code-short", "prose-short"]) == {"code-short": 1.0, "prose-short": 0.0}
    resumed = Router(Settings(router=RouterSettings()), store=None, params={}, seed=0)
    resumed.resume({"decisions": [{"reason": "outcome", "request_class": "prose-short"},
                                  {"reason": "cost", "request_class": "code-short"}]})
    assert resumed.estimates.shares(["code-short", "prose-short"]) == {"code-short": 0.0, "prose-short": 1.0}


def test_what_a_chain_realised_is_the_mean_of_its_runs_not_the_last_one():
    """bench adaptive, 16 in flight: `drafter-prose,target` ran 194, 223 and 202 tok/s in three
    10 s runs, `ngram,target` 235, 219 and 214; with an EWMA of 0.2 over a class's ~12
    outcomes a run, the router kept the last run alone and took `drafter-prose,target` after
    its lucky one. The first outcomes are averaged, then an EWMA over about the last 20."""
    from services.router.estimates import REALISED_WEIGHT, Calibration

    seen = Calibration()
    for ms in [100.0] * 12 + [80.0] * 12:  # a slow run, then a fast one
        seen.observe(ms, 50.0, batch=16.0, round_ms=2 * ms)
    assert seen.tpot_ms == pytest.approx(90.0, rel=0.01) and seen.round_ms == pytest.approx(180.0, rel=0.01)
    for _ in range(200):  # what it costs moved for good: followed
        seen.observe(60.0, 50.0, batch=16.0, round_ms=120.0)
    assert seen.tpot_ms == pytest.approx(60.0, rel=1e-3) and seen.round_ms == pytest.approx(120.0, rel=1e-3)
    one = Calibration()
    one.observe(70.0, 50.0)
    one.observe(30.0, 50.0)  # no round time: the rounds' mean is over the outcomes that had one
    assert one.tpot_ms == pytest.approx(50.0) and one.round_ms is None and REALISED_WEIGHT < 0.1


def test_a_class_keeps_its_chain_and_k_while_another_is_cheaper_by_less_than_the_switch_margin():
    """tiny family, 1 req/s: `ngram,target` k = 3 to 6 priced within 3% of each other, and the
    class rode k = 3 x20, 4 x17 and 5 x1 as each estimate dipped in turn (TPOT p50 1.46 ms
    against the static k = 4's 1.39)."""
    from services.router.decision import hold
    from services.router.service import Router
    from shared.settings import RouterSettings, Settings

    chain = ("drafter-code", "target")
    router = Router(Settings(router=RouterSettings(explore_rate=0.0, explore_depth_rate=0.0, class_switch_margin=0.03)),
                    store=None, params={}, seed=0)
    router.chains = [chain]
    router.estimates = est = synthetic(PROFILE, ALPHAS)

    def ran(ks: tuple[int, ...], ms: float, times: int = 25) -> None:
        for _ in range(times):
            est.observe_calibration(chain, 1.0, ms, ms, ks, "code-short")

    ran((4,), 10.0)
    for _ in range(25):
        est.observe_calibration(TARGET_ALONE, 1.0, 30.0, 30.0, (), "code-short")
    assert router.decide_classes(1.0)["code-short"].winner.k == (4,)
    ran((5,), 9.8)  # 2% cheaper: kept at k = 4
    choice = router.decide_classes(1.0)["code-short"]
    assert choice.winner.k == (4,) and "kept drafter-code,target k=[4]" in choice.why and choice.reason == "cost"
    ran((5,), 9.5, times=200)  # 5% cheaper: moved, and k = 5 is the one held from then on
    assert router.decide_classes(1.0)["code-short"].winner.k == (5,)
    ran((4,), 9.4, times=200)
    assert router.decide_classes(1.0)["code-short"].winner.k == (5,)
    # each load keeps its own; a fresh router (replay) holds nothing; an objective it misses is not held
    assert router.held[("code-short", 0)] == (chain, (5,)) and ("code-short", 4) not in router.held
    choice = router.decide_classes(1.0)["code-short"]
    assert hold(choice, (chain, (4,)), 0.03).winner.k == (4,)
    assert hold(choice, (chain, (4,)), 0.03, slo_tpot_ms=1.0).winner.k == (5,)
    assert hold(choice, (chain, (4,)), 0.0).winner.k == (5,)


def test_rounds_the_depth_policy_cut_are_priced_at_the_tokens_they_emit():
    """The per-round depth policy held 15 of a request's 20 rounds at depth 0 (9 ms each, the
    target alone), 2 at depth 2 and 3 at 4 (20 ms): 27 tokens after the first in 235 ms.
    Priced at a round of 4 drafts the chain would look almost twice as cheap as it ran; at
    the depths its rounds took it costs about what it realised. A round held at depth 0 is no
    draft-rate trial, and a proposal the policy cut short no continuation trial."""
    from services.router.service import Router
    from shared.settings import RouterSettings, Settings

    router = Router(Settings(router=RouterSettings(explore_rate=0.0, explore_depth_rate=0.0)), store=None, params={}, seed=0)
    est = router.estimates = Estimates(half_life_tokens=1e9)
    chain, cls, depths = ("drafter-code", "target"), "code-short", [15, 0, 2, 0, 3]
    level = LevelOutcome("drafter-code", "target", 16, 7, [5, 5, 3, 3], [3, 2, 1, 1])  # 20 rounds: 28 tokens
    tpot = 235.0 / 27
    for i in range(10):
        router.on_outcome(Outcome(f"r{i}", cls, list(chain), [4], 28, 10, 20.0, tpot, 300.0, [level], "length", "t1",
                                  batch_mean=1.0, depths=depths))
    seen = est.realised(chain, (4,), 1.0, cls)
    assert seen.round_ms == pytest.approx(235.0 / 20) and seen.depths == pytest.approx([0.75, 0, 0.1, 0, 0.15])
    assert est.draft_rate("drafter-code", cls) == pytest.approx(1.0)  # 5 proposals in the 5 rounds allowed one
    pair = est.pair("drafter-code", "target", cls)
    assert [pair.continuation(j) for j in range(4)] == [1.0, 1.0, 1.0, 1.0]  # the cuts are the policy's
    cost = realised_cost((chain, (4,)), seen, cls, est)
    gain = lambda m: est.expected_tokens("drafter-code", "target", cls, m) - 1  # noqa: E731
    emitted = est.emitted_ratio(chain, cls)  # 27 tokens in 20 rounds against the model's, pooled
    assert emitted == pytest.approx((270 + 200) / (200 * (1 + 0.1 * gain(2) + 0.15 * gain(4)) + 200), rel=0.02)
    assert cost == pytest.approx(seen.round_ms / ((1 + 0.1 * gain(2) + 0.15 * gain(4)) * emitted))
    assert cost > 1.5 * seen.round_ms / (1 + gain(4))  # what a round of k drafts would have said
    assert cost == pytest.approx(tpot, rel=0.25)
    # Unsteered outcomes of the same (chain, k) move the shares back towards k in every round.
    for i in range(40):
        router.on_outcome(Outcome(f"u{i}", cls, list(chain), [4], 28, 10, 20.0, 5.0, 300.0,
                                  [LevelOutcome("drafter-code", "target", 28, 7, [7] * 4, [3, 2, 1, 1])], "length", "t1",
                                  batch_mean=1.0))
    assert seen.depths[4] > 0.5 and seen.depths[0] < 0.4
    # Its model error is taken against the model at those depths: a round at depth m is one
    # of k = m, a round at depth 0 the target's alone.
    at = lambda ks, shares: predict_at_depths(chain, ks, cls, est, 1.0, shares)  # noqa: E731
    full, alone = predict(chain, (4,), cls, est, 1.0, calibrated=False), predict(("target",), (), cls, est, 1.0)
    assert at((4,), [0, 0, 0, 0, 1.0]) == pytest.approx(full.model_ms)
    assert at((4,), [1.0, 0, 0, 0, 0]) == pytest.approx(alone.model_ms)
    mixed = at((4,), seen.depths)
    assert min(full.model_ms, alone.model_ms) < mixed < max(full.model_ms, alone.model_ms)
    three = ("drafter-code", "verifier", "target")
    assert predict_at_depths(three, (4, 3), cls, est, 1.0, [1.0, 0, 0, 0]) == pytest.approx(alone.model_ms)
    # Nonsense depths (negative counts, none at all) are ignored, as if the request was not steered.
    other = Estimates(half_life_tokens=1e9)
    other.observe_calibration(chain, 1.0, tpot, 5.0, (4,), cls, 11.75, [-1, 3])
    other.observe_calibration(chain, 1.0, tpot, 5.0, (4,), "prose-short", 11.75, [0, 0])
    assert other.realised(chain, (4,), 1.0, cls).depths == [0, 0, 0, 0, 1.0]
    assert other.realised(chain, (4,), 1.0, "prose-short").depths == [0, 0, 0, 0, 1.0]


def test_a_chains_rounds_are_priced_at_what_they_emitted_in_the_class():
    """Every request's n-gram proposals: half are long matches (4 drafts, all accepted), half
    one token the target rejects. A round emits 3 tokens on average. The model's per-position
    counts take going on to the next position (half the proposals do) as independent of the
    drafts before being accepted, and say 2.25. Pooled over the chain's outcomes in the class,
    what the rounds emitted against the model puts the chain at its rounds' time over 3."""
    from services.router.service import Router
    from shared.settings import RouterSettings, Settings

    router = Router(Settings(router=RouterSettings(explore_rate=0.0, explore_depth_rate=0.0)), store=None, params={}, seed=0)
    est = router.estimates = Estimates(half_life_tokens=1e9)
    chain, cls = ("ngram", "target"), "code-short"
    level = LevelOutcome("ngram", "target", 50, 40, [20, 10, 10, 10], [10, 10, 10, 10])  # 20 rounds, 61 tokens
    for i in range(60):
        router.on_outcome(Outcome(f"r{i}", cls, list(chain), [4], 61, 10, 20.0, 10.0 * 20 / 60, 300.0, [level], "length",
                                  "t1", batch_mean=1.0))
    modelled = 1 + est.draft_rate("ngram", cls) * (est.expected_tokens("ngram", "target", cls, 4) - 1)
    assert modelled == pytest.approx(2.25, abs=0.1)
    assert est.emitted_ratio(chain, cls) * modelled == pytest.approx(3.0, rel=0.03)
    seen = est.realised(chain, (4,), 1.0, cls)
    assert realised_cost((chain, (4,)), seen, cls, est) == pytest.approx(10.0 / 3, rel=0.03)
    assert est.emitted_ratio(("drafter-code", "target"), cls) == 1.0  # none seen: the model stands
    shown = est.summary()["emitted"]  # `specmesh router explain --json` shows it
    assert list(shown) == ["ngram,target@code-short"] and shown["ngram,target@code-short"]["tokens"] == 3600
    # A restarted router rebuilds it from the history rows (the rounds from the pair's row).
    replayed = Router(Settings(), store=None, params={}, seed=0)
    replayed.resume({
        "pair_stats": [{"proposer": "ngram", "verifier": "target", "request_class": cls, "drafted": 50, "accepted": 40,
                        "accepted_per_position": level.accepted_per_pos, "drafted_per_position": level.drafted_per_pos,
                        "tv_distance": None, "request_id": f"r{i}", "rounds": 20} for i in range(5)],
        "decisions": [{"reason": "outcome", "chain": "ngram,target", "k": [4], "tokens": 61, "tpot_ms": 10.0 / 3,
                       "predicted_ms_per_token": 3.0, "batch_mean": 1.0, "request_id": f"r{i}", "request_class": cls,
                       "tokens_per_round": 2.25} for i in range(5)]})
    assert replayed.estimates.emitted_ratio(chain, cls) == pytest.approx((300 + 200) / (225 + 200), rel=0.02)


def test_an_unchanged_router_decides_once_and_any_observation_decides_again(monkeypatch):
    import services.router.service as service
    from services.router.service import Router
    from shared.settings import RouterSettings, Settings

    router = Router(Settings(router=RouterSettings(explore_rate=0.0, explore_depth_rate=0.0)), store=None, params={}, seed=0)
    router.chains = CHAINS
    router.estimates = synthetic(PROFILE, ALPHAS, live=1)
    calls = []
    real = service.decide
    monkeypatch.setattr(service, "decide", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    first = router.table()
    n = len(calls)
    assert n >= len(first.assignments)
    again = router.table()  # nothing observed, same load: the same table, nothing decided again
    assert len(calls) == n and [(e.chain, e.k) for e in again.assignments] == [(e.chain, e.k) for e in first.assignments]
    assert again.version > first.version
    # any observation, at the same load too, and a profile (the load, the step times): decided again
    batch = router.estimates.batch()
    router.estimates.observe_traffic("code-short")
    router.table()
    assert router.estimates.batch() == batch and len(calls) == 2 * n
    router.on_profile(StepProfile(worker="t1", interval_s=1.0, steps=[], live_requests=1, waiting_requests=0))
    router.table()
    assert len(calls) == 3 * n
    router.estimates = synthetic(PROFILE, ALPHAS, live=1)  # other estimates, another memo
    router.table()
    assert len(calls) == 4 * n
    router.available = {"verifier"}  # models going down change the candidates
    narrowed = router.table()
    assert len(calls) == 5 * n and all("drafter" not in ",".join(e.chain) for e in narrowed.assignments)
    # trials are drawn every interval whatever the memo holds: a trial is decided afresh
    router.cfg = router.cfg.model_copy(update={"explore_rate": 1.0})
    router.available = None
    assert any(e.reason == "explore" for e in router.table().assignments)
