"""Per-round speculation depth (shared/engine/depth.py): the counts, the profile, the goodput
decision on synthetic costs, and, on the tiny family, that a chain steered by it still gives
the target alone's tokens while verifying fewer drafts where they do not pay."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from shared.engine.build import RunnerPool
from shared.engine.depth import Counts, DepthPolicy, VerifyProfile, profile_verify
from shared.engine.sampling import SamplingParams
from tests.device import DEVICE
from tests.test_engine_chain import engine_family, target_alone  # noqa: F401 - the fixture is used below


def flat(fixed: float, per_width: float, per_row: float = 0.0) -> VerifyProfile:
    """A verification costing fixed + per_width x width + per_row x batch x width seconds."""
    batches, widths = [1, 4, 16], [1, 2, 5, 9]
    return VerifyProfile(batches, widths, [[fixed + per_width * w + per_row * b * w for w in widths] for b in batches])


def test_counts_follow_the_positions_a_proposal_reached():
    c = Counts()
    c.record(4, 2, 1.0)  # positions 0, 1 accepted, 2 rejected, 3 never reached
    assert c.reached == [1, 1, 1, 0] and c.accepted == [1, 1, 0, 0]
    c.record(3, 3, 1.0)  # every draft accepted: all three reached and accepted
    assert c.reached == [2, 2, 2, 0] and c.accepted == [2, 2, 1, 0]
    c.record(1, 0, 0.5)  # older counts decay before the new one
    assert c.reached == [2.0, 1.0, 1.0, 0.0] and c.accepted == [1.0, 1.0, 0.5, 0.0]
    assert c.rate(3, 0.5, 2.0) == 0.5  # never reached: the prior
    assert c.rate(0, 0.5, 2.0) == pytest.approx((1.0 + 1.0) / (2.0 + 2.0))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), max_size=30))
def test_counts_never_accept_more_than_they_reached(rounds):
    c = Counts()
    for drafted, accepted in rounds:
        c.record(drafted, min(accepted, drafted), 0.9)
    assert all(0 <= a <= r + 1e-9 for a, r in zip(c.accepted, c.reached))
    assert all(0 < c.rate(j, 0.5, 1.0) < 1 for j in range(10))


def test_profile_interpolates_and_extends_its_edges():
    p = flat(1.0, 0.5)
    assert p(4, 2) == pytest.approx(2.0)
    assert p(4, 3) == pytest.approx(2.5)  # between widths 2 and 5
    assert p(10, 5) == pytest.approx(3.5)  # between batches, same costs
    assert p(4, 13) == pytest.approx(7.5)  # past the widest: the last segment's slope
    with pytest.raises(ValueError):
        VerifyProfile([1, 4], [1], [[1.0], [2.0]])
    with pytest.raises(ValueError):
        VerifyProfile([4, 1], [1, 2], [[1.0, 2.0], [1.0, 2.0]])


def learnt(policy: DepthPolicy, key, rid: str, accepted_of_4: int, rounds: int = 40) -> None:
    for _ in range(rounds):
        policy.record(key, rid, 4, accepted_of_4)


def test_idle_every_draft_pays_and_under_load_poor_drafts_do_not():
    key = ("drafter", "target")
    # a forward's fixed cost dominates: verifying 4 drafts costs little more than 1 token
    cheap = DepthPolicy(flat(10e-3, 0.1e-3))
    learnt(cheap, key, "a", 1)  # a quarter of the first drafts held, none after
    assert cheap.depths(key, {"a": 4}) == {"a": 4}
    # every token written costs as much as the forward's fixed part, and drafting a step too
    dear = DepthPolicy(flat(1e-3, 1e-3, per_row=1e-3))
    learnt(dear, key, "a", 0)
    dear.observe_draft(key, 4, 8e-3)
    assert dear.depths(key, {"a": 4}, batch=16) == {"a": 0}
    # ... while a request whose drafts all hold keeps them, there too
    learnt(dear, key, "b", 4)
    dear.observe_draft(key, 4, 0.0)
    dear.step_s[key] = 0.0
    assert dear.depths(key, {"b": 4}, batch=1)["b"] == 4


def test_a_near_tie_keeps_the_k_asked_for():
    key = ("ngram", "target")
    policy = DepthPolicy(flat(8e-3, 1e-3), margin=0.1)
    learnt(policy, key, "a", 3)  # the first three drafts hold, the fourth never
    rates = [policy.expected(key, "a", 4)[m] / policy.round_seconds(key, 1, m) for m in range(5)]
    best = max(range(5), key=lambda m: rates[m])
    assert best != 4 and rates[best] < rates[4] * 1.1  # the model prefers a shallower round, by less than its margin
    assert policy.depths(key, {"a": 4}) == {"a": 4}
    policy.margin = 0.0
    assert policy.depths(key, {"a": 4}) == {"a": best}


def test_a_round_kept_at_depth_zero_probes_one_draft_now_and_then():
    key = ("drafter", "target")
    policy = DepthPolicy(flat(1e-3, 5e-3), probe_every=4)
    learnt(policy, key, "a", 0)
    got = [policy.depths(key, {"a": 4})["a"] for _ in range(8)]
    assert got == [0, 0, 0, 1, 0, 0, 0, 1]


def test_every_decision_reaches_the_listener():
    key = ("drafter", "target")
    policy = DepthPolicy(flat(1e-3, 5e-3))
    seen = []
    policy.listener = lambda *args: seen.append(args)
    policy.depths(key, {"a": 4})  # nothing measured yet: the whole k
    learnt(policy, key, "a", 0)
    policy.depths(key, {"a": 4})
    policy.depths(key, {"a": 0})  # nothing to decide
    assert seen == [(key, 4, 4), (key, 0, 4)]


def test_caps_are_never_exceeded_and_unsteered_requests_count_in_the_batch():
    key = ("drafter", "target")
    policy = DepthPolicy(flat(10e-3, 0.1e-3))
    learnt(policy, key, "a", 4)
    assert policy.depths(key, {"a": 2, "b": 5}) == {"a": 2, "b": 5}
    assert policy.depths(key, {"a": 0}) == {"a": 0}
    # what costs a row per request: with 15 other rows in the forward the same drafts cost more
    busy = DepthPolicy(flat(0.5e-3, 0.0, per_row=0.2e-3))
    learnt(busy, key, "a", 4)
    assert busy.depths(key, {"a": 4}, batch=1) == {"a": 4}
    assert busy.depths(key, {"a": 4}, batch=16)["a"] < 4


def test_measured_costs_move_the_decision():
    key = ("drafter", "target")
    policy = DepthPolicy(flat(2e-3, 0.2e-3))
    learnt(policy, key, "a", 4)
    assert policy.depths(key, {"a": 4}) == {"a": 4}
    for _ in range(40):  # drafting turns out to cost 3 ms a step
        policy.observe_draft(key, 4, 12e-3)
        policy.observe_draft(key, 2, 6e-3)
    assert policy.step_s[key] == pytest.approx(3e-3)
    assert policy.depths(key, {"a": 4})["a"] < 4
    # verification measured at twice the profile: the scale follows
    for _ in range(60):
        policy.observe_verify(4, 2, 2 * flat(2e-3, 0.2e-3)(4, 2))
    assert policy.scale == pytest.approx(2.0, rel=0.02)


def test_round_overhead_is_what_the_forwards_leave_and_idle_gaps_are_skipped():
    policy = DepthPolicy(flat(1e-3, 0.1e-3))
    t = 100.0
    policy.observe_round(t)
    for _ in range(10):
        policy.observe_draft("c", 1, 1e-3)
        policy.observe_verify(1, 2, 2e-3)
        t += 5e-3
        policy.observe_round(t)
    assert policy.overhead_s == pytest.approx(2e-3, rel=0.01)
    policy.observe_round(t + 30.0)  # nothing ran for 30 s: not a round
    assert policy.overhead_s == pytest.approx(2e-3, rel=0.01)


# -- on the tiny family ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(engine_family):  # noqa: F811
    torch.set_num_threads(1)
    return RunnerPool(engine_family, device=DEVICE, max_batch=8, max_len=256)


@pytest.fixture(scope="module")
def prompts(pool):
    from shared.models.corpus import heldout_prompts

    tok = pool.tokenizer()
    return [tok.encode(t) for t in heldout_prompts("code", 3, 160, seed=3) + heldout_prompts("prose", 3, 160, seed=3)]


def test_profile_of_a_runner_leaves_it_as_it_was(pool):
    target = pool.get("target")
    before = (target.forwards, target.forward_s, target.prefix_queried, target.prefix_hits)
    wrapped = []  # a worker wraps its target's methods on the instance (tracing, rollback metrics)
    for name in ("prefill", "score", "rollback", "release"):
        setattr(target, name, lambda *a, _name=name, **kw: wrapped.append(_name))
    try:
        profile = profile_verify(target, 8, 5, context=32, repeats=1)
    finally:
        for name in ("prefill", "score", "rollback", "release"):
            delattr(target, name)
    assert not wrapped
    assert profile.batches == [1, 2, 4, 8] and profile.widths == [1, 2, 3, 5]
    assert all(s > 0 for row in profile.seconds for s in row)
    assert (target.forwards, target.forward_s, target.prefix_queried, target.prefix_hits) == before
    for i in range(8):  # every slot is free again
        target.prefill(f"after-profile-{i}", [5, 6, 7])
    for i in range(8):
        target.release(f"after-profile-{i}")


def frozen(policy: DepthPolicy) -> DepthPolicy:
    """The policy on its synthetic profile alone: what the machine measures is not learnt,
    so what it decides depends on the drafts' acceptance only (the cost learning is tested above)."""
    policy.observe_draft = policy.observe_verify = policy.observe_round = lambda *args: None
    return policy


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.9, seed=11)], ids=["greedy", "seeded"])
def test_a_steered_chain_gives_the_target_alones_tokens(pool, prompts, sampling):
    target = pool.get("target")
    reference = [target_alone(target, p, 24, sampling) for p in prompts]
    for spec, profile in (("drafter,target", flat(0.2e-3, 2e-3, per_row=0.5e-3)),  # drafts dear: mostly depth 0
                          ("ngram,drafter,target", flat(5e-3, 0.01e-3))):  # drafts cheap: the whole k
        policy = frozen(DepthPolicy(profile, probe_every=3))
        chain = pool.chain(spec, k=4, depth=policy)
        steered = [chain.add(p, 24, sampling, adaptive_depth=True) for p in prompts]
        while any(not r.done for r in steered):
            chain.step()
        assert [r.output for r in steered] == reference, spec
        drafted = chain.collect_stats().levels[-2].drafted
        static = pool.chain(spec, k=4)
        for p in prompts:
            static.add(p, 24, sampling)
        while any(not r.done for r in static.requests.values()):
            static.step()
        full = static.collect_stats().levels[-2].drafted
        below = spec.split(",")[-2]
        for r in steered:  # each round's depth is tallied for the router: a proposal never outruns it
            reaching = [sum(r.depths[j + 1:]) for j in range(4)]
            per_pos = r.stats[below].drafted_per_pos
            assert all(per_pos[j] <= reaching[j] for j in range(len(per_pos))), (r.depths, per_pos)
            assert len(r.depths) <= 5 and sum(r.depths) >= r.stats[below].proposals > 0
        assert all(not r.depths for r in static.requests.values())
        tally = [sum(r.depths[m] for r in steered if m < len(r.depths)) for m in range(5)]
        if spec == "drafter,target":
            assert drafted < full / 2, (drafted, full)
            assert tally[0] == max(tally), tally  # mostly held at depth 0
        else:
            assert drafted == full
            assert tally[4] > 4 * sum(tally[:4]), tally  # the whole k but where max_tokens caps it
        assert not policy.requests  # finished requests are forgotten

    # n-gram lookup right below the target costs a round the same at any depth: no cost per step
    policy = DepthPolicy(flat(5e-3, 0.01e-3))
    chain = pool.chain("ngram,target", k=4, depth=policy)
    for p in prompts:
        chain.add(p, 8, adaptive_depth=True)
    while any(not r.done for r in chain.requests.values()):
        chain.step()
    assert ("ngram", "target") not in policy.step_s and policy.overhead_s is not None


def test_requests_without_adaptive_depth_verify_their_whole_k(pool, prompts):
    policy = frozen(DepthPolicy(flat(0.2e-3, 2e-3, per_row=0.5e-3)))
    chain = pool.chain("drafter,target", k=3, depth=policy)
    static = pool.chain("drafter,target", k=3)
    for c in (chain, static):
        for p in prompts[:3]:
            c.add(p, 12)
        while any(not r.done for r in c.requests.values()):
            c.step()
    assert chain.collect_stats().levels[0].drafted == static.collect_stats().levels[0].drafted
