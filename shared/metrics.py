"""Prometheus metrics of every SpecMesh process, each on the process's own registry.

The speculative-decoding counters follow vLLM's `spec_decode_*` (prefixed `specmesh_`,
labelled by level: the proposing model): drafts, draft tokens, accepted tokens, accepted
tokens per draft position. The driver adds each request's per-step increments, so the
counters are sums of the per-request `speculation` stats the gateway returns. Latencies
are histograms in the gateway; queue depth and KV memory are read when scraped.

    registry = CollectorRegistry(); metrics = DriverMetrics(registry)
    serve_metrics(registry, "127.0.0.1", 19105)   # or the gateway's FastAPI `/metrics`
"""

from __future__ import annotations

import logging
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("specmesh.metrics")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve `registry` on http://host:port/metrics in a daemon thread; the bound port.

    A taken port falls back to a free one (several replicas on one host, a test stack beside
    a developer's): the caller announces the real one.
    """
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if port == 0:
            raise
        log.warning("metrics port %d is taken (%s); serving on a free port", port, exc)
        server, _ = start_http_server(0, addr=host, registry=registry)
    return server.server_port


class SpecDecodeMetrics:
    """vLLM's spec-decode counters, per proposing level."""

    def __init__(self, registry: CollectorRegistry):
        self.drafts = Counter("specmesh_spec_decode_num_drafts", "Drafts a level proposed to the level above.",
                              ["level"], registry=registry)
        self.draft_tokens = Counter("specmesh_spec_decode_num_draft_tokens", "Tokens a level proposed.",
                                    ["level"], registry=registry)
        self.accepted_tokens = Counter("specmesh_spec_decode_num_accepted_tokens",
                                       "Proposed tokens the level above accepted.", ["level"], registry=registry)
        self.accepted_per_pos = Counter("specmesh_spec_decode_num_accepted_tokens_per_pos",
                                        "Accepted tokens by their position in the draft (0 = first).",
                                        ["level", "position"], registry=registry)

    def add(self, level: str, drafts: int, drafted: int, accepted: int, accepted_per_pos: list[int]) -> None:
        """Add one request's increments for `level` (zeros are skipped)."""
        if drafts:
            self.drafts.labels(level).inc(drafts)
        if drafted:
            self.draft_tokens.labels(level).inc(drafted)
        if accepted:
            self.accepted_tokens.labels(level).inc(accepted)
        for position, n in enumerate(accepted_per_pos):
            if n:
                self.accepted_per_pos.labels(level, str(position)).inc(n)


class DriverMetrics(SpecDecodeMetrics):
    """The target worker's driver: speculation counters, queue, batches, rollbacks, KV memory."""

    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry)
        self.waiting = Gauge("specmesh_driver_waiting_requests", "Requests queued for admission (beyond max_batch).",
                             registry=registry)
        self.live = Gauge("specmesh_driver_live_requests", "Requests being generated.", registry=registry)
        self.batch_size = Histogram("specmesh_driver_batch_size", "Requests per chain step.",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.steps = Counter("specmesh_driver_steps", "Chain steps (one target verification over a batch).",
                             registry=registry)
        self.preemptions = Counter("specmesh_num_preemptions", "Running requests sent back to the waiting queue for a "
                                   "more urgent one (vLLM's num_preemptions); they resume from their committed tokens.",
                                   registry=registry)
        self.depth = Histogram("specmesh_speculation_depth", "Drafts a round verified per request on a chain the "
                               "depth policy steers (speculation.adaptive_depth): the round's depth, at most the "
                               "requests' k.", ["chain"], buckets=list(range(17)), registry=registry)
        self.depth_cut = Counter("specmesh_speculation_depth_cut_rounds", "Rounds the depth policy verified fewer "
                                 "drafts than their requests' k, because more would have cost more than they bring.",
                                 ["chain"], registry=registry)
        self.rollbacks = Counter("specmesh_rollbacks", "KV cache rollbacks, by level (the model rolled back).",
                                 ["level"], registry=registry)
        self.kv = KvMetrics(registry)


class KvMetrics:
    """KV cache memory in use by the live requests of the runners this process hosts, and
    their prefix cache (vLLM's `prefix_cache_queries` / `prefix_cache_hits`, in tokens)."""

    def __init__(self, registry: CollectorRegistry):
        self.bytes = Gauge("specmesh_kv_cache_bytes_in_use", "Bytes of KV cache held by live requests (slots in use).",
                           ["model"], registry=registry)
        self.requests = Gauge("specmesh_kv_cache_requests", "Requests holding KV cache.", ["model"], registry=registry)
        self.prefix = _PrefixCache()
        registry.register(self.prefix)

    def watch(self, model: str, runner) -> None:
        """Report `runner`'s KV use for `model`, computed when scraped (nothing on the token path)."""
        self.bytes.labels(model).set_function(lambda: kv_bytes_in_use(runner))
        self.requests.labels(model).set_function(lambda: kv_requests(runner))
        self.prefix.runners[model] = runner


class _PrefixCache:
    """The runners' prefix-cache totals, read when scraped (counters the runner keeps)."""

    def __init__(self):
        self.runners: dict[str, object] = {}

    def describe(self):
        return []  # read at scrape time only, like a gauge's function

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        queries = CounterMetricFamily("specmesh_prefix_cache_queries", "Prompt tokens prefilled.", labels=["model"])
        hits = CounterMetricFamily("specmesh_prefix_cache_hits",
                                   "Prompt tokens the KV cache already held (prefix caching): not run.", labels=["model"])
        for model, runner in list(self.runners.items()):
            queries.add_metric([model], getattr(runner, "prefix_queried", 0))
            hits.add_metric([model], getattr(runner, "prefix_hits", 0))
        yield queries
        yield hits


class LevelMetrics:
    """A drafter's or verifier's level server."""

    def __init__(self, registry: CollectorRegistry):
        self.calls = Counter("specmesh_level_calls", "LevelCalls served, by operation.", ["model", "op"],
                             registry=registry)
        self.batch_size = Histogram("specmesh_level_batch_size", "Requests per LevelCall.", ["model", "op"],
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.seconds = Histogram("specmesh_level_call_seconds", "Time to serve a LevelCall (queue and model).",
                                 ["model", "op"], buckets=LATENCY_BUCKETS, registry=registry)
        self.kv = KvMetrics(registry)


class StateMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.commits = Counter("specmesh_state_commits", "Commits received, by result (accepted, repeat, refused).",
                               ["result"], registry=registry)
        self.tokens = Counter("specmesh_state_committed_tokens", "Tokens made durable and forwarded.",
                              registry=registry)


class GatewayMetrics:
    """Request latencies and token counts, as a client sees them."""

    def __init__(self, registry: CollectorRegistry):
        self.ttft = Histogram("specmesh_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token = Histogram("specmesh_inter_token_latency_seconds",
                                     "Mean time between output tokens of a request (first to last).",
                                     buckets=LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram("specmesh_e2e_request_latency_seconds", "Arrival to the last token.",
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.requests = Counter("specmesh_requests", "Finished requests, by finish reason (stop, length, error).",
                                ["finish_reason"], registry=registry)
        self.prompt_tokens = Counter("specmesh_prompt_tokens", "Prompt tokens of finished requests.", registry=registry)
        self.generation_tokens = Counter("specmesh_generation_tokens", "Output tokens of finished requests.",
                                         registry=registry)
        self.responses_stored = Counter("specmesh_responses_stored", "Responses API answers to keep, by outcome "
                                        "(stored, or failed: answered with store false).", ["outcome"],
                                        registry=registry)
        self.background_responses = Gauge("specmesh_background_responses",
                                          "Background responses this gateway is generating.", registry=registry)

    def finished(self, timings: dict, prompt_tokens: int, output_tokens: int, finish_reason: str) -> None:
        """Record one finished request from its `timings` (milliseconds, as in the response)."""
        for histogram, key in ((self.ttft, "first_token_ms"), (self.inter_token, "inter_token_ms"),
                               (self.e2e, "total_ms")):
            value = timings.get(key)
            if value is not None:
                histogram.observe(value / 1e3)
        self.requests.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)


# -- KV memory of a runner ----------------------------------------------------------------
def kv_bytes_in_use(runner) -> float:
    """Bytes of KV cache the live requests hold: slots in use x slot size (lean), tensor bytes (HF)."""
    cache = getattr(runner, "cache", None)
    if cache is not None and hasattr(cache, "k"):
        slot_bytes = (cache.k[:, 0].numel() * cache.k.element_size()) * 2  # keys and values
        return float(cache.active * slot_bytes)
    caches = getattr(runner, "_caches", None)
    if caches is None:
        return 0.0
    total = 0
    try:
        for c in list(caches.values()):
            for layer in getattr(c, "layers", []):
                for name in ("keys", "values"):
                    t = getattr(layer, name, None)
                    if t is not None and hasattr(t, "numel"):
                        total += t.numel() * t.element_size()
    except RuntimeError:  # the model thread changed the dict while we read it: report next scrape
        return 0.0
    return float(total)


def kv_requests(runner) -> float:
    cache = getattr(runner, "cache", None)
    if cache is not None and hasattr(cache, "active"):
        return float(cache.active)
    return float(len(getattr(runner, "_caches", {}) or {}))


def counter_value(registry: CollectorRegistry, name: str, labels: dict | None = None) -> float:
    """The current value of counter `name` (without `_total`) with exactly `labels`, 0 if unseen."""
    value = registry.get_sample_value(f"{name}_total", labels or {})
    return value or 0.0


__all__ = ["CollectorRegistry", "DriverMetrics", "GatewayMetrics", "KvMetrics", "LevelMetrics", "SpecDecodeMetrics",
           "StateMetrics", "counter_value", "kv_bytes_in_use", "serve_metrics"]
