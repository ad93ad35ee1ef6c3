"""API keys at the gateway: required outside dev mode, on HTTP and gRPC; health stays open."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import httpx
import pytest
from pydantic import SecretStr

from services.gateway.http_api import create_app
from services.gateway.grpc_server import start_grpc
from tests.test_gateway_api import FakeBackend, make_settings, tok  # noqa: F401  (the tokenizer fixture)

BODY = {"model": "specmesh-test", "prompt": "hello", "max_tokens": 4, "temperature": 0}


async def post(app, headers=None):
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        return await client.post("/v1/completions", json=BODY, headers=headers or {})


@pytest.fixture
def keyed(tok):  # noqa: F811
    settings = make_settings(dev_mode=False, api_keys=[SecretStr("sk-right")])
    return create_app(settings, SimpleNamespace(backend=FakeBackend(tok), nc=None))


async def test_valid_key_is_served(keyed):
    resp = await post(keyed, {"Authorization": "Bearer sk-right"})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("headers, message", [
    ({}, "Missing API key"),
    ({"Authorization": "Bearer sk-wrong"}, "Invalid API key"),
    ({"Authorization": "Basic sk-right"}, "Missing API key"),
])
async def test_missing_or_wrong_key_is_refused(keyed, headers, message):
    resp = await post(keyed, headers)
    assert resp.status_code == 401
    error = resp.json()["error"]
    assert message in error["message"] and error["code"] == "invalid_api_key"
    assert "sk-right" not in resp.text


async def test_no_keys_outside_dev_mode_refuses_and_says_how_to_fix(tok):  # noqa: F811
    app = create_app(make_settings(dev_mode=False), SimpleNamespace(backend=FakeBackend(tok), nc=None))
    resp = await post(app, {"Authorization": "Bearer anything"})
    assert resp.status_code == 401
    assert "SPECMESH_GATEWAY__API_KEYS" in resp.json()["error"]["message"]


async def test_grpc_requires_the_key_but_health_is_open(tok):  # noqa: F811
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.gateway.proto import generate_pb2, generate_pb2_grpc

    settings = make_settings(dev_mode=False, api_keys=[SecretStr("sk-right")], host="127.0.0.1", grpc_port=0)
    server = await start_grpc(settings, FakeBackend(tok))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = generate_pb2_grpc.TextGenerationStub(channel)
            request = generate_pb2.GenerateRequest(prompt="hello", max_tokens=4)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.Generate(request)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as denied_stream:
                async for _ in stub.GenerateStream(request):
                    pass
            assert denied_stream.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = await stub.Generate(request, metadata=(("authorization", "Bearer sk-right"),))
            assert reply.text is not None
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


def test_database_password_is_never_printed():
    from shared.settings import Settings

    dumped = Settings().model_dump_json()
    assert "specmesh@" not in dumped and '"password":"**********"' in dumped


async def test_version_is_open_and_the_packages(keyed):
    from importlib.metadata import version

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=keyed), base_url="http://gw") as client:
        resp = await client.get("/version")
        assert resp.status_code == 200 and resp.json() == {"version": version("specmesh")}
        assert (await client.get("/v1/models")).status_code == 401


async def test_cors_answers_a_browsers_preflight_only_for_the_allowed_origins(tok):  # noqa: F811
    settings = make_settings(dev_mode=False, api_keys=[SecretStr("sk-right")], cors_allow_origins=["https://app.test"])
    app = create_app(settings, SimpleNamespace(backend=FakeBackend(tok), nc=None))
    ask = {"access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        ok = await client.options("/v1/completions", headers=ask | {"origin": "https://app.test"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.test"
        other = await client.options("/v1/completions", headers=ask | {"origin": "https://evil.test"})
        assert "access-control-allow-origin" not in other.headers
        served = await client.post("/v1/completions", json=BODY, headers={"origin": "https://app.test",
                                                                          "authorization": "Bearer sk-right"})
        assert served.status_code == 200 and served.headers["access-control-allow-origin"] == "https://app.test"
        assert "x-request-id" in served.headers["access-control-expose-headers"]
        refused = await client.post("/v1/completions", json=BODY, headers={"origin": "https://app.test"})
        assert refused.status_code == 401  # CORS opens no door the API key keeps shut
    plain = create_app(make_settings(), SimpleNamespace(backend=FakeBackend(tok), nc=None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=plain), base_url="http://gw") as client:
        r = await client.options("/v1/completions", headers=ask | {"origin": "https://app.test"})
        assert "access-control-allow-origin" not in r.headers  # off by default
