"""gateway.reasoning_parser "think": a reasoning model's <think>...</think> apart from its
answer, whole and streamed (split anywhere), on chat and the Responses API, with tool calls
read from the answer only."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.generation import Delta
from services.gateway.http_api import create_app
from services.gateway.reasoning import Thinking, ThinkingStream
from tests.test_gateway_api import MODEL, FakeBackend, make_settings, sse_events, tok  # noqa: F401
from tests.test_gateway_responses import events_of
from tests.test_gateway_tools import CONTEXT, TIME, WEATHER, answer_with

THOUGHT = "<think>Two and two.\nSo four.</think>The answer is 4."


@pytest.mark.parametrize("text, opened, want", [
    (THOUGHT, False, ("Two and two.\nSo four.", "The answer is 4.")),
    ("\n<think>a</think>", False, ("a", "")),
    ("<think>cut off", False, ("cut off", "")),
    ("No thinking.", False, (None, "No thinking.")),
    ("a</think>b", True, ("a", "b")),  # the template opened it (DeepSeek-R1)
    ("a</think>b", False, (None, "a</think>b")),
])
def test_the_thinking_and_the_answer(text, opened, want):
    assert Thinking(opened).split(text) == want


@settings(max_examples=300, deadline=None)
@given(text=st.sampled_from([THOUGHT, " <think>x</think></think>y", "<thin", "<think></think>", "plain <think>a",
                             "a</think>b</think>c"]),
       opened=st.booleans(), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_a_stream_split_anywhere_gives_the_same_parts(text, opened, cuts):
    thinking = Thinking(opened)
    bounds = sorted({0, len(text), *[c for c in cuts if c < len(text)]})
    stream = ThinkingStream(thinking)
    parts = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        parts += stream.feed(Delta(text[a:b], [i]))
    parts += stream.finish()
    reasoning, answer = thinking.split(text)
    assert "".join(d.text for kind, d in parts if kind == "reasoning") == (reasoning or "")
    assert "".join(d.text for kind, d in parts if kind == "content") == answer
    assert [i for _, d in parts for i in d.token_ids] == list(range(len(bounds) - 1))  # every token, once, in order


@pytest.fixture
def backend(tok):
    found = FakeBackend(tok)
    found.max_context = CONTEXT
    return found


@pytest.fixture
async def client(backend):
    app = create_app(make_settings(reasoning_parser="think"), SimpleNamespace(backend=backend))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 400}


async def test_chat_answers_carry_the_thinking_apart(client, backend):
    answer_with(backend, THOUGHT)
    r = await client.post("/v1/chat/completions", json=CHAT)
    message = r.json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "Two and two.\nSo four."}
    r = await client.post("/v1/chat/completions", json=CHAT | {"stream": True})
    deltas = [e["choices"][0]["delta"] for e in sse_events(r.text)]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Two and two.\nSo four."
    assert "".join(d.get("content") or "" for d in deltas) == "The answer is 4."
    answer_with(backend, "No thinking here.")
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "No thinking here."}


async def test_tool_calls_are_read_from_the_answer(client, backend):
    answer_with(backend, '<think>I need the time.</think>[{"name": "get_time", "arguments": {}}]')
    for stream in (False, True):
        r = await client.post("/v1/chat/completions", json=CHAT | {"tools": [WEATHER, TIME], "stream": stream})
        if stream:
            deltas = [e["choices"][0]["delta"] for e in sse_events(r.text)]
            assert "".join(d.get("reasoning_content") or "" for d in deltas) == "I need the time."
            assert not any(d.get("content") for d in deltas)
            assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls", [])] == ["get_time"]
        else:
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "tool_calls" and choice["message"]["reasoning_content"] == "I need the time."
            assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_time"


async def test_the_responses_api_gives_a_reasoning_item(client, backend):
    answer_with(backend, THOUGHT)
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "2+2?", "max_output_tokens": 400})
    output = r.json()["output"]
    assert [o["type"] for o in output] == ["reasoning", "message"]
    assert output[0]["content"] == [{"type": "reasoning_text", "text": "Two and two.\nSo four."}]
    assert output[1]["content"][0]["text"] == "The answer is 4."
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "2+2?", "max_output_tokens": 400,
                                                 "stream": True})
    events = events_of(r.text)
    thought = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    said = [e for e in events if e["type"] == "response.output_text.delta"]
    assert thought == "Two and two.\nSo four." and "".join(e["delta"] for e in said) == "The answer is 4."
    assert {e["output_index"] for e in said} == {1}
    done = events[-1]["response"]["output"]
    assert [o["type"] for o in done] == ["reasoning", "message"] and done[0]["content"][0]["text"] == thought


async def test_a_template_that_opens_the_thinking(client, backend, tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", "{% for m in messages %}{{ m.content }}\n{% endfor %}<think>\n")
    answer_with(backend, "Hmm.</think>Four.")
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "Four.", "reasoning_content": "Hmm."}
