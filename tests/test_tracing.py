"""Tracing: W3C context over NATS headers and LevelItems, the JSON-lines exporter, and one
trace per request across gateway, target, drafter, verifier and state on the real stack.

Run: `.venv/bin/pytest -q tests/test_tracing.py` (the stack part starts NATS, PostgreSQL and
every service once, about a minute).
"""

from __future__ import annotations

import time

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.cli.trace_cmd import find_trace, render, span_tree
from shared.messages import LevelCall, LevelItem, decode, encode
from shared.tracing import (
    JsonlSpanExporter, RequestSpans, continued, extract, from_traceparent, inject, read_spans, setup_tracing,
    trace_id, traceparent,
)


@pytest.fixture
def provider():
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    tp.exporter = exporter
    return tp


# -- context over NATS --------------------------------------------------------------------
def test_inject_extract_round_trip(provider):
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("sender") as sender:
        headers = inject()
    assert headers["traceparent"].startswith(f"00-{trace_id(sender)}-{sender.get_span_context().span_id:016x}-")
    with tracer.start_as_current_span("receiver", context=extract(headers)) as receiver:
        pass
    assert receiver.parent.span_id == sender.get_span_context().span_id
    assert receiver.get_span_context().trace_id == sender.get_span_context().trace_id


def test_no_span_no_headers_and_no_context():
    assert inject() == {}
    assert not trace.get_current_span(extract(None)).get_span_context().is_valid
    assert not trace.get_current_span(extract({"traceparent": "garbage"})).get_span_context().is_valid
    assert from_traceparent("") is None and from_traceparent("00-zz") is None
    assert traceparent(None) == ""


def test_continued_makes_no_orphan_span(provider):
    tracer = provider.get_tracer("t")
    with continued(tracer, "commit", None) as span:
        assert span is None
    with tracer.start_as_current_span("client") as client:
        headers = inject()
    with continued(tracer, "commit", headers) as span:
        assert span.parent.span_id == client.get_span_context().span_id
    assert [s.name for s in provider.exporter.get_finished_spans()] == ["client", "commit"]


def test_each_level_item_carries_its_own_trace(provider):
    """A batched LevelCall holds several requests: each item's traceparent names its own trace."""
    tracer = provider.get_tracer("t")
    a, b = tracer.start_span("a"), tracer.start_span("b")
    call = LevelCall("score", [LevelItem("r1", 0, 5, [1, 2], trace=traceparent(a)),
                               LevelItem("r2", 0, 7, [3], trace=traceparent(b))])
    back = decode(encode(call), LevelCall)
    for item, span in zip(back.items, (a, b)):
        child = tracer.start_span("server", context=from_traceparent(item.trace))
        assert child.get_span_context().trace_id == span.get_span_context().trace_id
        assert child.parent.span_id == span.get_span_context().span_id
    # An item from a sender without the field decodes with no trace.
    old = encode(LevelCall("score", [LevelItem("r1", 0, 5)]))
    assert decode(old, LevelCall).items[0].trace == ""


def test_request_spans_nest_per_request_and_skip_untraced(provider):
    spans = RequestSpans(provider)
    root = provider.get_tracer("t").start_span("generate")
    assert spans.start("r1", trace.set_span_in_context(root))
    assert not spans.start("r2", extract({}))
    assert spans.open("r2", "step") is None  # untraced: no span, no orphan trace
    step = spans.open("r1", "step")
    previous = spans.enter("r1", step)
    inner = spans.open("r1", "score target")
    inner.end()
    spans.leave("r1", previous)
    after = spans.open("r1", "commit")
    after.end()
    step.end()
    assert inner.parent.span_id == step.get_span_context().span_id
    assert after.parent.span_id == root.get_span_context().span_id
    spans.forget("r1")
    assert spans.open("r1", "late") is None


# -- the JSON-lines exporter and `specmesh trace show` --------------------------------------
def test_jsonl_exporter_writes_a_tree_trace_show_reads(tmp_path):
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(tmp_path / "gateway.jsonl", "gateway")))
    tracer = tp.get_tracer("t")
    with tracer.start_as_current_span("POST /v1/completions"):
        with tracer.start_as_current_span("text_completion specmesh", attributes={"specmesh.request_id": "cmpl-1"}):
            with tracer.start_as_current_span("step", attributes={"specmesh.k": [3, 3], "specmesh.epoch": 2}) as step:
                step.add_event("rollback verifier", {"specmesh.level": "verifier", "specmesh.length": 9})
    (tmp_path / "gateway.jsonl").open("a").write('{"torn": ')  # a live file's unfinished last line
    spans = read_spans(tmp_path)
    assert len(spans) == 3 and {s["service"] for s in spans} == {"gateway"}
    tid = find_trace(spans, "cmpl-1")
    assert tid == spans[0]["trace_id"] and find_trace(spans, tid) == tid and find_trace(spans, "nope") is None
    assert [(d, s["name"]) for d, s in span_tree(spans)] == [
        (0, "POST /v1/completions"), (1, "text_completion specmesh"), (2, "step")]
    text = render(spans)
    assert "    step  k=3,3 epoch=2" in text and text.startswith(f"trace {tid}")
    assert "      · rollback verifier  length=9" in text


def test_setup_tracing_once_per_process(tmp_path):
    from shared.settings import Settings

    settings = Settings(run_dir=tmp_path)
    memory = InMemorySpanExporter()
    tp = setup_tracing(settings, "unit-test", exporters=[memory])
    assert setup_tracing(settings, "unit-test") is tp
    assert trace.get_tracer_provider() is not tp  # injected, never the global one
    tp.get_tracer("t").start_span("x").end()
    tp.force_flush()
    assert [s.name for s in memory.get_finished_spans()] == ["x"]
    assert read_spans(tmp_path / "traces")[0]["service"] == "unit-test"


# -- one request, one trace, on the real stack ------------------------------------------------
REQUIRED = {"gateway", "target", "drafter", "verifier", "state"}


def wait_for_trace(trace_dir, tid: str, required=REQUIRED, timeout_s: float = 20.0) -> list[dict]:
    """The trace's spans once every service has written its part and the count is stable."""
    deadline, last = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        spans = [s for s in read_spans(trace_dir) if s["trace_id"] == tid]
        if required <= {s["service"] for s in spans} and any(s["parent_id"] is None for s in spans) \
                and len(spans) == last:
            return spans
        last = len(spans)
        time.sleep(0.7)
    return [s for s in read_spans(trace_dir) if s["trace_id"] == tid]


@pytest.mark.stack
def test_one_generation_is_one_trace(stack):
    from shared.cli.trace_cmd import trace_dir

    env, settings = stack
    body = {"model": "specmesh", "prompt": "def fibonacci(n):", "max_tokens": 12, "temperature": 0,
            "speculation": {"chain": "drafter,verifier,target", "k": 3}}
    resp = httpx.post(f"{settings.gateway.http_url}/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    tid, rid = resp.headers["x-trace-id"], out["id"]
    assert out["trace_id"] == tid and len(tid) == 32

    spans = wait_for_trace(trace_dir(settings.run_dir), tid)
    by_id = {s["span_id"]: s for s in spans}
    assert REQUIRED <= {s["service"] for s in spans}, sorted({s["service"] for s in spans})
    # The request's spans are in this trace alone, and the trace is one tree under the HTTP span.
    everywhere = [s for s in read_spans(trace_dir(settings.run_dir))
                  if s["attributes"].get("specmesh.request_id") == rid]
    assert {s["trace_id"] for s in everywhere} == {tid}
    roots = [s for s in spans if s["parent_id"] is None]
    assert len(roots) == 1 and roots[0]["service"] == "gateway" and roots[0]["kind"] == "SERVER"
    orphans = [s["name"] for s in spans if s["parent_id"] is not None and s["parent_id"] not in by_id]
    assert not orphans, orphans

    def parent(s):
        return by_id[s["parent_id"]]

    generate = [s for s in spans if s["name"] == "text_completion specmesh"]
    assert len(generate) == 1 and parent(generate[0]) is roots[0]
    attrs = generate[0]["attributes"]
    assert attrs["gen_ai.request.model"] == "specmesh" and attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.usage.input_tokens"] == out["usage"]["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == out["usage"]["completion_tokens"]
    assert attrs["specmesh.chain"] == "drafter,verifier,target" and attrs["specmesh.k"] == [3, 3]
    assert [s["name"] for s in spans if s["name"] == "router.assignment" and parent(s) is roots[0]]

    steps = [s for s in spans if s["name"] == "step"]
    assert steps and all(parent(s) is generate[0] and s["service"] == "target" for s in steps)
    assert sum(s["attributes"].get("specmesh.emitted", 0) for s in steps) + 1 == out["usage"]["completion_tokens"]
    names = {(s["service"], s["name"]) for s in spans}
    assert {("target", "propose drafter-code"), ("target", "score verifier"), ("target", "score target"),
            ("target", "commit"), ("target", "queue"), ("target", "prefill")} <= names
    for s in spans:  # each remote level's span is the child of the driver's call for that request
        if s["service"] in ("drafter", "verifier"):
            assert parent(s)["service"] == "target" and parent(s)["name"] == s["name"], s["name"]
            assert parent(s)["kind"] == "CLIENT" and s["kind"] == "SERVER"
        if s["service"] == "state":
            assert parent(s)["name"] == "commit" and parent(s)["service"] == "target"
        if s["name"] == "propose drafter-code" and s["service"] == "target":
            assert 1 <= s["attributes"]["specmesh.k"] <= 3 and "specmesh.epoch" in s["attributes"]
    rolled = any(lv["accepted"] < lv["drafted"] for lv in out["speculation"]["levels"])
    events = [e for s in steps for e in s["events"] if e["name"].startswith("rollback ")]
    assert (events or not rolled) and all("specmesh.epoch" in e["attributes"] for e in events)
    commits = [s for s in spans if s["service"] == "state"]
    assert sum(s["attributes"]["specmesh.tokens"] for s in commits) == out["usage"]["completion_tokens"]

    from tests.stack_fixtures import specmesh

    shown = specmesh(env, "trace", "show", rid).stdout
    assert shown.startswith(f"trace {tid}") and "propose drafter-code" in shown and "commit" in shown


@pytest.mark.stack
def test_grpc_generation_returns_its_trace(stack):
    import grpc

    from services.gateway.proto import generate_pb2 as pb
    from services.gateway.proto import generate_pb2_grpc as pb_grpc
    from shared.cli.trace_cmd import trace_dir

    _, settings = stack
    with grpc.insecure_channel(f"{settings.gateway.host}:{settings.gateway.grpc_port}") as channel:
        reply, call = pb_grpc.TextGenerationStub(channel).Generate.with_call(
            pb.GenerateRequest(prompt="Once upon a time", max_tokens=6), timeout=60)
    tid = dict(call.trailing_metadata())["x-trace-id"]
    spans = wait_for_trace(trace_dir(settings.run_dir), tid, required={"gateway", "target", "state"})
    root = [s for s in spans if s["parent_id"] is None]
    assert len(root) == 1 and root[0]["attributes"].get("rpc.method") == "Generate"
    assert any(s["attributes"].get("specmesh.request_id") == reply.request_id for s in spans)
