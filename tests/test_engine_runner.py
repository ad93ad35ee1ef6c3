"""The lean runner against transformers (logits, ragged batches), rollback equivalence,
the KV cache's bookkeeping and the proposer operations. Random-initialised models:
enough for numerics and state, never for acceptance."""

from __future__ import annotations

import pytest
import torch

from shared.engine.kv_cache import CacheFullError, KVCache
from shared.engine.ngram import NgramProposer
from shared.engine.runner import HFRunner, LeanRunner, load_hf_model
from shared.engine.sampling import SamplingParams
from tests.device import ATOL, DEVICE

VOCAB = 257


ARCHS = {  # model type -> the transformers classes' prefix
    "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "phi3": "Phi3", "smollm3": "SmolLM3",
    "gemma2": "Gemma2", "gemma3": "Gemma3Text", "olmo2": "Olmo2", "gpt_neox": "GPTNeoX",  # the last: transformers' only
}


def _save(path, arch: str, **overrides):
    import transformers

    torch.manual_seed(0)
    Config = getattr(transformers, f"{ARCHS[arch]}Config")
    Model = getattr(transformers, f"{ARCHS[arch].removesuffix('Text')}ForCausalLM")
    cfg = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=5000.0, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(overrides)
    if arch == "gemma3" and cfg.pop("vision", False):  # Gemma 3 4B and up: the text model inside a vision-language one
        tokens = {k: cfg.pop(k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        config = transformers.Gemma3Config(
            text_config=cfg, vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=28, patch_size=14),
            mm_tokens_per_image=4, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2, image_token_index=VOCAB - 1,
            **tokens)
        model = transformers.Gemma3ForConditionalGeneration(config)
    else:
        model = Model(Config(**cfg))
    with torch.no_grad():  # sharper logits than the default init, so argmaxes mean something
        model.lm_head.weight.mul_(20.0) if not cfg["tie_word_embeddings"] else model.model.embed_tokens.weight.mul_(5.0)
    model.save_pretrained(str(path))
    return path


def _rope(rope_type: str, **params) -> dict:
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": 5000.0, **params}}


VARIANTS = {  # fixture name -> (model type, config overrides)
    "llama": ("llama", {}),
    "llama-tied-mha": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4, rope_theta=10000.0)),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {}),
    "qwen3": ("qwen3", dict(head_dim=24, tie_word_embeddings=True)),  # per-head q/k norms; head_dim != hidden / heads
    "phi3-partial-rope": ("phi3", _rope("default", partial_rotary_factor=0.5)),  # fused qkv and gate_up
    "smollm3": ("smollm3", dict(num_hidden_layers=4, no_rope_layer_interval=2)),  # layers without RoPE
    "llama3-rope": ("llama", _rope("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)),
    "yarn-rope": ("qwen2", _rope("yarn", factor=4.0, original_max_position_embeddings=64)),
    # Gemma 3 text: a sliding window shorter than the sequences on one layer, a table per layer type, the
    # sandwich norms, q/k norms, tanh GELU, its attention scale and (Gemma 2's) final soft-capping
    "gemma3": ("gemma3", dict(head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                              query_pre_attn_scalar=24, final_logit_softcapping=30.0)),
    # Gemma 2: attention scores soft-capped by tanh (50 in the real ones; 0.5 here, and a larger scale, so that it bites)
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                              attn_logit_softcapping=0.5, final_logit_softcapping=30.0, query_pre_attn_scalar=1)),
    "olmo2": ("olmo2", {}),  # norms after the attention and the MLP only, q/k norms over all heads
    # Gemma 3 4B and up: the same text model inside Gemma3ForConditionalGeneration (model.language_model.*)
    "gemma3-multimodal": ("gemma3", dict(head_dim=16, sliding_window=6, vision=True,
                                         layer_types=["sliding_attention", "full_attention"])),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    return _save(tmp_path_factory.mktemp(request.param), arch, **overrides)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens], device=model.device)).logits[0].cpu()


@pytest.mark.parametrize("kind", ["lean", "hf"])
def test_ragged_batch_logits_match_transformers_row_by_row(checkpoint, kind):
    """One forward over requests of different lengths and chunks gives each row what
    transformers gives that sequence alone (the HF runner pads caches left, chunks right)."""
    model = load_hf_model(checkpoint)
    runner = LeanRunner if kind == "lean" else HFRunner
    lean = runner(load_hf_model(checkpoint), DEVICE, max_batch=4, max_len=128)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (13, 5, 21)]
    chunks = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (4, 1, 6)]
    ids = [f"r{i}" for i in range(3)]
    for rid, p in zip(ids, prompts):
        lean.prefill(rid, p)
    with torch.inference_mode():
        got = lean._logits(ids, chunks, last_only=False)  # [3, 6, V], one ragged forward
    for b, (p, c) in enumerate(zip(prompts, chunks)):
        ref = _hf_logits(model, p + c)[len(p) :]
        assert torch.allclose(got[b, : len(c)].cpu(), ref, atol=ATOL, rtol=ATOL), (b, (got[b, : len(c)].cpu() - ref).abs().max())
    # a decode step over the slots in another order (gathered, not a view) agrees too
    with torch.inference_mode():
        step = lean._logits(ids[::-1], [[9], [8], [7]], last_only=True).flip(0)
    for b, (p, c) in enumerate(zip(prompts, chunks)):
        ref = _hf_logits(model, p + c + [7 + b])[-1]
        assert torch.allclose(step[b].cpu(), ref, atol=ATOL, rtol=ATOL)
    # a fresh request beside them (nothing cached yet), last rows only
    lean.prefill("new", [4])
    lean.rollback("r1", 3)
    with torch.inference_mode():
        mixed = lean._logits(["r1", "new", "r2"], [[1, 2], [5, 6, 7], [3]], last_only=True)
    for row, seq in zip(mixed, [prompts[1][:3] + [1, 2], [4, 5, 6, 7], prompts[2] + chunks[2] + [9, 3]]):
        assert torch.allclose(row.cpu(), _hf_logits(model, seq)[-1], atol=ATOL, rtol=ATOL)
    assert [lean.length(r) for r in ("r0", "r1", "new", "r2")] == [13 + 4 + 1, 5, 4, 21 + 6 + 2]


@pytest.mark.parametrize("arch, overrides, bound", [
    ("phi3", dict(original_max_position_embeddings=64, **_rope("longrope", short_factor=[1.0 + i / 8 for i in range(8)], long_factor=[4.0] * 8,
                                                             original_max_position_embeddings=64)), 64),
    ("llama", _rope("dynamic", factor=2.0), 256),  # dynamic NTK: static up to max_position_embeddings
])
def test_length_dependent_rope_is_lean_within_its_original_context(tmp_path, arch, overrides, bound):
    """LongRoPE and dynamic NTK tables are static up to the original context: the lean
    runner takes them there (equal to transformers) and refuses a max_len past it."""
    from shared.engine.llama import UnsupportedModel
    from shared.engine.runner import load_runner

    path = _save(tmp_path, arch, **overrides)
    model = load_hf_model(path)
    lean = LeanRunner(model, DEVICE, max_len=64)
    tokens = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    assert torch.allclose(lean.prefill("a", tokens).cpu().log(), torch.log_softmax(_hf_logits(model, tokens)[-1], -1), atol=ATOL)
    with pytest.raises(UnsupportedModel, match=f"changes past {bound} positions"):
        LeanRunner(model, DEVICE, max_len=bound + 1)
    if bound < model.config.max_position_embeddings:
        assert isinstance(load_runner(path, max_len=bound + 1), HFRunner)  # refused: transformers runs it
    else:  # dynamic NTK's bound is the context itself: past it, no runner
        with pytest.raises(ValueError, match=f"engine.max_len={bound + 1} is longer than the context"):
            load_runner(path, max_len=bound + 1)


def test_unsupported_checkpoints_name_the_reason(tmp_path):
    from shared.engine.llama import UnsupportedModel

    model = load_hf_model(_save(tmp_path, "llama", **_rope("longrope", short_factor=[1.0] * 8, long_factor=[1.0] * 8)))
    model.config.rope_parameters["rope_type"] = "proportional"
    with pytest.raises(UnsupportedModel, match="rope type 'proportional'"):
        LeanRunner(model, DEVICE, max_len=64)
    model.config.model_type = "gemma"
    with pytest.raises(UnsupportedModel, match="'gemma' is not one of"):
        LeanRunner(model, DEVICE, max_len=64)


def test_hf_runner_matches_lean_runner(checkpoint):
    model = load_hf_model(checkpoint)
    lean, hf = LeanRunner(model, DEVICE, max_len=64), HFRunner(load_hf_model(checkpoint), DEVICE, max_len=64)
    tokens = list(range(3, 30))
    assert torch.allclose(lean.prefill("a", tokens), hf.prefill("a", tokens), atol=ATOL / 10)
    a, b = lean.score(["a"], [[1, 2, 3]])[0], hf.score(["a"], [[1, 2, 3]])[0]
    assert torch.allclose(a, b, atol=ATOL / 10)
    lean.rollback("a", 20), hf.rollback("a", 20)
    assert lean.length("a") == hf.length("a") == 20
    assert torch.allclose(lean.score(["a"], [[5]])[0], hf.score(["a"], [[5]])[0], atol=ATOL / 10)


@pytest.mark.parametrize("kind", ["lean", "hf"])
def test_rollback_equals_fresh_prefill(checkpoint, kind):
    model = load_hf_model(checkpoint)
    runner = LeanRunner(model, DEVICE, max_len=96) if kind == "lean" else HFRunner(model, DEVICE, max_len=96)
    prompt = list(range(10, 40))
    runner.prefill("x", prompt)
    runner.score(["x"], [[1, 2, 3, 4, 5]])  # speculative tokens written...
    runner.propose(["x"], [[6]], 4)  # ...and more
    runner.rollback("x", len(prompt) - 3)  # back into the prompt: O(1)
    after = runner.score(["x"], [prompt[-3:] + [9, 9]])[0]
    runner.prefill("fresh", prompt + [9])
    fresh = runner.score(["fresh"], [[9]])[0]
    assert torch.allclose(after[-1], fresh[-1], atol=ATOL / 10)
    with pytest.raises(ValueError):
        runner.rollback("x", runner.length("x") + 1)


def test_propose_is_greedy_autoregressive_and_respects_k_and_threshold(checkpoint):
    model = load_hf_model(checkpoint)
    runner = LeanRunner(model, DEVICE, max_len=96)
    prompt = [5, 6, 7, 8]
    runner.prefill("p", prompt)
    drafts = runner.propose(["p"], [[9]], 5)[0]
    assert len(drafts.tokens) == 5 and drafts.probs.shape == (5, VOCAB)
    assert runner.length("p") == len(prompt) + 5  # the feed plus 4 drafts; the last draft is not written
    seq = prompt + [9]
    for tok in drafts.tokens:  # each draft is the argmax after the ones before
        assert tok == int(_hf_logits(model, seq)[-1].argmax())
        seq.append(tok)
    assert drafts.confidence == pytest.approx([float(drafts.probs[j, t]) for j, t in enumerate(drafts.tokens)])
    runner.prefill("q", prompt)
    runner.prefill("r", prompt)
    out = runner.propose(["q", "r"], [[9], [9]], [0, 3], confidence_threshold=[0.0, 1.01])
    assert out[0].tokens == [] and out[1].tokens == []  # k=0 drafts nothing; threshold > 1 cuts everything
    assert runner.length("q") == len(prompt)


def test_seeded_propose_is_position_keyed(checkpoint):
    model = load_hf_model(checkpoint)
    runner = LeanRunner(model, DEVICE, max_len=96)
    sp = SamplingParams(temperature=1.0, seed=17)
    runner.prefill("a", [1, 2, 3], sp)
    runner.prefill("b", [1, 2, 3], sp)
    a = runner.propose(["a"], [[4]], 6)[0].tokens
    b = runner.propose(["b", "a"], [[4], [a[-1]]], [6, 0])[0].tokens  # batched differently, same tokens
    assert a == b


def test_kv_cache_slots_and_limits():
    cache = KVCache(layers=1, slots=2, kv_heads=1, max_len=8, head_dim=4)
    cache.open("a"), cache.open("b")
    with pytest.raises(CacheFullError):
        cache.open("c")
    cache.advance("a", list(range(8)))
    with pytest.raises(CacheFullError):
        cache.check_room("a", 1)
    cache.rollback("a", 3)
    assert cache.length("a") == 3
    cache.close("a")
    cache.open("c")
    with pytest.raises(KeyError):
        cache.length("a")


def test_ngram_proposes_what_followed_the_last_match():
    ng = NgramProposer(vocab_size=50, max_ngram=3)
    ctx = [1, 2, 3, 4, 5, 9, 1, 2, 3]
    d = ng.propose([ctx], 3)[0]
    assert d.tokens == [4, 5, 9]
    assert torch.equal(d.probs.argmax(-1), torch.tensor([4, 5, 9])) and d.probs.sum() == 3
    assert ng.propose([[1, 2, 3]], 4)[0].tokens == []
    assert ng.lookup([7, 7, 7], 2) == [7]


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.9, seed=5)], ids=["greedy", "seeded"])
def test_chains_over_qwen3_phi3_and_smollm3_give_the_target_alones_tokens(tmp_path, sampling):
    """Real pairings have a small model of one family drafting for a large one: a Qwen3
    target, verified by the same checkpoint through transformers (nearly everything
    accepted) and drafted by a Phi-3 and a SmolLM3 (nearly nothing), in one ragged batch."""
    from shared.engine.chain import Chain
    from tests.test_engine_chain import target_alone

    def lean(name):
        arch, overrides = VARIANTS[name]
        return LeanRunner(load_hf_model(_save(tmp_path / name, arch, **overrides)), DEVICE, max_batch=4, max_len=96)

    target = lean("qwen3")
    same = HFRunner(load_hf_model(tmp_path / "qwen3"), DEVICE, max_batch=4, max_len=96)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (9, 17, 4)]
    ref = [target_alone(target, p, 12, sampling) for p in prompts]
    accepted = {}
    for levels in (
        [("verifier", same), ("target", target)],
        [("ngram", NgramProposer(VOCAB)), ("drafter", lean("phi3-partial-rope")), ("verifier", same), ("target", target)],
        [("drafter", lean("smollm3")), ("target", target)],
    ):
        chain = Chain(levels, k=3)
        assert chain.generate(prompts, 12, sampling, stop_at_eos=False) == ref, [name for name, _ in levels]
        for stats in chain.collect_stats().levels[:-1]:
            assert stats.drafted > 0, stats.name
            accepted[stats.name] = accepted.get(stats.name, 0) + stats.accepted / stats.drafted
    assert accepted["verifier"] > 1.5  # the same weights: taken
    assert accepted["drafter"] < 1.5  # a stranger's drafts: rejections ran


def test_every_eos_token_of_the_generation_config_ends_a_sequence(tmp_path):
    """Llama 3.x Instruct's config lists several ends (and its generation config more):
    each one stops a chain, min_tokens bars each, ignore_eos passes them all."""
    from transformers import GenerationConfig

    from shared.engine.chain import Chain
    from shared.engine.runner import eos_token_ids, load_runner
    from tests.test_engine_chain import target_alone

    path = _save(tmp_path / "plain", "llama")
    free = target_alone(LeanRunner(load_hf_model(path), DEVICE, max_len=64), [5, 6, 7], 12)
    end = next(t for t in free[3:] if t not in (1, 2, 0))  # a token the model says after its fourth
    model = load_hf_model(path)
    model.config.eos_token_id = [2, 0]
    model.generation_config = GenerationConfig(eos_token_id=[0, end], bos_token_id=1)
    model.save_pretrained(str(tmp_path / "ends"))
    assert eos_token_ids(load_hf_model(tmp_path / "ends")) == (2, 0, end)
    for kind in ("lean", "hf"):
        target = load_runner(tmp_path / "ends", runner=kind, max_len=64)
        assert target.eos_token_id == 2 and target.eos_token_ids == (2, 0, end)
        first = free.index(end)
        assert Chain([("target", target)]).generate([[5, 6, 7]], 12) == [free[: first + 1]], kind
        assert Chain([("target", target)]).generate([[5, 6, 7]], 12, stop_at_eos=False) == [free], kind
        late = Chain([("target", target)]).generate([[5, 6, 7]], 12, SamplingParams(min_tokens=first + 1), stop_at_eos=True)[0]
        assert end not in late[: first + 1] and late[:first] == free[:first], kind


def test_a_reduced_precision_runner_loads_in_its_dtype_and_computes_as_from_float32(tmp_path, monkeypatch):
    """load_runner reads the weights in the runner's dtype (half fp32's memory at load): the
    same weights and RoPE tables as casting a float32 load, so the same logits, bit for bit."""
    import shared.engine.runner as runners
    from shared.engine.runner import load_runner

    path = _save(tmp_path, "llama", **VARIANTS["llama3-rope"][1])
    loaded = []
    monkeypatch.setattr(runners, "load_hf_model", lambda p, dtype=torch.float32: loaded.append(dtype) or load_hf_model(p, dtype))
    direct = load_runner(path, dtype="bfloat16", max_batch=1, max_len=64)
    assert loaded == [torch.bfloat16]  # never a float32 copy of the weights first
    cast = LeanRunner(load_hf_model(path), DEVICE, torch.bfloat16, max_batch=1, max_len=64)
    assert direct.model.embed.dtype == torch.bfloat16 and torch.equal(direct.model.tables["default"][0], cast.model.tables["default"][0])
    tokens = list(range(5, 30))
    assert torch.equal(direct.prefill("a", tokens), cast.prefill("a", tokens))
    hf = load_runner(path, runner="hf", dtype="bfloat16", max_batch=1, max_len=64)
    assert {p.dtype for p in hf.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("arch, overrides", [
    ("mistral", dict(sliding_window=6)),  # a window shorter than the sequences on every layer: the lean runner refuses it
    ("gpt_neox", dict(rotary_pct=0.5, use_parallel_residual=True)),  # Pythia: LayerNorm, GELU, parallel residual
], ids=["mistral-window", "gpt-neox"])
def test_transformers_runner_batches_architectures_the_lean_one_refuses(tmp_path, arch, overrides):
    """Mistral's window on every layer, GPT-NeoX (Pythia): the HF runner's ragged batch
    equals transformers on each sequence alone, and so does a chain over it."""
    from shared.engine.chain import Chain
    from shared.engine.llama import UnsupportedModel
    from tests.test_engine_chain import target_alone

    path = _save(tmp_path, arch, **overrides)
    model = load_hf_model(path)
    with pytest.raises(UnsupportedModel):
        LeanRunner(model, DEVICE, max_len=64)
    hf = HFRunner(load_hf_model(path), DEVICE, max_batch=4, max_len=64)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (11, 3, 17)]
    for i, p in enumerate(prompts):
        hf.prefill(f"r{i}", p)
    chunks = [[5, 6, 7], [8], [9, 10]]
    with torch.inference_mode():
        got = hf._logits(["r0", "r1", "r2"], chunks, last_only=False)
    for b, (p, c) in enumerate(zip(prompts, chunks)):
        ref = _hf_logits(model, p + c)[len(p):]
        assert torch.allclose(got[b, : len(c)].cpu(), ref, atol=ATOL, rtol=ATOL), (b, (got[b, : len(c)].cpu() - ref).abs().max())
    for rid in ("r0", "r1", "r2"):
        hf.release(rid)
    ref = [target_alone(hf, p, 10) for p in prompts]
    chain = Chain([("ngram", NgramProposer(VOCAB)), ("target", hf)], k=3)
    assert chain.generate(prompts, 10, stop_at_eos=False) == ref


def test_a_reduced_precision_chunk_equals_its_decode_steps_past_a_sliding_window(tmp_path):
    """bf16 attention rounds differently for 5 queries than for 1, so a chunk computes its
    queries one by one; on a sliding layer each one sees only its window's keys."""
    arch, overrides = VARIANTS["gemma3"]
    model = load_hf_model(_save(tmp_path, arch, **overrides))
    runner = LeanRunner(model, DEVICE, torch.bfloat16, max_batch=2, max_len=64)
    prompt, chunk = list(range(10, 30)), [3, 4, 5, 6, 7]
    runner.prefill("chunk", prompt)
    runner.prefill("steps", prompt)
    with torch.inference_mode():
        whole = runner._logits(["chunk"], [chunk], last_only=False)[0]
        steps = torch.stack([runner._logits(["steps"], [[t]], last_only=True)[0] for t in chunk])
    assert torch.equal(whole, steps)


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.9, seed=4)], ids=["greedy", "seeded"])
def test_levels_with_embeddings_padded_to_other_sizes_give_the_target_alones_tokens(tmp_path, sampling):
    """One tokenizer, embedding tables of different sizes (Qwen2.5 0.5B drafting for 7B): a
    narrower drafter (it reads the target's tokens past its size as 0) and a wider one."""
    from shared.engine.chain import Chain
    from tests.test_engine_chain import target_alone

    def lean(name, vocab):
        return LeanRunner(load_hf_model(_save(tmp_path / name, "llama", vocab_size=vocab)), DEVICE, max_batch=4, max_len=96)

    target = lean("target", VOCAB + 40)
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (7, 19)]
    ref = [target_alone(target, p, 14, sampling) for p in prompts]
    assert any(t >= VOCAB for out in ref for t in out)  # the target says tokens the narrow drafter cannot read
    for levels in ([("drafter", lean("narrow", VOCAB)), ("target", target)],
                   [("ngram", NgramProposer(VOCAB + 40)), ("drafter", lean("wide", VOCAB + 60)),
                    ("verifier", lean("narrow-verifier", VOCAB)), ("target", target)]):
        chain = Chain(levels, k=3)
        assert chain.generate(prompts, 14, sampling, stop_at_eos=False) == ref, [name for name, _ in levels]
        assert all(st.drafted > 0 for st in chain.collect_stats().levels[:-1])
