"""Prefix caching: the KV cache's bookkeeping of what each slot holds (a freed slot kept
for the next prompt that starts the same way, a live request's head copied, salts kept
apart), and that a prompt prefilled on a cached head gives the same tokens as one run
whole, through every chain."""

from __future__ import annotations

import pytest
import torch

from shared.engine.build import RunnerPool
from shared.engine.kv_cache import CacheFullError, KVCache
from shared.engine.sampling import SamplingParams
from tests.device import DEVICE
from tests.test_engine_chain import MAX_TOKENS, engine_family, target_alone  # noqa: F401 - fixtures


def _cache(slots: int = 3) -> KVCache:
    return KVCache(layers=2, slots=slots, kv_heads=1, max_len=16, head_dim=2)


def _write(cache: KVCache, rid: str, tokens: list[int]) -> None:
    """What a forward does: keys and values at the request's next positions, then advance."""
    slot, start = cache.slot(rid), cache.length(rid)
    for i, token in enumerate(tokens):
        cache.k[:, slot, :, start + i] = float(token)
        cache.v[:, slot, :, start + i] = -float(token)
    cache.advance(rid, tokens)


def test_a_freed_slot_is_reused_for_a_prompt_that_starts_the_same_way():
    cache = _cache()
    assert cache.open_prefix("a", [1, 2, 3, 4]) == 0
    _write(cache, "a", [1, 2, 3, 4, 9])
    slot = cache.slot("a")
    cache.close("a")
    assert cache.open_prefix("b", [1, 2, 3, 4, 9, 5]) == 5  # the next turn: the whole slot, as it is
    assert cache.slot("b") == slot and cache.length("b") == 5
    cache.close("b")
    assert cache.open_prefix("c", [1, 2, 3, 4, 9]) == 4  # the last token is always run: its logits are the answer
    cache.close("c")
    assert cache.open_prefix("d", [5, 6]) == 0 and cache.slot("d") != slot  # least recently freed first


def test_a_head_of_a_longer_sequence_is_copied_and_the_sequence_kept():
    cache = _cache()
    cache.open_prefix("a", [1, 2, 3, 4])
    _write(cache, "a", [1, 2, 3, 4, 9])  # a system prompt 1 2 3, a question, an answer
    kept = cache.slot("a")
    cache.close("a")
    assert cache.open_prefix("b", [1, 2, 3, 7, 7]) == 3  # another question after the same system prompt
    b = cache.slot("b")
    assert b != kept and torch.equal(cache.k[:, b, :, :3], cache.k[:, kept, :, :3])
    cache.close("b")
    assert cache.open_prefix("c", [1, 2, 3, 4, 9, 8]) == 5  # a's conversation is still whole
    assert cache.slot("c") == kept


def test_a_rolled_back_tail_is_not_offered():
    cache = _cache()
    cache.open_prefix("a", [1, 2])
    _write(cache, "a", [1, 2, 3, 4])
    cache.rollback("a", 2)  # 3 4 were a rejected draft
    cache.close("a")
    assert cache.open_prefix("b", [1, 2, 3, 4, 5]) == 2


def test_a_live_requests_head_is_copied_into_a_free_slot():
    cache = _cache()
    cache.open_prefix("a", [4, 5, 6, 7])
    _write(cache, "a", [4, 5, 6, 7])
    assert cache.open_prefix("b", [4, 5, 6, 1]) == 3
    a, b = cache.slot("a"), cache.slot("b")
    assert a != b and cache.length("a") == 4
    assert torch.equal(cache.k[:, b, :, :3], cache.k[:, a, :, :3]) and torch.equal(cache.v[:, b, :, :3],
                                                                                    cache.v[:, a, :, :3])
    _write(cache, "b", [1])
    cache.close("b")
    assert cache.open_prefix("c", [4, 5, 6, 1, 8]) == 4  # b's slot holds 4 5 6 1 now


def test_salts_keep_heads_apart():
    cache = _cache()
    cache.open_prefix("a", [1, 2, 3], salt="alice")
    _write(cache, "a", [1, 2, 3])
    assert cache.open_prefix("b", [1, 2, 3, 4], salt="bob") == 0  # live, another salt: not copied
    cache.close("a")
    assert cache.open_prefix("c", [1, 2, 3, 4]) == 0  # no salt is a salt of its own
    assert cache.open_prefix("d", [1, 2, 3, 4], salt="alice") == 3


def test_open_prefix_fills_every_slot_then_refuses():
    cache = _cache(slots=2)
    cache.open_prefix("a", [1]), cache.open_prefix("b", [1])
    with pytest.raises(CacheFullError):
        cache.open_prefix("c", [1])
    cache.open_prefix("a", [1, 2])  # a request that has a slot gives it up first: no error
    assert cache.active == 2


@pytest.fixture(scope="module")
def pools(engine_family):
    torch.set_num_threads(1)
    return (RunnerPool(engine_family, device=DEVICE, max_batch=8, max_len=256),
            RunnerPool(engine_family, device=DEVICE, max_batch=8, max_len=256, prefix_caching=True))


@pytest.fixture(scope="module")
def conversation(pools):
    """Prompts that share heads: one system text, two questions after it, and a second turn
    that carries the first turn's answer."""
    from shared.models.corpus import heldout_prompts

    tok = pools[0].tokenizer()
    system = tok.encode(heldout_prompts("prose", 1, 200, seed=3)[0])
    first, second = (tok.encode(t, add_special_tokens=False) for t in heldout_prompts("code", 2, 60, seed=4))
    return system, first, second


@pytest.mark.parametrize("spec", ["target", "ngram,target", "drafter,target", "drafter,verifier,target"])
def test_prompts_on_cached_heads_give_the_target_alones_tokens(pools, conversation, spec):
    cold, warm = pools
    system, first, second = conversation
    target = warm.get("target")
    hits = target.prefix_hits
    chain = warm.chain(spec, k=4)
    turn1 = chain.generate([system + first], MAX_TOKENS, stop_at_eos=False)[0]
    prompts = [system + second, system + first + turn1 + second]  # a shared system text; the next turn
    outputs = chain.generate(prompts, MAX_TOKENS, stop_at_eos=False)
    reference = [target_alone(cold.get("target"), p, MAX_TOKENS) for p in [system + first] + prompts]
    assert [turn1] + outputs == reference
    assert target.prefix_hits - hits >= len(system) * 2 + len(first) + len(turn1) - 1


def test_seeded_sampling_on_a_cached_head_draws_the_same_tokens(pools, conversation):
    cold, warm = pools
    system, first, _ = conversation
    sampling = SamplingParams(temperature=0.8, seed=11)
    reference = target_alone(cold.get("target"), system + first, MAX_TOKENS, sampling)
    chain = warm.chain("drafter,target", k=3)
    for _ in range(2):  # the second time the whole prompt but its last token is cached
        assert chain.generate([system + first], MAX_TOKENS, stop_at_eos=False, sampling=sampling)[0] == reference


def test_the_forward_runs_only_the_uncached_tail(pools, conversation):
    _, warm = pools
    system, first, second = conversation
    target = warm.get("target")
    alone = SamplingParams(cache_salt="tail")  # apart from what the other tests cached
    target.prefill("x", system + first, alone)
    target.release("x")
    before = target.forward_tokens
    target.prefill("y", system + second, alone)
    assert target.forward_tokens - before == len(second)
    assert target.cached_prefix("y") == len(system)
    target.release("y")
    assert target.cached_prefix("y") == 0


def test_a_request_knows_the_head_the_target_held_even_when_done_at_once(pools, conversation):
    _, warm = pools
    system, first, _ = conversation
    chain = warm.chain("drafter,target", k=2)
    salt = SamplingParams(cache_salt="known")
    cold = chain.add(system + first, 1, salt, stop_at_eos=False)  # done by its first token: released already
    warm_ = chain.add(system + first, 1, salt, stop_at_eos=False)
    assert cold.done and warm_.done and cold.cached_prompt == 0
    assert warm_.cached_prompt == len(system + first) - 1  # all but the last token, which is run for its logits


def test_a_prompt_run_whole_is_cached_under_its_own_salt(pools, conversation):
    """`prefill_rows` (echo's prompt log-probabilities) runs every token and opens without
    a cached head, yet what it writes stays its salt's: no other salt starts on it."""
    _, warm = pools
    system, first, _ = conversation
    target = warm.get("target")
    prompt = list(reversed(system)) + first  # a head no other test has cached
    target.prefill_rows("rows", prompt, SamplingParams(cache_salt="private"))
    target.release("rows")
    hits = target.prefix_hits
    target.prefill("other", prompt, SamplingParams(cache_salt="public"))
    target.release("other")
    assert target.prefix_hits == hits
    target.prefill("same", prompt, SamplingParams(cache_salt="private"))
    target.release("same")
    assert target.prefix_hits - hits == len(prompt) - 1


@pytest.fixture(scope="module")
def hf_pools(engine_family):
    torch.set_num_threads(1)
    return (RunnerPool(engine_family, runner="hf", device=DEVICE, max_batch=4, max_len=256),
            RunnerPool(engine_family, runner="hf", device=DEVICE, max_batch=4, max_len=256, prefix_caching=True))


def test_the_transformers_runner_caches_prefixes_too(hf_pools, conversation):
    """The fallback runner for other architectures: a next turn and a second question start
    on cached heads, run only their tails, and give its own target alone's tokens."""
    cold, warm = hf_pools
    system, first, second = conversation
    target = warm.get("target")
    chain = warm.chain("drafter,target", k=3)
    turn1 = chain.generate([system + first], MAX_TOKENS, stop_at_eos=False)[0]
    before = target.forward_tokens
    prompts = [system + first + turn1 + second, system + second]
    hits = target.prefix_hits
    outputs = chain.generate(prompts[:1], MAX_TOKENS, stop_at_eos=False) + \
        chain.generate(prompts[1:], MAX_TOKENS, stop_at_eos=False)
    reference = [target_alone(cold.get("target"), p, MAX_TOKENS) for p in [system + first] + prompts]
    assert [turn1] + outputs == reference
    assert target.prefix_hits - hits >= len(system + first + turn1) - 1 + len(system)
    assert target.forward_tokens - before < sum(len(p) for p in prompts)  # the heads were not run again


def test_the_transformers_runners_kept_caches_respect_salt_and_room(hf_pools, conversation):
    _, warm = hf_pools
    system, first, second = conversation
    target = warm.get("target")
    salted = SamplingParams(cache_salt="hf-a")
    target.prefill("a", system + first, salted)
    target.release("a")
    target.prefill("b", system + first, SamplingParams(cache_salt="hf-b"))
    assert target.cached_prefix("b") == 0  # another salt
    target.prefill("c", system + second, salted)
    assert target.cached_prefix("c") == len(system)  # copied out of the kept cache, cut to the head
    target.prefill("d", system + first, salted)
    assert target.cached_prefix("d") == len(system + first) - 1  # the kept one, still whole
    for rid in "bcd":
        target.release(rid)
    assert len(target._caches) + len(target._kept) <= target.max_batch
    for i in range(6):  # more prompts than room: the oldest kept caches are dropped, nothing fails
        target.prefill(f"x{i}", system[i:] + second, SamplingParams(cache_salt=f"hf-x{i}"))
        target.release(f"x{i}")
    assert len(target._kept) <= target.max_batch
