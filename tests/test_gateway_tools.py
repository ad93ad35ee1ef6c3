"""Tool calling on the chat endpoint (services/gateway/tools.py) against the in-memory backend:
what reaches the job (the prompt's tools line, the constraint), how outputs come back
(tool_calls, finish reasons, streamed), and every refusal. The real models under the
constraint: tests/test_services.py."""

from __future__ import annotations

import json

import openai
import pytest

from services.gateway.chat import render_chat
from shared.engine.json_schema import compile_schema
from tests.test_engine_grammar import takes
from tests.test_gateway_api import MODEL, FakeBackend, client, serving, service, sse_events, tok  # noqa: F401

CONTEXT = 4096  # the tools line is long for the test tokenizer's 300 tokens

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALLS = '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}, {"name": "get_time", "arguments": {}}]'


@pytest.fixture
def backend(tok):
    found = FakeBackend(tok)
    found.max_context = CONTEXT
    return found


@pytest.fixture
async def oai(backend):
    async with serving(backend) as url:
        yield openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def chat(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 400,
            "temperature": 0, "tools": [WEATHER, TIME]} | extra


def answer_with(backend, text: str) -> None:
    """The fake backend answers `text`, then the end of sequence."""
    backend.reply = backend.tok.encode(text)
    backend.eos_after = len(backend.reply)


def accepts(schema: str, text: str) -> bool:
    """Whether the job's schema takes `text` whole."""
    return takes(compile_schema(schema), text)


def prompt_of(backend) -> str:
    return backend.tok.decode(backend.jobs[-1].prompt)


async def test_required_constrains_the_output_to_a_call_list_and_returns_the_calls(client, backend):
    answer_with(backend, CALLS)
    r = await client.post("/v1/chat/completions", json=chat(tool_choice="required"))
    assert r.status_code == 200, r.text
    job = backend.jobs[-1]
    assert job.sampling.response_format == "json_schema"
    assert accepts(job.sampling.json_schema, CALLS)
    assert not accepts(job.sampling.json_schema, '[{"name": "get_weather", "arguments": {"unit": "C"}}]')  # no city
    assert not accepts(job.sampling.json_schema, "[]")  # one call at least
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "C"}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert "Tools: [" in prompt_of(backend) and '"get_weather"' in prompt_of(backend)


async def test_one_call_without_parallel_tool_calls_and_a_named_function(client, backend):
    answer_with(backend, '[{"name": "get_time", "arguments": {}}]')
    r = await client.post("/v1/chat/completions", json=chat(tool_choice="required", parallel_tool_calls=False))
    assert r.status_code == 200, r.text
    one = '{"name":"get_time","arguments":{}}'
    assert accepts(backend.jobs[-1].sampling.json_schema, f"[{one}]")
    assert not accepts(backend.jobs[-1].sampling.json_schema, f"[{one},{one}]")
    r = await client.post("/v1/chat/completions", json=chat(tool_choice={"type": "function",
                                                                         "function": {"name": "get_time"}}))
    assert r.status_code == 200, r.text
    other = '[{"name":"get_weather","arguments":{"city":"x","unit":"F"}}]'
    assert not accepts(backend.jobs[-1].sampling.json_schema, other)  # only the named function
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"  # as OpenAI answers a forced function
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}


@pytest.mark.parametrize("text, called", [
    (CALLS, True),
    ("  " + CALLS, True),
    ("It is sunny in Paris.", False),
    ('[{"name": "nope", "arguments": {}}]', False),  # not one of the tools: text
    ('[{"name": "get_time", "arguments": {}}', False),  # not JSON: text
])
async def test_auto_returns_calls_only_when_the_whole_output_is_a_call_list(client, backend, text, called):
    answer_with(backend, text)
    r = await client.post("/v1/chat/completions", json=chat())  # auto: the default with tools
    assert r.status_code == 200, r.text
    assert backend.jobs[-1].sampling.response_format == ""  # free
    choice = r.json()["choices"][0]
    if called:
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert len(choice["message"]["tool_calls"]) == 2
    else:
        assert choice["finish_reason"] == "stop" and choice["message"]["content"] == text
        assert "tool_calls" not in choice["message"]
    r = await client.post("/v1/chat/completions", json=chat(tool_choice="none"))
    assert r.json()["choices"][0]["message"].get("tool_calls") is None  # none: always text


HERMES = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n' \
         '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'


@pytest.mark.parametrize("text, content, names", [
    (HERMES, "Let me check.\n", ["get_weather", "get_time"]),
    ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', None, ["get_time"]),
    ('Hmm <tool_call>{"name": "get_time", "arguments": {}}', None, None),  # not closed: text
    ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call> and more', None, None),  # text after: text
    ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', None, None),
])
async def test_auto_reads_hermes_tool_call_blocks(client, backend, text, content, names):
    """What checkpoints trained on the Hermes format write (Qwen, Hermes...): text, then
    `<tool_call>` blocks; streamed, the text before them goes out as it comes."""
    answer_with(backend, text)
    r = await client.post("/v1/chat/completions", json=chat())
    choice = r.json()["choices"][0]
    if names is None:
        assert choice["message"] == {"role": "assistant", "content": text} and choice["finish_reason"] == "stop"
    else:
        assert choice["message"]["content"] == content and choice["finish_reason"] == "tool_calls"
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == names
    r = await client.post("/v1/chat/completions", json=chat(stream=True))
    deltas = [e["choices"][0]["delta"] for e in sse_events(r.text)]
    streamed = "".join(d.get("content") or "" for d in deltas)
    calls = [c["function"]["name"] for d in deltas for c in d.get("tool_calls", [])]
    assert (streamed, calls) == ((content or "", names) if names else (text, []))


async def test_parameters_left_out_take_no_arguments_and_empty_ones_any(client, backend):
    free = {"type": "function", "function": {"name": "anything", "parameters": {}}}
    answer_with(backend, '[{"name": "anything", "arguments": {"a": [1]}}]')
    r = await client.post("/v1/chat/completions", json=chat(tools=[free, TIME], tool_choice="required"))
    assert r.status_code == 200, r.text
    schema = backend.jobs[-1].sampling.json_schema
    assert accepts(schema, '[{"name": "anything", "arguments": {"a": [1]}}]')
    assert accepts(schema, '[{"name": "get_time", "arguments": {}}]')
    assert not accepts(schema, '[{"name": "get_time", "arguments": {"a": 1}}]')
    assert not accepts(schema, '[{"name": "anything", "arguments": [1]}]')


async def test_a_call_list_cut_by_max_tokens_is_text_with_finish_length(client, backend):
    answer_with(backend, CALLS)
    r = await client.post("/v1/chat/completions", json=chat(tool_choice="required", max_tokens=5))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] and "tool_calls" not in choice["message"]


async def test_streamed_calls_come_whole_in_one_chunk(client, backend):
    answer_with(backend, CALLS)
    for choice in ("required", "auto"):
        r = await client.post("/v1/chat/completions", json=chat(tool_choice=choice, stream=True))
        events = sse_events(r.text)
        deltas = [e["choices"][0]["delta"] for e in events]
        assert not any(d.get("content") for d in deltas), choice  # nothing of the list went out as text
        calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
        assert len(calls) == 1 and [c["index"] for c in calls[0]] == [0, 1]
        assert json.loads(calls[0][0]["function"]["arguments"]) == {"city": "Paris", "unit": "C"}
        assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    answer_with(backend, "It is sunny. " * 3)
    r = await client.post("/v1/chat/completions", json=chat(stream=True))
    deltas = [e["choices"][0]["delta"] for e in sse_events(r.text)]
    texts = [d["content"] for d in deltas if d.get("content")]
    assert len(texts) > 1 and "".join(texts) == "It is sunny. " * 3  # text streams as it comes
    answer_with(backend, "[1, 2]")  # starts like a list, is not calls: sent as text at the end
    r = await client.post("/v1/chat/completions", json=chat(stream=True))
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "[1, 2]"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


async def test_history_with_calls_and_results_is_rendered(client, backend):
    answer_with(backend, "Sunny.")
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"}]
    r = await client.post("/v1/chat/completions", json=chat(messages=messages))
    assert r.status_code == 200, r.text
    assert prompt_of(backend).endswith(
        'User: Weather?\nAssistant: [{"name": "get_weather", "arguments": {"city": "Oslo"}}]\nTool: -3 C, snow\nAssistant:')
    assert render_chat([("tools", "[]"), ("user", "x")]) == "Tools: []\nUser: x\nAssistant:"


@pytest.mark.parametrize("extra, param, words", [
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": []}, "tools", "at least one"),
    ({"tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice", "does not hold"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "object", "patternProperties": {}}}}}}]}, "tools[0].function.parameters", "patternProperties"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters", "object"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "pattern"),
    ({"tools": [{"type": "code", "function": {"name": "f"}}]}, "tools[0].type", None),
    ({"tool_choice": "sometimes"}, "tool_choice", None),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format", "tool_choice"),
    ({"tool_choice": "required", "min_tokens": 3}, "min_tokens", "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": "not json"}}]}]}, "messages[0].tool_calls", "JSON object"),
])
async def test_bad_tools_are_refused_and_nothing_runs(client, backend, extra, param, words):
    before = len(backend.jobs)
    r = await client.post("/v1/chat/completions", json=chat(**extra))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert words is None or words in error["message"], error
    assert len(backend.jobs) == before


async def test_openai_client_tool_calls(oai, backend):
    answer_with(backend, CALLS)
    done = await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                             tools=[WEATHER, TIME], tool_choice="required", max_tokens=400)
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "tool_calls" and message.content is None
    assert [c.function.name for c in message.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(message.tool_calls[0].function.arguments)["city"] == "Paris"
    named = []
    async for chunk in await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Paris?"}], tools=[WEATHER, TIME], max_tokens=400,
            stream=True):
        named += [call.function.name for c in chunk.choices for call in c.delta.tool_calls or []]
    assert named == ["get_weather", "get_time"]
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                          tools=[WEATHER], tool_choice={"type": "function",
                                                                        "function": {"name": "nope"}})


CHATML = ("{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
          "{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
          "{{ raise_exception('the system message must come first') }}{% endif %}"
          "<|im_start|>{{ m.role }}\n{{ m.content }}{% for c in m.tool_calls or [] %}"
          "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


async def test_a_checkpoints_own_chat_template_renders_the_chat(client, backend, tok, monkeypatch):
    """A tokenizer with a chat template: the prompt is its `apply_chat_template` (token ids, so
    no second beginning of sequence), with the tools and earlier calls as it expects them;
    `/tokenize` renders the same; a template's own refusal is a 400."""
    monkeypatch.setattr(tok, "chat_template", CHATML)
    answer_with(backend, "Sunny.")
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}]
    r = await client.post("/v1/chat/completions", json=chat(messages=messages))
    assert r.status_code == 200, r.text
    prompt = backend.jobs[-1].prompt
    text = tok.decode(prompt)
    assert text.startswith('<|im_start|>system\nTools: [{"type": "function", "function": {"name": "get_weather", '
                           '"description": "The weather in a city."')
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in text
    assert text.endswith("<|im_start|>tool\n-3 C<|im_end|>\n<|im_start|>assistant\n")
    r = await client.post("/tokenize", json={"model": MODEL, "messages": messages})  # no tools: no system line
    assert tok.decode(r.json()["tokens"]) == text[text.index("<|im_start|>user"):]
    before = len(backend.jobs)
    r = await client.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": "x"},
                                                                      {"role": "system", "content": "late"}]))
    assert r.status_code == 400 and "must come first" in r.json()["error"]["message"]
    assert len(backend.jobs) == before
    r = await client.post("/v1/chat/completions", json=chat(
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}],
        add_generation_prompt=False, continue_final_message=True, tools=None, chat_template_kwargs={"flavour": 1}))
    assert r.status_code == 200, r.text
    assert tok.decode(backend.jobs[-1].prompt).endswith("<|im_start|>assistant\nHel")  # left open


async def test_continue_final_message_and_add_generation_prompt(client, backend):
    """vLLM's extensions on the family's template: no cue, or the last assistant message left open."""
    answer_with(backend, "lo")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    r = await client.post("/v1/chat/completions", json=chat(messages=messages, tools=None, add_generation_prompt=False,
                                                            continue_final_message=True))
    assert r.status_code == 200, r.text
    assert prompt_of(backend) == "User: Hi\nAssistant: Hel"
    r = await client.post("/v1/chat/completions", json=chat(messages=messages[:1], tools=None,
                                                            add_generation_prompt=False))
    assert prompt_of(backend) == "User: Hi"
    for extra, words in [({"continue_final_message": True}, "add_generation_prompt: false"),
                         ({"continue_final_message": True, "add_generation_prompt": False,
                           "messages": messages[:1]}, "assistant message last"),
                         ({"chat_template_kwargs": {"tools": []}}, "may not set 'tools'")]:
        r = await client.post("/v1/chat/completions", json=chat(**({"messages": messages, "tools": None} | extra)))
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


# -- over gRPC ----------------------------------------------------------------------------
@pytest.fixture
async def stub(backend):
    import grpc

    from services.gateway.grpc_server import start_grpc
    from services.gateway.proto import generate_pb2_grpc
    from tests.test_gateway_api import make_settings

    server = await start_grpc(make_settings(host="127.0.0.1", grpc_port=0), backend)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield generate_pb2_grpc.TextGenerationStub(channel)
    await server.stop(None)


def grpc_chat(**extra):
    from services.gateway.proto import generate_pb2 as pb

    return pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="Weather in Paris?")], max_tokens=400,
                              sampling=pb.SamplingParameters(temperature=0), tools=json.dumps([WEATHER, TIME]), **extra)


async def test_grpc_tool_calls_come_back_as_the_chat_api_gives_them(stub, backend):
    from services.gateway.proto import generate_pb2 as pb

    answer_with(backend, CALLS)
    reply = await stub.Generate(grpc_chat())  # auto: read from the output
    assert [(c.name, json.loads(c.arguments)) for c in reply.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {})]
    assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS and reply.text == ""
    assert all(c.id.startswith("call_") for c in reply.tool_calls) and "get_weather" in prompt_of(backend)
    assert not backend.jobs[-1].sampling.response_format  # auto: free output
    reply = await stub.Generate(grpc_chat(tool_choice="required"))
    job = backend.jobs[-1]
    assert job.sampling.response_format == "json_schema" and accepts(job.sampling.json_schema, CALLS)
    assert len(reply.tool_calls) == 2 and reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    answer_with(backend, '[{"name": "get_time", "arguments": {}}]')
    named = await stub.Generate(grpc_chat(tool_choice="get_time"))  # a named function: finish STOP, as OpenAI's
    assert [c.name for c in named.tool_calls] == ["get_time"] and named.finish_reason == pb.FINISH_REASON_STOP
    assert not accepts(backend.jobs[-1].sampling.json_schema, CALLS)
    answer_with(backend, "Sunny.")
    text = await stub.Generate(grpc_chat())
    assert text.text == "Sunny." and not text.tool_calls and text.finish_reason == pb.FINISH_REASON_STOP


async def test_grpc_streamed_calls_come_whole_on_the_last_message_and_a_tool_turn_is_rendered(stub, backend):
    from services.gateway.proto import generate_pb2 as pb

    answer_with(backend, CALLS)
    replies = [r async for r in stub.GenerateStream(grpc_chat())]
    assert "".join(r.text for r in replies) == "" and [c.name for c in replies[-1].tool_calls] == ["get_weather", "get_time"]
    assert replies[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS and not any(r.tool_calls for r in replies[:-1])
    answer_with(backend, "Sunny at noon.")
    called = pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    turn = [pb.ChatMessage(role="user", content="Weather in Paris?"),
            pb.ChatMessage(role="assistant", tool_calls=[called]),
            pb.ChatMessage(role="tool", content="18 C", tool_call_id="call_1")]
    reply = await stub.Generate(pb.GenerateRequest(messages=turn, max_tokens=20, tools=json.dumps([WEATHER])))
    assert reply.text == "Sunny at noon." and reply.finish_reason == pb.FINISH_REASON_STOP
    assert prompt_of(backend).index('"get_weather"') < prompt_of(backend).index("Tool: 18 C")


@pytest.mark.parametrize("fields, param", [
    ({"tools": "not json"}, "tools"),
    ({"tools": json.dumps([{"type": "function", "function": {"description": "no name"}}])}, "tools"),
    ({"tools": json.dumps([WEATHER]), "tool_choice": "get_time"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
async def test_grpc_bad_tools_are_invalid_arguments(stub, fields, param):
    import grpc

    from services.gateway.proto import generate_pb2 as pb

    request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="Hi")], **fields)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:  # tools with a plain prompt
        await stub.Generate(pb.GenerateRequest(prompt="Hi", tools=json.dumps([WEATHER])))
    assert "messages" in err.value.details()
