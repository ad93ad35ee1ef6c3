"""The checkpoint's recommended sampling defaults (`gateway.generation_config`): read and
checked from generation_config.json, applied to the fields a request leaves out, never
to the ones it sets; over HTTP and gRPC."""

from __future__ import annotations

import json
from types import SimpleNamespace

import grpc
import httpx
import pytest

from services.gateway.generation_defaults import BadGenerationConfig, GenerationDefaults
from services.gateway.grpc_server import start_grpc
from services.gateway.http_api import create_app
from services.gateway.proto import generate_pb2, generate_pb2_grpc
from tests.test_gateway_api import CONTEXT, MODEL, FakeBackend, make_settings, tok  # noqa: F401

QWEN3 = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
         "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}


def _folder(tmp_path, config) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
    return str(tmp_path)


def test_auto_reads_the_targets_file_and_none_ignores_it(tmp_path):
    _folder(tmp_path / "target", QWEN3 | {"max_new_tokens": 40, "repetition_penalty": 1.05})
    got = GenerationDefaults.load("auto", tmp_path / "target")
    assert got.given() == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 40}
    assert got.source.endswith("target/generation_config.json")
    assert GenerationDefaults.load("none", tmp_path / "target").given() == {}
    other = _folder(tmp_path / "other", {"temperature": 0.2, "min_p": 0.1})
    assert GenerationDefaults.load(other, tmp_path / "target").given() == {"temperature": 0.2, "min_p": 0.1}
    assert GenerationDefaults.load("auto", tmp_path / "nothing").given() == {}  # a checkpoint without one


@pytest.mark.parametrize("config, message", [
    ({"temperature": 3.0}, "temperature must be between 0 and 2, got 3.0"),
    ({"top_p": 0}, "top_p must be greater than 0 and at most 1"),
    ({"top_k": -1}, "top_k must be a whole number >= 0"),
    ({"top_k": 2.5}, "top_k must be a whole number"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a whole number >= 1"),
    ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
    ({"repetition_penalty": True}, "repetition_penalty must be a number"),
    ("[1, 2]", "expected a JSON object, got list"),
    ("{not json", "not readable JSON"),
])
def test_a_bad_file_is_refused_naming_it_and_the_key(tmp_path, config, message):
    _folder(tmp_path, config)
    with pytest.raises(BadGenerationConfig, match="generation_config.json: " + message.replace("(", r"\(")):
        GenerationDefaults.load("auto", tmp_path)


def test_a_named_folder_without_the_file_is_refused(tmp_path):
    with pytest.raises(BadGenerationConfig, match="does not exist"):
        GenerationDefaults.load(str(tmp_path), tmp_path / "target")


@pytest.fixture
def backend(tok, tmp_path):  # noqa: F811
    backend = FakeBackend(tok)
    backend.generation_defaults = GenerationDefaults.load(_folder(tmp_path, QWEN3 | {"max_new_tokens": 12}), tmp_path)
    return backend


@pytest.fixture
async def client(backend):
    app = create_app(make_settings(), SimpleNamespace(backend=backend, nc=None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c


async def test_a_request_without_sampling_fields_gets_the_checkpoints(client, backend):
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    s = backend.jobs[-1].sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == pytest.approx((0.6, 0.95, 20, 0.0, 1.0))
    assert backend.jobs[-1].max_tokens == 12 and r.json()["usage"]["completion_tokens"] == 12  # max_new_tokens


async def test_the_requests_own_values_win_even_openais_defaults(client, backend):
    body = {"model": MODEL, "prompt": "hi", "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_tokens": 30}
    assert (await client.post("/v1/completions", json=body)).status_code == 200
    s = backend.jobs[-1].sampling
    assert (s.temperature, s.top_p, s.top_k) == (1.0, 1.0, 0) and backend.jobs[-1].max_tokens == 30
    assert (await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "temperature": 0})).status_code == 200
    s = backend.jobs[-1].sampling
    assert s.temperature == 0 and s.top_k == 20  # greedy asked for: the other defaults stay, and change nothing


async def test_max_new_tokens_still_fits_the_context(client, backend):
    backend.generation_defaults = GenerationDefaults(max_new_tokens=10 * CONTEXT)
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hello there"})
    assert r.status_code == 200 and len(backend.jobs[-1].prompt) + backend.jobs[-1].max_tokens == CONTEXT


async def test_grpc_applies_them_too(backend):
    server = await start_grpc(make_settings(host="127.0.0.1", grpc_port=0), backend)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = generate_pb2_grpc.TextGenerationStub(channel)
            await stub.Generate(generate_pb2.GenerateRequest(model=MODEL, prompt="hi"))
            await stub.Generate(generate_pb2.GenerateRequest(model=MODEL, prompt="hi", sampling=generate_pb2.SamplingParameters(top_k=3)))
    finally:
        await server.stop(None)
    first, second = backend.jobs[-2:]
    assert (first.sampling.temperature, first.sampling.top_k, first.max_tokens) == (pytest.approx(0.6), 20, 12)
    assert second.sampling.top_k == 3 and second.sampling.top_p == pytest.approx(0.95)


async def test_request_lines_are_logged_when_asked_with_the_prompt_cut(tok, caplog):  # noqa: F811
    import logging

    backend = FakeBackend(tok)
    settings = make_settings(log_requests=True, max_log_len=5)
    app = create_app(settings, SimpleNamespace(backend=backend, nc=None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        with caplog.at_level(logging.INFO, logger="specmesh.gateway.requests"):
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hello there", "max_tokens": 6,
                                                           "temperature": 0, "seed": 3,
                                                           "speculation": {"chain": "drafter,target", "k": 2}})
    assert r.status_code == 200
    received, finished = [rec.getMessage() for rec in caplog.records if rec.name == "specmesh.gateway.requests"]
    rid = r.json()["id"]
    assert received.startswith(f"request {rid} received: ") and "max_tokens 6, chain drafter,target, k [2]" in received
    assert "seed=3" in received and "prompt 'hello'..." in received
    assert finished.startswith(f"request {rid} finished: length, 6 tokens, chain drafter,target")
    caplog.clear()
    app = create_app(make_settings(), SimpleNamespace(backend=backend, nc=None))  # off by default
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        with caplog.at_level(logging.INFO, logger="specmesh.gateway.requests"):
            await client.post("/v1/completions", json={"model": MODEL, "prompt": "hello there", "max_tokens": 2})
    assert not [rec for rec in caplog.records if rec.name == "specmesh.gateway.requests"]
