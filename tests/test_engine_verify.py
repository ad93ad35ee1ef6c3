"""Verification: exact cases, statistics (rejection sampling reproduces p), determinism,
and hypothesis properties, on synthetic distributions (fast, no model)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.sampling import SamplingParams, gumbel_argmax, gumbel_noise, process_logits, process_rows
from shared.engine.verify import lenient_mixture, verify, verify_greedy, verify_gumbel, verify_rejection

V = 8


def onehot(tokens: list[int], vocab: int = V) -> torch.Tensor:
    out = torch.zeros(len(tokens), vocab)
    out[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
    return out


def chi2_critical(df: int, z: float = 4.0) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at a normal z (z=4: p ~ 3e-5)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    exp = probs[keep] * n
    return float(((counts[keep] - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


def random_dist(gen: torch.Generator, vocab: int = V, sharp: float = 1.0) -> torch.Tensor:
    return torch.softmax(torch.randn(vocab, generator=gen) * sharp, -1)


# -- exact cases (after vLLM's test_rejection_sampler) -------------------------------------


def test_greedy_perfect_match_emits_bonus():
    p = onehot([3, 5, 1, 7])
    v = verify_greedy(torch.tensor([3, 5, 1]), p)
    assert v.tokens == [3, 5, 1, 7] and v.accepted == 3 and v.bonus


def test_greedy_early_mismatch_emits_recovered():
    p = onehot([3, 5, 1, 7])
    v = verify_greedy(torch.tensor([3, 4, 1]), p)
    assert v.tokens == [3, 5] and v.accepted == 1 and not v.bonus
    assert torch.equal(v.probs, p[:2])


def test_greedy_first_mismatch_and_no_drafts():
    p = onehot([2, 0])
    assert verify_greedy(torch.tensor([1]), p).tokens == [2]
    v = verify_greedy(torch.tensor([], dtype=torch.long), p[:1])
    assert v.tokens == [2] and v.accepted == 0


def test_greedy_lenient_accepts_within_top_l():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.7, 0.0]])
    assert verify_greedy(torch.tensor([1]), p).tokens == [0]
    assert verify_greedy(torch.tensor([1]), p, leniency=2).tokens == [1, 2]
    assert verify_greedy(torch.tensor([2]), p, leniency=2).tokens == [0]


def test_rejection_accepts_when_q_le_p_and_rejects_tokens_p_forbids():
    p = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.25] * 4])
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    u = torch.tensor([0.999])
    v = verify_rejection(torch.tensor([1]), q, p, u, torch.tensor([0.1, 0.9]))
    assert v.accepted == 1 and v.tokens == [1, 3]  # q <= p: always accept; bonus at u=0.9
    v = verify_rejection(torch.tensor([0]), q, p, torch.tensor([0.0]), torch.tensor([0.5, 0.5]))
    assert v.accepted == 0 and v.tokens == [1]  # p(x) = 0: always reject; residual is token 1


def test_rejection_is_deterministic_given_uniforms():
    gen = torch.Generator().manual_seed(0)
    p = torch.stack([random_dist(gen) for _ in range(4)])
    q = torch.stack([random_dist(gen) for _ in range(3)])
    drafts = torch.multinomial(q, 1, generator=gen).squeeze(-1)
    u = torch.rand(7, generator=gen)
    a = verify_rejection(drafts, q, p, u[:3], u[3:])
    b = verify_rejection(drafts, q, p, u[:3], u[3:])
    assert a.tokens == b.tokens and a.accepted == b.accepted


def test_gumbel_verification_reproduces_target_samples():
    gen = torch.Generator().manual_seed(1)
    p = torch.stack([random_dist(gen, 50) for _ in range(5)])
    noise = gumbel_noise(7, range(100, 105), 50)
    mine = gumbel_argmax(p, noise)
    v = verify_gumbel(mine[:4], p, noise)
    assert v.tokens == mine.tolist() and v.bonus
    wrong = mine[:4].clone()
    wrong[2] = (wrong[2] + 1) % 50
    v = verify_gumbel(wrong, p, noise)
    assert v.tokens == mine[:3].tolist() and v.accepted == 2


def test_gumbel_noise_is_keyed_by_seed_and_position_only():
    a = gumbel_noise(3, [10, 11, 12], 16)
    b = gumbel_noise(3, [12, 11], 16)
    assert torch.equal(a[2], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(gumbel_noise(4, [10], 16)[0], a[0])


# -- statistics: the output follows p, enough samples to catch a 2% bias -------------------

N = 40_000


def _sample_first_token(p, q, leniency=1.0, n=N, seed=0):
    """Run verify_rejection n times on one draft position; counts of the first emitted token."""
    gen = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q[0], n, replacement=True, generator=gen)
    u = torch.rand(n, 3, generator=gen)
    counts = torch.zeros(p.shape[-1])
    for i in range(n):
        v = verify_rejection(drafts[i : i + 1], q, p, u[i, :1], u[i, 1:], leniency)
        counts[v.tokens[0]] += 1
    return counts


@pytest.mark.parametrize("case", ["random", "q_sharp", "q_onehot_ngram", "disjoint_support"])
def test_rejection_sampling_follows_target(case):
    gen = torch.Generator().manual_seed(11)
    p = random_dist(gen)
    if case == "random":
        q = random_dist(gen)
    elif case == "q_sharp":
        q = random_dist(gen, sharp=4.0)
    elif case == "q_onehot_ngram":
        q = onehot([int(torch.argmin(p))])[0]  # a bad n-gram guess
    else:
        p = torch.tensor([0.4, 0.3, 0.3, 0, 0, 0, 0, 0.0])
        q = torch.tensor([0, 0, 0, 0.5, 0.5, 0, 0, 0.0])
    counts = _sample_first_token(torch.stack([p, p]), q[None])
    stat, df = chi2(counts, p)
    assert stat < chi2_critical(df), (stat, df, counts / N, p)
    tv = 0.5 * (counts / N - p).abs().sum()
    assert tv < 0.01


def test_statistical_test_catches_a_two_percent_bias():
    """The same test on a 2%-biased sampler must fail: the sample size is large enough."""
    gen = torch.Generator().manual_seed(11)
    p = random_dist(gen)
    biased = p.clone()
    biased[0] += 0.02
    biased[int(torch.argmax(p[1:])) + 1] -= 0.02
    counts = torch.bincount(torch.multinomial(biased, N, replacement=True, generator=gen), minlength=V).float()
    stat, df = chi2(counts, p)
    assert stat > chi2_critical(df)


def test_lenient_level_emits_its_reported_mixture_and_the_target_restores_p():
    """Three levels on one position: drafter q -> lenient middle r (l = 2) -> exact target p."""
    gen = torch.Generator().manual_seed(5)
    q, r, p = random_dist(gen, sharp=2.0), random_dist(gen), random_dist(gen)
    mixture = lenient_mixture(r[None], q[None], 2.0)[0]
    assert torch.allclose(mixture.sum(), torch.tensor(1.0))
    n = N
    drafts = torch.multinomial(q, n, replacement=True, generator=gen)
    u = torch.rand(n, 6, generator=gen)
    mid_counts, top_counts = torch.zeros(V), torch.zeros(V)
    for i in range(n):
        mid = verify_rejection(drafts[i : i + 1], q[None], torch.stack([r, r]), u[i, :1], u[i, 1:3], leniency=2.0)
        y = mid.tokens[:1]
        mid_counts[y[0]] += 1
        top = verify_rejection(torch.tensor(y), mid.probs[:1], torch.stack([p, p]), u[i, 3:4], u[i, 4:6])
        top_counts[top.tokens[0]] += 1
    stat, df = chi2(mid_counts, mixture)
    assert stat < chi2_critical(df)
    stat, df = chi2(top_counts, p)
    assert stat < chi2_critical(df)
    assert (0.5 * (mid_counts / n - r).abs().sum()) > 0.02  # the middle level really is lenient


def test_second_position_follows_target_after_acceptance():
    gen = torch.Generator().manual_seed(21)
    p = torch.stack([random_dist(gen) for _ in range(3)])
    q = torch.stack([random_dist(gen) for _ in range(2)])
    counts = torch.zeros(V)
    n = N
    first = torch.multinomial(q[0], n, replacement=True, generator=gen)
    second = torch.multinomial(q[1], n, replacement=True, generator=gen)
    u = torch.rand(n, 5, generator=gen)
    for i in range(n):
        v = verify_rejection(torch.stack([first[i], second[i]]), q, p, u[i, :2], u[i, 2:])
        if len(v.tokens) >= 2:
            counts[v.tokens[1]] += 1
    stat, df = chi2(counts, p[1])
    assert stat < chi2_critical(df)


def test_gumbel_max_samples_follow_p():
    gen = torch.Generator().manual_seed(3)
    p = random_dist(gen)
    noise = gumbel_noise(99, range(20_000), V)
    counts = torch.bincount(gumbel_argmax(p.expand(20_000, V), noise), minlength=V).float()
    stat, df = chi2(counts, p)
    assert stat < chi2_critical(df)


# -- hypothesis: properties on random distributions ---------------------------------------


@st.composite
def drafts_and_dists(draw):
    vocab = draw(st.integers(2, 12))
    k = draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    sharp = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(k + 1, vocab, generator=gen) * sharp, -1)
    q = torch.softmax(torch.randn(k, vocab, generator=gen) * sharp, -1)
    if draw(st.booleans()) and k:  # zero out some of q's support, as top-k would
        q = q * (torch.rand(k, vocab, generator=gen) > 0.3)
        q[:, 0] += 1e-3
        q = q / q.sum(-1, keepdim=True)
    drafts = torch.multinomial(q, 1, generator=gen).squeeze(-1) if k else torch.empty(0, dtype=torch.long)
    u = torch.rand(2 * k + 1, generator=gen)
    leniency = draw(st.sampled_from([1.0, 1.0, 1.5, 3.0]))
    return drafts, q, p, u, leniency


@settings(max_examples=200, deadline=None)
@given(drafts_and_dists())
def test_rejection_verdict_invariants(case):
    drafts, q, p, u, leniency = case
    k = drafts.shape[0]
    v = verify_rejection(drafts, q, p, u[:k], u[k:], leniency)
    assert 0 <= v.accepted <= k
    assert len(v.tokens) == v.accepted + 1
    assert v.tokens[: v.accepted] == drafts[: v.accepted].tolist()
    assert v.probs.shape == (v.accepted + 1, p.shape[-1])
    assert torch.allclose(v.probs.sum(-1), torch.ones(v.accepted + 1), atol=1e-5)
    last = v.tokens[-1]
    assert float(v.probs[-1, last]) > 0  # every emitted token is possible under its reported distribution
    if leniency == 1.0:
        assert torch.equal(v.probs, p[: v.accepted + 1])
    for j in range(v.accepted):  # accepted drafts are never tokens the verifier forbids
        assert float(p[j, drafts[j]]) > 0


@settings(max_examples=200, deadline=None)
@given(drafts_and_dists())
def test_greedy_and_gumbel_verdicts_are_the_verifiers_own_tokens(case):
    drafts, _, p, _, _ = case
    k = drafts.shape[0]
    v = verify_greedy(drafts, p)
    mine = torch.argmax(p, -1).tolist()
    assert v.tokens == mine[: len(v.tokens)]
    assert v.accepted == k or drafts[v.accepted] != mine[v.accepted]
    noise = gumbel_noise(5, range(k + 1), p.shape[-1])
    g = verify_gumbel(drafts, p, noise)
    assert g.tokens == gumbel_argmax(p, noise).tolist()[: len(g.tokens)]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.floats(0.05, 2.0), st.floats(0.05, 1.0), st.integers(0, 20))
def test_process_logits_is_a_distribution_respecting_top_k_and_top_p(vocab, temperature, top_p, top_k):
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(vocab))
    probs = process_logits(logits, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k))
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    kept = (probs > 0).sum(-1)
    if 0 < top_k < vocab:
        assert (kept <= top_k).all()
    assert (kept >= 1).all()
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.floats(0.05, 2.0), st.floats(0.0, 1.0), st.floats(0.05, 1.0), st.integers(0, 20))
def test_min_p_keeps_the_tokens_at_least_min_p_times_the_likeliest(vocab, temperature, min_p, top_p, top_k):
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(vocab + 1))
    tempered = torch.softmax(logits / temperature, -1)
    probs = process_logits(logits, SamplingParams(temperature=temperature, min_p=min_p))
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    ratio = tempered / tempered.max(-1, keepdim=True).values
    clear = (ratio - min_p).abs() > 1e-5  # rounding decides a token right at the threshold
    assert torch.equal((probs > 0)[clear], (ratio >= min_p)[clear])
    kept = probs > 0
    assert torch.allclose(probs, torch.where(kept, tempered, 0) / torch.where(kept, tempered, 0).sum(-1, keepdim=True))
    # min_p is measured on the whole distribution, before top-k and top-p cut it further
    both = process_logits(logits, SamplingParams(temperature=temperature, min_p=min_p, top_p=top_p, top_k=top_k))
    assert ((both > 0) <= kept).all() and torch.equal(both.argmax(-1), logits.argmax(-1))


def test_rows_with_different_min_p_are_processed_each_by_its_own():
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=1.0, min_p=0.5), SamplingParams(temperature=1.0)]
    rows = process_rows(logits, params)
    for row, p in enumerate(params):
        assert torch.equal(rows[row], process_logits(logits[row], p))
    assert (rows[0] > 0).sum() < (rows[1] > 0).sum()


def test_sampling_params_validation():
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(top_k=1.5), dict(seed="x"),
                dict(min_p=-0.1), dict(min_p=1.5), dict(min_p=float("nan")), dict(min_p="0.1"),
                dict(allowed_token_ids=(-1,)), dict(allowed_token_ids=("a",)),
                dict(allowed_token_ids=(3,), response_format="json_object")):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams().greedy and SamplingParams(temperature=1, seed=3).seeded
    assert not SamplingParams(temperature=1).seeded


def test_verify_dispatches_on_sampling_mode():
    gen = torch.Generator().manual_seed(0)
    p = torch.stack([random_dist(gen) for _ in range(3)])
    mine = torch.argmax(p, -1).tolist()
    assert verify(mine[:2], None, p, SamplingParams(), 10).tokens == mine
    seeded = SamplingParams(temperature=1.0, seed=4)
    noised = gumbel_argmax(p, gumbel_noise(4, [10, 11, 12], V)).tolist()
    assert verify(noised[:2], None, p, seeded, 10).tokens == noised


def test_sampled_verdicts_measure_one_minus_tv_on_every_draft_position():
    gen = torch.Generator().manual_seed(5)
    p = torch.stack([random_dist(gen) for _ in range(4)])
    q = torch.stack([random_dist(gen) for _ in range(3)])
    drafts = [int(torch.argmax(row)) for row in q]
    unseeded = verify(drafts, q, p, SamplingParams(temperature=1.0), 10, gen)
    want = float(torch.minimum(p[:3], q).sum())  # sum over positions of 1 - TV(p_j, q_j)
    assert unseeded.overlap == pytest.approx(want) and unseeded.overlap_positions == 3
    assert 0 < want < 3
    seeded = verify(drafts, q, p, SamplingParams(temperature=1.0, seed=3), 10)
    assert seeded.overlap == pytest.approx(want) and seeded.overlap_positions == 3
    same = verify(drafts, p[:3], p, SamplingParams(temperature=1.0), 10, gen)
    assert same.overlap == pytest.approx(3.0)  # identical distributions: TV 0
    greedy = verify(drafts, q, p, SamplingParams(), 10)
    assert greedy.overlap == 0.0 and greedy.overlap_positions == 0  # greedy: no distributions to compare
    assert verify([], None, p[:1], SamplingParams(temperature=1.0), 10, gen).overlap_positions == 0


def test_logprob_ranks_count_the_likelier_tokens_and_only_when_asked():
    from shared.engine.logprobs import logprobs_of

    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    ranked = logprobs_of(probs, [2, 1], top=1, ranks=True)
    assert [lp.rank for lp in ranked] == [3, 1]
    assert [lp.rank for lp in logprobs_of(probs, [2, 1], top=1)] == [0, 0]  # output tokens: not computed


@pytest.mark.parametrize("draft_width", [V - 3, V + 4], ids=["narrower", "wider"])
def test_rejection_sampling_follows_the_target_across_vocabulary_sizes(draft_width):
    """A drafter whose embeddings are padded to another size (one tokenizer): its
    distribution is compared over the wider vocabulary, zeros past each one's size; the
    output still follows p, and never a token past p's size."""
    gen = torch.Generator().manual_seed(5)
    p = random_dist(gen)
    q = torch.rand(draft_width, generator=gen) ** 3
    q /= q.sum()
    params = SamplingParams(temperature=1.0)
    runs = torch.Generator().manual_seed(6)
    drafts = torch.multinomial(q, N, replacement=True, generator=runs)
    counts = torch.zeros(V)
    for i in range(N):
        v = verify([int(drafts[i])], q[None], torch.stack([p, p]), params, 0, runs)
        counts[v.tokens[0]] += 1  # an index past V would raise here
        assert v.probs.shape[-1] == V
    stat, df = chi2(counts, p)
    assert stat < chi2_critical(df), (stat, df)


def test_greedy_and_seeded_drafts_past_the_verifiers_vocabulary_are_rejected_there():
    p = torch.stack([onehot([3])[0]] * 3)
    greedy = verify([3, V + 2, 3], None, p, SamplingParams(), 0)
    assert greedy.tokens == [3, 3] and greedy.accepted == 1
    seeded = SamplingParams(temperature=1.0, seed=9)
    noise = gumbel_noise(9, range(0, 3), V)
    first = int(torch.argmax(torch.log(p[0]) + noise[0]))
    v = verify([V + 1, 5], torch.rand(2, V + 3), p, seeded, 0)
    assert v.accepted == 0 and v.tokens == [first]
