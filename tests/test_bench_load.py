"""The load benchmark's parts: arrival processes (seeded, right mean, right burstiness),
percentile maths against numpy and by hand, SLO attainment and goodput on synthetic
records, SSE parsing over a mock transport, the report writer. No timing assertions.

    .venv/bin/pytest -q tests/test_bench_load.py
"""

from __future__ import annotations

import gzip
import json
import math
import statistics
from collections import Counter

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.bench.arrivals import Arrivals, phased_times
from shared.bench.load import (
    LoadConfig, Mode, balanced_orders, check_loopback, planned_requests, run_load, run_schedule, send,
)
from shared.bench.report import link_readme, read_document, results, targets, write_report
from shared.bench.stats import (
    RequestRecord, Slo, acceptance, cell_stats, chain_label, goodput, median_ci, paired_ratios, percentile,
    slo_attainment, summary,
)

# --- arrival processes -------------------------------------------------------------------


@pytest.mark.parametrize("process", [Arrivals("poisson", 4.0), Arrivals("gamma", 4.0, 0.5)])
def test_arrivals_are_seeded(process):
    assert process.times(30, seed=7) == process.times(30, seed=7)
    assert process.gaps(100, seed=7) == process.gaps(100, seed=7)
    assert process.times(30, seed=7) != process.times(30, seed=8)


@pytest.mark.parametrize("process", [Arrivals("poisson", 5.0), Arrivals("gamma", 5.0, 0.25),
                                     Arrivals("gamma", 0.5, 4.0)])
def test_mean_gap_is_one_over_rate(process):
    n = 50_000
    gaps = process.gaps(n, seed=1)
    # The sample mean's standard error is cv / (rate * sqrt(n)); allow 5 of them.
    tolerance = 5 * process.cv / (process.rate * math.sqrt(n))
    assert abs(statistics.fmean(gaps) - 1 / process.rate) < tolerance


@pytest.mark.parametrize("shape", [0.25, 0.5, 1.0, 4.0])
def test_gamma_burstiness_sets_the_coefficient_of_variation(shape):
    gaps = Arrivals("gamma", 3.0, shape).gaps(50_000, seed=2)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(shape ** -0.5, rel=0.05)


def test_poisson_is_gamma_with_shape_one():
    gaps = Arrivals("poisson", 3.0).gaps(50_000, seed=3)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)
    assert Arrivals("poisson", 3.0).cv == Arrivals("gamma", 3.0, 1.0).cv == 1.0


def test_times_stay_in_the_window_and_under_the_count():
    times = Arrivals("poisson", 20.0).times(50, seed=0, start_s=10)
    assert times == sorted(times) and 10 < times[0] and times[-1] < 60
    assert abs(len(times) - 1000) < 5 * math.sqrt(1000)  # Poisson count: mean = var = rate * duration
    assert len(Arrivals("poisson", 20.0).times(50, seed=0, max_requests=17)) == 17


def test_phased_times_follow_their_phases():
    phases = [(Arrivals("poisson", 2.0), 100.0), (Arrivals("poisson", 20.0), 100.0), (Arrivals("poisson", 2.0), 100.0)]
    out = phased_times(phases, seed=0)
    assert [t for t, _ in out] == sorted(t for t, _ in out)
    for index in range(3):
        times = [t for t, p in out if p == index]
        assert all(100 * index <= t < 100 * (index + 1) for t in times)
    counts = [sum(1 for _, p in out if p == i) for i in range(3)]
    assert counts[1] > 5 * max(counts[0], counts[2])


@pytest.mark.parametrize("kwargs", [{"kind": "uniform", "rate": 1.0}, {"kind": "poisson", "rate": 0.0},
                                    {"kind": "gamma", "rate": 1.0, "shape": -1.0}])
def test_bad_arrival_processes_are_refused(kwargs):
    with pytest.raises(ValueError):
        Arrivals(**kwargs)


def test_every_mode_of_a_cell_gets_the_same_schedule():
    cfg = LoadConfig(url="http://127.0.0.1:1", duration_s=20)
    assert cfg.schedule("gamma", 4.0) == cfg.schedule("gamma", 4.0)
    assert cfg.schedule("gamma", 4.0) != cfg.schedule("poisson", 4.0)
    assert {p for _, p in cfg.phased_schedule()} == {0, 1, 2}
    assert cfg.schedule("gamma", 4.0, 1) == cfg.schedule("gamma", 4.0, 1) != cfg.schedule("gamma", 4.0, 0)


def test_rounds_run_every_mode_once_each_and_change_who_follows_whom():
    cfg = LoadConfig(url="http://127.0.0.1:1", rates=[1.0, 8.0], modes=["off", "drafter,target", "adaptive"],
                     processes=["poisson"], repeats=3)
    rounds = cfg.rounds()
    assert len(rounds) == 2 * 3 * 3 and [r[:2] for r in rounds] == [("poisson", 1.0)] * 9 + [("poisson", 8.0)] * 9
    by_round = [[m for _, rate, i, m in rounds if rate == 1.0 and i == n] for n in range(3)]
    assert by_round == [["off", "drafter,target", "adaptive"], ["adaptive", "drafter,target", "off"],
                        ["drafter,target", "adaptive", "off"]]
    assert [m for *_, m in LoadConfig(url="", modes=["off", "adaptive"]).rounds()] == ["off", "adaptive"] * 8


@pytest.mark.parametrize("n", range(1, 9))
def test_balanced_orders_put_every_mode_after_every_other_equally_often(n):
    orders = balanced_orders(n)
    assert len(orders) == (n if n % 2 == 0 or n == 1 else 2 * n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    follows = Counter((a, b) for order in orders for a, b in zip(order, order[1:]))
    assert set(follows) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert set(follows.values()) <= {1 if n % 2 == 0 else 2}
    assert orders[0][0] == 0


# --- statistics ---------------------------------------------------------------------------


def test_percentile_by_hand():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([4, 1, 3, 2], 0) == 1 and percentile([4, 1, 3, 2], 100) == 4
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60), st.floats(0, 100))
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-6)


def test_summary_of_values_and_of_none():
    s = summary([10.0, 20.0, 30.0])
    assert s == {"n": 3, "mean": 20.0, "p50": 20.0, "p90": 28.0, "p99": pytest.approx(29.8)}
    assert summary([]) == {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None}


def record(ttft=0.05, e2e=0.35, tokens=31, error="", **kw) -> RequestRecord:
    return RequestRecord(mode=kw.pop("mode", "off"), process="poisson", rate=1.0, scheduled_s=kw.pop("at", 0.0),
                         ttft_s=ttft, e2e_s=e2e, output_tokens=tokens, error=error, **kw)


SLO = Slo(ttft_s=0.1, tpot_s=0.02)


def test_slo_met_cases():
    assert record().tpot_s == pytest.approx(0.01)
    assert SLO.met(record())
    assert not SLO.met(record(ttft=0.2))                  # TTFT over
    assert not SLO.met(record(e2e=0.05 + 30 * 0.03))      # TPOT over
    assert SLO.met(record(tokens=1, e2e=0.05))            # one token: TTFT only
    assert not SLO.met(record(error="HTTP 503: no target worker"))
    assert not SLO.met(record(ttft=None, e2e=None, tokens=0))


def test_goodput_and_attainment_on_synthetic_records():
    records = [record() for _ in range(7)] + [record(ttft=0.5), record(error="cancelled"), record(e2e=2.0)]
    assert slo_attainment(records, SLO) == pytest.approx(0.7)
    assert goodput(records, SLO, wall_s=5.0) == pytest.approx(1.4)
    assert slo_attainment([], SLO) is None and goodput(records, SLO, 0.0) == 0.0


def test_acceptance_sums_per_level():
    records = [record(levels=[{"name": "drafter", "drafted": 8, "accepted": 6},
                              {"name": "verifier", "drafted": 4, "accepted": 1}]),
               record(levels=[{"name": "drafter", "drafted": 2, "accepted": 0}]), record()]
    acc = acceptance(records)
    assert acc["drafter"] == {"drafted": 10, "accepted": 6, "rate": 0.6}
    assert acc["verifier"]["rate"] == 0.25


def test_cell_stats_pool_itl_and_count_failures():
    records = [record(itl_s=[0.01, 0.02], chain=["target"]), record(itl_s=[0.03], chain=["target"]),
               record(error="HTTP 500: boom")]
    s = cell_stats(records, SLO, wall_s=2.0)
    assert (s["requests"], s["completed"], s["failed"]) == (3, 2, 1)
    assert s["throughput_rps"] == 1.0 and s["output_tokens_per_s"] == 31.0
    assert s["itl_ms"]["n"] == 3 and s["itl_ms"]["p50"] == pytest.approx(20.0)
    assert s["chains"] == {"target": 2} and s["errors"] == ["HTTP 500: boom"]
    assert chain_label(["drafter", "target"], [4]) == "drafter,target k=4" and chain_label([], []) == "?"


# --- the driver ----------------------------------------------------------------------------


def test_modes_and_loopback():
    assert Mode.parse("off", 4).speculation == {"enabled": False}
    assert Mode.parse("adaptive", 4).speculation is None
    assert Mode.parse(" drafter, target ", 3) == Mode("drafter,target", {"chain": "drafter,target", "k": 3})
    for bad in ("drafter", "target,drafter", ""):
        with pytest.raises(ValueError):
            Mode.parse(bad, 4)
    for ok in ("http://127.0.0.1:18000", "http://localhost:1", "http://[::1]:8000", "http://127.3.2.1"):
        check_loopback(ok)
    for bad in ("http://10.0.0.1:18000", "https://example.com", "http://0.0.0.0:1"):
        with pytest.raises(ValueError):
            check_loopback(bad)


def sse(*chunks) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


SPEC = {"chain": ["drafter", "target"], "k": [4],
        "levels": [{"name": "drafter", "drafted": 8, "accepted": 5, "acceptance_rate": 0.625}]}
STREAM = sse({"choices": [{"text": "a", "token_ids": [1]}]},
             {"choices": [{"text": "bc", "token_ids": [2, 3]}]},
             {"choices": [{"text": "d", "token_ids": [4]}]},
             {"choices": [{"text": "", "finish_reason": "length"}], "speculation": SPEC},
             {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}})


def mock_client(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url="http://127.0.0.1:1", transport=httpx.MockTransport(handler))


async def test_send_reads_tokens_chain_and_usage():
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, content=STREAM, headers={"content-type": "text/event-stream"})

    r = record(ttft=None, e2e=None, tokens=0)
    async with mock_client(handler) as client:
        await send(client, {"prompt": "x"}, r)
    assert r.ok and r.error == ""
    assert r.output_tokens == 4 and len(r.itl_s) == 2 and r.prompt_tokens == 9
    assert r.chain == ["drafter", "target"] and r.k == [4]
    assert r.levels == [{"name": "drafter", "drafted": 8, "accepted": 5}]
    assert r.e2e_s >= r.ttft_s


@pytest.mark.parametrize("response, error", [
    (httpx.Response(400, json={"error": {"message": "speculation.chain 'x' is not served"}}), "HTTP 400: speculation"),
    (httpx.Response(200, content=sse({"choices": [{"token_ids": [1]}]}, {"error": {"message": "worker died"}})),
     "stream error: worker died"),
    (httpx.Response(200, content=b"data: [DONE]\n\n"), "no token received"),
])
async def test_send_turns_failures_into_errors(response, error):
    r = record(ttft=None, e2e=None, tokens=0)
    async with mock_client(lambda request: response) as client:
        await send(client, {}, r)
    assert r.error.startswith(error) and not r.ok


def test_sse_lines_become_chunks_and_an_error_event_raises():
    from shared.bench.sse import StreamError, chunk_of

    assert chunk_of('data: {"choices": []}') == {"choices": []}
    assert chunk_of("data: [DONE]") is None and chunk_of("") is None and chunk_of(": keep-alive") is None
    with pytest.raises(StreamError, match="worker died"):
        chunk_of('data: {"error": {"message": "worker died", "type": "server_error"}}')


async def test_run_schedule_sends_each_arrival_with_the_mode():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=STREAM)

    cfg = LoadConfig(url="http://127.0.0.1:1", max_tokens=8)
    prompts = [("code", "def f("), ("prose", "The sea")]
    done = []
    async with mock_client(handler) as client:
        records, wall = await run_schedule(client, [(0.0, 0), (0.01, 0), (0.02, 1)], Mode.parse("drafter,target", 4),
                                           prompts, cfg, "phased", [1.0, 5.0], done.append)
    assert len(records) == len(seen) == len(done) == 3 and wall > 0
    assert all(b["speculation"] == {"chain": "drafter,target", "k": 4, "slo_tpot_ms": cfg.slo_tpot_ms}
               and b["max_tokens"] == 8 for b in seen)
    assert [r.rate for r in records] == [1.0, 1.0, 5.0] and all(r.ok for r in records)


async def test_a_cell_pools_its_rounds_and_the_modes_alternate(monkeypatch):
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body["max_tokens"] == 8:  # not the warm-up
            spec = body["speculation"]
            sent.append("off" if spec.get("enabled") is False else spec.get("chain", "adaptive"))
        return httpx.Response(200, content=STREAM)

    real = httpx.AsyncClient
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real(**kw, transport=httpx.MockTransport(handler)))
    cfg = LoadConfig(url="http://127.0.0.1:1", rates=[20.0], modes=["off", "drafter,target", "adaptive"],
                     processes=["poisson"], duration_s=0.4, max_tokens=8, repeats=2, phase_s=0.0)
    raw = await run_load(cfg)
    runs = [m for i, m in enumerate(sent) if i == 0 or sent[i - 1] != m]
    assert runs == ["off", "drafter,target", "adaptive", "drafter,target", "off"]  # round 2 mirrors round 1
    assert [(c["mode"], c["rounds"]) for c in raw["cells"]] == [("off", 2), ("drafter,target", 2), ("adaptive", 2)]
    per_round = [len(cfg.schedule("poisson", 20.0, i)) for i in range(2)]
    assert min(per_round) > 0 and 3 * sum(per_round) == planned_requests(cfg)
    for cell in raw["cells"]:
        assert [r.round for r in cell["records"]] == [0] * per_round[0] + [1] * per_round[1]
        assert sent.count(cell["mode"]) == sum(per_round) and cell["wall_s"] >= 2 * 0.3


# --- the report ------------------------------------------------------------------------------


def synthetic_run(cfg: LoadConfig) -> dict:
    cells = []
    for process, rate, mode in cfg.cells():
        slow = 1 + rate * (0.5 if mode == "off" else 1.0)
        recs = [record(mode=mode, ttft=0.02 * slow, e2e=0.02 * slow + 31 * 0.004 * slow, itl_s=[0.004 * slow] * 30,
                       chain=["target"] if mode == "off" else ["drafter", "target"], at=i / rate,
                       levels=[] if mode == "off" else [{"name": "drafter", "drafted": 40, "accepted": 30}])
                for i in range(int(rate * cfg.duration_s))]
        cells.append({"process": process, "rate": rate, "mode": mode, "wall_s": cfg.duration_s, "records": recs})
    phased = [record(mode="adaptive", at=t, phase=p, chain=["target"] if p == 1 else ["drafter", "target"])
              for t, p in cfg.phased_schedule()]
    return {"cells": cells, "phased": {"mode": "adaptive", "rates": cfg.phased_rates, "phase_s": cfg.phase_s,
                                       "wall_s": 3 * cfg.phase_s, "records": phased}}


def test_report_writes_json_markdown_and_plots(tmp_path):
    cfg = LoadConfig(url="http://127.0.0.1:1", rates=[1.0, 4.0], modes=["off", "drafter,target", "adaptive"],
                     duration_s=5.0, phased_rates=[1.0, 6.0, 1.0], phase_s=5.0)
    doc = results(synthetic_run(cfg), cfg, {"date": "2026-01-01", "family": "tiny", "threads_per_process": 1})
    written = write_report(doc, tmp_path / "2026-01-01")
    names = {p.name for p in written}
    assert names == {"results.json", "records.jsonl.gz", "summary.md", "latency_vs_rate.png", "slo_vs_rate.png",
                     "chains_over_time.png"}
    for png in (p for p in written if p.suffix == ".png"):
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = json.loads((tmp_path / "2026-01-01" / "results.json").read_text())
    assert len(again["cells"]) == 2 * 2 * 3 and again["phased"]["phases"][1]["rate"] == 6.0
    assert "records" not in again and len(again["phased"]["records"]) == len(cfg.phased_schedule())
    with gzip.open(tmp_path / "2026-01-01" / "records.jsonl.gz", "rt") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == sum(c["stats"]["requests"] for c in again["cells"])
    assert all("slo_met" in r and "itl_s" not in r for r in records)
    # The folder can be rebuilt from results.json alone.
    assert (tmp_path / "again" / "chains_over_time.png") in write_report(again, tmp_path / "again")
    md = (tmp_path / "2026-01-01" / "summary.md").read_text()
    assert "| rate/s | mode | sent |" in md and "## poisson arrivals" in md and "## gamma arrivals" in md
    assert "## Targets (issue 8)" in md and "## Phased run" in md and "![chains_over_time](chains_over_time.png)" in md
    assert md.count("| 4 | adaptive |") == 2 and "drafter,target x" in md


def test_targets_compare_adaptive_with_static_modes():
    def cell(rate, mode, att, good, tpot):
        return {"process": "poisson", "rate": rate, "mode": mode,
                "stats": {"slo_attainment": att, "goodput_rps": good, "tpot_ms": {"p50": tpot}}}

    doc = {"cells": [cell(1, "off", 1.0, 1.0, 3.0), cell(1, "drafter,target", 1.0, 1.0, 5.0),
                     cell(1, "adaptive", 1.0, 1.0, 4.0), cell(8, "off", 0.9, 7.0, 9.0),
                     cell(8, "drafter,target", 0.5, 4.0, 20.0), cell(8, "adaptive", 0.8, 6.0, 10.0)]}
    met = {t["target"]: t["met"] for t in targets(doc)}
    assert met == {"poisson 1/s: adaptive SLO attainment >= every static mode's": True,
                   "poisson 8/s: adaptive SLO attainment >= every static mode's": False,
                   "poisson 8/s (highest): adaptive goodput >= 0.98x no speculation": False,
                   "poisson 1/s (lowest): adaptive TPOT p50 <= the best static chain's": True}
    assert targets({"cells": [c for c in doc["cells"] if c["mode"] != "adaptive"]}) == []


def test_paired_ratios_match_each_request_with_its_twin_of_the_same_round_and_slot():
    def rec(round_, at, tpot, domain="code"):
        return {"round": round_, "scheduled_s": at, "domain": domain, "tpot_s": tpot}

    mine = [rec(0, 0.5, 2.0), rec(1, 0.5, 3.0), rec(0, 1.5, 1.0), rec(0, 2.5, 1.0, "prose"), rec(0, 3.5, None)]
    theirs = [rec(1, 0.5, 2.0), rec(0, 0.5, 1.0), rec(0, 2.5, 1.0), rec(0, 3.5, 1.0)]
    # round 0 slot 0.5 -> 2/1; round 1 slot 0.5 -> 3/2; 1.5 has no twin; 2.5's twin is code; 3.5 has no TPOT
    assert paired_ratios(mine, theirs) == [2.0, 1.5]


def test_median_ci_brackets_the_median_and_narrows_with_more_pairs():
    few = [0.9, 1.0, 1.1, 1.2, 0.95, 1.05]
    mid, low, high = median_ci(few)
    assert mid == pytest.approx(statistics.median(few)) and low <= mid <= high
    assert median_ci(few) == median_ci(few)  # seeded: a rebuilt report says the same
    many = few * 20
    _, low2, high2 = median_ci(many)
    assert high2 - low2 < high - low
    assert median_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    assert all(math.isnan(x) for x in median_ci([]))
    with pytest.raises(ValueError):
        median_ci(few, level=1.0)


def test_the_lowest_rate_target_shows_the_paired_comparison(tmp_path):
    cfg = LoadConfig(url="http://127.0.0.1:1", rates=[1.0, 4.0], modes=["off", "drafter,target", "adaptive"],
                     duration_s=5.0, phase_s=0)
    doc = results(synthetic_run(cfg), cfg, {"date": "2026-01-01"})
    low = [t for t in targets(doc) if "(lowest)" in t["target"]]
    # synthetic_run gives every chain mode the same times: each pair's ratio is 1
    assert low and all("TPOT 1.000x (95% CI 1.000-1.000, slower in 0 of 5)" in t["measured"] for t in low)
    write_report(doc, tmp_path / "run")
    again = read_document(tmp_path / "run" / "results.json", (tmp_path / "run" / "results.json").read_text())
    assert len(again["records"]) == len(doc["records"]) and targets(again) == targets(doc)


def test_link_readme_rewrites_only_its_line(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# X\n\n## Tests and benchmarks\nLatest load benchmark: [old](old)\nmore\n")
    summary = tmp_path / "bench" / "results" / "2026-01-02" / "summary.md"
    assert link_readme(readme, summary)
    assert readme.read_text() == ("# X\n\n## Tests and benchmarks\nLatest load benchmark: "
                                  "[bench/results/2026-01-02/summary.md](bench/results/2026-01-02/summary.md)\nmore\n")
    (tmp_path / "OTHER.md").write_text("no marker\n")
    assert not link_readme(tmp_path / "OTHER.md", summary)


# --- the real stack ---------------------------------------------------------------------------


@pytest.mark.stack
async def test_load_against_the_real_stack(stack, tmp_path):
    """2 rates x 2 modes x a few requests through the gateway, then the report."""
    from shared.bench.load import run_load

    _, settings_ = stack
    cfg = LoadConfig(url=settings_.gateway.http_url, rates=[1.0, 3.0], modes=["off", "drafter,target"],
                     processes=["poisson"], duration_s=2.0, max_requests=5, drain_s=20.0, max_tokens=8,
                     prompts_per_domain=2, phase_s=0.0)
    raw = await run_load(cfg)
    assert [(c["rate"], c["mode"]) for c in raw["cells"]] == [(1.0, "off"), (1.0, "drafter,target"),
                                                              (3.0, "off"), (3.0, "drafter,target")]
    for cell in raw["cells"]:
        for r in cell["records"]:
            assert r.ok, r.error
            assert r.output_tokens == 8 and r.prompt_tokens > 0
            assert r.chain == (["target"] if cell["mode"] == "off" else ["drafter", "target"])
    doc = results(raw, cfg, {"date": "smoke", "family": "tiny", "threads_per_process": 1})
    assert (tmp_path / "r" / "summary.md") in write_report(doc, tmp_path / "r")


def test_a_low_rate_cell_grows_to_hold_the_minimum_requests():
    cfg = LoadConfig(url="", rates=[0.5, 1.0, 8.0], duration_s=6.0, min_requests=12)
    assert [cfg.window(r) for r in cfg.rates] == [24.0, 12.0, 6.0]
    assert LoadConfig(url="", duration_s=6.0).window(1.0) == 6.0  # off by default
    times = [t for t, _ in cfg.schedule("poisson", 0.5)]
    assert times and max(times) > 6.0 and max(times) < 24.0
    assert max(t for t, _ in cfg.schedule("poisson", 8.0)) < 6.0


def test_every_request_carries_a_cache_salt_of_its_own():
    """The modes of a cell run the same prompts: no request may start on a head the model
    services cached for another (prefix caching would flatter whichever mode runs later)."""
    from shared.bench.load import request_body

    mode = Mode.parse("drafter,target", 3)
    salts = {request_body(mode, "same prompt", 8)["cache_salt"] for _ in range(50)}
    assert len(salts) == 50 and all(len(s) >= 16 for s in salts)


def test_the_paired_interval_resamples_rounds_not_requests():
    from shared.bench.report import _paired

    def rec(cell, round_, at, tpot):
        return {"cell": cell, "round": round_, "scheduled_s": at, "domain": "code", "tpot_s": tpot}

    cells = [{"process": "poisson", "rate": 1.0, "mode": m} for m in ("ngram,target", "adaptive")]
    # round 0: adaptive as fast as its twins; round 1 (a slow stretch of the machine): 1.2x on every request
    records = [rec(0, r, t, 1.0) for r in (0, 1) for t in range(12)]
    records += [rec(1, 0, t, 1.0) for t in range(12)] + [rec(1, 1, t, 1.2) for t in range(12)]
    text = _paired({"cells": cells, "records": records}, "poisson", 1.0, "ngram,target")
    # per request the interval would be narrow around 1.1; two rounds resampled: from one round twice to the other
    assert "TPOT 1.100x (95% CI 1.000-1.200, resampling its 2 rounds, slower in 12 of 24)" in text


def test_the_lowest_rate_ceiling_takes_each_class_from_its_own_best_chain():
    from shared.bench.report import _ceiling

    def rec(cell, round_, domain, tpot, prompt_tokens=40):
        return {"cell": cell, "round": round_, "domain": domain, "tpot_s": tpot, "prompt_tokens": prompt_tokens}

    cells = [{"process": "poisson", "rate": 1.0, "mode": m} for m in ("ngram,target", "drafter,target", "adaptive")]
    # ngram is the faster on code, the drafter on prose, in both rounds
    records = [rec(0, r, "code", 0.002) for r in (0, 1) for _ in range(3)] + [rec(0, r, "prose", 0.004) for r in (0, 1) for _ in range(3)]
    records += [rec(1, r, "code", 0.005) for r in (0, 1) for _ in range(3)] + [rec(1, r, "prose", 0.003) for r in (0, 1) for _ in range(3)]
    records += [rec(2, 0, "code", 0.001)]  # adaptive's own requests are not a static chain's
    doc = {"cells": cells, "records": records}
    text = _ceiling(doc, "poisson", 1.0, ["ngram,target", "drafter,target"])
    assert "TPOT p50 2.50 ms in sample, 2.50 cross-validated over rounds" in text  # median of 2s and 3s
    assert "(code-short ngram,target, prose-short drafter,target)" in text
    # a drafter fast on prose in round 0 only (a fast stretch): in sample it is chosen, but chosen on
    # round 1 it is not taken for round 0, and chosen on round 0 it is slow in round 1
    records[-7:-1] = [rec(1, 0, "prose", 0.001)] * 3 + [rec(1, 1, "prose", 0.0045)] * 3
    lucky = _ceiling(doc, "poisson", 1.0, ["ngram,target", "drafter,target"])
    assert "TPOT p50 2.00 ms in sample, 3.00 cross-validated over rounds" in lucky
    one_round = _ceiling({"cells": cells, "records": [rec(0, 0, "code", 0.002)]}, "poisson", 1.0, ["ngram,target"])
    assert "in sample" in one_round and "cross-validated" not in one_round
    assert _ceiling({"cells": cells, "records": []}, "poisson", 1.0, ["ngram,target"]) == ""
    # a class only one round has: no other round chooses for it, and nothing fails
    apart = _ceiling({"cells": cells, "records": [rec(0, 0, "code", 0.002), rec(1, 1, "prose", 0.003)]}, "poisson", 1.0,
                     ["ngram,target", "drafter,target"])
    assert "2.50 ms in sample (code-short ngram,target, prose-short drafter,target)" in apart
    long_prompt = _ceiling({"cells": cells, "records": [rec(0, 0, "code", 0.002, prompt_tokens=400)]}, "poisson", 1.0,
                           ["ngram,target"])
    assert "code-long ngram,target" in long_prompt
