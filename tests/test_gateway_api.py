"""The gateway's HTTP and gRPC APIs against an in-memory backend (no NATS, no models).

`FakeBackend` answers every job with the same deterministic text, tokenized by a real
byte-level BPE (multi-byte characters split across tokens), in batches like a target
worker's, with cumulative speculation stats. Run: `.venv/bin/pytest -q tests/test_gateway_api.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from types import SimpleNamespace

import grpc
import httpx
import openai
import pytest
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings as hsettings, strategies as st

from services.gateway.backend import GenerationError
from services.gateway.chat import render_chat
from services.gateway.generation import Detokenizer, StopMatcher, speculation_report
from services.gateway.grpc_server import start_grpc
from services.gateway.http_api import MAX_BODY_BYTES, create_app
from services.gateway.proto import generate_pb2 as pb
from services.gateway.proto import generate_pb2_grpc as pb_grpc
from shared.messages import Assignment, Candidate, GenerateJob, TokenBatch, TokenLogprob
from shared.settings import Settings

MODEL = "specmesh-test"
CONTEXT = 96
REPLY = " Hello, wörld! 日本語 🙂 the quick brown fox. END"
CORPUS = [f"{REPLY} naïve café def f(x): return x + 1\nUser: hi\nAssistant: ok\n"] * 20


@pytest.fixture(scope="module")
def tok():
    from shared.models.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, 300, threads=1)


def fake_logprob(position: int, token: int, top: int) -> TokenLogprob:
    """A made-up log-probability for the token at `position`: -position / 10, and `top` alternatives."""
    value = -position / 10
    return TokenLogprob(value, [token + i if i == 0 else (token + i) % 256 for i in range(top)], [value - i for i in range(top)])


class FakeBackend:
    """Emits REPLY's tokens (repeated) in batches of `batch` tokens; records jobs and cancels."""

    model_name = MODEL
    max_context = CONTEXT

    def __init__(self, tok, batch: int = 3, delay_s: float = 0.0):
        self.tok, self.batch, self.delay_s = tok, batch, delay_s
        self.reply = tok.encode(REPLY)
        self.jobs: list[GenerateJob] = []
        self.cancelled: list[str] = []
        self.fail: Exception | None = None
        self.eos_after: int | None = None  # emit EOS after this many tokens
        self.cached = 0  # the prompt's head its "prefix cache" held, reported in the stats

    def tokenizer(self):
        return self.tok

    def chains(self) -> list[list[str]]:
        return [["target"], ["drafter", "target"], ["drafter", "verifier", "target"]]

    def output(self, n: int) -> list[int]:
        ids = (self.reply * (n // len(self.reply) + 1))[:n]
        if self.eos_after is not None and self.eos_after < n:
            ids = ids[: self.eos_after] + [self.tok.eos_token_id]
        return ids

    async def generate(self, job: GenerateJob):
        self.jobs.append(job)
        if self.fail:
            raise self.fail
        ids = self.output(job.max_tokens)
        stop = next((i for i, t in enumerate(ids) if t in job.sampling.stop_token_ids), None)
        ids = ids if stop is None else ids[:stop + 1]
        drafted = accepted = 0
        for pos in range(0, len(ids), self.batch):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            chunk = ids[pos:pos + self.batch]
            drafted, accepted = drafted + 4, accepted + len(chunk) - 1
            done = pos + len(chunk) >= len(ids)
            stats = {"levels": [{"name": name, "drafted": drafted, "accepted": accepted,
                                 "accepted_per_pos": [accepted, max(0, accepted - 1)]} for name in job.chain[:-1]],
                     "cached_prompt_tokens": self.cached}
            reason = ("stop" if ids[-1] == self.tok.eos_token_id or stop is not None else "length") if done else None
            logprobs = [fake_logprob(pos + i, t, job.logprobs) for i, t in enumerate(chunk)] if job.logprobs >= 0 else []
            scored = [fake_logprob(i, t, job.prompt_logprobs) for i, t in enumerate(job.prompt[1:])]
            yield TokenBatch(request_id=job.request_id, epoch=0, position=pos, tokens=chunk, finished=done,
                             finish_reason=reason, stats=stats, logprobs=logprobs,
                             prompt_logprobs=scored if pos == 0 and job.prompt_logprobs >= 0 else [])

    async def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


def make_settings(**gateway) -> Settings:
    """Gateway settings for tests: dev mode (no API keys) unless the test says otherwise."""
    s = Settings()
    return s.model_copy(update={"gateway": s.gateway.model_copy(update={"dev_mode": True} | gateway)})


@pytest.fixture
def backend(tok):
    return FakeBackend(tok)


@pytest.fixture
def service(backend):
    return SimpleNamespace(backend=backend, nc=None)


@pytest.fixture
async def client(service):
    app = create_app(make_settings(), service)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c


def text_of(tok, n: int, backend: FakeBackend) -> str:
    return tok.decode(backend.output(n), skip_special_tokens=True)


def sse_events(body: str) -> list:
    events = [line[len("data: "):] for line in body.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# -- pure logic ---------------------------------------------------------------------------
@hsettings(max_examples=150, deadline=None)
@given(data=st.data())
def test_detokenizer_streams_exactly_the_full_decode(tok, data):
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=40))
    detok = Detokenizer(tok)
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_detokenizer_never_emits_half_a_character(tok):
    ids = tok.encode("日本語🙂")
    detok = Detokenizer(tok)
    pieces = [detok.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == "日本語🙂"
    assert len(ids) > 4  # the tokenizer really splits these characters


def test_stop_matcher_holds_back_a_possible_stop_and_cuts_before_it():
    m = StopMatcher(["END", "\n\n"])
    assert m.push("abc E") == ("abc ", False)  # "E" may begin "END"
    assert m.push("N") == ("", False)
    assert m.push("x") == ("ENx", False)  # it did not
    assert m.push(" E") == (" ", False)
    assert m.push("NDtail") == ("", True)
    assert m.text == "abc ENx "
    m = StopMatcher(["ab", "b"])
    assert m.push("xab") == ("x", True)  # the earliest stop wins
    assert StopMatcher([]).push("anything") == ("anything", False)
    kept = StopMatcher(["EN", "END"], include=True)  # vLLM's include_stop_str_in_output
    assert kept.push("abc E") == ("abc ", False) and kept.push("NDx") == ("END", True)  # the longest at the first hit
    assert kept.text == "abc END"


def test_speculation_report_reads_both_shapes_and_skips_junk():
    job = GenerateJob(request_id="r", prompt=[1], max_tokens=4, chain=["drafter", "target"], k=[4])
    rep = speculation_report(job, {"levels": [{"name": "drafter", "drafted": 8, "accepted": 6,
                                               "accepted_per_pos": [2, 2, 1, 1]}, "junk"]})
    assert rep == {"chain": ["drafter", "target"], "k": [4], "levels": [
        {"name": "drafter", "drafted": 8, "accepted": 6, "acceptance_rate": 0.75, "accepted_per_position": [2, 2, 1, 1],
         "expected_acceptance": None}], "slo_tpot_ms": None, "slo_met": None}
    rep = speculation_report(job, {"levels": [{"name": "drafter", "drafted": 8, "accepted": 6, "expected_acceptance": 0.61},
                                              {"name": "verifier", "drafted": 8, "accepted": 6, "expected_acceptance": 7}]})
    assert [lv["expected_acceptance"] for lv in rep["levels"]] == [0.61, None]  # outside [0, 1]: junk, dropped
    rep = speculation_report(job, {"drafter": {"drafted": 0, "accepted": "x"}, "chain": ["target"], "k": []})
    assert rep["chain"] == ["target"] and rep["levels"][0]["acceptance_rate"] is None
    assert speculation_report(job, {})["levels"] == []


def test_chat_template():
    assert render_chat([("system", "Be brief."), ("user", "Hi"), ("assistant", "Yo"), ("user", "Bye")]) == \
        "System: Be brief.\nUser: Hi\nAssistant: Yo\nUser: Bye\nAssistant:"


# -- HTTP, raw ----------------------------------------------------------------------------
async def test_completion(client, backend, tok):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 10,
                                                   "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and r.headers["x-request-id"] == body["id"]
    assert body["object"] == "text_completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["text"] == text_of(tok, 10, backend) and choice["finish_reason"] == "length"
    assert choice["token_ids"] == backend.output(10)
    prompt = tok.encode("Hello")
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 10, "total_tokens": len(prompt) + 10,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    job = backend.jobs[-1]
    assert job.prompt == prompt and job.max_tokens == 10 and job.sampling.temperature == 0.0
    assert job.chain == ["drafter", "target"] and job.k == [4]  # settings.speculation defaults
    assert body["speculation"]["chain"] == ["drafter", "target"]
    level = body["speculation"]["levels"][0]
    assert level["name"] == "drafter" and level["drafted"] == 16 and level["accepted"] == 6
    assert level["acceptance_rate"] == pytest.approx(6 / 16) and level["accepted_per_position"] == [6, 5]
    assert body["timings"]["total_ms"] >= 0
    assert backend.cancelled == []  # finished on its own


async def test_completion_defaults_and_sampling_fields(client, backend):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": ["Hi"], "top_p": 0.5, "seed": 7,
                                                   "top_k": 5})
    assert r.status_code == 200, r.text
    job = backend.jobs[-1]
    assert job.max_tokens == 16 and job.sampling.temperature == 1.0
    assert (job.sampling.top_p, job.sampling.seed, job.sampling.top_k) == (0.5, 7, 5)


async def test_min_p_reaches_the_job(client, backend):
    for path, prompt in (("/v1/completions", {"prompt": "Hi"}),
                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
        r = await client.post(path, json={"model": MODEL, "min_p": 0.05} | prompt)
        assert r.status_code == 200, r.text
        assert backend.jobs[-1].sampling.min_p == 0.05
    await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})
    assert backend.jobs[-1].sampling.min_p == 0.0


@pytest.mark.parametrize("stream", [False, True])
async def test_usage_counts_the_prompt_tokens_the_prefix_cache_held(client, backend, tok, stream):
    backend.cached = 3
    body = {"model": MODEL, "prompt": ["The quick brown fox", "Hi"], "n": 2, "max_tokens": 4, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    usage = sse_events(r.text)[-1]["usage"] if stream else r.json()["usage"]
    # each prompt counted once, and "Hi" holds fewer than 3 tokens: all of them cached
    assert usage["prompt_tokens_details"] == {"cached_tokens": 3 + len(tok.encode("Hi"))}
    backend.cached = 10**6  # nonsense from a worker is capped at the prompt
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                        "max_tokens": 2})
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == r.json()["usage"]["prompt_tokens"]
    backend.cached = 2
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 2})
    assert r.json()["usage"]["input_tokens_details"] == {"cached_tokens": 2}


async def test_prompt_logprobs_in_vllms_shape(client, backend, tok):
    prompt = tok.encode("Hello there")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello there", "max_tokens": 2,
                                                   "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    assert backend.jobs[-1].prompt_logprobs == 2 and backend.jobs[-1].logprobs == -1
    got = r.json()["choices"][0]["prompt_logprobs"]
    assert len(got) == len(prompt) and got[0] is None
    for j, (token, entry) in enumerate(zip(prompt[1:], got[1:])):
        want = fake_logprob(j, token, 2)
        assert entry[str(token)]["logprob"] == pytest.approx(want.logprob)  # the prompt token itself is there
        assert list(entry.values())[0]["rank"] == 1  # the likeliest first
        assert all(set(e) == {"logprob", "rank", "decoded_token"} for e in entry.values())
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello there", "max_tokens": 2,
                                                   "echo": True, "logprobs": 1, "prompt_logprobs": 3})
    body = r.json()["choices"][0]
    assert backend.jobs[-1].prompt_logprobs == 3
    assert all(len(top) == 1 for top in body["logprobs"]["top_logprobs"][1:])  # echo keeps to its own logprobs: 1
    assert len(body["prompt_logprobs"]) == len(prompt)
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                        "max_tokens": 2, "prompt_logprobs": 0})
    chat = r.json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == len(backend.jobs[-1].prompt)
    assert "prompt_logprobs" not in chat["choices"][0]
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "prompt_logprobs": 1, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


async def test_allowed_token_ids_reach_the_job(client, backend):
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                        "allowed_token_ids": [9, 3, 9]})
    assert r.status_code == 200, r.text
    assert backend.jobs[-1].sampling.allowed_token_ids == [3, 9]


async def test_priority_reaches_the_job(client, backend):
    for path, prompt in (("/v1/completions", {"prompt": "Hi"}),
                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                         ("/v1/responses", {"input": "Hi"})):
        r = await client.post(path, json={"model": MODEL, "priority": -7} | prompt)
        assert r.status_code == 200, r.text
        assert backend.jobs[-1].priority == -7
    await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})
    assert backend.jobs[-1].priority == 0


async def test_a_pinned_k_is_verified_whole_every_round(client, backend):
    """The driver may verify fewer drafts a round than k only where the client left k out."""
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})
    assert r.status_code == 200, r.text
    assert backend.jobs[-1].adaptive_depth is True
    for spec in ({"k": 3}, {"chain": "target", "k": 0}):
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "speculation": spec})
        assert r.status_code == 200, r.text
        assert backend.jobs[-1].adaptive_depth is False, spec


async def test_truncate_prompt_tokens_keeps_the_prompts_tail(client, backend, tok):
    text = "The quick brown fox jumps over the lazy dog and runs away."
    ids = tok.encode(text)
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": text, "truncate_prompt_tokens": 4,
                                                   "max_tokens": 3, "echo": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert backend.jobs[-1].prompt == ids[-4:] and body["usage"]["prompt_tokens"] == 4
    assert body["choices"][0]["text"].startswith(tok.decode(ids[-4:]))  # echo gives what ran
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7], "truncate_prompt_tokens": 9,
                                                   "max_tokens": 2})
    assert r.status_code == 200 and backend.jobs[-1].prompt == [5, 6, 7]  # shorter than n: whole
    long = "word " * 400  # past the context, made to fit by truncation
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "truncate_prompt_tokens": 50, "max_tokens": 2,
                                                        "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 200, r.text
    assert backend.jobs[-1].prompt == tok.encode(f"User: {long}\nAssistant:")[-50:]


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_reason_names_the_stop_string_or_token(client, backend, tok, stream):
    async def reasons(body: dict) -> list:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 40,
                                                       "stream": stream} | body)
        assert r.status_code == 200, r.text
        choices = [c["choices"][0] for c in sse_events(r.text) if c["choices"]] if stream else r.json()["choices"]
        return [(c["finish_reason"], c["stop_reason"]) for c in choices if c["finish_reason"]]

    assert await reasons({"stop": ["zebra", "fox"]}) == [("stop", "fox")]
    assert await reasons({"stop": [f"no{i}" for i in range(20)] + ["brown"]}) == [("stop", "brown")]  # more than 4
    stop = backend.output(20)[4]
    assert await reasons({"stop_token_ids": [stop]}) == [("stop", stop)]
    assert await reasons({"max_tokens": 3}) == [("length", None)]
    backend.eos_after = 5
    assert await reasons({}) == [("stop", None)]


async def test_penalties_and_logit_bias_reach_the_job(client, backend, tok):
    r = await client.post("/v1/completions", json={
        "model": MODEL, "prompt": "Hi", "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
        "logit_bias": {"5": 10, "17": -100.0}})
    assert r.status_code == 200, r.text
    s = backend.jobs[-1].sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -1.0, 1.2)
    assert (s.logit_bias_ids, s.logit_bias_values) == ([5, 17], [10.0, -100.0])
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                        "presence_penalty": 0, "logit_bias": {}})
    assert r.status_code == 200, r.text
    s = backend.jobs[-1].sampling
    assert (s.presence_penalty, s.repetition_penalty, s.logit_bias_ids) == (0.0, 1.0, [])
    assert backend.jobs[-1].stop_at_eos and s.min_tokens == 0
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 9, "min_tokens": 9,
                                                   "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert backend.jobs[-1].sampling.min_tokens == 9 and not backend.jobs[-1].stop_at_eos


async def test_response_format_json_object_reaches_the_job(client, backend):
    """JSON mode on both endpoints (vLLM takes it on completions too); text is the default."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    for url, body in (("/v1/chat/completions", chat), ("/v1/completions", {"model": MODEL, "prompt": "Hi"})):
        r = await client.post(url, json=body | {"response_format": {"type": "json_object"}})
        assert r.status_code == 200, r.text
        assert backend.jobs[-1].sampling.response_format == "json_object"
        r = await client.post(url, json=body | {"response_format": {"type": "text"}})
        assert r.status_code == 200, r.text
        assert backend.jobs[-1].sampling.response_format == ""
        schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"enum": ["x", "y"]}},
                  "required": ["b"]}
        r = await client.post(url, json=body | {"response_format": {"type": "json_schema", "json_schema": {
            "name": "pair", "schema": schema, "strict": True}}})
        assert r.status_code == 200, r.text
        s = backend.jobs[-1].sampling
        assert s.response_format == "json_schema" and json.loads(s.json_schema) == schema
        assert list(json.loads(s.json_schema)["properties"]) == ["b", "a"]  # the schema's order is kept


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ("/v1/responses", {"input": "x"})])
async def test_a_cache_salt_rides_with_the_job(client, backend, path, body):
    r = await client.post(path, json={"model": MODEL, "max_tokens" if "responses" not in path else "max_output_tokens": 2,
                                      "cache_salt": "tenant-7"} | body)
    assert r.status_code == 200, r.text
    assert backend.jobs[-1].sampling.cache_salt == "tenant-7"
    r = await client.post(path, json={"model": MODEL} | body)
    assert backend.jobs[-1].sampling.cache_salt == ""  # the requests without a salt share their cache


@pytest.mark.parametrize("stream", [False, True])
async def test_a_stop_token_ends_the_output_and_is_not_text(client, backend, tok, stream):
    ids = backend.output(20)
    stop = ids[4]
    end = ids.index(stop)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 20, "stop_token_ids": [stop, stop], "return_token_ids": True,
            "stream": stream}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert backend.jobs[-1].sampling.stop_token_ids == [stop]
    if stream:
        chunks = sse_events(r.text)
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        token_ids = [t for c in chunks if c["choices"] for t in c["choices"][0].get("token_ids") or []]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    else:
        choice = r.json()["choices"][0]
        text, token_ids, finish = choice["text"], choice["token_ids"], choice["finish_reason"]
    assert token_ids == ids[:end + 1] and text == tok.decode(ids[:end]) and finish == "stop"


async def test_tokenize_and_detokenize(client, backend, tok):
    r = await client.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("Hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == CONTEXT
    chat = (await client.post("/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})).json()
    assert chat["tokens"] == tok.encode("User: Hi\nAssistant:")
    r = await client.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": "Hello world"}
    for path, bad, param in [("/tokenize", {}, "prompt"),
                             ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
                             ("/detokenize", {"tokens": [10**7]}, "tokens"),
                             ("/detokenize", {"tokens": ["a"]}, "tokens")]:
        r = await client.post(path, json={"model": MODEL} | bad)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), r.text
    assert (await client.post("/tokenize", json={"model": "gpt-4", "prompt": "x"})).status_code == 404
    assert backend.jobs == []


async def test_token_id_prompt(client, backend):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert backend.jobs[-1].prompt == [5, 6, 7]
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [[8, 9]], "max_tokens": 2})
    assert r.status_code == 200 and backend.jobs[-1].prompt == [8, 9]


async def test_default_max_tokens_shrinks_to_fit_the_context(client, backend):
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    job = backend.jobs[-1]
    assert len(job.prompt) + job.max_tokens == CONTEXT  # 128 asked by default, the context allows less


async def test_stop_string_truncates_and_cancels(client, backend, tok):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 40, "stop": ["fox"]})
    body = r.json()
    full = text_of(tok, 40, backend)
    assert body["choices"][0]["text"] == full[:full.index("fox")]
    assert body["choices"][0]["finish_reason"] == "stop"
    n = body["usage"]["completion_tokens"]
    assert n < 40 and "fox" in tok.decode(backend.output(n)) and "fox" not in tok.decode(backend.output(n - 1))
    await asyncio.sleep(0.05)
    assert backend.cancelled == [body["id"]]


@pytest.mark.parametrize("stream", [False, True])
async def test_include_stop_str_in_output_keeps_the_stop_string(client, backend, tok, stream):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 40, "stop": ["fox"],
                                                   "include_stop_str_in_output": True, "stream": stream})
    assert r.status_code == 200, r.text
    full = text_of(tok, 40, backend)
    if stream:
        text = "".join(c["choices"][0]["text"] for c in sse_events(r.text) if c["choices"])
    else:
        text = r.json()["choices"][0]["text"]
    assert text == full[:full.index("fox") + 3]


async def test_eos_finishes_with_stop_and_is_not_text(client, backend, tok):
    backend.eos_after = 5
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 20})
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == tok.decode(backend.reply[:5])
    assert body["usage"]["completion_tokens"] == 6


async def test_continuous_usage_counts_each_chunks_tokens_so_far(client, backend):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 9, "stream": True,
                                                   "return_token_ids": True, "stream_options": {
                                                       "include_usage": True, "continuous_usage_stats": True}})
    chunks = sse_events(r.text)
    made, seen = [], 0
    for chunk in chunks[:-1]:
        seen += len(chunk["choices"][0].get("token_ids") or [])
        made.append(chunk["usage"]["completion_tokens"])
        assert chunk["usage"]["completion_tokens"] >= seen
    assert made == sorted(made) and made[-1] == 9 and chunks[-1]["usage"]["completion_tokens"] == 9


async def test_streaming_completion_with_usage(client, backend, tok):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 20, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert len({e["id"] for e in events}) == 1 and events[0]["id"] == r.headers["x-request-id"]
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == text_of(tok, 20, backend)
    assert all("\ufffd" not in e["choices"][0]["text"] for e in events if e["choices"])
    final = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["choices"][0]["finish_reason"] == "length"
    assert final[0]["speculation"]["levels"][0]["name"] == "drafter"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 20
    assert all(e["usage"] is None for e in events[:-1])


async def test_streaming_chat_with_stop_across_batches(client, backend, tok):
    r = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 30, "stream": True, "stop": "brown"})
    events = sse_events(r.text)
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    full = text_of(tok, 30, backend)
    assert text == full[:full.index("brown")]
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and "usage" not in events[-1]
    assert tok.decode(backend.jobs[-1].prompt) == "System: Be nice.\nUser: Hi\nAssistant:"


async def test_chat_completion(client, backend, tok):
    r = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_completion_tokens": 8, "speculation": {"enabled": False}})
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text_of(tok, 8, backend)}
    assert backend.jobs[-1].chain == ["target"] and backend.jobs[-1].k == []
    assert body["speculation"] == {"chain": ["target"], "k": [], "levels": [], "slo_tpot_ms": None, "slo_met": None}


async def test_completion_logprobs(client, backend, tok):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 12, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    ids = backend.output(12)
    assert backend.jobs[-1].logprobs == 2
    assert lp["token_logprobs"] == pytest.approx([-i / 10 for i in range(12)])
    assert lp["tokens"] == [tok.decode([t]) for t in ids]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(12)]
    assert [len(top) for top in lp["top_logprobs"]] == [len({tok.decode([t]), tok.decode([(t + 1) % 256])}) for t in ids]
    assert lp["top_logprobs"][3][tok.decode([ids[3]])] == pytest.approx(-0.3)
    plain = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4})
    assert plain.json()["choices"][0]["logprobs"] is None and backend.jobs[-1].logprobs == -1


async def test_chat_logprobs_carry_each_tokens_bytes(client, backend, tok):
    """A token may hold part of a UTF-8 character: its text reads U+FFFD, its bytes are exact."""
    r = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "logprobs": True,
        "top_logprobs": 1})
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert backend.jobs[-1].logprobs == 1 and len(content) == 20
    assert bytes(b for e in content for b in e["bytes"]).decode() == choice["message"]["content"]
    assert [e["logprob"] for e in content] == pytest.approx([-i / 10 for i in range(20)])
    assert all(e["top_logprobs"][0]["token"] == e["token"] and len(e["top_logprobs"]) == 1 for e in content)
    assert any("\ufffd" in e["token"] for e in content)  # REPLY's multi-byte characters span tokens
    r = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True})
    assert all(e["top_logprobs"] == [] for e in r.json()["choices"][0]["logprobs"]["content"])
    r = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    assert "logprobs: true" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_streamed_logprobs_are_the_whole_responses(client, backend, path):
    """Streaming sends each token's log-probability once, in order, even while its text is held back."""
    ask = {"model": MODEL, "max_tokens": 20, "logprobs": 2 if "chat" not in path else True}
    ask |= {"prompt": "x"} if "chat" not in path else {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}
    whole = (await client.post(path, json=ask)).json()["choices"][0]["logprobs"]
    events = sse_events((await client.post(path, json=ask | {"stream": True})).text)
    parts = [e["choices"][0]["logprobs"] for e in events if e["choices"] and e["choices"][0]["logprobs"]]
    if "chat" in path:
        assert [x for p in parts for x in p["content"]] == whole["content"]
    else:
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for p in parts for x in p[key]] == whole[key], key


async def test_a_backend_without_logprobs_is_an_error_not_a_misaligned_answer(client, backend):
    generate = backend.generate

    async def old_worker(job):
        async for batch in generate(job):
            batch.logprobs = []
            yield batch

    backend.generate = old_worker
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5, "logprobs": 1})
    assert r.status_code == 500 and "log-probabilities" in r.json()["error"]["message"]


@pytest.mark.parametrize("spec, chain, k", [
    ({"chain": "drafter,verifier,target", "k": 3}, ["drafter", "verifier", "target"], [3, 3]),
    ({"chain": ["drafter", "verifier", "target"], "k": [5, 2], "confidence_threshold": 0.3},
     ["drafter", "verifier", "target"], [5, 2]),
    ({"chain": "target"}, ["target"], []),
    ({"enabled": False, "chain": "drafter,target", "k": 7}, ["target"], []),
])
async def test_speculation_extension(client, backend, spec, chain, k):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4, "speculation": spec})
    assert r.status_code == 200, r.text
    job = backend.jobs[-1]
    assert (job.chain, job.k) == (chain, k)
    assert job.confidence_threshold == spec.get("confidence_threshold", 0.0)
    assert r.json()["speculation"]["chain"] == chain


# predictions in hundreds of ms so that "met" holds however slow the machine running the test
ALTERNATIVES = [Candidate(["drafter", "target"], [3], 600.0), Candidate(["target"], [], 900.0),
                Candidate(["drafter", "verifier", "target"], [2, 2], 1400.0)]


@pytest.mark.parametrize("assigned, slo, chain, k, met", [
    # an exploration: requests without an objective take it, requests with one do not
    (Assignment("c", ["drafter", "verifier", "target"], [2, 2], 1400.0, "explore", ALTERNATIVES), None,
     ["drafter", "verifier", "target"], [2, 2], None),
    (Assignment("c", ["drafter", "verifier", "target"], [2, 2], 1400.0, "explore", ALTERNATIVES), 1000.0,
     ["drafter", "target"], [3], True),
    # the cost choice predicted to meet the objective stands
    (Assignment("c", ["drafter", "target"], [3], 600.0, "cost", ALTERNATIVES), 700.0, ["drafter", "target"], [3], True),
    # no alternative is predicted to meet it: the cheapest
    (Assignment("c", ["target"], [], 900.0, "explore", ALTERNATIVES), 2.0, ["drafter", "target"], [3], False),
])
async def test_a_request_with_its_own_slo_runs_on_the_cheapest_chain_predicted_to_meet_it(
        client, backend, assigned, slo, chain, k, met):
    backend.assignment = lambda request_class: assigned
    backend.delay_s = 0.0 if met is not False else 0.05  # 50 ms between batches of 3: 10 ms per token > 2
    spec = {"slo_tpot_ms": slo} if slo else {}
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 6, "speculation": spec})
    assert r.status_code == 200, r.text
    job = backend.jobs[-1]
    assert (job.chain, job.k, job.slo_tpot_ms) == (chain, k, slo or 0.0)
    report = r.json()["speculation"]
    assert report["slo_tpot_ms"] == slo and report["slo_met"] is met


async def test_served_model_names_are_all_accepted_and_the_first_answered(tok):
    backend = FakeBackend(tok)
    backend.model_names = ["llama-3-8b", "default"]
    backend.model_name = backend.model_names[0]
    app = create_app(make_settings(), SimpleNamespace(backend=backend))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        listed = (await c.get("/v1/models")).json()["data"]
        assert [m["id"] for m in listed] == ["llama-3-8b", "default"]
        assert (await c.get("/v1/models/default")).json()["id"] == "default"
        r = await c.post("/v1/completions", json={"model": "default", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "llama-3-8b"
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 404 and "llama-3-8b" in r.json()["error"]["message"]


def test_the_nats_backend_serves_the_configured_names():
    from services.gateway.backend import NatsBackend

    settings = Settings()
    settings.gateway.served_model_names = ["mine", "specmesh"]
    backend = NatsBackend(settings, nc=None)
    assert (backend.model_name, backend.model_names) == ("mine", ["mine", "specmesh"])


def test_a_chat_template_file_replaces_the_checkpoints(tmp_path):
    from services.gateway.backend import NatsBackend
    from services.gateway.chat import chat_prompt
    from services.gateway.openai_models import ChatMessage

    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    settings = Settings()
    settings.gateway.chat_template = template
    tok = NatsBackend(settings, nc=None).tokenizer()
    prompt = chat_prompt(tok, [ChatMessage(role="user", content="Hi")])
    assert tok.decode(prompt) == "<user>Hi\n<assistant>"
    template.write_text("{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}")
    with pytest.raises(ValueError, match="chat.jinja"):
        NatsBackend(settings, nc=None).tokenizer()


async def test_models(client):
    r = await client.get("/v1/models")
    assert r.json()["data"][0]["id"] == MODEL and r.json()["data"][0]["max_model_len"] == CONTEXT
    assert (await client.get(f"/v1/models/{MODEL}")).status_code == 200
    assert (await client.get("/v1/models/nope")).status_code == 404


LONG = "the quick brown fox " * 60
BAD = [
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 65}, 400, "n"),
    ({"prompt": ["a", "b"], "n": 40}, 400, "n"),
    ({"prompt": ["x"] * 65}, 400, "prompt"),
    ({"prompt": ["x", LONG]}, 400, "prompt[1]"),
    ({"prompt": "x", "best_of": 2}, 400, "best_of"),
    ({"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**30}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": LONG}, 400, "prompt"),
    ({"prompt": [[1], []]}, 400, "prompt"),
    ({"prompt": [1, 10**6]}, 400, "prompt"),
    ({"prompt": 12}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "echo": "yes"}, 400, "echo"),
    ({"prompt": "x", "max_tokens": 0, "echo": False}, 400, "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ({"prompt": "x", "speculation": {"chain": "drafter,oracle,target"}}, 400, "speculation.chain"),
    ({"prompt": "x", "speculation": {"chain": ""}}, 400, "speculation.chain"),
    ({"prompt": "x", "speculation": {"chain": "drafter,verifier,target", "k": [1, 2, 3]}}, 400, "speculation.k"),
    ({"prompt": "x", "speculation": {"k": 99}}, 400, "speculation.k"),
    ({"prompt": "x", "speculation": {"confidence_threshold": 2}}, 400, "speculation.confidence_threshold"),
    ({"prompt": "x", "speculation": {"turbo": True}}, 400, "speculation.turbo"),
    ({"prompt": "x", "speculation": {"slo_tpot_ms": 0}}, 400, "speculation.slo_tpot_ms"),
    ({"prompt": "x", "speculation": {"slo_tpot_ms": -5}}, 400, "speculation.slo_tpot_ms"),
    ({"prompt": "x", "speculation": {"slo_tpot_ms": 1e9}}, 400, "speculation.slo_tpot_ms"),
    ({"prompt": "x", "speculation": {"slo_tpot_ms": "fast"}}, 400, "speculation.slo_tpot_ms"),
    ({"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"prompt": "x", "frequency_penalty": "lots"}, 400, "frequency_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "x", "repetition_penalty": 3}, 400, "repetition_penalty"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": "up"}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"dog": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"-1": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1000000": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 1, "05": 2}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": [5, 1]}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"\u00b2": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {str(i): 1 for i in range(1025)}}, 400, "logit_bias"),
    ({"prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ({"prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
    ({"prompt": "x", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ({"prompt": "x", "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ({"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ({"prompt": "x", "stop_token_ids": list(range(65))}, 400, "stop_token_ids"),
    ({"prompt": "x", "stop_token_ids": 5}, 400, "stop_token_ids"),
    ({"prompt": "x", "cache_salt": ""}, 400, "cache_salt"),
    ({"prompt": "x", "cache_salt": "s" * 257}, 400, "cache_salt"),
    ({"prompt": "x", "cache_salt": 7}, 400, "cache_salt"),
    ({"prompt": "x", "stop": [f"s{i}" for i in range(65)]}, 400, "stop"),
    ({"prompt": "x", "stop": ["s" * 1025]}, 400, "stop"),
    ({"prompt": "x", "guided_grammar": "root ::= \"a\""}, 400, "guided_grammar"),
    ({"prompt": "x", "use_beam_search": True}, 400, "use_beam_search"),
    ({"prompt": "x", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ({"prompt": "x", "prompt_logprobs": -1}, 400, "prompt_logprobs"),
    ({"prompt": "x", "allowed_token_ids": []}, 400, "allowed_token_ids"),
    ({"prompt": "x", "allowed_token_ids": [10**6]}, 400, "allowed_token_ids"),
    ({"prompt": "x", "allowed_token_ids": [-1]}, 400, "allowed_token_ids"),
    ({"prompt": "x", "allowed_token_ids": 5}, 400, "allowed_token_ids"),
    ({"prompt": "x", "allowed_token_ids": [5], "response_format": {"type": "json_object"}}, 400, "allowed_token_ids"),
    ({"prompt": "x", "priority": 2**31}, 400, "priority"),
    ({"prompt": "x", "priority": "high"}, 400, "priority"),
    ({"prompt": "x", "priority": 1.5}, 400, "priority"),
    ({"prompt": "x", "min_p": -0.1}, 400, "min_p"),
    ({"prompt": "x", "min_p": 1.5}, 400, "min_p"),
    ({"prompt": "x", "min_p": "low"}, 400, "min_p"),
    ({"prompt": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    ({"prompt": "x", "truncate_prompt_tokens": -1}, 400, "truncate_prompt_tokens"),
    ({"prompt": "x", "truncate_prompt_tokens": 2.5}, 400, "truncate_prompt_tokens"),
    ({"prompt": "x" * 2000, "truncate_prompt_tokens": CONTEXT}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("fields, status, param", BAD, ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(BAD)])
async def test_bad_completion_requests(client, backend, fields, status, param):
    r = await client.post("/v1/completions", json={"model": MODEL} | fields)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and len(error["message"]) > 10
    assert backend.jobs == []  # nothing reached the backend


@pytest.mark.parametrize("fields, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema",
                                                                          "json_schema": {"name": "x"}}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "object", "patternProperties": {}}}}}}},
     "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string"}}}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}, "extra": 1}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": "json_object"}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}, "min_tokens": 2},
     "min_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}, "ignore_eos": True},
     "ignore_eos"),
    ({"messages": [{"role": "user", "content": "x" * 2000}]}, "messages"),
])
async def test_bad_chat_requests(client, fields, param):
    r = await client.post("/v1/chat/completions", json={"model": MODEL} | fields)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param), r.text


async def test_messages_say_what_to_do(client):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": LONG})
    assert "context" in r.json()["error"]["message"] and r.json()["error"]["code"] == "context_length_exceeded"
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 500})
    assert "at most" in r.json()["error"]["message"]
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "speculation": {"chain": "a,target"}})
    assert "'drafter,target'" in r.json()["error"]["message"]  # lists what is served
    r = await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert MODEL in r.json()["error"]["message"] and r.json()["error"]["code"] == "model_not_found"


async def test_malformed_bodies(client):
    r = await client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = await client.post("/v1/completions", json=[1, 2])
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * (MAX_BODY_BYTES + 1)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    async def chunked():
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    r = await client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = await client.get("/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()


async def test_backend_unavailable(client, backend, service):
    backend.fail = GenerationError("no target worker answers")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 503 and "no target worker" in r.json()["error"]["message"]
    assert r.headers["x-request-id"].startswith("cmpl-")
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "stream": True,
                                                        "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503  # before the first token: a status, not an event
    service.backend = None
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"


async def test_worker_error_mid_stream_is_an_error_event(client, backend):
    async def failing(job):
        yield TokenBatch(request_id=job.request_id, epoch=0, position=0, tokens=backend.reply[:2])
        yield TokenBatch(request_id=job.request_id, epoch=0, position=2, tokens=[], finished=True,
                         finish_reason="error", error="target worker lost its model")

    backend.generate = failing
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
    events = sse_events(r.text)
    assert "target worker lost its model" in events[-1]["error"]["message"]


async def test_timeout_is_504_and_cancels(tok):
    backend = FakeBackend(tok, batch=1, delay_s=0.05)
    app = create_app(make_settings(request_timeout_s=0.2), SimpleNamespace(backend=backend))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 50})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    await asyncio.sleep(0.05)
    assert backend.cancelled == [r.headers["x-request-id"]]


async def test_health_route_unchanged(tok):
    import nats.errors

    class NoOne:
        async def request(self, *a, **k):
            raise nats.errors.NoRespondersError

    app = create_app(make_settings(), SimpleNamespace(backend=FakeBackend(tok), nc=NoOne()))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        body = (await c.get("/health")).json()
    assert body["status"] == "degraded" and body["services"]["gateway"] == "up"


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
          "stop", "stream", "stream_options", "n", "speculation", "logprobs", "top_logprobs", "echo", "response_format", "logit_bias",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos",
          "stop_token_ids", "cache_salt", "min_p", "truncate_prompt_tokens", "priority", "allowed_token_ids", "prompt_logprobs"]


@pytest.fixture(scope="module")
def fuzz_app(tok):
    return create_app(make_settings(), SimpleNamespace(backend=FakeBackend(tok)))


@hsettings(max_examples=120, deadline=None)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.fixed_dictionaries({}, optional={f: JSON for f in FIELDS}),
       valid=st.booleans())
async def test_no_input_gives_a_5xx(fuzz_app, path, body, valid):
    if valid:  # mostly-valid requests with one odd field reach deeper
        body = {"model": MODEL, "prompt": "x", "messages": [{"role": "user", "content": "\ud800x"}]} | body
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fuzz_app), base_url="http://gw") as c:
        # json.dumps escapes lone surrogates and writes NaN/Infinity, which the server's parser accepts
        r = await c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_openapi_schema_builds(client):
    schema = (await client.get("/openapi.json")).json()
    assert "/v1/completions" in schema["paths"] and "/v1/chat/completions" in schema["paths"]


# -- HTTP, a real server and the official client ------------------------------------------
@contextlib.asynccontextmanager
async def serving(backend, app=None):
    """The gateway's app over `backend` (or `app`) on a real uvicorn server on a free port; yields its URL."""
    app = app or create_app(make_settings(), SimpleNamespace(backend=backend))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    while not srv.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        await task


@pytest.fixture(scope="module")
async def server(tok):
    backend = FakeBackend(tok, delay_s=0.002)
    async with serving(backend) as url:
        yield SimpleNamespace(url=url, backend=backend)


@pytest.fixture
def oai(server):
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


async def test_openai_client_completions(oai, server, tok):
    expected = text_of(tok, 12, server.backend)
    done = await oai.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0)
    assert done.choices[0].text == expected and done.usage.completion_tokens == 12
    assert done.model_extra["speculation"]["chain"] == ["drafter", "target"]
    parts, usage = [], None
    stream = await oai.completions.create(model=MODEL, prompt="Hello", max_tokens=12, stream=True,
                                          stream_options={"include_usage": True})
    async for chunk in stream:
        parts += [c.text for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(parts) == expected and usage.completion_tokens == 12
    scored = await oai.completions.create(model=MODEL, prompt=["Hello", "Hi"], max_tokens=0, echo=True, logprobs=1)
    assert [c.text for c in scored.choices] == ["Hello", "Hi"] and scored.usage.completion_tokens == 0
    lp = scored.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(tok.encode("Hello")) == len(lp.text_offset)
    sampled = await oai.completions.create(model=MODEL, prompt="Hello", max_tokens=4, n=2, logprobs=2, seed=1)
    assert [c.index for c in sampled.choices] == [0, 1]
    assert all(len(c.logprobs.top_logprobs[0]) <= 2 and len(c.logprobs.token_logprobs) == 4 for c in sampled.choices)


async def test_openai_client_chat(oai, server, tok):
    expected = text_of(tok, 9, server.backend)
    done = await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=9,
                                             extra_body={"speculation": {"chain": "drafter,verifier,target", "k": 2}})
    assert done.choices[0].message.content == expected and done.choices[0].finish_reason == "length"
    assert [lv["name"] for lv in done.model_extra["speculation"]["levels"]] == ["drafter", "verifier"]
    parts = []
    async for chunk in await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                         max_tokens=9, stream=True):
        parts += [c.delta.content or "" for c in chunk.choices]
    assert "".join(parts) == expected


async def test_a_gateway_at_its_limit_answers_429_with_retry_after(tok):
    """gateway.max_concurrent_requests: past it a request (each choice counts) is a 429 with
    Retry-After and runs nothing; below it, it runs."""
    backend = FakeBackend(tok)
    backend.in_flight = {"a": 0.0, "b": 0.0}  # what the NATS backend counts (admit / release)
    app = create_app(make_settings(max_concurrent_requests=3), SimpleNamespace(backend=backend))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        backend.in_flight["c"] = 0.0
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and "x-request-id" in r.headers
        assert r.json()["error"]["code"] == "too_many_requests" and "max_concurrent_requests" in r.text
    assert len(backend.jobs) == 1


async def test_openai_client_errors(oai):
    with pytest.raises(openai.BadRequestError) as bad:
        await oai.completions.create(model=MODEL, prompt="x", temperature=9)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        await oai.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    models = await oai.models.list()
    assert [m.id for m in models.data] == [MODEL]


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_the_generation(tok, stream):
    backend = FakeBackend(tok, batch=1, delay_s=0.02)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 80, "stream": stream}
    async with serving(backend) as url:
        async with httpx.AsyncClient(base_url=url) as c:
            if stream:
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break  # first token seen; hang up
            else:
                with pytest.raises(httpx.TimeoutException):
                    await c.post("/v1/completions", json=body, timeout=0.3)
        for _ in range(100):
            if backend.cancelled:
                break
            await asyncio.sleep(0.02)
        assert backend.cancelled == [backend.jobs[0].request_id]


# -- gRPC ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def grpc_gateway(tok):
    backend = FakeBackend(tok)
    server = await start_grpc(make_settings(host="127.0.0.1", grpc_port=0), backend)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield SimpleNamespace(stub=pb_grpc.TextGenerationStub(channel), channel=channel, backend=backend)
    await channel.close()
    await server.stop(None)


async def test_grpc_generate(grpc_gateway, tok):
    backend = grpc_gateway.backend
    reply = await grpc_gateway.stub.Generate(pb.GenerateRequest(
        prompt="Hello", max_tokens=10, sampling=pb.SamplingParameters(temperature=0, seed=3),
        speculation=pb.SpeculationParameters(chain=["drafter", "verifier", "target"], k=[3, 2])))
    assert reply.text == text_of(tok, 10, backend) and list(reply.token_ids) == backend.output(10)
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH and reply.request_id.startswith("gen-")
    assert reply.usage.completion_tokens == 10 and reply.usage.prompt_tokens == len(tok.encode("Hello"))
    assert reply.usage.cached_prompt_tokens == 0
    assert list(reply.speculation.chain) == ["drafter", "verifier", "target"] and list(reply.speculation.k) == [3, 2]
    assert [lv.name for lv in reply.speculation.levels] == ["drafter", "verifier"]
    assert reply.timings.total_ms > 0
    job = backend.jobs[-1]
    assert job.sampling.temperature == 0.0 and job.sampling.seed == 3 and job.logprobs == -1
    full = text_of(tok, 40, backend)
    for include in (False, True):
        kept = await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=40, stop=["fox"],
                                                                   include_stop_str_in_output=include))
        assert kept.text == full[:full.index("fox") + 3 * include] and kept.finish_reason == pb.FINISH_REASON_STOP
        assert kept.WhichOneof("stop_reason") == "stop_string" and kept.stop_string == "fox"
    assert reply.WhichOneof("stop_reason") is None  # max_tokens
    stop = backend.output(20)[4]
    ended = await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=20, sampling=pb.SamplingParameters(
        stop_token_ids=[stop])))
    assert ended.WhichOneof("stop_reason") == "stop_token_id" and ended.stop_token_id == stop
    await grpc_gateway.stub.Generate(pb.GenerateRequest(
        prompt="Hello there, general", max_tokens=2, truncate_prompt_tokens=2,
        sampling=pb.SamplingParameters(temperature=1.0, min_p=0.25)))
    assert backend.jobs[-1].prompt == tok.encode("Hello there, general")[-2:]
    assert backend.jobs[-1].sampling.min_p == 0.25
    await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=2, sampling=pb.SamplingParameters(
        allowed_token_ids=[7, 5])))
    assert backend.jobs[-1].sampling.allowed_token_ids == [5, 7]
    chat = await grpc_gateway.stub.Generate(pb.GenerateRequest(messages=[
        pb.ChatMessage(role="system", content="Be brief."), pb.ChatMessage(role="user", content="Hi")]))
    assert tok.decode(backend.jobs[-1].prompt) == "System: Be brief.\nUser: Hi\nAssistant:"
    assert backend.jobs[-1].max_tokens == min(128, CONTEXT - len(backend.jobs[-1].prompt)) and chat.text
    for bad, field in ((pb.GenerateRequest(prompt="x", messages=[pb.ChatMessage(role="user", content="Hi")]), "messages"),
                       (pb.GenerateRequest(messages=[pb.ChatMessage(role="wizard", content="Hi")]), "role")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await grpc_gateway.stub.Generate(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=2, priority=-2))
    assert backend.jobs[-1].priority == -2
    assert list(reply.logprobs) == []
    reply = await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=6, logprobs=2))
    assert backend.jobs[-1].logprobs == 2 and len(reply.logprobs) == 6
    assert [lp.logprob for lp in reply.logprobs] == pytest.approx([-i / 10 for i in range(6)])
    assert [lp.top_token_ids[0] for lp in reply.logprobs] == list(reply.token_ids)
    await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=2, sampling=pb.SamplingParameters(
        presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5, logit_bias={7: -100.0, 9: 2.5},
        min_tokens=2, ignore_eos=True, stop_token_ids=[3, 1])))
    s = backend.jobs[-1].sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, 0.25, 1.5)
    assert dict(zip(s.logit_bias_ids, s.logit_bias_values)) == {7: -100.0, 9: 2.5}
    assert s.min_tokens == 2 and not backend.jobs[-1].stop_at_eos and s.stop_token_ids == [1, 3]
    await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=2, cache_salt="tenant-7"))
    assert backend.jobs[-1].sampling.cache_salt == "tenant-7"
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=2, cache_salt=""))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in bad.value.details()
    await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=2, sampling=pb.SamplingParameters(
        response_format="json_object")))
    assert backend.jobs[-1].sampling.response_format == "json_object"
    schema = '{"type":"object","properties":{"a":{"type":"boolean"}}}'
    await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=2, sampling=pb.SamplingParameters(
        response_format="json_schema", json_schema=schema)))
    assert (backend.jobs[-1].sampling.response_format, backend.jobs[-1].sampling.json_schema) == ("json_schema", schema)
    for bad in (pb.SamplingParameters(response_format="json_schema", json_schema='{"type":"object","patternProperties":{}}'),
                pb.SamplingParameters(response_format="json_object", json_schema=schema)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="Hello", sampling=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "json_schema" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParameters(
            response_format="xml")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "response_format" in err.value.details()
    await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=2, sampling=pb.SamplingParameters(
        response_format="regex", regex="[a-z]+")))
    assert (backend.jobs[-1].sampling.response_format, backend.jobs[-1].sampling.regex) == ("regex", "[a-z]+")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParameters(
            response_format="regex", regex="a(?=b)")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "lookaround" in err.value.details()


async def test_grpc_prompt_logprobs_score_the_prompt(grpc_gateway):
    stub, backend = grpc_gateway.stub, grpc_gateway.backend
    reply = await stub.Generate(pb.GenerateRequest(prompt_token_ids=[5, 6, 7, 8], max_tokens=2, prompt_logprobs=2))
    assert backend.jobs[-1].prompt_logprobs == 2 and backend.jobs[-1].logprobs == -1
    assert [lp.logprob for lp in reply.prompt_logprobs] == pytest.approx([0.0, -0.1, -0.2])  # tokens 6, 7, 8
    assert [list(lp.top_token_ids) for lp in reply.prompt_logprobs] == [[6, 7], [7, 8], [8, 9]]
    assert not reply.prompt_logprobs[0].HasField("rank") and not reply.logprobs
    plain = await stub.Generate(pb.GenerateRequest(prompt_token_ids=[5, 6, 7, 8], max_tokens=2))
    assert not plain.prompt_logprobs and backend.jobs[-1].prompt_logprobs == -1
    replies = [r async for r in stub.GenerateStream(pb.GenerateRequest(prompt_token_ids=[5, 6, 7], max_tokens=4,
                                                                       prompt_logprobs=0))]
    assert len(replies[-1].prompt_logprobs) == 2 and not any(r.prompt_logprobs for r in replies[:-1])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(pb.GenerateRequest(prompt="x", prompt_logprobs=21))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_logprobs" in err.value.details()


async def test_grpc_generate_stream(grpc_gateway, tok):
    backend = grpc_gateway.backend
    replies = [r async for r in grpc_gateway.stub.GenerateStream(pb.GenerateRequest(
        prompt_token_ids=[1, 2, 3], max_tokens=40, stop=["fox"], request_id="my-req-1"))]
    full = text_of(tok, 40, backend)
    assert "".join(r.text for r in replies) == full[:full.index("fox")]
    assert all(r.request_id == "my-req-1" for r in replies)
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP and all(r.finish_reason == 0 for r in replies[:-1])
    assert last.stop_string == "fox" and all(r.WhichOneof("stop_reason") is None for r in replies[:-1])
    ids = [t for r in replies for t in r.token_ids]
    assert last.usage.completion_tokens == len(ids) and ids == backend.output(len(ids))
    await asyncio.sleep(0.05)
    assert "my-req-1" in backend.cancelled
    replies = [r async for r in grpc_gateway.stub.GenerateStream(pb.GenerateRequest(prompt="x", max_tokens=9,
                                                                                    logprobs=0))]
    assert [len(r.logprobs) for r in replies] == [len(r.token_ids) for r in replies]
    assert [lp.logprob for r in replies for lp in r.logprobs] == pytest.approx([-i / 10 for i in range(9)])


@pytest.mark.parametrize("request_, code", [
    (pb.GenerateRequest(prompt="x", model="gpt-4"), grpc.StatusCode.NOT_FOUND),
    (pb.GenerateRequest(prompt="x", max_tokens=10**6), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParameters(top_p=0)), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="x", speculation=pb.SpeculationParameters(chain=["oracle", "target"])),
     grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="x", request_id="bad id.*"), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="x", logprobs=21), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParameters(min_p=2)), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="x", truncate_prompt_tokens=0), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParameters(repetition_penalty=0)), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParameters(logit_bias={10**6: 1.0})),
     grpc.StatusCode.INVALID_ARGUMENT),
])
async def test_grpc_errors(grpc_gateway, request_, code):
    for call in (grpc_gateway.stub.Generate, lambda r: _drain(grpc_gateway.stub.GenerateStream(r))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request_)
        assert err.value.code() == code and err.value.details()


async def _drain(stream):
    return [r async for r in stream]


async def test_grpc_backend_unavailable(grpc_gateway):
    grpc_gateway.backend.fail = GenerationError("no target worker answers")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await grpc_gateway.stub.Generate(pb.GenerateRequest(prompt="x"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no target worker" in err.value.details()
    finally:
        grpc_gateway.backend.fail = None


async def test_grpc_health(grpc_gateway):
    health = health_pb2_grpc.HealthStub(grpc_gateway.channel)
    for service in ("", "specmesh.v1.TextGeneration"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_grpc_client_cancel_cancels_the_generation(tok):
    backend = FakeBackend(tok, batch=1, delay_s=0.02)
    server = await start_grpc(make_settings(host="127.0.0.1", grpc_port=0), backend)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = pb_grpc.TextGenerationStub(channel).GenerateStream(pb.GenerateRequest(prompt="x", max_tokens=80))
            await call.read()
            call.cancel()
        for _ in range(100):
            if backend.cancelled:
                break
            await asyncio.sleep(0.02)
        assert backend.cancelled == [backend.jobs[0].request_id]
    finally:
        await server.stop(None)


async def test_only_a_request_that_passed_validation_counts_in_flight(client, backend):
    admitted = []
    backend.admit = admitted.append  # NatsBackend counts it until its generation ends
    bad = [{"speculation": {"chain": "nope,target"}}, {"stop": [""]}, {"speculation": {"slo_tpot_ms": -1}}]
    for extra in bad:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4} | extra)
        assert r.status_code == 400, r.text
    assert admitted == []  # refused: never in flight, so never a load the table is picked by
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4})
    assert r.status_code == 200 and admitted == [backend.jobs[-1].request_id]
    released = []
    backend.release = released.append
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": ["x", "y", LONG], "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[2]"
    assert admitted[1:] == released and len(released) == 2  # the batch's first two were planned, then let go


# -- several choices: batches of prompts and n ------------------------------------------------
async def test_a_batch_of_prompts_with_n_samples_each(client, backend, tok):
    r = await client.post("/v1/completions", json={
        "model": MODEL, "prompt": ["a", "bb", "a b"], "n": 2, "max_tokens": 6, "seed": 5, "temperature": 0.7,
        "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    jobs = sorted(backend.jobs, key=lambda j: int(j.request_id.rsplit("-", 1)[1]))
    assert [j.request_id for j in jobs] == [f"{body['id']}-{i}" for i in range(6)]
    assert [j.prompt for j in jobs] == [tok.encode("a")] * 2 + [tok.encode("bb")] * 2 + [tok.encode("a b")] * 2
    assert [j.sampling.seed for j in jobs] == [5, 6, 5, 6, 5, 6]  # sample j draws with seed + j
    choices = body["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    assert all(c["text"] == text_of(tok, 6, backend) and c["token_ids"] == backend.output(6) for c in choices)
    assert all(c["speculation"]["chain"] == ["drafter", "target"] and c["timings"]["total_ms"] >= 0 for c in choices)
    assert "speculation" not in body and "timings" not in body  # each choice has its own
    prompt_tokens = sum(len(tok.encode(p)) for p in ("a", "bb", "a b"))  # each prompt once, however many samples
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 36, "total_tokens": prompt_tokens + 36,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [[5, 6], [7]], "max_tokens": 2})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert sorted(j.prompt for j in backend.jobs[-2:]) == [[5, 6], [7]]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_streamed_choices_are_interleaved_and_each_ends_once(tok, path):
    backend = FakeBackend(tok, batch=2, delay_s=0.002)
    app = create_app(make_settings(), SimpleNamespace(backend=backend, nc=None))
    ask = {"model": MODEL, "max_tokens": 9, "n": 3, "stream": True, "stream_options": {"include_usage": True},
           "logprobs": 1 if "chat" not in path else True}
    ask |= {"prompt": "x"} if "chat" not in path else {"messages": [{"role": "user", "content": "Hi"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        events = sse_events((await c.post(path, json=ask)).text)
    chunks = [e for e in events if e["choices"]]
    indices = [e["choices"][0]["index"] for e in chunks]
    assert set(indices) == {0, 1, 2} and indices != sorted(indices)  # the three ran at once
    for i in range(3):
        mine = [e["choices"][0] for e in chunks if e["choices"][0]["index"] == i]
        text = "".join(c["delta"].get("content", "") if "chat" in path else c["text"] for c in mine)
        assert text == text_of(tok, 9, backend)
        assert [c["finish_reason"] for c in mine].count("length") == 1 and mine[-1]["finish_reason"] == "length"
        n = sum(len(c["logprobs"]["content"] if "chat" in path else c["logprobs"]["tokens"]) for c in mine if c["logprobs"])
        assert n == 9
    assert events[-1]["usage"]["completion_tokens"] == 27


async def test_one_failing_choice_fails_the_request_and_cancels_the_others(tok):
    class OneFails(FakeBackend):
        async def generate(self, job):
            async for batch in super().generate(job):
                if job.request_id.endswith("-1") and batch.position >= 3:
                    raise GenerationError("replica lost")
                yield batch

    backend = OneFails(tok, batch=3, delay_s=0.01)
    app = create_app(make_settings(), SimpleNamespace(backend=backend, nc=None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 30, "n": 3})
        assert r.status_code == 503 and "replica lost" in r.json()["error"]["message"]
        await asyncio.sleep(0.05)
        rid = backend.jobs[0].request_id.rsplit("-", 1)[0]
        assert set(backend.cancelled) >= {f"{rid}-0", f"{rid}-2"}  # the others stopped, not left running
        events = sse_events((await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 30,
                                                                      "n": 3, "stream": True})).text)
        assert "replica lost" in events[-1]["error"]["message"]


# -- echo -------------------------------------------------------------------------------------
async def test_echo_puts_the_prompt_and_its_logprobs_first(client, backend, tok):
    prompt = "the quick brown"
    ids = tok.encode(prompt)
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 5, "echo": True,
                                                   "logprobs": 1, "return_token_ids": True})
    choice = r.json()["choices"][0]
    assert backend.jobs[-1].prompt_logprobs == 1 and backend.jobs[-1].max_tokens == 5
    assert choice["text"] == prompt + text_of(tok, 5, backend) and choice["token_ids"] == backend.output(5)
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.decode([t]) for t in ids + backend.output(5)]
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([-i / 10 for i in range(len(ids) - 1)] + [-i / 10 for i in range(5)])
    assert lp["top_logprobs"][0] is None and len(lp["top_logprobs"][1]) == 1
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids) + 5)]
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 5, "echo": True})
    assert r.json()["choices"][0]["text"] == prompt + text_of(tok, 5, backend)
    assert r.json()["choices"][0]["logprobs"] is None and backend.jobs[-1].prompt_logprobs == -1


@pytest.mark.parametrize("stream", [False, True])
async def test_echo_with_no_tokens_scores_the_prompt_alone(client, backend, tok, stream):
    """max_tokens 0 with echo: the prompt and its log-probabilities, nothing generated in the answer."""
    ids = tok.encode("the quick brown fox")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [ids, ids[:2]], "max_tokens": 0,
                                                   "echo": True, "logprobs": 0, "stream": stream,
                                                   "stream_options": {"include_usage": True} if stream else None})
    assert r.status_code == 200, r.text
    assert all(job.max_tokens == 1 for job in backend.jobs[-2:])  # one token made, and left out
    if stream:
        events = sse_events(r.text)
        usage = events[-1]["usage"]
        choices = {}
        for e in events[:-1]:
            choices.setdefault(e["choices"][0]["index"], []).append(e["choices"][0])
        got = {i: ("".join(c["text"] for c in cs), [x for c in cs if c["logprobs"] for x in c["logprobs"]["token_logprobs"]],
                   [c["finish_reason"] for c in cs if c["finish_reason"]]) for i, cs in choices.items()}
    else:
        body = r.json()
        usage = body["usage"]
        got = {c["index"]: (c["text"], c["logprobs"]["token_logprobs"], [c["finish_reason"]]) for c in body["choices"]}
    assert got[0][0] == tok.decode(ids) and got[0][2] == ["length"] and got[0][1][0] is None
    assert got[0][1][1:] == pytest.approx([-i / 10 for i in range(len(ids) - 1)])
    assert got[1] == (tok.decode(ids[:2]), [None, 0.0], ["length"])
    assert usage == {"prompt_tokens": len(ids) + 2, "completion_tokens": 0, "total_tokens": len(ids) + 2,
                     "prompt_tokens_details": {"cached_tokens": 0}}
