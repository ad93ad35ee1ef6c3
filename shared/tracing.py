"""OpenTelemetry for every SpecMesh process: one tracer provider, W3C context over NATS.

`setup_tracing(settings, service)` builds the process's `TracerProvider` once (spans to
`<run_dir>/traces/<service>.jsonl`, and to OTLP when an endpoint is configured); callers
pass it to whatever makes spans, no global provider is set. Trace context crosses NATS in
message headers (`inject` / `extract`); a batched `LevelCall` carries one `traceparent`
per `LevelItem` (`traceparent` / `from_traceparent`, the same pair on a one-key carrier).
`RequestSpans` keeps per-request parents for work the driver does in batches.

    provider = setup_tracing(settings, "state")
    await nc.request(subject, data, headers=inject())          # sender
    with tracer.start_as_current_span("commit", context=extract(msg.headers)): ...  # receiver
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode, use_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("specmesh.tracing")

TRACER_NAME = "specmesh"
_PROPAGATOR = TraceContextTextMapPropagator()
_providers: dict[str, TracerProvider] = {}
_lock = threading.Lock()


# -- setup ----------------------------------------------------------------------------
def setup_tracing(settings, service: str, exporters: Sequence[SpanExporter] = ()) -> TracerProvider:
    """The process's tracer provider for `service`, built on first call (later calls return it).

    Spans go to `<run_dir>/traces/<service>.jsonl` (settings.tracing.file), to the OTLP
    endpoint in settings.tracing.otlp_endpoint or OTEL_EXPORTER_OTLP_ENDPOINT, and to any
    `exporters` given (tests pass an InMemorySpanExporter).
    """
    with _lock:
        if service in _providers:
            return _providers[service]
        cfg = settings.tracing
        provider = TracerProvider(resource=Resource.create({"service.name": service, "service.namespace": "specmesh"}),
                                  sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)))
        if cfg.file:
            path = Path(settings.run_dir) / "traces" / f"{service}.jsonl"
            provider.add_span_processor(BatchSpanProcessor(JsonlSpanExporter(path, service), schedule_delay_millis=500))
        endpoint = cfg.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint:
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(endpoint)))
            log.info("%s exports spans to OTLP at %s", service, endpoint)
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=100))
        _providers[service] = provider
        return provider


def _otlp_exporter(endpoint: str) -> SpanExporter:
    """OTLP over HTTP/protobuf, or gRPC when OTEL_EXPORTER_OTLP_PROTOCOL says so."""
    if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    if not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint)


def tracer(provider: TracerProvider | None) -> trace.Tracer:
    """SpecMesh's tracer from `provider`; a no-op tracer when there is none (tests, tools)."""
    if provider is None:
        return trace.NoOpTracer()
    return provider.get_tracer(TRACER_NAME)


# -- W3C trace context over NATS ------------------------------------------------------
def inject(context: Context | None = None) -> dict[str, str]:
    """NATS headers carrying `context` (default: the current one); {} when there is no span."""
    headers: dict[str, str] = {}
    _PROPAGATOR.inject(headers, context=context)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    """The trace context in NATS headers (an empty context when they carry none)."""
    return _PROPAGATOR.extract(headers or {})


@contextmanager
def continued(tracer_: trace.Tracer, name: str, headers: Mapping[str, str] | None, *,
              kind: SpanKind = SpanKind.SERVER, attributes: dict | None = None) -> Iterator[Span | None]:
    """A current span continuing the trace in NATS `headers`; None (no span) when they carry none.

    Messages without trace context (tools, tests, untraced requests) make no orphan traces.
    """
    context = extract(headers)
    if not trace.get_current_span(context).get_span_context().is_valid:
        yield None
        return
    with tracer_.start_as_current_span(name, context=context, kind=kind, attributes=attributes) as span:
        yield span


def traceparent(span: Span | None) -> str:
    """`span`'s W3C traceparent, for a `LevelItem.trace` ('' for no span or an invalid one)."""
    if span is None or not span.get_span_context().is_valid:
        return ""
    return inject(trace.set_span_in_context(span)).get("traceparent", "")


def from_traceparent(value: str) -> Context | None:
    """The context a `LevelItem.trace` names, None when it names none."""
    if not value:
        return None
    context = extract({"traceparent": value})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def trace_id(span: Span | None = None) -> str:
    """Hex trace id of `span` (default: the current span), '' when there is none."""
    ctx = (span or trace.get_current_span()).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


# -- per-request spans of batched work ---------------------------------------------------
class RequestSpans:
    """Parents for per-request spans of work done in batches, on one thread (the driver's).

    `roots[rid]` is the request's context from the gateway; `open(rid, name)` starts a span
    under the request's innermost open span (or its root) and `enter` makes a span the parent
    of what follows for that request. A request without a root gets no spans.
    """

    def __init__(self, provider: TracerProvider | None):
        self.tracer = tracer(provider)
        self.enabled = provider is not None
        self.roots: dict[str, Context] = {}
        self.current: dict[str, Context] = {}

    def traced(self, request_id: str) -> bool:
        return request_id in self.roots

    def open(self, request_id: str, name: str, attributes: dict | None = None, kind: SpanKind = SpanKind.INTERNAL,
             start_time: int | None = None) -> Span | None:
        parent = self.context(request_id)
        if parent is None:
            return None
        return self.tracer.start_span(name, context=parent, kind=kind, attributes=attributes, start_time=start_time)

    def open_each(self, request_ids: Iterable[str], name: str, attributes: dict | None = None,
                  kind: SpanKind = SpanKind.INTERNAL) -> list[Span | None]:
        return [self.open(rid, name, attributes, kind) for rid in request_ids]

    def start(self, request_id: str, context: Context | None) -> bool:
        """Trace `request_id` under `context` (from its job's headers); False if that names no span."""
        if context is None or not trace.get_current_span(context).get_span_context().is_valid:
            return False
        self.roots[request_id] = context
        return True

    def enter(self, request_id: str, span: Span | None) -> Context | None:
        """Make `span` the parent of the request's next spans; returns the parent it replaces (for `leave`)."""
        previous = self.current.get(request_id)
        if span is not None and request_id in self.roots:
            self.current[request_id] = trace.set_span_in_context(span)
        return previous

    def leave(self, request_id: str, previous: Context | None = None) -> None:
        if previous is not None and request_id in self.roots:
            self.current[request_id] = previous
        else:
            self.current.pop(request_id, None)

    def span(self, request_id: str) -> Span:
        """The request's innermost open span (a non-recording one when there is none)."""
        context = self.current.get(request_id)
        return trace.get_current_span(context) if context is not None else INVALID_SPAN

    def context(self, request_id: str) -> Context | None:
        """The parent of the request's next span: its innermost open span, else its root."""
        context = self.current.get(request_id)
        return context if context is not None else self.roots.get(request_id)

    def forget(self, request_id: str) -> None:
        self.roots.pop(request_id, None)
        self.current.pop(request_id, None)


def end(span: Span | None, error: str | None = None, **attributes) -> None:
    """End `span` (None is fine) with `specmesh.<name>` attributes, and an error status if `error`."""
    if span is None:
        return
    if attributes and span.is_recording():
        span.set_attributes({f"specmesh.{k}": v for k, v in attributes.items() if v is not None})
    if error:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def fail(span: Span | None, error: str) -> None:
    if span is not None:
        span.set_status(Status(StatusCode.ERROR, error))


# -- the JSON-lines exporter --------------------------------------------------------------
def span_record(span: ReadableSpan, service: str) -> dict:
    """One span as the JSON object `specmesh trace show` reads."""
    ctx = span.context
    parent = span.parent
    return {
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_id": format(parent.span_id, "016x") if parent is not None else None,
        "name": span.name,
        "service": service,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "error": span.status.description,
        "attributes": {k: list(v) if isinstance(v, tuple) else v for k, v in (span.attributes or {}).items()},
        "events": [{"name": e.name, "ns": e.timestamp, "attributes": dict(e.attributes or {})} for e in span.events],
    }


class JsonlSpanExporter(SpanExporter):
    """Appends each span as one JSON line to `path` (one write per batch, so processes can share it)."""

    def __init__(self, path: Path, service: str):
        self.path = Path(path)
        self.service = service
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(s, self.service), separators=(",", ":"), default=str) + "\n"
                        for s in spans)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, lines.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("spans not written to %s: %s", self.path, exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def read_spans(trace_dir: Path) -> list[dict]:
    """Every span in `trace_dir/*.jsonl` (torn last lines of live files are skipped)."""
    spans = []
    for path in sorted(Path(trace_dir).glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                spans.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return spans


__all__ = ["INVALID_SPAN", "JsonlSpanExporter", "RequestSpans", "SpanKind", "Status", "StatusCode", "continued", "end", "extract", "fail",
           "from_traceparent", "inject", "read_spans", "setup_tracing", "trace_id", "traceparent", "tracer", "use_span"]
