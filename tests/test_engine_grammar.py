"""JSON response format: the automaton, the token masks, and chains under the constraint.

The automaton is checked against Python's `json` (what it completes parses as an object;
what `json.dumps` writes it completes, and no prefix of it before the end); the masks
against a brute-force walk of every token's bytes; chains against the target alone
decoding one token per forward under a mask made by that brute force.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.grammar import DONE, INITIAL, JSON_OBJECT, MAX_DEPTH, MAX_INDENT, Grammar, TokenTrie, advance, token_bytes
from shared.engine.sampling import SamplingParams, choose, penalize, process_logits
from tests.test_engine_chain import MAX_TOKENS, engine_family, pool, prompts  # noqa: F401 - fixtures
from tests.test_engine_penalties import by_hand

JSON_MODE = SamplingParams(response_format="json_object")

scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                      max_leaves=12)
objects = st.dictionaries(st.text(max_size=6), values, max_size=4)


def complete(text: bytes) -> bool:
    state = advance(INITIAL, text)
    return state is not None and state[0] == DONE


@settings(max_examples=300, deadline=None)
@given(objects, st.sampled_from([None, 0, 2]), st.booleans())
def test_what_json_dumps_writes_is_accepted_and_complete_only_at_its_end(obj, indent, ascii_only):
    data = json.dumps(obj, indent=indent, ensure_ascii=ascii_only).encode()
    assert complete(data)
    state = INITIAL
    for i, b in enumerate(data[:-1]):
        state = advance(state, bytes([b]))
        assert state is not None and state[0] != DONE, data[: i + 1]


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='{}[]":,.-+eE0123456789 \\tunrlasfu\u00e9\n', max_size=24))
def test_what_the_automaton_completes_parses_as_an_object(text):
    data = text.encode()
    if complete(data):
        assert isinstance(json.loads(data), dict)


@pytest.mark.parametrize("bad", ['[1]', '"x"', '1', '{"a":01}', '{"a":1,}', '{,}', '{"a" 1}', "{'a':1}",
                                 '{"a":tru}', '{"a":"\x01"}', '{"a":"\\x"}', '{"a":1.}', '{"a":-}', '{"a":1e}',
                                 '{"a":[1 2]}', '{"a":1}}', '{"a":1} ', '{"a":NaN}', '{"a":"\\u12G4"}', ' {}',
                                 '{  }', '{\n\n}', '{\t}', '{\n' + ' ' * (MAX_INDENT + 1) + '}'])
def test_what_is_not_one_json_object_is_refused(bad):
    assert not complete(bad.encode())


def test_invalid_utf8_and_deep_nesting_are_refused():
    assert not complete(b'{"a":"\xff"}') and not complete(b'{"a":"\xc3"}') and complete('{"a":"\u00e9\u4e2d"}'.encode())
    assert complete(b'{"a":' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}")
    assert advance(INITIAL, b'{"a":' + b"[" * MAX_DEPTH) is None


VOCAB = [b"", b"{", b"}", b'{"', b'"', b"a", b'":', b" ", b"1", b"12", b".5", b",", b"[", b"]", b"true", b'"}',
         b"\xc3", b"\xa9", b"x}", b"}}", b"\\", b"u00e9"]  # token 0 is the end of sequence


def takes(automaton, text: str | bytes) -> bool:
    """Whether `automaton` takes `text` whole (every byte, then complete)."""
    state = advance(automaton.initial, text.encode() if isinstance(text, str) else text, automaton.step)
    return state is not None and automaton.done(state)


def brute_force(state, vocab: list[bytes], eos: int, automaton=JSON_OBJECT) -> set[int]:
    """The tokens whose bytes all fit after `state`, each walked on its own (no trie), and the
    end of sequence where the output is complete (or nothing fits)."""
    if state is None:
        return {eos}
    fits = {t for t, data in enumerate(vocab) if t != eos and data and advance(state, data, automaton.step) is not None}
    return fits | {eos} if automaton.done(state) or not fits else fits


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, len(VOCAB) - 1), max_size=12))
def test_masks_are_the_tokens_whose_bytes_fit(output):
    grammar = Grammar(TokenTrie(VOCAB, eos_token_id=0))
    state = grammar.state(output)
    assert state == advance(INITIAL, b"".join(VOCAB[t] for t in output))
    allowed = grammar.allowed(state, len(VOCAB) + 3)  # a model's vocabulary may be wider than its tokenizer's
    assert set(allowed.nonzero()[0].tolist()) == (brute_force(state, VOCAB, 0) if state is None or allowed[1:].any()
                                                    else {0})


def test_rows_are_constrained_by_their_own_output_and_the_prompt_is_left_alone():
    grammar = Grammar(TokenTrie(VOCAB, eos_token_id=0))
    prompt, output = [5, 5, 8], [3, 5, 6, 8]  # {"a":1
    logits = torch.zeros(6, len(VOCAB))  # rows predict positions 2..7: the prompt's last token, then output
    rows = penalize(logits, replace(JSON_MODE, output_start=len(prompt)), prompt + output, eos_token_ids=[0],
                    grammar=grammar)
    assert torch.equal(rows[0], logits[0])  # predicts the prompt's last token: not output
    for j in range(1, 6):
        state = advance(INITIAL, b"".join(VOCAB[t] for t in output[:j - 1]))
        assert set(torch.isfinite(rows[j]).nonzero().flatten().tolist()) == brute_force(state, VOCAB, 0)
    with pytest.raises(ValueError, match="tokenizer"):
        penalize(logits, replace(JSON_MODE, output_start=1), [1, 2, 3, 4, 5, 6])


@pytest.mark.parametrize("bad", [dict(response_format="json_schema"), dict(response_format="json_object", min_tokens=3)])
def test_bad_response_formats_are_refused(bad):
    with pytest.raises(ValueError, match="response_format"):
        SamplingParams(**bad)


def json_target_alone(runner, vocab: list[bytes], prompt: list[int], n: int, params: SamplingParams,
                      automaton=JSON_OBJECT) -> list[int]:
    """The target alone under `automaton` (JSON mode's, or a schema's), one token per forward,
    penalized by hand and masked by brute force."""
    plain = SamplingParams(params.temperature, params.top_p, params.top_k, params.seed)
    eos = runner.eos_token_id
    runner.prefill("ref", prompt[:-1], plain)
    out: list[int] = []
    feed = prompt[-1]
    for _ in range(n):
        logits = by_hand(runner._forward(["ref"], [[feed]], last_only=True)[0], params, prompt, out)
        state = advance(automaton.initial, b"".join(vocab[t] for t in out), automaton.step)
        allowed = brute_force(state, vocab, eos, automaton)
        blocked = torch.ones_like(logits, dtype=torch.bool)
        blocked[sorted(allowed)] = False
        probs = process_logits(logits.masked_fill(blocked, float("-inf"))[None], plain)
        feed = int(choose(probs, plain, [len(prompt) + len(out)], runner.generator)[0])
        out.append(feed)
        if feed == eos:
            break
    runner.release("ref")
    return out


@pytest.fixture(scope="module")
def vocab(pool):
    return token_bytes(pool.tokenizer())


@pytest.mark.parametrize("spec, params", [
    ("ngram,drafter,target", JSON_MODE),
    ("drafter,verifier,target", JSON_MODE),
    ("fused,target", replace(JSON_MODE, presence_penalty=0.5)),
    ("drafter,target", replace(JSON_MODE, temperature=0.9, top_k=40, seed=5)),
])
def test_chains_under_json_mode_emit_the_target_alones_tokens(pool, prompts, vocab, spec, params):
    target = pool.get("target")
    subset = prompts[:3] + prompts[-3:]
    want = [json_target_alone(target, vocab, p, MAX_TOKENS, params) for p in subset]
    got = pool.chain(spec, k=3).generate(subset, MAX_TOKENS, sampling=params)
    assert got == want
    for out in got:  # every output is the start of one JSON object
        text = b"".join(vocab[t] for t in out if t != target.eos_token_id)
        assert text.startswith(b"{") and advance(INITIAL, text) is not None
    free = pool.chain(spec, k=3).generate(subset, MAX_TOKENS, sampling=replace(params, response_format=""))
    assert free != got


def test_a_closed_object_is_followed_by_the_end_of_sequence(pool, prompts, vocab):
    """Pushed to close (a bias on `}`), the output is a whole object, then the end of
    sequence, through a chain as through the target alone; it parses."""
    target = pool.get("target")
    close = vocab.index(b"}")
    quote = vocab.index(b'"')
    params = replace(JSON_MODE, logit_bias=((close, 6.0), (quote, 4.0)))
    for prompt in prompts[:3]:
        got = pool.chain("ngram,drafter,target", k=4).generate([prompt], 4 * MAX_TOKENS, sampling=params)[0]
        assert got == json_target_alone(target, vocab, prompt, 4 * MAX_TOKENS, params)
        assert got[-1] == target.eos_token_id
        assert isinstance(json.loads(b"".join(vocab[t] for t in got[:-1])), dict)


def test_a_runner_without_a_tokenizer_refuses_json_mode(pool, prompts):
    from shared.engine.runner import LeanRunner, load_hf_model

    runner = LeanRunner(load_hf_model(pool.path("target")), max_batch=1, max_len=64)  # not from a folder
    with pytest.raises(ValueError, match="tokenizer"):
        runner.prefill("r", prompts[0][:8], JSON_MODE)
