"""TLS on the gateway (gateway.ssl_certfile / ssl_keyfile): HTTPS and gRPC's secure port with
a self-signed certificate made by openssl; plain connections are refused."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
from types import SimpleNamespace

import grpc
import httpx
import pytest
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.grpc_server import start_grpc
from services.gateway.http_api import create_app
from services.gateway.service import http_config
from shared.batch import plan_batch, read_batch, run_batch
from tests.test_gateway_api import MODEL, FakeBackend, make_settings, tok  # noqa: F401


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_the_certificate_and_key_go_together(tmp_path):
    from shared.settings import GatewaySettings

    with pytest.raises(ValueError, match="go together"):
        GatewaySettings(ssl_certfile=tmp_path / "cert.pem")
    assert make_settings().gateway.http_url.startswith("http://")


async def test_https_and_secure_grpc(tok, certificate, tmp_path):  # noqa: F811
    cert, key = certificate
    settings = make_settings(ssl_certfile=cert, ssl_keyfile=key, grpc_port=0)
    assert settings.gateway.http_url.startswith("https://")
    backend = FakeBackend(tok)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(http_config(create_app(settings, SimpleNamespace(backend=backend)), settings.gateway, port))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    grpc_server = await start_grpc(settings, backend)
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert))) as client:
            r = await client.get(f"https://127.0.0.1:{port}/version")
            assert r.status_code == 200 and "version" in r.json()
        out = tmp_path / "out.jsonl"  # a batch file through https
        requests = read_batch([json.dumps({"custom_id": "a", "url": "/v1/completions",
                                           "body": {"model": MODEL, "prompt": "Hi", "max_tokens": 2}})])
        summary = await run_batch(plan_batch(requests, out), out, url=f"https://127.0.0.1:{port}", ca_certs=cert)
        assert summary.outcomes == {"200": 1}
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.HTTPError):
                await client.get(f"http://127.0.0.1:{port}/version")  # TLS only
        roots = grpc.ssl_channel_credentials(cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{grpc_server.port}", roots) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    finally:
        server.should_exit = True
        await task
        await grpc_server.stop(grace=0)
