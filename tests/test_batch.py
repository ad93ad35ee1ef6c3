"""Batch files (`specmesh run-batch`): every line answered once, through a real HTTP gateway
(uvicorn, over the in-memory backend of the gateway tests), resumed without loss, retried on 429."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from types import SimpleNamespace

import pytest
import uvicorn
from typer.testing import CliRunner

from services.gateway.http_api import create_app
from shared.batch import BadBatch, BatchRequest, plan_batch, read_batch, read_results, run_batch
from shared.cli.main import app as cli
from tests.test_gateway_api import MODEL, FakeBackend, make_settings, text_of


@pytest.fixture(scope="module")
def tok():
    from tests.test_gateway_api import CORPUS
    from shared.models.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, 300, threads=1)


class Admitting(FakeBackend):
    """Counts its requests in flight as the NATS backend does, so the gateway's limit applies."""

    def __init__(self, tok, **kwargs):
        super().__init__(tok, **kwargs)
        self.in_flight: dict[str, float] = {}

    def admit(self, request_id: str) -> None:
        self.in_flight[request_id] = 0.0

    async def generate(self, job):
        try:
            async for batch in super().generate(job):
                yield batch
        finally:
            self.in_flight.pop(job.request_id, None)


@contextlib.contextmanager
def serving(backend, store=None, **gateway):
    """The gateway over `backend` (and a response `store`) on a real uvicorn server in a thread
    of its own; yields its URL."""
    app = create_app(make_settings(**gateway), SimpleNamespace(backend=backend, responses=store))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(5)


def line(custom_id, url="/v1/completions", **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def results(path) -> dict:
    found = [json.loads(text) for text in path.read_text().splitlines()]
    by_id = {r["custom_id"]: r for r in found}
    assert len(by_id) == len(found), "a custom_id answered twice"
    return by_id


def run(plan, out, url, **kwargs):
    return asyncio.run(run_batch(plan, out, url=url, **kwargs))


def test_every_request_is_answered_once_whatever_its_status(tok, tmp_path):
    backend = FakeBackend(tok)
    requests = read_batch([
        line("plain", model=MODEL, prompt="Hi", max_tokens=5, temperature=0),
        line("chat", "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], max_tokens=4),  # no model
        "",
        line("responses", "/v1/responses", input="Hi", max_output_tokens=3),
        line("too-hot", model=MODEL, prompt="Hi", temperature=9),
        line("too-long", model=MODEL, prompt="Hi", max_tokens=10**6),
    ])
    out = tmp_path / "out.jsonl"
    with serving(backend) as url:
        summary = run(plan_batch(requests, out), out, url=url, concurrency=3)
    got = results(out)
    assert set(got) == {"plain", "chat", "responses", "too-hot", "too-long"}
    plain = got["plain"]["response"]
    assert plain["status_code"] == 200 and plain["body"]["choices"][0]["text"] == text_of(tok, 5, backend)
    assert plain["request_id"] == plain["body"]["id"] and got["plain"]["error"] is None
    assert got["plain"]["id"].startswith("batch_req_")
    assert got["chat"]["response"]["body"]["object"] == "chat.completion"
    assert got["responses"]["response"]["body"]["object"] == "response"
    for cid, param in (("too-hot", "temperature"), ("too-long", "max_tokens")):
        assert got[cid]["response"]["status_code"] == 400 and got[cid]["response"]["body"]["error"]["param"] == param
    assert len(backend.jobs) == 3  # the 400s ran nothing
    assert summary.sent == 5 and summary.succeeded == 3 and summary.failed == 2
    assert summary.outcomes == {"200": 3, "400": 2} and summary.completion_tokens == 5 + 4 + 3


def test_a_file_with_lines_that_are_not_requests_is_refused_whole():
    with pytest.raises(BadBatch) as bad:
        read_batch([
            line("ok", model=MODEL, prompt="Hi"),
            "{not json",
            "[1, 2]",
            line("ok", model=MODEL, prompt="again"),
            line("streamed", model=MODEL, prompt="Hi", stream=True),
            line("elsewhere", "/v1/embeddings", model=MODEL, input="Hi"),
            json.dumps({"url": "/v1/completions", "body": {}}),
            json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {}}),
            json.dumps({"custom_id": "nobody", "url": "/v1/completions", "body": "Hi"}),
        ])
    assert [p.split(":")[0] for p in bad.value.problems] == [f"line {n}" for n in range(2, 10)]
    for words in ("not JSON", "a JSON object", "is line 1's too", "stream", "url must be one of", "custom_id must",
                  "method must be 'POST'", "body must be"):
        assert words in str(bad.value)
    with pytest.raises(BadBatch, match="and 5 more"):
        read_batch(["x"] * 25)


def test_a_run_resumes_with_only_what_the_output_lacks(tok, tmp_path):
    backend = FakeBackend(tok)
    requests = read_batch([line(c, model=MODEL, prompt=c, max_tokens=2) for c in ("a", "b", "c", "d")])
    out = tmp_path / "out.jsonl"
    kept = {"id": "batch_req_1", "custom_id": "a", "error": None,
            "response": {"status_code": 200, "request_id": "cmpl-1", "body": {"kept": True}}}
    busy = {"id": "batch_req_2", "custom_id": "b", "error": None,
            "response": {"status_code": 503, "request_id": "cmpl-2", "body": {}}}
    unsent = {"id": "batch_req_3", "custom_id": "c", "response": None, "error": {"code": "no_response", "message": "x"}}
    torn = json.dumps({"id": "batch_req_4", "custom_id": "d", "response": None})[:30]  # stopped mid-write
    out.write_text("".join(json.dumps(r) + "\n" for r in (kept, busy, unsent)) + torn)
    plan = plan_batch(requests, out)
    assert [r.custom_id for r in plan.requests] == ["b", "c", "d"] and plan.skipped == 1
    assert out.read_text() == json.dumps(kept) + "\n"  # the redone and the torn line are out
    with serving(backend) as url:
        summary = run(plan, out, url=url)
    got = results(out)
    assert got["a"] == kept and all(got[c]["response"]["status_code"] == 200 for c in "bcd")
    assert sorted(backend.tok.decode(job.prompt) for job in backend.jobs) == ["b", "c", "d"]
    assert summary.sent == 3 and summary.skipped == 1
    again = plan_batch(requests, out)
    assert again.requests == [] and again.skipped == 4


def test_requests_turned_away_with_429_are_sent_again(tok, tmp_path):
    backend = Admitting(tok, batch=1, delay_s=0.01)
    requests = read_batch([line(f"r{i}", model=MODEL, prompt="Hi", max_tokens=6) for i in range(6)])
    out = tmp_path / "out.jsonl"
    with serving(backend, max_concurrent_requests=2) as url:
        summary = run(plan_batch(requests, out), out, url=url, concurrency=6, retries=10)
    assert summary.outcomes == {"200": 6} and len(backend.jobs) == 6  # a 429 ran nothing
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 6 for r in results(out).values())


def test_no_gateway_is_an_error_per_request_and_redone_next_time(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    requests = read_batch([line("a", model=MODEL, prompt="x"), line("b", model=MODEL, prompt="y")])
    out = tmp_path / "out.jsonl"
    summary = run(plan_batch(requests, out), out, url=closed, retries=1)
    assert summary.outcomes == {"no_response": 2}
    assert {r["error"]["code"] for r in results(out).values()} == {"no_response"}
    assert len(plan_batch(requests, out).requests) == 2 and out.read_text() == ""


def test_an_output_file_that_is_not_a_batch_output_is_left_alone(tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("dear diary\n")
    with pytest.raises(ValueError, match="not a batch output"):
        read_results(out)
    assert out.read_text() == "dear diary\n"
    out.write_text('{"a": 1}\n')
    with pytest.raises(ValueError, match="not a batch result"):
        plan_batch([BatchRequest(1, "x", "/v1/completions", {})], out)


def test_the_cli_runs_a_batch_resumes_it_and_says_what_failed(tok, tmp_path):
    backend = FakeBackend(tok)
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([line("ok", model=MODEL, prompt="Hi", max_tokens=3),
                                 line("hot", model=MODEL, prompt="Hi", temperature=9)]) + "\n")
    out = tmp_path / "out.jsonl"
    with serving(backend) as url:
        result = CliRunner().invoke(cli, ["run-batch", "-i", str(source), "-o", str(out), "--url", url, "--json"])
        assert result.exit_code == 1, result.output  # one request was refused
        summary = json.loads(result.stdout)
        assert summary["succeeded"] == 1 and summary["outcomes"] == {"200": 1, "400": 1}
        result = CliRunner().invoke(cli, ["run-batch", "-i", str(source), "-o", str(out), "--url", url])
        assert result.exit_code == 0, result.output
        assert "0 sent, 2 already done" in result.stdout
        assert len(backend.jobs) == 1
        result = CliRunner().invoke(cli, ["run-batch", "-i", str(source), "-o", str(out), "--url", url, "--overwrite"])
        assert result.exit_code == 1 and len(backend.jobs) == 2
    assert set(results(out)) == {"ok", "hot"}
    missing = CliRunner().invoke(cli, ["run-batch", "-i", str(tmp_path / "nope.jsonl"), "-o", str(out)])
    assert missing.exit_code == 2 and "cannot read" in missing.output
    source.write_text("[1]\n")
    refused = CliRunner().invoke(cli, ["run-batch", "-i", str(source), "-o", str(out)])
    assert refused.exit_code == 2 and "line 1: a request is a JSON object" in refused.output
