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


def _save(path, arch: str, **overrides):
    torch.manual_seed(0)
    if arch == "llama":
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model
    elif arch == "qwen2":
        from transformers import Qwen2Config as Config, Qwen2ForCausalLM as Model
    else:
        from transformers import MistralConfig as Config, MistralForCausalLM as Model
    cfg = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=5000.0, tie_word_embeddings=False,
    )
    cfg.update(overrides)
    model = Model(Config(**cfg))
    with torch.no_grad():  # sharper logits than the default init, so argmaxes mean something
        model.lm_head.weight.mul_(20.0) if not cfg["tie_word_embeddings"] else model.model.embed_tokens.weight.mul_(5.0)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", params=["llama", "llama-tied-mha", "qwen2", "mistral"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "llama-tied-mha":
        return _save(path, "llama", tie_word_embeddings=True, num_key_value_heads=4, rope_theta=10000.0)
    return _save(path, request.param)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens], device=model.device)).logits[0].cpu()


def test_lean_logits_match_transformers_with_ragged_batch(checkpoint):
    model = load_hf_model(checkpoint)
    lean = LeanRunner(model, DEVICE, max_batch=4, max_len=128)
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
