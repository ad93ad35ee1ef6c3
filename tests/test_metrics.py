"""Prometheus metrics: the spec-decode counters, KV memory, latencies, and on the real stack
the counters agree with the per-request `speculation` stats of the responses.

Run: `.venv/bin/pytest -q tests/test_metrics.py`.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from shared.metrics import (
    DriverMetrics, GatewayMetrics, SpecDecodeMetrics, counter_value, kv_bytes_in_use, serve_metrics,
)


def test_spec_decode_counters_are_counters_per_level_and_position():
    registry = CollectorRegistry()
    m = SpecDecodeMetrics(registry)
    m.add("drafter-code", drafts=2, drafted=6, accepted=4, accepted_per_pos=[2, 1, 1])
    m.add("drafter-code", drafts=1, drafted=3, accepted=0, accepted_per_pos=[0, 0, 0])
    m.add("verifier", drafts=1, drafted=3, accepted=3, accepted_per_pos=[1, 1, 1])
    level = {"level": "drafter-code"}
    assert counter_value(registry, "specmesh_spec_decode_num_drafts", level) == 3
    assert counter_value(registry, "specmesh_spec_decode_num_draft_tokens", level) == 9
    assert counter_value(registry, "specmesh_spec_decode_num_accepted_tokens", level) == 4
    per_pos = [counter_value(registry, "specmesh_spec_decode_num_accepted_tokens_per_pos", level | {"position": str(j)})
               for j in range(3)]
    assert per_pos == [2, 1, 1]
    assert counter_value(registry, "specmesh_spec_decode_num_accepted_tokens", {"level": "verifier"}) == 3
    kinds = {f.name: f.type for f in text_string_to_metric_families(_text(registry))}
    decode = [name for name in kinds if name.startswith("specmesh_spec_decode") and not name.endswith("_created")]
    assert len(decode) == 4 and all(kinds[name] == "counter" for name in decode)


def test_kv_bytes_count_live_slots():
    from shared.engine.kv_cache import KVCache

    class Runner:
        cache = KVCache(layers=2, slots=4, kv_heads=2, max_len=8, head_dim=4)

    runner = Runner()
    assert kv_bytes_in_use(runner) == 0
    runner.cache.open("a")
    runner.cache.open("b")
    slot = 2 * 2 * 8 * 4 * 4  # layers x kv_heads x max_len x head_dim x float32 bytes
    assert kv_bytes_in_use(runner) == 2 * slot * 2  # two slots, keys and values
    registry = CollectorRegistry()
    DriverMetrics(registry).kv.watch("target", runner)  # read when scraped
    runner.cache.close("a")
    assert registry.get_sample_value("specmesh_kv_cache_bytes_in_use", {"model": "target"}) == slot * 2
    runner.prefix_queried, runner.prefix_hits = 120, 90  # what a runner counts at each prefill
    assert counter_value(registry, "specmesh_prefix_cache_queries", {"model": "target"}) == 120
    assert counter_value(registry, "specmesh_prefix_cache_hits", {"model": "target"}) == 90


def test_gateway_latencies_from_timings():
    registry = CollectorRegistry()
    m = GatewayMetrics(registry)
    m.finished({"first_token_ms": 20.0, "inter_token_ms": 5.0, "total_ms": 100.0}, 7, 16, "length")
    m.finished({"first_token_ms": 30.0, "inter_token_ms": None, "total_ms": 30.0}, 3, 1, "stop")
    assert registry.get_sample_value("specmesh_time_to_first_token_seconds_count") == 2
    assert registry.get_sample_value("specmesh_time_to_first_token_seconds_sum") == pytest.approx(0.05)
    assert registry.get_sample_value("specmesh_inter_token_latency_seconds_count") == 1
    assert registry.get_sample_value("specmesh_e2e_request_latency_seconds_bucket", {"le": "0.1"}) == 2
    assert counter_value(registry, "specmesh_generation_tokens") == 17
    assert counter_value(registry, "specmesh_requests", {"finish_reason": "length"}) == 1


def test_taken_port_falls_back_to_a_free_one():
    registry = CollectorRegistry()
    SpecDecodeMetrics(registry).add("ngram", 1, 2, 1, [1])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = serve_metrics(registry, "127.0.0.1", taken.getsockname()[1])
        assert port != taken.getsockname()[1]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'specmesh_spec_decode_num_draft_tokens_total{level="ngram"} 2.0' in text


def _text(registry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


# -- on the real stack -----------------------------------------------------------------------
def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one /metrics page."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metrics_url(env, service: str, model: str | None = None) -> str:
    """The metrics URL an instance of `service` announces (the one hosting `model`, if given)."""
    from tests.stack_fixtures import specmesh

    for _ in range(50):  # every instance answers a ping; the first to answer wins it
        meta = json.loads(specmesh(env, "ping", service).stdout)["metadata"]
        if model is None or meta.get("model") == model:
            return meta["metrics"]
    raise AssertionError(f"no {service} instance hosting {model} answered")


@pytest.mark.stack
def test_counters_agree_with_the_responses(stack):
    from services.worker.driver import canonical

    env, settings = stack
    target, drafter = metrics_url(env, "target"), metrics_url(env, "drafter", model="drafter-code")
    gateway = f"{settings.gateway.http_url}/metrics"
    before, gw_before = scrape(target), scrape(gateway)
    bodies = [{"model": "specmesh", "prompt": p, "max_tokens": 16, "temperature": 0,
               "speculation": {"chain": "drafter,verifier,target", "k": 3}}
              for p in ("def fibonacci(n):", "The history of the city")]
    results = [httpx.post(f"{settings.gateway.http_url}/v1/completions", json=b, timeout=120).json() for b in bodies]
    after, gw_after = scrape(target), scrape(gateway)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    want: dict[str, dict] = {}
    for r in results:
        for lv in r["speculation"]["levels"]:
            acc = want.setdefault(canonical(lv["name"]), {"drafted": 0, "accepted": 0, "per_pos": []})
            acc["drafted"] += lv["drafted"]
            acc["accepted"] += lv["accepted"]
            for j, n in enumerate(lv["accepted_per_position"]):
                acc["per_pos"] += [0] * (j + 1 - len(acc["per_pos"]))
                acc["per_pos"][j] += n
    assert set(want) == {"drafter-code", "verifier"}
    for level, w in want.items():
        assert delta("specmesh_spec_decode_num_draft_tokens_total", level=level) == w["drafted"] > 0
        assert delta("specmesh_spec_decode_num_accepted_tokens_total", level=level) == w["accepted"]
        for j, n in enumerate(w["per_pos"]):
            assert delta("specmesh_spec_decode_num_accepted_tokens_per_pos_total", level=level, position=str(j)) == n
        drafts = delta("specmesh_spec_decode_num_drafts_total", level=level)
        assert w["per_pos"][0] <= drafts <= w["drafted"] and drafts > 0

    assert delta("specmesh_driver_batch_size_count") > 0
    assert ("specmesh_kv_cache_bytes_in_use", (("model", "target"),)) in after
    assert ("specmesh_driver_waiting_requests", ()) in after
    assert any(name == "specmesh_rollbacks_total" for name, _ in after) or not any(
        lv["accepted"] < lv["drafted"] for r in results for lv in r["speculation"]["levels"])

    for name in ("specmesh_time_to_first_token_seconds_count", "specmesh_e2e_request_latency_seconds_count",
                 "specmesh_inter_token_latency_seconds_count"):
        assert gw_after[(name, ())] - gw_before.get((name, ()), 0) == 2, name
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    assert gw_after[("specmesh_generation_tokens_total", ())] - gw_before.get(("specmesh_generation_tokens_total", ()), 0) == tokens

    # k pinned: every round verified the whole k, no depth recorded; k left out: the policy steered
    assert delta("specmesh_speculation_depth_count", chain="drafter,verifier,target") == 0
    free = {"model": "specmesh", "prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0,
            "speculation": {"chain": "ngram,target"}}
    assert httpx.post(f"{settings.gateway.http_url}/v1/completions", json=free, timeout=120).status_code == 200
    steered = scrape(target)
    assert steered.get(("specmesh_speculation_depth_count", (("chain", "ngram,target"),)), 0) - \
        before.get(("specmesh_speculation_depth_count", (("chain", "ngram,target"),)), 0) > 0

    level = scrape(drafter)
    assert level[("specmesh_level_calls_total", (("model", "drafter-code"), ("op", "propose")))] > 0
    assert ("specmesh_kv_cache_bytes_in_use", (("model", "drafter-code"),)) in level
    state = scrape(metrics_url(env, "state"))
    assert state[("specmesh_state_commits_total", (("result", "accepted"),))] > 0

    # start-up's heap (torch, transformers, the model or tokenizer) is frozen out of collection
    for page in (steered, level, scrape(gateway)):
        assert page[("specmesh_gc_frozen_objects", ())] > 50_000
        assert page[("specmesh_gc_pause_seconds_count", (("generation", "2"),))] >= 1  # the freeze's own
