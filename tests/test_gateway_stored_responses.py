"""Stored responses (`store`, `previous_response_id`, GET / DELETE /v1/responses/{id},
`/input_items`) against the in-memory backend and store; the JetStream store is exercised
by the real stack (tests/test_services.py)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import httpx
import openai
import pytest

from services.gateway.http_api import create_app
from services.gateway.response_store import MemoryResponseStore, StoreError
from tests.test_gateway_api import MODEL, make_settings, serving, tok  # noqa: F401
from tests.test_gateway_responses import FLAT, events_of
from tests.test_gateway_tools import CALLS, answer_with, backend, prompt_of  # noqa: F401


@contextlib.asynccontextmanager
async def gateway(backend, store, **settings):
    app = create_app(make_settings(**settings), SimpleNamespace(backend=backend, responses=store))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        yield client


@pytest.fixture
def store():
    return MemoryResponseStore()


@pytest.fixture
async def client(backend, store):
    async with gateway(backend, store) as c:
        yield c


async def ask(client, **body) -> dict:
    r = await client.post("/v1/responses", json={"model": MODEL, "temperature": 0, "max_output_tokens": 64} | body)
    assert r.status_code == 200, r.text
    return r.json()


async def test_a_follow_up_continues_the_stored_conversation(client, backend):
    answer_with(backend, "Bonjour.")
    first = await ask(client, input="Hi", instructions="Be French.")
    assert first["store"] is True and first["previous_response_id"] is None
    answer_with(backend, "Au revoir.")
    second = await ask(client, input="Bye", previous_response_id=first["id"], instructions="Be brief.")
    # the earlier turn and its answer come first; the instructions are the follow-up's own
    assert prompt_of(backend) == "System: Be brief.\nUser: Hi\nAssistant: Bonjour.\nUser: Bye\nAssistant:"
    assert second["previous_response_id"] == first["id"] and second["store"] is True
    answer_with(backend, "Encore.")
    await ask(client, input=[{"role": "user", "content": "Again"}], previous_response_id=second["id"])
    assert prompt_of(backend) == "User: Hi\nAssistant: Bonjour.\nUser: Bye\nAssistant: Au revoir.\nUser: Again\nAssistant:"
    answer_with(backend, "Branch.")
    await ask(client, input="Other", previous_response_id=first["id"])  # a branch from the first turn
    assert prompt_of(backend) == "User: Hi\nAssistant: Bonjour.\nUser: Other\nAssistant:"


async def test_a_stored_response_is_read_listed_and_deleted(client, backend):
    answer_with(backend, "Bonjour.")
    first = await ask(client, input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                                     {"role": "user", "content": "there"}], metadata={"topic": "greeting"})
    got = await client.get(f"/v1/responses/{first['id']}")
    assert got.status_code == 200 and got.json() == first
    items = (await client.get(f"/v1/responses/{first['id']}/input_items")).json()
    assert items["object"] == "list" and items["has_more"] is False
    assert [(i["type"], i["role"], i["content"]) for i in items["data"]] == [
        ("message", "user", [{"type": "input_text", "text": "Hi"}]),
        ("message", "user", [{"type": "input_text", "text": "there"}])]
    assert items["first_id"] == items["data"][0]["id"] and items["last_id"] == items["data"][1]["id"]
    gone = await client.delete(f"/v1/responses/{first['id']}")
    assert gone.status_code == 200 and gone.json() == {"id": first["id"], "object": "response", "deleted": True}
    jobs = len(backend.jobs)
    for method, path, body in [("GET", f"/v1/responses/{first['id']}", None),
                               ("DELETE", f"/v1/responses/{first['id']}", None),
                               ("GET", "/v1/responses/resp_nothing/input_items", None),
                               ("GET", "/v1/responses/not a key!", None),
                               ("POST", "/v1/responses", {"model": MODEL, "input": "x",
                                                          "previous_response_id": first["id"]})]:
        r = await client.request(method, path, json=body)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]["code"] == "response_not_found" and "store: false" in r.json()["error"]["message"]
    assert len(backend.jobs) == jobs  # a follow-up of nothing runs nothing


async def test_store_false_keeps_nothing(client, backend, store):
    answer_with(backend, "Bonjour.")
    body = await ask(client, input="Hi", store=False)
    assert body["store"] is False and await store.get(body["id"]) is None
    assert (await client.get(f"/v1/responses/{body['id']}")).status_code == 404


async def test_a_tool_call_turn_is_continued_with_its_output(client, backend):
    answer_with(backend, CALLS)
    called = await ask(client, input="Paris?", tools=FLAT, tool_choice="required", max_output_tokens=400)
    calls = [o for o in called["output"] if o["type"] == "function_call"]
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    answer_with(backend, "Sunny at noon.")
    outputs = [{"type": "function_call_output", "call_id": c["call_id"], "output": "ok"} for c in calls]
    await ask(client, input=outputs, previous_response_id=called["id"], tools=FLAT)
    prompt = prompt_of(backend)
    assert prompt.endswith("\nTool: ok\nTool: ok\nAssistant:")  # the calls, then their outputs
    assert prompt.index("User: Paris?\nAssistant: ") < prompt.rindex('"get_weather"') < prompt.index("Tool: ok")


async def test_a_streamed_response_is_stored_before_its_last_event(client, backend, store):
    answer_with(backend, "It is sunny.")
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True})
    done = events_of(r.text)[-1]["response"]
    assert done["store"] is True and (await store.get(done["id"]))["response"] == done
    answer_with(backend, "Still sunny.")
    await ask(client, input="And now?", previous_response_id=done["id"])
    assert prompt_of(backend) == "User: Hi\nAssistant: It is sunny.\nUser: And now?\nAssistant:"


class Broken(MemoryResponseStore):
    async def get(self, response_id):
        raise StoreError("NATS is down")

    async def put(self, response_id, record):
        raise StoreError("bucket full")


async def test_a_store_that_fails_costs_no_answer(backend):
    from prometheus_client import CollectorRegistry

    from shared.metrics import GatewayMetrics

    answer_with(backend, "Bonjour.")
    registry = CollectorRegistry()
    backend.metrics = GatewayMetrics(registry)
    async with gateway(backend, MemoryResponseStore()) as client:
        await ask(client, input="Hi")
    assert registry.get_sample_value("specmesh_responses_stored_total", {"outcome": "stored"}) == 1
    async with gateway(backend, Broken()) as client:
        body = await ask(client, input="Hi")
        assert body["store"] is False and body["output"][0]["content"][0]["text"] == "Bonjour."  # answered, not kept
        assert registry.get_sample_value("specmesh_responses_stored_total", {"outcome": "failed"}) == 1
        r = await client.get(f"/v1/responses/{body['id']}")
        assert r.status_code == 503 and "retry" in r.json()["error"]["message"]
    async with gateway(backend, MemoryResponseStore(), responses_store=False) as client:
        body = await ask(client, input="Hi")
        assert body["store"] is False
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": body["id"]})
        assert r.status_code == 400 and "responses_store" in r.json()["error"]["message"]


def test_the_memory_store_forgets_the_oldest_past_its_limit():
    import asyncio

    async def run():
        store = MemoryResponseStore(limit=2)
        for name in "abc":
            await store.put(name, {"n": name})
        return [await store.get(name) for name in "abc"], await store.delete("a"), await store.delete("b")

    assert asyncio.run(run()) == ([None, {"n": "b"}, {"n": "c"}], False, True)


async def test_openai_client_chains_retrieves_and_deletes(backend, store):
    app = create_app(make_settings(), SimpleNamespace(backend=backend, responses=store))
    async with serving(backend, app=app) as url:
        oai = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer_with(backend, "Salut.")
        first = await oai.responses.create(model=MODEL, input="Hi", max_output_tokens=32)
        answer_with(backend, "Ciao.")
        second = await oai.responses.create(model=MODEL, input="Bye", previous_response_id=first.id,
                                            max_output_tokens=32)
        assert second.previous_response_id == first.id and second.output_text == "Ciao."
        assert prompt_of(backend) == "User: Hi\nAssistant: Salut.\nUser: Bye\nAssistant:"
        again = await oai.responses.retrieve(first.id)
        assert again.output_text == "Salut." and again.id == first.id
        items = await oai.responses.input_items.list(second.id)
        assert [i.content[0].text for i in items.data] == ["Bye"]
        await oai.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            await oai.responses.retrieve(first.id)
        answer_with(backend, "Plus tard.")
        later = await oai.responses.create(model=MODEL, input="Later", background=True, max_output_tokens=32)
        assert later.status == "queued" and later.background
        while (later := await oai.responses.retrieve(later.id)).status in ("queued", "in_progress"):
            pass
        assert later.status == "completed" and later.output_text == "Plus tard."
        assert (await oai.responses.cancel(later.id)).status == "completed"
        answer_with(backend, "En direct.")
        streamed = [e async for e in await oai.responses.create(model=MODEL, input="Live", background=True,
                                                                 stream=True, max_output_tokens=32)]
        assert [e.type for e in streamed[:2]] == ["response.created", "response.queued"]
        assert streamed[-1].type == "response.completed" and streamed[-1].response.output_text == "En direct."
        resumed = [e async for e in await oai.responses.retrieve(streamed[0].response.id, stream=True, starting_after=2)]
        assert [e.sequence_number for e in resumed] == [e.sequence_number for e in streamed[3:]]


async def finished(client, response_id: str, timeout_s: float = 10.0) -> dict:
    """Poll a background response until it is no longer queued or in progress."""
    import asyncio
    import time

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        body = (await client.get(f"/v1/responses/{response_id}")).json()
        if body["status"] not in ("queued", "in_progress"):
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"{response_id} still {body['status']}")


async def test_a_background_response_is_answered_queued_then_polled(client, backend):
    answer_with(backend, "Bonjour.")
    backend.delay_s = 0.02
    queued = await ask(client, input="Hi", background=True)
    assert (queued["status"], queued["background"], queued["output"], queued["store"]) == ("queued", True, [], True)
    done = await finished(client, queued["id"])
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == "Bonjour."
    assert done["background"] is True and done["usage"]["output_tokens"] > 0
    items = (await client.get(f"/v1/responses/{queued['id']}/input_items")).json()["data"]
    assert [i["content"][0]["text"] for i in items] == ["Hi"]
    answer_with(backend, "Encore.")
    await ask(client, input="More", previous_response_id=queued["id"])
    assert prompt_of(backend) == "User: Hi\nAssistant: Bonjour.\nUser: More\nAssistant:"


async def test_a_background_response_is_cancelled(client, backend):
    answer_with(backend, "A long answer " * 20)
    backend.delay_s, backend.batch = 0.05, 1
    queued = await ask(client, input="Hi", background=True, max_output_tokens=60)
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": queued["id"]})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and ("is queued" in message or "is in_progress" in message)
    gone = await client.post(f"/v1/responses/{queued['id']}/cancel")
    assert gone.status_code == 200 and gone.json()["status"] == "cancelled"
    assert (await client.get(f"/v1/responses/{queued['id']}")).json()["status"] == "cancelled"
    import asyncio
    await asyncio.sleep(0.1)
    assert backend.jobs[-1].request_id in backend.cancelled  # the generation was stopped, not just forgotten
    again = await client.post(f"/v1/responses/{queued['id']}/cancel")
    assert again.json()["status"] == "cancelled"
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": queued["id"]})
    assert r.status_code == 400 and "cancelled" in r.json()["error"]["message"]


async def test_background_rules(client, backend, store):
    answer_with(backend, "Bonjour.")
    whole = await ask(client, input="Hi")
    r = await client.post(f"/v1/responses/{whole['id']}/cancel")
    assert r.status_code == 400 and "Only a background response" in r.json()["error"]["message"]
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "background": True, "store": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "background"
    done = await finished(client, (await ask(client, input="Hi", background=True))["id"])
    assert (await client.post(f"/v1/responses/{done['id']}/cancel")).json() == done  # finished: as it is
    # a record left running by a gateway that stopped is settled as failed once past its deadline
    await store.put("resp_orphan", {"response": done | {"id": "resp_orphan", "status": "in_progress", "output": []},
                                    "input_items": [], "conversation": None, "deadline": 0})
    orphan = (await client.get("/v1/responses/resp_orphan")).json()
    assert orphan["status"] == "failed" and "stopped" in orphan["error"]["message"]


async def test_a_background_stream_is_resumed_after_any_event(client, backend):
    """background + stream: the POST streams the events from `response.created` (queued); a
    GET with stream=true and starting_after=N gives every event after N, the same events,
    also once the response has ended; the stored response is the last event's."""
    answer_with(backend, "Bonjour tout le monde.")
    backend.delay_s, backend.batch = 0.01, 1
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "background": True, "stream": True,
                                                 "temperature": 0})
    events = events_of(r.text)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert events[0]["response"]["status"] == "queued" and events[-1]["type"] == "response.completed"
    rid = events[0]["response"]["id"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Bonjour tout le monde."
    for after in (-1, 0, 4, len(events) - 2, len(events) - 1):
        again = await client.get(f"/v1/responses/{rid}", params={"stream": "true", "starting_after": after})
        assert again.status_code == 200 and events_of(again.text, after + 1) == events[after + 1:], after
    stored = (await client.get(f"/v1/responses/{rid}")).json()
    assert stored == events[-1]["response"] and stored["background"] is True


async def test_a_background_stream_goes_on_without_its_client_and_a_reader_joins_it_live(backend, store):
    import asyncio

    answer_with(backend, "One two three four five six seven eight.")
    backend.delay_s, backend.batch = 0.03, 1
    import json

    app = create_app(make_settings(), SimpleNamespace(backend=backend, responses=store))
    async with serving(backend, app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with client.stream("POST", "/v1/responses", json={"model": MODEL, "input": "Hi", "background": True,
                                                                 "stream": True, "temperature": 0}) as r:
            lines = r.aiter_lines()
            first = [await anext(lines) for _ in range(2)]  # response.created, then the client is gone
        rid = json.loads(first[1].removeprefix("data: "))["response"]["id"]
        assert (await client.get(f"/v1/responses/{rid}")).json()["status"] in ("queued", "in_progress")
        resumed = await client.get(f"/v1/responses/{rid}", params={"stream": "true", "starting_after": 1})
        events = events_of(resumed.text, 2)  # read while it ran: it waited for each new event
        assert events[0]["sequence_number"] == 2 and events[-1]["type"] == "response.completed"
        assert events[-1]["response"]["output"][0]["content"][0]["text"] == "One two three four five six seven eight."
        await asyncio.sleep(0)
        assert not backend.cancelled  # the client that left stopped nothing


async def test_a_cancelled_background_stream_ends_its_readers(client, backend):
    import asyncio

    answer_with(backend, "A long answer " * 20)
    backend.delay_s, backend.batch = 0.03, 1
    post = asyncio.ensure_future(client.post("/v1/responses", json={
        "model": MODEL, "input": "Hi", "background": True, "stream": True, "max_output_tokens": 60}))
    while not (logs := client._transport.app.state.background.logs):
        await asyncio.sleep(0.01)
    rid = next(iter(logs))
    while (await client.get(f"/v1/responses/{rid}")).json()["status"] != "in_progress":
        await asyncio.sleep(0.01)
    assert (await client.post(f"/v1/responses/{rid}/cancel")).json()["status"] == "cancelled"
    events = events_of((await post).text)
    assert events[0]["type"] == "response.created" and "response.completed" not in {e["type"] for e in events}
    assert (await client.get(f"/v1/responses/{rid}")).json()["status"] == "cancelled"


async def test_background_stream_errors_are_clear(client, backend):
    answer_with(backend, "Bonjour.")
    whole = await ask(client, input="Hi")
    r = await client.get(f"/v1/responses/{whole['id']}", params={"stream": "true"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream" and "background" in r.json()["error"]["message"]
    r = await client.get(f"/v1/responses/{whole['id']}", params={"starting_after": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "starting_after"
    r = await client.get(f"/v1/responses/{whole['id']}", params={"stream": "true", "starting_after": -5})
    assert r.status_code == 400
    from services.gateway.backend import GenerationError

    backend.fail = GenerationError("no target answers")
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "background": True, "stream": True})
    events = events_of(r.text)
    assert [e["type"] for e in events] == ["response.created", "response.queued", "error"]
    failed = await finished(client, events[0]["response"]["id"])
    assert failed["status"] == "failed" and "no target answers" in failed["error"]["message"]


async def test_a_background_response_that_fails_says_why(client, backend):
    from services.gateway.backend import GenerationError

    backend.fail = GenerationError("no target answers")
    queued = await ask(client, input="Hi", background=True)
    failed = await finished(client, queued["id"])
    assert failed["status"] == "failed" and failed["error"]["message"]


async def test_a_gateway_that_stops_records_its_background_responses_failed(backend, store):
    answer_with(backend, "A long answer " * 20)
    backend.delay_s, backend.batch = 0.05, 1
    app = create_app(make_settings(), SimpleNamespace(backend=backend, responses=store))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        queued = await ask(client, input="Hi", background=True, max_output_tokens=60)
        await app.state.background.close()  # what GatewayService.teardown does
        stopped = (await client.get(f"/v1/responses/{queued['id']}")).json()
    assert stopped["status"] == "failed" and "gateway stopped" in stopped["error"]["message"]


async def test_truncation_auto_drops_the_oldest_turns_to_fit(client, backend):
    from tests.test_gateway_tools import CONTEXT

    long = "word "
    while len(backend.tok.encode(long)) < 0.4 * CONTEXT:  # two turns of these fit the context, three do not
        long += "word "
    answer_with(backend, "Ok.")
    first = await ask(client, input=long, instructions="Be brief.", max_output_tokens=8)
    answer_with(backend, "Fine.")
    second = await ask(client, input=long, previous_response_id=first["id"], max_output_tokens=8)
    r = await client.post("/v1/responses", json={"model": MODEL, "input": long + "Last?", "max_output_tokens": 8,
                                                 "previous_response_id": second["id"], "instructions": "Be brief."})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"  # "disabled": no cut
    third = await ask(client, input=long + "Last?", previous_response_id=second["id"], instructions="Be brief.",
                      max_output_tokens=8, truncation="auto")
    prompt = prompt_of(backend)
    assert third["truncation"] == "auto" and prompt.startswith("System: Be brief.\n")
    assert prompt.endswith("Last?\nAssistant:") and "Ok." not in prompt and "Fine." in prompt  # the first turn went
    assert len(backend.jobs[-1].prompt) + 8 <= CONTEXT
    answer_with(backend, "Again.")
    await ask(client, input="Again?", previous_response_id=third["id"], max_output_tokens=8, truncation="auto")
    assert prompt_of(backend).endswith("User: Again?\nAssistant:")  # cut again from the whole stored conversation
