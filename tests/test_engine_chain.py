"""Chains on the trained tiny family: token-exact equality with the target alone (greedy),
seeded reproducibility across chains and batch sizes, an end-to-end sampling check,
cache consistency after rollbacks, draft control, and the CLI."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
import torch

from shared.engine.build import RunnerPool, parse_chain
from shared.engine.chain import Chain, verify_rounds
from shared.engine.sampling import SamplingParams
from tests.device import DEVICE

CHAINS = [
    "target",
    "drafter,target",
    "verifier,target",
    "drafter,verifier,target",
    "ngram,drafter,target",
    "ngram,drafter,verifier,target",
    "fused,target",
    "fused,verifier,target",
]
N_PROMPTS = 50  # half code, half prose
MAX_TOKENS = 16


@pytest.fixture(scope="session")
def engine_family(request):
    """The `tiny_family` fixture when the suite provides one; otherwise the cached tiny family."""
    try:
        return request.getfixturevalue("tiny_family")
    except pytest.FixtureLookupError:
        from shared.models.family import ensure_family

        return ensure_family("tiny", progress=False)


@pytest.fixture(scope="module")
def pool(engine_family):
    torch.set_num_threads(1)
    return RunnerPool(engine_family, device=DEVICE, max_batch=16, max_len=256)


@pytest.fixture(scope="module")
def prompts(pool):
    from shared.models.corpus import heldout_prompts

    tok = pool.tokenizer()
    texts = heldout_prompts("code", N_PROMPTS // 2, 160, seed=1) + heldout_prompts("prose", N_PROMPTS // 2, 160, seed=1)
    return [tok.encode(t) for t in texts]


def target_alone(runner, prompt, n, sampling=SamplingParams()):
    """Reference decoding, independent of the chain: prefill, then one token per forward."""
    from shared.engine.sampling import choose

    probs = runner.prefill("ref", prompt, sampling)
    out = []
    for _ in range(n):
        tok = int(choose(probs[None], sampling, [len(prompt) + len(out)], runner.generator)[0])
        out.append(tok)
        probs = runner.score(["ref"], [[tok]])[0][-1]
    runner.release("ref")
    return out


@pytest.fixture(scope="module")
def reference(pool, prompts):
    target = pool.get("target")
    return [target_alone(target, p, MAX_TOKENS) for p in prompts]


def run_batches(chain, prompts, batch, max_tokens, **kwargs):
    out = []
    for i in range(0, len(prompts), batch):
        out += chain.generate(prompts[i : i + batch], max_tokens, stop_at_eos=False, **kwargs)
    return out


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("spec", CHAINS)
def test_greedy_chain_is_token_exact(pool, prompts, reference, spec, batch):
    chain = pool.chain(spec, k=4)
    outputs = run_batches(chain, prompts, batch, MAX_TOKENS)
    mismatched = [i for i, (a, b) in enumerate(zip(outputs, reference)) if a != b]
    assert not mismatched, f"{spec} batch {batch}: prompts {mismatched} differ from the target alone"
    if spec != "target":
        stats = chain.collect_stats()
        assert stats.levels[0].drafted > 0


def test_greedy_exact_with_lenient_middle_thresholds_and_mixed_k(pool, prompts, reference):
    chain = pool.chain("ngram,drafter,verifier,target", k=[2, 3, 2], leniency=3.0, confidence_threshold=0.3)
    outputs = run_batches(chain, prompts[:16], 8, MAX_TOKENS)
    assert outputs == reference[:16]
    # per-request k: one request without speculation at all, one with a different chain depth
    chain = pool.chain("drafter,verifier,target", k=4)
    reqs = [chain.add(p, MAX_TOKENS, k=k, stop_at_eos=False) for p, k in zip(prompts[:3], [[0, 0], [4, 0], [1, 5]])]
    while any(not r.done for r in reqs):
        chain.step()
    assert [r.output for r in reqs] == reference[:3]


def test_chains_sharing_the_target_verify_in_one_forward_and_stay_exact(pool, prompts, reference):
    """A server with requests on several chains runs one target forward per round for all."""
    specs = ["target", "ngram,target", "drafter,target", "drafter,verifier,target"]
    chains = [pool.chain(spec, k=3) for spec in specs]
    target = pool.get("target")
    reqs = {spec: [chain.add(p, MAX_TOKENS, stop_at_eos=False) for p in prompts[2 * i : 2 * i + 2]]
            for i, (spec, chain) in enumerate(zip(specs, chains))}
    forwards = target.forwards
    rounds = 0
    while any(not r.done for rs in reqs.values() for r in rs):
        pending = [p for p in (chain.propose() for chain in chains) if p is not None]
        verify_rounds(pending)
        rounds += 1
    assert target.forwards - forwards == rounds  # one target forward per round, not one per chain
    for i, spec in enumerate(specs):
        assert [r.output for r in reqs[spec]] == reference[2 * i : 2 * i + 2], spec
    mine, other = pool.chain("target"), Chain([("verifier", pool.get("verifier"))])
    for chain in (mine, other):
        chain.add(prompts[0], 4, request_id="mixed", stop_at_eos=False)
    with pytest.raises(ValueError, match="share one target"):
        verify_rounds([mine.propose(), other.propose()])
    for chain in (mine, other):
        chain.release("mixed")


def test_k_zero_is_the_target_alone(pool, prompts, reference):
    chain = pool.chain("drafter,target", k=0)
    assert run_batches(chain, prompts[:4], 4, MAX_TOKENS) == reference[:4]
    stats = chain.collect_stats()
    assert stats.levels[0].drafted == 0


def test_caches_hold_exactly_the_sequence_after_every_round(pool, prompts):
    """After each step, every level's cache equals a fresh prefill of the tokens so far."""
    chain = pool.chain("ngram,drafter,verifier,target", k=3, leniency=2.0)
    reqs = [chain.add(p, 40, stop_at_eos=False) for p in prompts[:3]]
    for _ in range(4):
        chain.step()
        for r in reqs:
            seq = r.tokens
            for level in chain.levels:
                runner = level.runner
                if runner is None:
                    continue
                n = runner.length(r.request_id)
                assert n <= len(seq) - 1
                got = runner.score([r.request_id], [seq[n:]])[0][-1]
                runner.rollback(r.request_id, n)
                fresh = runner.prefill("fresh", seq)
                runner.release("fresh")
                assert torch.allclose(got, fresh, atol=1e-5), (level.name, r.request_id)
    for r in reqs:
        chain.release(r.request_id)
    assert all(lv.runner.cache.active == 0 for lv in chain.levels if lv.runner is not None)


def chi2_critical(df: int, z: float = 4.0) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at a normal z (z=4: p ~ 3e-5)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * a**0.5) ** 3


SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)


def test_seeded_sampling_is_reproducible_across_chains_and_batches(pool, prompts):
    subset = prompts[:6] + prompts[-6:]
    target = pool.get("target")
    ref = [target_alone(target, p, MAX_TOKENS, SEEDED) for p in subset]
    for spec, batch, kwargs in [
        ("target", 1, {}),
        ("drafter,target", 4, {}),
        ("ngram,drafter,verifier,target", 12, {"leniency": 2.0}),
        ("verifier,target", 3, {"k": 2}),
        ("fused,verifier,target", 5, {}),
    ]:
        chain = pool.chain(spec, **kwargs)
        assert run_batches(chain, subset, batch, MAX_TOKENS, sampling=SEEDED) == ref, spec
    other = SamplingParams(temperature=0.9, top_p=0.95, seed=4321)
    assert run_batches(pool.chain("drafter,target"), subset, 12, MAX_TOKENS, sampling=other) != ref


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.9, seed=5)], ids=["greedy", "seeded"])
def test_allowed_token_ids_hold_at_every_level(pool, prompts, reference, sampling):
    """Only the allowed tokens come out, and they are the target alone's under the same rule."""
    subset = prompts[:3] + prompts[-3:]
    seen = sorted({t for out in reference[:3] + reference[-3:] for t in out})
    allowed = replace(sampling, allowed_token_ids=tuple(seen[::2]))  # half of what the target would say
    target = pool.get("target")
    ref = [target_alone(target, p, MAX_TOKENS, allowed) for p in subset]
    assert all(set(out) <= set(allowed.allowed_token_ids) for out in ref)
    for spec in ("ngram,drafter,target", "drafter,verifier,target"):
        assert run_batches(pool.chain(spec, k=3), subset, 6, MAX_TOKENS, sampling=allowed) == ref, spec


def test_min_p_sampling_seeded_is_the_target_alones_through_every_chain(pool, prompts):
    """min_p filters the target's distribution (and every drafter's) the same way at every
    level: seeded outputs equal the target alone's, and differ from the unfiltered ones."""
    sp = SamplingParams(temperature=1.2, min_p=0.2, seed=77)
    subset = prompts[:3] + prompts[-3:]
    target = pool.get("target")
    ref = [target_alone(target, p, MAX_TOKENS, sp) for p in subset]
    for spec in ("drafter,target", "ngram,drafter,verifier,target", "fused,target"):
        assert run_batches(pool.chain(spec, k=3), subset, 6, MAX_TOKENS, sampling=sp) == ref, spec
    assert ref != [target_alone(target, p, MAX_TOKENS, replace(sp, min_p=0.0)) for p in subset]


@pytest.mark.parametrize("sp", [SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=1.0, min_p=0.3)],
                         ids=["top_k", "min_p"])
def test_unseeded_sampling_follows_the_target_end_to_end(pool, prompts, sp):
    """Joint distribution of the first two tokens through a 3-level chain with a lenient middle."""
    prompt = prompts[3]
    target = pool.get("target")
    p1 = target.prefill("exact", prompt, sp)
    exact = {}
    for t1 in torch.nonzero(p1).flatten().tolist():
        p2 = target.score(["exact"], [[t1]])[0][-1]
        target.rollback("exact", len(prompt))
        for t2 in torch.nonzero(p2).flatten().tolist():
            exact[(t1, t2)] = float(p1[t1] * p2[t2])
    target.release("exact")
    chain = pool.chain("drafter,verifier,target", k=2, leniency=2.0, confidence_threshold=0.2, seed=0)
    n = 1600
    counts = Counter()
    for _ in range(n // 16):
        for out in chain.generate([prompt] * 16, 3, sampling=sp, stop_at_eos=False):
            counts[tuple(out[:2])] += 1  # token 2 went through both verifications
    assert set(counts) <= set(exact), "a token outside the target's support was emitted"
    cells = [(c, e * n) for c, e in ((counts.get(key, 0), p) for key, p in exact.items())]
    big = [(c, e) for c, e in cells if e >= 5]
    rest_c, rest_e = sum(c for c, e in cells if e < 5), sum(e for c, e in cells if e < 5)
    if rest_e > 0:
        big.append((rest_c, rest_e))
    stat = sum((c - e) ** 2 / e for c, e in big)
    assert stat < chi2_critical(len(big) - 1), (stat, len(big))
    assert chain.stats.levels[1].drafted > 0
    for level in chain.stats.levels[:2]:  # every drafted position measured 1 - TV against the level above
        assert level.overlap_positions == level.drafted > 0
        assert 0 < level.expected_acceptance < 1


def test_greedy_chains_report_no_tv_estimate(pool, prompts):
    chain = pool.chain("drafter,target", k=3)
    chain.generate(prompts[:2], 8, stop_at_eos=False)
    assert chain.stats.levels[0].drafted > 0 and chain.stats.levels[0].expected_acceptance is None


def test_eos_stops_like_the_target_alone(pool, prompts, reference):
    eos = reference[0][5]
    chain = Chain([(lv.name, lv.proposer) for lv in pool.chain("drafter,target").levels], eos_token_id=eos)
    (out,) = chain.generate([prompts[0]], MAX_TOKENS)
    assert out == reference[0][: reference[0].index(eos) + 1]


def test_chain_names_and_lengths_are_checked(pool, tmp_path):
    with pytest.raises(ValueError):
        parse_chain("target,ngram")
    with pytest.raises(ValueError):
        parse_chain("drafter,llama")
    with pytest.raises(ValueError):
        parse_chain("drafter,drafter-code,target")
    assert parse_chain("ngram, drafter ,target") == ["ngram", "drafter", "target"]
    assert parse_chain("fused,verifier,target") == ["fused", "verifier", "target"]
    for bad in ("ngram,fused,target", "verifier,fused,target", "fused,drafter-prose,target", "fused"):
        with pytest.raises(ValueError):
            parse_chain(bad)
    # levels whose embedding tables differ in size are served (test_engine_runner.py's padded-vocabulary test)
    with pytest.raises(ValueError, match="max_len"):
        pool.chain("drafter,target", k=4).add([5] * 240, 16)


def test_fused_drafts_come_from_the_more_confident_drafter_at_each_position(pool, prompts):
    """Replays a fused proposal with the two drafters alone: each token is the confident one's."""
    from shared.engine.fused import FusedRunner

    code, prose = pool.get("drafter-code"), pool.get("drafter-prose")
    fused = FusedRunner(code, prose)
    picks = [0, 0]
    for n, prompt in enumerate(prompts[::5]):
        fused.prefill(f"f{n}", prompt[:-1])
        (draft,) = fused.propose([f"f{n}"], [[prompt[-1]]], 5)
        assert fused.length(f"f{n}") == len(prompt) + 4 == code.length(f"f{n}") == prose.length(f"f{n}")
        fused.release(f"f{n}")
        seq = list(prompt)
        for j, tok in enumerate(draft.tokens):
            dists = [runner.prefill("replay", seq) for runner in (code, prose)]
            for runner in (code, prose):
                runner.release("replay")
            tops = [float(d.max()) for d in dists]
            pick = 0 if tops[0] >= tops[1] else 1
            picks[pick] += 1
            assert tok == int(dists[pick].argmax()), (n, j)
            assert torch.allclose(draft.probs[j], dists[pick], atol=1e-5)
            seq.append(tok)
    assert all(picks), picks  # on mixed prompts both drafters lead somewhere
    assert fused.chosen == picks


def _cli(engine_family, monkeypatch, args):
    from typer.testing import CliRunner

    from shared.cli.main import app
    from shared.settings import get_settings

    monkeypatch.setenv("SPECMESH_MODELS__CACHE_DIR", str(engine_family.root.parent))
    monkeypatch.setenv("SPECMESH_MODELS__PROFILE", engine_family.profile)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, args)
    finally:
        get_settings.cache_clear()


def test_cli_generate(engine_family, monkeypatch, tmp_path):
    result = _cli(engine_family, monkeypatch, ["generate", "--chain", "ngram,drafter,verifier,target", "--max-tokens", "12", "def main("])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output and "threads=" in result.output and "acceptance" in result.output
    bad = _cli(engine_family, monkeypatch, ["generate", "--chain", "target,ngram", "x"])
    assert bad.exit_code == 2 and "bottom" in bad.output
    result = _cli(engine_family, monkeypatch, ["generate", "--json", "--max-tokens", "24", "Settings: "])
    assert result.exit_code == 0, result.output
    assert "Settings: {" in result.output
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"ok": {"type": "boolean"}}}')
    result = _cli(engine_family, monkeypatch, ["generate", "--json-schema", str(schema), "--max-tokens", "24", "x"])
    assert result.exit_code == 0 and 'x{"ok"' in result.output, result.output
    schema.write_text('{"type": "object", "properties": {"ok": {"type": "object", "patternProperties": {"a": {}}}}}')
    bad = _cli(engine_family, monkeypatch, ["generate", "--json-schema", str(schema), "x"])
    assert bad.exit_code == 2 and "'patternProperties' is not supported" in bad.output
    result = _cli(engine_family, monkeypatch, ["generate", "--regex", " (yes|no)", "--max-tokens", "8", "Q:"])
    assert result.exit_code == 0 and ("Q: yes\n" in result.output or "Q: no\n" in result.output), result.output
    bad = _cli(engine_family, monkeypatch, ["generate", "--regex", "a", "--json", "x"])
    assert bad.exit_code == 2 and "one of" in bad.output


def test_cli_bench_engine_json(engine_family, monkeypatch):
    result = _cli(
        engine_family, monkeypatch,
        ["bench", "engine", "--json", "--prompts", "2", "--max-tokens", "8", "--chains", "drafter,target;ngram,drafter,verifier,target", "--no-hf"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{\n") :])
    assert data["threads"] >= 1
    for r in data["chains"].values():
        assert r["identical_to_target"] is True
        assert {"tokens_per_s", "speedup", "acceptance", "theoretical_speedup", "efficiency"} <= set(r)


def test_cli_bench_engine_under_a_json_schema(engine_family, monkeypatch, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}, "ok": {"type": "boolean"}}}')
    result = _cli(engine_family, monkeypatch, ["bench", "engine", "--json", "--prompts", "2", "--max-tokens", "12",
                                               "--chains", "ngram,drafter,target", "--json-schema", str(schema)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{\n"):])
    assert data["response_format"] == "json_schema" and "hf_assisted_tokens_per_s" not in data
    assert data["chains"]["ngram,drafter,target"]["identical_to_target"] is True
    result = _cli(engine_family, monkeypatch, ["bench", "engine", "--json", "--prompts", "2", "--max-tokens", "12",
                                               "--chains", "drafter,target", "--regex", " [a-z]+( [a-z]+)*"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{\n"):])
    assert data["response_format"] == "regex" and data["chains"]["drafter,target"]["identical_to_target"] is True


@pytest.mark.slow
def test_cli_bench_engine_with_transformers_assisted(engine_family, monkeypatch):
    result = _cli(engine_family, monkeypatch, ["bench", "engine", "--json", "--prompts", "2", "--max-tokens", "16"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{\n") :])
    assert data["hf_assisted_tokens_per_s"] > 0
    assert all(r["identical_to_target"] for r in data["chains"].values())


def test_transformers_runner_chain_is_token_exact(engine_family, prompts):
    """The fallback runner drives the same chain code: exact against its own target alone."""
    hf = RunnerPool(engine_family, runner="hf", device=DEVICE, max_batch=8, max_len=256)
    ref = [target_alone(hf.get("target"), p, 12) for p in prompts[:4]]
    chain = hf.chain("ngram,drafter,verifier,target", k=3)
    assert run_batches(chain, prompts[:4], 2, 12) == ref


def test_bfloat16_chains_are_token_exact_at_batch_1(engine_family, prompts):
    """Reduced precision: verify chunks reproduce the decode steps bit for bit at batch 1."""
    bf16 = RunnerPool(engine_family, device=DEVICE, dtype="bfloat16", max_batch=4, max_len=256)
    ref = [target_alone(bf16.get("target"), p, MAX_TOKENS) for p in prompts[::5]]
    for spec in ("drafter,target", "ngram,drafter,verifier,target"):
        assert run_batches(bf16.chain(spec, k=4), prompts[::5], 1, MAX_TOKENS) == ref, spec


def target_logprobs(runner, prompt, n, top, sampling=SamplingParams()):
    """Reference log-probabilities: the target alone's distribution row of each token it emits."""
    from shared.engine.logprobs import logprobs_of
    from shared.engine.sampling import choose

    probs = runner.prefill("ref", prompt, sampling)
    out = []
    for _ in range(n):
        tok = int(choose(probs[None], sampling, [len(prompt) + len(out)], runner.generator)[0])
        out += logprobs_of(probs[None], [tok], top)
        probs = runner.score(["ref"], [[tok]])[0][-1]
    runner.release("ref")
    return out


@pytest.mark.parametrize("spec, sampling", [("ngram,drafter,target", SamplingParams()),
                                            ("drafter,verifier,target", SamplingParams()),
                                            ("fused,target", SamplingParams(temperature=0.8, top_k=50, seed=5))])
def test_logprobs_are_the_target_alones(pool, prompts, reference, spec, sampling):
    """Every emitted token's log-probability and its top alternatives equal the target alone's,
    whichever level drafted it."""
    chain = pool.chain(spec, k=3)
    subset = prompts[:2] + prompts[-2:]
    reqs = [chain.add(p, MAX_TOKENS, sampling, stop_at_eos=False, logprobs=3) for p in subset]
    while any(not r.done for r in reqs):
        chain.step()
    target = pool.get("target")
    for req, prompt in zip(reqs, subset):
        ref = target_logprobs(target, prompt, MAX_TOKENS, 3, sampling)
        assert len(req.output_logprobs) == len(req.output) == MAX_TOKENS
        for got, want in zip(req.output_logprobs, ref):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert got.top_logprobs == pytest.approx(want.top_logprobs, abs=1e-4)
            assert got.top_ids[0] == want.top_ids[0]
            assert got.top_logprobs == sorted(got.top_logprobs, reverse=True) and got.logprob <= 0.0
        if sampling.greedy:
            assert [lp.top_ids[0] for lp in req.output_logprobs] == req.output  # greedy emits the argmax
    plain = chain.add(subset[0], 4, stop_at_eos=False)
    assert plain.output_logprobs == []  # nobody asked: nothing computed
    chain.release(plain.request_id)
    with pytest.raises(ValueError, match="logprobs"):
        chain.add(subset[0], 4, logprobs=21)


def test_logprobs_of_a_row_floors_tokens_without_mass():
    from shared.engine.logprobs import FLOOR, logprobs_of

    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 1.0, 0.0]])
    first, second = logprobs_of(probs, [1, 3], 2)
    assert first.logprob == pytest.approx(-1.386294, abs=1e-5) and first.top_ids[0] == 0
    assert first.top_logprobs == pytest.approx([-0.693147, -1.386294], abs=1e-5)
    assert second.logprob == FLOOR and second.top_ids[0] == 2 and second.top_logprobs[0] == 0.0
    assert [lp.top_ids for lp in logprobs_of(probs, [0, 2], 0)] == [[], []]
    assert logprobs_of(probs, [], 5) == []


def test_prompt_logprobs_are_the_targets_score_of_each_prompt_token(pool, prompts, reference):
    """Token j of the prompt gets log p_target(prompt[j] | prompt[:j]), as a prefill of the
    first j tokens predicts it; the output is unchanged by asking."""
    from shared.engine.logprobs import logprobs_of

    chain = pool.chain("drafter,target", k=3)
    prompt = prompts[0][:24]
    req = chain.add(prompt, MAX_TOKENS, stop_at_eos=False, prompt_logprobs=2)
    while not req.done:
        chain.step()
    target = pool.get("target")
    want = []
    for j in range(1, len(prompt)):
        want += logprobs_of(target.prefill("ref", prompt[:j])[None], [prompt[j]], 2)
        target.release("ref")
    assert len(req.prompt_logprobs) == len(prompt) - 1
    for got, ref in zip(req.prompt_logprobs, want):
        assert got.logprob == pytest.approx(ref.logprob, abs=1e-4) and got.top_ids[0] == ref.top_ids[0]
    assert req.output == target_alone(target, prompt, MAX_TOKENS)
