"""Penalties and logit_bias: every chain emits what the target alone emits with them.

The reference applies them by hand, from scratch, to the target's raw logits at each step
(a Counter of the output so far), so it shares nothing with `shared.engine.sampling.penalize`
but the model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch

from shared.engine.sampling import SamplingParams, choose, penalize, process_logits
from tests.test_engine_chain import MAX_TOKENS, engine_family, pool, prompts, run_batches  # noqa: F401 - fixtures

PENALIZED = SamplingParams(presence_penalty=0.6, frequency_penalty=0.4, repetition_penalty=1.3,
                           logit_bias=((17, 3.0), (42, -100.0)))


def by_hand(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
            eos: int | None = None) -> torch.Tensor:
    """One row [V] penalized the plain way: a loop over the tokens seen and counted."""
    x = logits.float().clone()
    if len(output) < params.min_tokens:
        for token in (eos, *params.stop_token_ids):
            x[token] = float("-inf")
    for token, bias in params.logit_bias:
        x[token] += bias
    for token in set(prompt) | set(output):
        x[token] = x[token] / params.repetition_penalty if x[token] > 0 else x[token] * params.repetition_penalty
    for token, count in Counter(output).items():
        x[token] -= params.frequency_penalty * count + params.presence_penalty
    return x


def target_alone(runner, prompt: list[int], n: int, params: SamplingParams) -> list[int]:
    """The target decoding one token per forward from its raw logits, penalized by hand."""
    assert len(prompt) > 1
    plain = SamplingParams(params.temperature, params.top_p, params.top_k, params.seed)
    runner.prefill("ref", prompt[:-1], plain)
    out: list[int] = []
    feed = prompt[-1]
    for _ in range(n):
        logits = runner._forward(["ref"], [[feed]], last_only=True)[0]
        probs = process_logits(by_hand(logits, params, prompt, out, runner.eos_token_id)[None], plain)
        feed = int(choose(probs, plain, [len(prompt) + len(out)], runner.generator)[0])
        out.append(feed)
    runner.release("ref")
    return out


def test_rows_are_penalized_by_their_own_prefix():
    """A T-row call equals T one-row calls on each prefix; the output counts from output_start."""
    torch.manual_seed(0)
    tokens = [3, 5, 3, 7, 5, 5, 2, 3]
    logits = torch.randn(4, 10)
    params = replace(PENALIZED, logit_bias=((1, 2.0),), output_start=5)
    rows = penalize(logits, params, tokens)
    for j in range(4):
        prefix = tokens[: len(tokens) - 4 + j + 1]
        assert torch.allclose(rows[j], penalize(logits[j][None], params, prefix)[0])
        assert torch.allclose(rows[j], by_hand(logits[j], params, prefix[:5], prefix[5:]))
    plain = SamplingParams(logit_bias=((1, 2.0), (99, 5.0)))  # an id past the vocabulary changes nothing
    assert torch.equal(penalize(logits, plain), logits + torch.nn.functional.one_hot(torch.tensor(1), 10) * 2.0)


def test_the_numpy_and_torch_penalties_are_the_same_numbers():
    """CPU logits take numpy's path, others torch's: the same float32 steps, bit for bit."""
    import numpy as np

    from shared.engine.sampling import _penalized

    rng = np.random.default_rng(0)
    xs = rng.standard_normal((6, 40)).astype(np.float32)
    seen = rng.random((6, 40)) > 0.5
    counts = np.floor(rng.random((6, 40)) * 4).astype(np.float32) * seen
    a = _penalized(xs, seen, counts, PENALIZED, np)
    b = _penalized(torch.from_numpy(xs), torch.from_numpy(seen), torch.from_numpy(counts), PENALIZED, torch)
    assert a.dtype == np.float32 and np.array_equal(a, b.numpy())


@pytest.mark.parametrize("bad", [dict(repetition_penalty=0.0), dict(presence_penalty=float("nan")),
                                 dict(frequency_penalty=float("inf")), dict(logit_bias=((-1, 1.0),)),
                                 dict(logit_bias=((3, 1.0), (3, 2.0))), dict(logit_bias=((3, float("inf")),)),
                                 dict(output_start=-2)])
def test_bad_penalties_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


@pytest.mark.parametrize("spec, params", [
    ("ngram,drafter,target", PENALIZED),
    ("drafter,verifier,target", PENALIZED),
    ("fused,target", replace(PENALIZED, repetition_penalty=1.0, presence_penalty=-0.5)),
    ("drafter,target", replace(PENALIZED, temperature=0.9, top_k=40, seed=11)),
])
def test_penalized_chains_emit_the_target_alones_tokens(pool, prompts, spec, params):
    subset = prompts[:4] + prompts[-4:]
    target = pool.get("target")
    want = [target_alone(target, p, MAX_TOKENS, params) for p in subset]
    got = run_batches(pool.chain(spec, k=3), subset, 4, MAX_TOKENS, sampling=params)
    assert got == want
    assert all(42 not in out for out in got)  # a bias of -100 rules a token out
    plain = run_batches(pool.chain(spec, k=3), subset, 4, MAX_TOKENS,
                        sampling=SamplingParams(params.temperature, params.top_p, params.top_k, params.seed))
    assert plain != got  # the penalties did something


def test_a_resumed_request_keeps_counting_its_output_from_the_prompt(pool, prompts):
    """Resumed from prompt + the tokens committed so far (as a worker does after a failure),
    with output_start at the prompt's end, the rest is what the first run emitted."""
    chain = pool.chain("drafter,target", k=3)
    params = replace(PENALIZED, presence_penalty=4.0, repetition_penalty=1.0)  # only the output is penalized
    prompt = prompts[1]
    first = chain.generate([prompt], MAX_TOKENS, stop_at_eos=False, sampling=params)[0]
    resumed = chain.add(prompt + first[:6], MAX_TOKENS - 6, replace(params, output_start=len(prompt)),
                        stop_at_eos=False)
    while not resumed.done:
        chain.step()
    assert first[:6] + resumed.output == first
    restarted = chain.generate([prompt + first[:6]], MAX_TOKENS - 6, stop_at_eos=False, sampling=params)[0]
    assert first[:6] + restarted != first  # counting from the longer prompt is another request


@pytest.mark.parametrize("spec", ["ngram,drafter,target", "drafter,verifier,target"])
def test_min_tokens_holds_off_the_end_of_sequence(pool, prompts, spec):
    """With the end-of-sequence token pushed up by +100, it comes exactly at min_tokens,
    never before, through every chain; without min_tokens it comes first."""
    target = pool.get("target")
    eos = target.eos_token_id
    eager = SamplingParams(logit_bias=((eos, 100.0),))
    chain = pool.chain(spec, k=3)
    assert chain.generate(prompts[:2], MAX_TOKENS, sampling=eager) == [[eos], [eos]]
    held = replace(eager, min_tokens=5, frequency_penalty=0.2)
    got = chain.generate(prompts[:4], MAX_TOKENS, sampling=held)  # stops at the end of sequence
    assert got == [target_alone(target, p, 6, held) for p in prompts[:4]]
    assert all(len(out) == 6 and out[-1] == eos and eos not in out[:-1] for out in got)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=-1)


def test_stop_token_ids_end_the_output_where_the_target_alone_emits_one(pool, prompts):
    """A stop token ends the output like the end of sequence (the chain drafts past it and
    cuts there); with min_tokens it cannot come before, so the output runs on."""
    target = pool.get("target")
    free = [target_alone(target, p, MAX_TOKENS, SamplingParams()) for p in prompts[:4]]
    chain = pool.chain("ngram,drafter,target", k=4)
    for prompt, ref in zip(prompts[:4], free):
        stop = ref[5]
        got = chain.generate([prompt], MAX_TOKENS, sampling=SamplingParams(stop_token_ids=(stop, 99999)))[0]
        assert got == ref[: ref.index(stop) + 1]
        held = SamplingParams(stop_token_ids=(stop,), min_tokens=ref.index(stop) + 1)
        late = chain.generate([prompt], MAX_TOKENS, sampling=held)[0]
        assert late == target_alone(target, prompt, len(late), held) and stop not in late[: held.min_tokens]
        assert len(late) > ref.index(stop) + 1
