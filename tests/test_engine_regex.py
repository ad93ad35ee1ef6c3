"""response_format "regex" (vLLM's guided_regex and guided_choice): the byte automaton of a
regular expression against Python's `re.fullmatch`, and chains under it against the target
alone masked by brute force."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.grammar import Grammar, TokenTrie, advance, token_bytes
from shared.engine.regex import choice_regex, compile_regex
from shared.engine.sampling import SamplingParams
from tests.test_engine_chain import MAX_TOKENS, engine_family, pool, prompts  # noqa: F401 - fixtures
from tests.test_engine_grammar import json_target_alone, takes

REGEXES = [r"[0-9]{3}-[a-zé]+", r"(yes|no|maybe)", r"a+b*", r"\d+(\.\d{1,2})?", r"(ab|é|日本)*x?", r"[^a]{2,4}",
           r"(red|green|blue) (car|bike)s?"]
ALPHABET = "ab01x9.-é日本 rdn"


@settings(max_examples=300, deadline=None)
@given(regex=st.sampled_from(REGEXES), text=st.text(ALPHABET, max_size=8))
def test_a_regex_takes_exactly_its_full_matches(regex, text):
    automaton = compile_regex(regex)
    assert takes(automaton, text) == bool(re.fullmatch(regex, text))
    # A prefix is taken exactly when some match goes on from it (a mask never leaves nothing to write).
    state = advance(automaton.initial, text.encode(), automaton.step)
    if state is not None:
        assert automaton.done(state) or any(automaton.step(state, b) is not None for b in range(256))


@pytest.mark.parametrize("regex", REGEXES)
def test_random_walks_end_in_matches(regex):
    automaton, rng = compile_regex(regex), random.Random(5)
    alphabet = sorted(set(range(0x20, 0x7F)) | set("é日本".encode()))
    for _ in range(30):
        state, out = automaton.initial, bytearray()
        while not automaton.done(state) or rng.random() < 0.5:
            options = [b for b in alphabet if automaton.step(state, b) is not None]
            if not options:
                assert automaton.done(state)
                break
            out.append(rng.choice(options))
            state = automaton.step(state, out[-1])
        assert re.fullmatch(regex, out.decode()), out


def test_a_choice_is_exactly_its_strings():
    choices = ["yes", "no", "a.b (c)?", "[x]|y", "été", "no!"]
    automaton = compile_regex(choice_regex(choices))
    for text in choices:
        assert takes(automaton, text)
    for text in ["ye", "yesno", "a-b (c)?", "x", "été!", "no!!", ""]:
        assert not takes(automaton, text)


def test_the_end_of_sequence_comes_where_a_match_ends_and_bytes_may_go_on():
    vocab = [b"", b"a", b"b", b"ab", b"c", b"ba"]
    grammar = Grammar(TokenTrie(vocab, eos_token_id=0), compile_regex("a+b?"))
    assert set(grammar.allowed(grammar.state([]), 6).nonzero()[0]) == {1, 3}
    assert set(grammar.allowed(grammar.state([1]), 6).nonzero()[0]) == {0, 1, 2, 3}  # a match: may end or go on
    assert set(grammar.allowed(grammar.state([3]), 6).nonzero()[0]) == {0}  # "ab": only the end


@pytest.mark.parametrize("regex, words", [
    ("a(?=b)", "not supported"), (r"(a)\1", "not supported"), ("", "empty"), ("a" * 5000, "longer than"),
    (".*a.{30}b", "4096 states"), ("[", "not supported"),
])
def test_bad_regexes_are_refused(regex, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(response_format="regex", regex=regex)
    with pytest.raises(ValueError, match="regex"):
        SamplingParams(regex="a+")  # an expression without its response format


@pytest.mark.parametrize("spec, params", [
    ("ngram,drafter,target", {}),
    ("drafter,verifier,target", {"temperature": 0.9, "seed": 11}),
])
def test_chains_under_a_regex_emit_the_target_alones_tokens(pool, prompts, spec, params):
    regex = r"(def|class|return) [a-z_]{1,8}\(\)"  # a match ends: then only the end of sequence
    sampling = SamplingParams(response_format="regex", regex=regex, **params)
    vocab = token_bytes(pool.tokenizer())
    target = pool.get("target")
    subset = prompts[:2] + prompts[-2:]
    got = pool.chain(spec, k=3).generate(subset, 2 * MAX_TOKENS, sampling=sampling)
    automaton = compile_regex(regex)
    assert got == [json_target_alone(target, vocab, p, 2 * MAX_TOKENS, sampling, automaton) for p in subset]
    for out in got:
        assert out[-1] == target.eos_token_id
        assert re.fullmatch(regex, b"".join(vocab[t] for t in out[:-1]).decode())


@settings(max_examples=300, deadline=None)
@given(regex=st.text(alphabet="ab()[]{}|*+?.^$\\-,0123456789=!<:", max_size=12))
def test_any_regex_is_compiled_or_refused_with_a_value_error(regex):
    try:
        compile_regex(regex)
    except ValueError:
        pass
