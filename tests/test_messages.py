"""The message codec: round trips, and bad bytes of every kind refused with a clear error."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from shared.messages import (
    BadMessage, Commit, GenerateJob, LevelCall, LevelItem, LevelReply, LevelResult, Sampling, TokenBatch, V,
    decode, encode,
)
from shared.engine.sampling import SamplingParams


def test_round_trip_nested():
    job = GenerateJob("r1", [1, 2, 3], 16, Sampling(0.7, 0.9, 5, 42), ["drafter", "target"], [4])
    assert decode(encode(job), GenerateJob) == job
    call = LevelCall("score", [LevelItem("r1", 2, 10, [5, 6], 0, 0.0, None, [])], want_probs=True)
    assert decode(encode(call)) == call
    reply = LevelReply("w1", [LevelResult("r1", 12, [7], [0.5], b"\x00\x01", 1)])
    assert decode(encode(reply)) == reply


@given(st.lists(st.integers(0, 2**31 - 1), max_size=50), st.integers(0, 1000), st.booleans())
def test_token_batch_round_trip(tokens, position, finished):
    batch = TokenBatch("req", 3, position, tokens, finished)
    assert decode(encode(batch), TokenBatch) == batch


@pytest.mark.parametrize("data, message", [
    (b"\xc1", "not msgpack"),
    (msgpack.packb([1, 2]), "expected a map"),
    (msgpack.packb({"type": "commit"}), "missing wire version"),
    (msgpack.packb({"v": V + 1, "type": "commit"}), "newer than"),
    (msgpack.packb({"v": V, "type": "nope"}), "unknown message type"),
    (msgpack.packb({"v": V, "type": "commit", "request_id": "r"}), "missing field 'epoch'"),
    (msgpack.packb({"v": V, "type": "commit", "request_id": "r", "epoch": "x", "position": 0, "tokens": []}),
     "expected an integer"),
    (msgpack.packb({"v": V, "type": "commit", "request_id": "r", "epoch": 1, "position": 0, "tokens": ["a"]}),
     r"tokens\[0\]: expected an integer"),
])
def test_bad_bytes_are_refused(data, message):
    with pytest.raises(BadMessage, match=message):
        decode(data)


def test_truncated_message_is_refused():
    data = encode(Commit("r", 1, 0, list(range(100))))
    with pytest.raises(BadMessage):
        decode(data[: len(data) // 2])


def test_wrong_type_for_subject_is_refused():
    with pytest.raises(BadMessage, match="expected a 'generate' message"):
        decode(encode(Commit("r", 1, 0, [])), GenerateJob)


def test_unknown_fields_are_ignored_for_forward_compatibility():
    body = msgpack.unpackb(encode(Commit("r", 1, 0, [4])))
    body["new_field"] = 7
    assert decode(msgpack.packb(body)) == Commit("r", 1, 0, [4])


@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data):
    try:
        decode(data)
    except BadMessage:
        pass


def test_lists_of_numbers_are_checked_element_by_element_when_not_plain():
    """Lists of plain ints (floats) pass as they are; anything else in them is refused or converted."""
    from shared.messages import TokenLogprob

    good = TokenBatch("r", 0, 0, [1, 2], logprobs=[TokenLogprob(-0.5, [3, 4], [-0.5, -1.0])])
    assert decode(encode(good), TokenBatch) == good
    body = {"v": V, "type": "tokens", "request_id": "r", "epoch": 0, "position": 0, "tokens": [1, True]}
    with pytest.raises(BadMessage, match=r"tokens\[1\]: expected an integer"):
        decode(msgpack.packb(body))
    lp = {"logprob": -1, "top_ids": [1], "top_logprobs": [0, -2.5]}  # ints where floats go: converted
    batch = decode(msgpack.packb(body | {"tokens": [1], "logprobs": [lp]}), TokenBatch)
    assert batch.logprobs[0].top_logprobs == [0.0, -2.5] and type(batch.logprobs[0].top_logprobs[0]) is float
    with pytest.raises(BadMessage, match=r"top_logprobs\[0\]: expected a number"):
        decode(msgpack.packb(body | {"tokens": [1], "logprobs": [lp | {"top_logprobs": ["x"]}]}))


@settings(deadline=None)
@given(temperature=st.floats(0, 2), top_p=st.floats(0.01, 1), top_k=st.integers(0, 100), min_p=st.floats(0, 1),
       seed=st.none() | st.integers(0, 2**63 - 1), min_tokens=st.integers(0, 9),
       stops=st.lists(st.integers(0, 999), max_size=3, unique=True), salt=st.text(max_size=8),
       bias=st.dictionaries(st.integers(0, 999), st.floats(-100, 100), max_size=3))
def test_sampling_params_cross_the_wire_whole(temperature, top_p, top_k, min_p, seed, min_tokens, stops, salt, bias):
    """Every field of a request's sampling parameters arrives as it was sent."""
    params = SamplingParams(temperature, top_p, top_k, seed, 0.5, -0.25, 1.1, tuple(bias.items()), 7, min_tokens,
                            tuple(stops), cache_salt=salt, min_p=min_p, allowed_token_ids=tuple(stops))
    job = GenerateJob("r1", [1, 2], 4, params.to_wire(), ["target"], [])
    assert SamplingParams.from_wire(decode(encode(job), GenerateJob).sampling) == params
