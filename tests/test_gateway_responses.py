"""OpenAI's Responses API (`/v1/responses`, services/gateway/responses.py) against the
in-memory backend: what reaches the job, the response object, its stream of events, tools,
refusals, and the official SDK's `responses.create`."""

from __future__ import annotations

import json

import pytest

from tests.test_gateway_api import MODEL, client, service, tok  # noqa: F401
from tests.test_gateway_tools import CALLS, TIME, WEATHER, accepts, answer_with, backend, oai, prompt_of  # noqa: F401

FLAT = [{"type": "function"} | t["function"] for t in (WEATHER, TIME)]  # the Responses API's flat tools


def events_of(body: str, first: int = 0) -> list[dict]:
    """The Responses API's events (no [DONE] at the end), each with its `event:` name checked,
    numbered in order from `first` (a resumed stream's)."""
    out = []
    for block in body.strip().split("\n\n") if body.strip() else []:
        name, data = block.split("\n", 1)
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        out.append(event)
    assert [e["sequence_number"] for e in out] == list(range(first, first + len(out)))
    return out


async def test_a_text_response(client, backend):
    answer_with(backend, "Bonjour.")
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "instructions": "Be French.",
                                                 "max_output_tokens": 64, "temperature": 0})
    assert r.status_code == 200, r.text
    assert prompt_of(backend) == "System: Be French.\nUser: Hi\nAssistant:"
    body = r.json()
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["status"] == "completed"
    [message] = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [{"type": "output_text", "text": "Bonjour.", "annotations": []}]
    usage = body["usage"]
    assert usage["output_tokens"] == len(backend.reply) + 1  # and the end of sequence
    assert usage["input_tokens"] == len(backend.jobs[-1].prompt) and body["store"] is False
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert body["speculation"]["chain"]  # the extension, as on chat


async def test_cut_by_max_output_tokens_is_incomplete(client, backend):
    answer_with(backend, "A long answer " * 10)
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 3})
    body = r.json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete" and body["usage"]["output_tokens"] == 3


async def test_items_calls_and_their_outputs_become_the_chat(client, backend):
    answer_with(backend, "Snowy.")
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
             {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
             {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "-3 C"},
             {"type": "function_call_output", "call_id": "c2", "output": "noon"}]
    r = await client.post("/v1/responses", json={"model": MODEL, "input": items, "tools": FLAT,
                                                 "max_output_tokens": 400})
    assert r.status_code == 200, r.text
    assert prompt_of(backend).endswith(
        'User: Weather in Oslo?\nAssistant: [{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
        '{"name": "get_time", "arguments": {}}]\nTool: -3 C\nTool: noon\nAssistant:')


async def test_required_tools_give_function_call_items(client, backend):
    answer_with(backend, CALLS)
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "Paris?", "tools": FLAT,
                                                 "tool_choice": "required", "max_output_tokens": 400})
    assert r.status_code == 200, r.text
    assert accepts(backend.jobs[-1].sampling.json_schema, CALLS)
    body = r.json()
    assert [(o["type"], o["name"]) for o in body["output"]] == [("function_call", "get_weather"),
                                                                ("function_call", "get_time")]
    assert json.loads(body["output"][0]["arguments"]) == {"city": "Paris", "unit": "C"}
    assert all(o["call_id"].startswith("call_") and o["id"].startswith("fc_") for o in body["output"])
    assert body["tools"] == FLAT and body["tool_choice"] == "required"
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "Paris?", "tools": FLAT,
                                                 "tool_choice": {"type": "function", "name": "get_time"},
                                                 "max_output_tokens": 400})
    assert not accepts(backend.jobs[-1].sampling.json_schema, CALLS)  # only get_time, once


async def test_text_format_json_schema_reaches_the_job(client, backend):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    answer_with(backend, '{"a": 1}')
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "text": {"format": {
        "type": "json_schema", "name": "a", "schema": schema, "strict": True}}})
    assert r.status_code == 200, r.text
    assert json.loads(backend.jobs[-1].sampling.json_schema) == schema
    assert r.json()["text"]["format"]["schema"] == schema
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "text": {"format": {"type": "json_object"}}})
    assert backend.jobs[-1].sampling.response_format == "json_object"


async def test_the_stream_of_events(client, backend):
    answer_with(backend, "It is sunny in Paris today.")
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True})
    assert r.status_code == 200, r.text
    events = events_of(r.text)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == "It is sunny in Paris today."
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "".join(deltas)
    answer_with(backend, HERMES_TEXT)
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True, "tools": FLAT,
                                                 "max_output_tokens": 400})
    events = events_of(r.text)
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Let me see. "
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert [i["type"] for i in added] == ["message", "function_call"]
    done = events[-1]["response"]
    assert [o["type"] for o in done["output"]] == ["message", "function_call"]
    assert done["output"][1]["id"] == added[1]["id"] and json.loads(done["output"][1]["arguments"]) == {}


HERMES_TEXT = 'Let me see. <tool_call>{"name": "get_time", "arguments": {}}</tool_call>'


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": []}, "input"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]},
     "tools[0].function.parameters"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]}, "messages[0].tool_calls"),
    ({"input": "x", "temperature": 3}, "temperature"),
])
async def test_bad_responses_requests_are_refused_and_nothing_runs(client, backend, body, param):
    before = len(backend.jobs)
    r = await client.post("/v1/responses", json={"model": MODEL} | body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert len(backend.jobs) == before
    r = await client.post("/v1/responses", json={"model": "other", "input": "x"})
    assert r.status_code == 404


async def test_openai_client_responses(oai, backend):
    answer_with(backend, "Salut.")
    done = await oai.responses.create(model=MODEL, input="Hi", instructions="Be French.", max_output_tokens=32,
                                      include=["message.output_text.logprobs"], top_logprobs=1)
    assert done.output_text == "Salut." and done.status == "completed" and done.usage.output_tokens > 0
    assert "".join(lp.token for lp in done.output[0].content[0].logprobs).startswith("Salut.")
    answer_with(backend, CALLS)
    called = await oai.responses.create(model=MODEL, input="Paris?", tools=FLAT, tool_choice="required",
                                        max_output_tokens=400)
    assert [(o.type, o.name) for o in called.output] == [("function_call", "get_weather"), ("function_call", "get_time")]
    answer_with(backend, "It is sunny.")
    kinds, text = [], ""
    async for event in await oai.responses.create(model=MODEL, input="Hi", stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            assert event.response.output_text == text == "It is sunny."
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"


@pytest.mark.parametrize("stream", [False, True])
async def test_output_text_logprobs_when_included(client, backend, stream):
    answer_with(backend, "Bonjour.")
    body = {"model": MODEL, "input": "Hi", "include": ["message.output_text.logprobs", "reasoning.encrypted_content"],
            "top_logprobs": 2, "stream": stream}
    r = await client.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    job = backend.jobs[-1]
    assert job.logprobs == 2
    if stream:
        events = events_of(r.text)
        deltas = [e for e in events if e["type"] == "response.output_text.delta"]
        streamed = [lp for e in deltas for lp in e["logprobs"]]
        part = events[-1]["response"]["output"][0]["content"][0]
        assert [lp["token"] for lp in streamed] == [lp["token"] for lp in part["logprobs"]][:len(streamed)]
    else:
        part = r.json()["output"][0]["content"][0]
    logprobs = part["logprobs"]
    assert "".join(lp["token"] for lp in logprobs).startswith("Bonjour.")
    assert all(len(lp["top_logprobs"]) == 2 and set(lp) == {"token", "logprob", "bytes", "top_logprobs"}
               for lp in logprobs)
    plain = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi"})
    assert "logprobs" not in plain.json()["output"][0]["content"][0] and backend.jobs[-1].logprobs == -1
