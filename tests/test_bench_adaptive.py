"""The statistics and verdict of `specmesh bench adaptive` on synthetic runs (no stack, no clock).

Run: `.venv/bin/pytest -q tests/test_bench_adaptive.py`.
"""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from shared.bench.adaptive import (ADAPTIVE, GROUPS, NO_SPECULATION, ceiling, ceiling_text, default_slo, group_of,
                                   markdown, per_prompt, per_view, percentile, summarise, summarise_all, verdict)
from shared.cli.adaptive_bench import order


def run(tokens: int, seconds: float, n: int = 4, tpot: float = 5.0, chain: str = "x", errors: int = 0) -> dict:
    """`n` requests sharing `tokens` output tokens in `seconds` of wall time."""
    results = [{"tokens": tokens // n + (tokens % n if i == 0 else 0), "ttft_ms": 20.0 + i, "tpot_ms": tpot + i,
                "chain": chain} for i in range(n)]
    return {"results": results, "errors": ["boom"] * errors, "seconds": seconds}


def test_percentile_interpolates_and_is_none_for_nothing():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5


@given(st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1), st.floats(0, 100))
def test_percentile_lies_within_the_values(values, q):
    assert min(values) - 1e-9 <= percentile(values, q) <= max(values) + 1e-9  # up to rounding


def test_summary_pools_tokens_over_seconds_and_keeps_each_repeat():
    s = summarise([run(400, 2.0), run(400, 4.0)], slo_ms=6.5)
    assert s["tokens_per_s"] == pytest.approx(800 / 6.0, abs=0.01)
    assert s["tokens_per_s_by_repeat"] == [200.0, 100.0]
    assert s["requests"] == 8 and s["tokens"] == 800
    assert s["slo_attainment"] == 0.5  # TPOTs 5, 6, 7, 8 twice: two of four <= 6.5
    assert "chains_used" not in s
    assert summarise([run(400, 2.0, chain="a"), run(400, 2.0, chain="b")], None)["chains_used"] == {"a": 4, "b": 4}
    assert s["tpot_p50_ms_by_domain"] == {}  # no domains given


def test_tpot_by_prompt_domain():
    r = run(400, 2.0)  # TPOTs 5, 6, 7, 8
    for result, domain in zip(r["results"], ("code", "prose", "code", "prose")):
        result["domain"] = domain
    assert summarise([r], None)["tpot_p50_ms_by_domain"] == {"code": 6.0, "prose": 7.0}


def test_the_workload_alternates_domains_and_lengths():
    from shared.cli.adaptive_bench import workload

    prompts = workload(8)
    assert [d for _, d in prompts] == ["code", "code", "prose", "prose"] * 2
    assert [len(p) > 400 for p, _ in prompts] == [False, True] * 4


def test_overall_merges_each_repeats_low_and_high_runs():
    views = per_view({"low": [run(100, 1.0), run(100, 2.0)], "high": [run(300, 1.0), run(300, 2.0)]})
    assert [v["seconds"] for v in views["overall"]] == [2.0, 4.0]
    assert [len(v["results"]) for v in views["overall"]] == [8, 8]


def test_default_slo_is_twice_the_low_phase_median_without_speculation():
    runs = {NO_SPECULATION: {"low": [run(100, 1.0, tpot=4.0), run(100, 1.0, tpot=6.0)], "high": [run(100, 1.0, tpot=50.0)]}}
    assert default_slo(runs) == pytest.approx(2 * 6.5)  # TPOTs 4..7 and 6..9: median 6.5
    assert default_slo({}) is None


def table(rates: dict[str, dict[str, list[float]]]) -> dict:
    """Runs from tokens/s per configuration, phase and repeat (1 s each)."""
    return {c: {p: [run(x, 1.0, chain="ngram,target" if c == ADAPTIVE else c) for x in xs]
                for p, xs in phases.items()} for c, phases in rates.items()}


def test_adaptive_that_wins_every_repeat_meets_every_target():
    runs = table({"drafter,target": {"low": [100, 110, 90], "high": [300, 310, 290]},
                  NO_SPECULATION: {"low": [80, 80, 80], "high": [320, 330, 300]},
                  ADAPTIVE: {"low": [104, 112, 96], "high": [324, 332, 304]}})
    v = verdict(summarise_all(runs, 10.0))
    assert v["low"]["best_static"] == "drafter,target" and v["high"]["best_static"] == NO_SPECULATION
    assert v["low"]["adaptive_vs_best_static_by_repeat"] == [1.04, 1.018, 1.067]
    assert v["low"]["repeats_won"] == 3
    assert [t["met"] for t in v["targets"]] == [True, True, True, True]
    assert all(t["every_repeat"] for t in v["targets"])
    assert "per repeat" in v["targets"][0]["measured"]


def test_a_pooled_margin_that_one_repeat_contradicts_is_met_but_not_in_every_repeat():
    runs = table({"ngram,target": {"low": [100, 100, 100], "high": [300, 300, 300]},
                  NO_SPECULATION: {"low": [50, 50, 50], "high": [200, 200, 200]},
                  ADAPTIVE: {"low": [120, 110, 95], "high": [300, 300, 300]}})
    v = verdict(summarise_all(runs, 10.0))
    low, high, overall, nospec = v["targets"]
    assert low["met"] and not low["every_repeat"]
    assert high["met"] and high["every_repeat"]          # a tie meets ">="
    assert overall["met"] and not overall["every_repeat"]  # 1.012x pooled; repeat 3 lost
    assert nospec["met"] and v["high"]["adaptive_vs_no_speculation"] == 1.5


def test_a_tie_on_the_whole_mix_is_not_strictly_better():
    same = {"low": [100, 100], "high": [300, 300]}
    v = verdict(summarise_all(table({"ngram,target": same, NO_SPECULATION: {"low": [50, 50], "high": [310, 310]},
                                     ADAPTIVE: same}), None))
    assert v["overall"]["adaptive_vs_best_static"] == 1.0
    assert not v["targets"][2]["met"]
    assert not v["targets"][3]["met"]  # 300 / 310 < 0.98


def timed(latencies: list[float], seconds: float = 1.0, order: list[int] | None = None) -> dict:
    """A run whose request for prompt i took latencies[i] ms, finished in `order` (default: the prompts')."""
    order = list(range(len(latencies))) if order is None else order
    return {"results": [{"tokens": 10, "ttft_ms": 1.0, "tpot_ms": 1.0, "chain": "x", "index": i,
                         "latency_ms": latencies[i]} for i in order], "errors": [], "seconds": seconds}


def test_per_prompt_pairs_each_request_with_the_same_prompt_in_the_same_run():
    # the reference's run 2 is slower throughout (drift): pooled, adaptive looks faster; per prompt it is the same
    ada = [timed([100, 200, 300, 400]), timed([100, 200, 300, 400], order=[3, 1, 0, 2])]
    ref = [timed([110, 220, 330, 440]), timed([100, 200, 300, 400])]
    got = per_prompt(ada, ref)
    assert got["pairs"] == 8 and got["runs"] == 2 and got["adaptive_faster"] == 4
    assert got["median"] == pytest.approx(1.05)
    # resampled by run: either run twice (1.0 or 1.1) or both (1.05)
    assert got["ci95"] == [pytest.approx(1.0), pytest.approx(1.1)]
    # sixteen runs of four requests, each run at its own moment's speed: the interval is the runs' spread
    runs_a = [timed([100.0 * (1 + 0.1 * (i % 3 - 1))] * 4) for i in range(16)]
    runs_r = [timed([100.0] * 4) for _ in range(16)]
    wide = per_prompt(runs_a, runs_r)
    assert wide["runs"] == 16 and wide["ci95"][0] < 1.0 < wide["ci95"][1]
    assert per_prompt(ada[:1], ref)["median"] == pytest.approx(1.1)  # only run 1 pairs: zip stops at the shorter
    assert per_prompt([timed([1.0])], [{"results": [{"latency_ms": 1.0}], "errors": [], "seconds": 1.0}]) is None


def test_the_verdict_reports_per_prompt_speed_beside_the_pooled_ratio():
    runs = {"ngram,target": {"low": [timed([100, 100]), timed([100, 100])], "high": [timed([50, 50])] * 2},
            NO_SPECULATION: {"low": [timed([200, 200])] * 2, "high": [timed([80, 80])] * 2},
            ADAPTIVE: {"low": [timed([90, 90]), timed([125, 125])], "high": [timed([50, 50])] * 2}}
    v = verdict(summarise_all(runs, None), runs)
    assert v["low"]["adaptive_vs_best_static_per_prompt"]["pairs"] == 4
    assert v["low"]["adaptive_vs_best_static_per_prompt"]["median"] == pytest.approx((100 / 90 + 0.8) / 2, abs=1e-3)
    assert v["overall"]["adaptive_vs_best_static_per_prompt"]["pairs"] == 8
    assert v["low"]["ceiling"]["best_single"] == "ngram,target" and v["low"]["ceiling"]["in_sample"] == 1.0
    assert "per prompt" in v["targets"][0]["measured"] and "adaptive faster in 2 of 4" in v["targets"][0]["measured"] \
        and "over 2 run pairs" in v["targets"][0]["measured"]
    assert "per prompt" not in verdict(summarise_all(runs, None))["targets"][0]["measured"]  # no runs: pooled only
    # adaptive ran head to head against another configuration: the best static's low runs stop at the
    # repeats, and its high runs still pair with adaptive's high runs (never a low run with a high one)
    runs[ADAPTIVE]["low"].append(timed([10, 10]))
    overall = verdict(summarise_all(runs, None), runs)["overall"]["adaptive_vs_best_static_per_prompt"]
    assert overall["pairs"] == 8 and overall["runs"] == 4
    assert overall["median"] == pytest.approx(1.0) and overall["adaptive_faster"] == 2


def test_the_ceiling_routes_each_class_to_its_own_best_static_configuration():
    # prompts 0-3 are code-short, code-long, prose-short, prose-long; two identical repeats
    runs = {"a": {"low": [timed([100, 100, 100, 100])] * 2},
            "b": {"low": [timed([80, 200, 50, 200])] * 2},
            ADAPTIVE: {"low": [timed([95, 95, 95, 95])] * 2}}
    c = ceiling(runs)
    assert c["best_single"] == "a" and c["repeats"] == 2  # 400 ms a run against b's 530
    assert c["in_sample"] == c["cross_validated"] == pytest.approx(400 / 330, abs=1e-3)
    assert c["groups"] == {"code-short": {"best": "b", "vs_best_single": 1.25}, "code-long": {"best": "a", "vs_best_single": 1.0},
                           "prose-short": {"best": "b", "vs_best_single": 2.0}, "prose-long": {"best": "a", "vs_best_single": 1.0}}
    assert c["adaptive"] == pytest.approx(400 / 380, abs=1e-3)
    text = ceiling_text(c)
    assert "1.212x as fast as a" in text and "prose-short: b 2.000x" in text and "adaptive on the same measure: 1.053x" in text
    assert ceiling({ADAPTIVE: runs[ADAPTIVE]}) is None and ceiling_text(None) == ""


def test_the_cross_validated_ceiling_does_not_credit_a_lucky_repeat():
    # c and d each beat a on one class in repeat 1 only by luck: in sample they look like a gain,
    # chosen on one repeat and measured on the other they are none
    runs = {"a": {"low": [timed([100, 100, 100, 100])] * 2},
            "c": {"low": [timed([90, 110, 110, 110]), timed([105, 110, 110, 110])]},
            "d": {"low": [timed([110, 110, 90, 110]), timed([110, 110, 105, 110])]}}
    c = ceiling(runs)
    assert c["best_single"] == "a"
    assert c["in_sample"] == pytest.approx(400 / 395, abs=1e-3) and c["in_sample"] > 1
    assert c["cross_validated"] == pytest.approx(800 / 810, abs=1e-3) and c["cross_validated"] < 1
    assert ceiling({"a": {"low": [timed([100] * 4)]}})["cross_validated"] is None  # one repeat: nothing to hold out
    # a repeat that lost a group's requests is not measured, and no configuration with every group: no ceiling
    short = {"results": timed([100, 100])["results"][:1], "errors": ["timeout"], "seconds": 1.0}
    assert ceiling({"a": {"low": [timed([100, 100]), short]}})["cross_validated"] is None
    assert ceiling({"a": {"low": [timed([100, 100])]}, "b": {"low": [timed([100, 100])]}} | {"c": {"low": [short]}},
                   repeats=1)["best_single"] == "a"
    assert ceiling({"a": {"low": [short]}, "b": {"low": [timed([100])]}}) is not None


def test_a_request_keeps_its_group_else_its_prompt_index_gives_it():
    from shared.cli.adaptive_bench import workload

    assert [group_of({"index": i}) for i in range(5)] == [*GROUPS, GROUPS[0]]
    assert group_of({"index": 0, "group": "prose-long"}) == "prose-long" and group_of({}) is None
    prompts = workload(4)  # the workload's order is the groups'
    assert [d for _, d in prompts] == [g.split("-")[0] for g in GROUPS]


def test_markdown_has_a_row_per_configuration_and_view_and_every_target():
    runs = table({"ngram,target": {"low": [100], "high": [300]}, NO_SPECULATION: {"low": [50], "high": [200]},
                  ADAPTIVE: {"low": [101], "high": [301]}})
    summaries = summarise_all(runs, 10.0)
    result = {"family": "tiny", "threads_per_process": 1, "requests_per_phase": 4, "repeats": 1, "max_tokens": 48,
              "concurrency": {"low": 1, "high": 16}, "slo_tpot_ms": 10.0, "configs": summaries,
              "verdict": verdict(summaries)}
    text = markdown(result)
    assert sum(1 for line in text.splitlines() if line.startswith("| ngram,target |")) == 3
    assert "| adaptive | high | 301.0 | 301 |" in text and "ngram,target x4" in text
    assert [line.split(" | ")[-2:] for line in text.splitlines() if "adaptive >" in line] == [["yes", "yes |"]] * 4


def test_each_repeat_starts_the_static_configurations_somewhere_else():
    statics = ["a", "b", "c"]
    assert [order(statics, r)[0] for r in range(4)] == ["a", "b", "c", "a"]
    assert sorted(order(statics, 2)) == statics and order([], 1) == []



def test_static_chains_wait_for_the_router_to_see_every_worker(monkeypatch):
    import asyncio
    from types import SimpleNamespace

    import shared.cli.router_cmd as router_cmd
    from shared.cli.adaptive_bench import _available_chains

    seen = [["verifier"], ["verifier", "drafter-code"], ["verifier", "drafter-code", "drafter-prose"]]
    calls = []

    async def ask(settings):
        calls.append(1)
        return SimpleNamespace(load={"available_models": seen[min(len(calls), len(seen)) - 1]})

    monkeypatch.setattr(router_cmd, "ask_router", ask)
    chains = asyncio.run(_available_chains(None, wait_s=30.0, every_s=0.0))
    assert len(calls) == 3  # asked until every model a served chain needs was up
    assert {"ngram,target", "verifier,target", "drafter-code,target", "fused,target", "fused,verifier,target"} <= set(chains)
    calls.clear()
    seen[:] = [["verifier"]]
    only = asyncio.run(_available_chains(None, wait_s=0.0))  # a worker that never shows: left out after the wait
    assert "verifier,target" in only and not any("drafter" in c or "fused" in c for c in only)


def test_head_to_head_runs_alternate_abba_against_the_best_static_so_far():
    from shared.cli.adaptive_bench import best_static, head_to_head

    assert head_to_head("ngram,target", 2) == ["adaptive", "ngram,target", "ngram,target", "adaptive"]
    assert head_to_head("b", 3)[4:] == ["adaptive", "b"] and head_to_head("b", 0) == []
    runs = {"a": [_run_of(100, 0.5), _run_of(100, 2.5)], "b": [_run_of(100, 1.25)], "adaptive": [_run_of(900, 1.0)]}
    assert best_static(runs, ["a", "b"]) == "b"  # 80 tok/s against 200 over 3 s (pooled, not the best run); adaptive is no static


def _run_of(tokens: int, seconds: float) -> dict:
    return {"results": [{"tokens": tokens, "ttft_ms": 1.0, "tpot_ms": 1.0, "chain": ""}], "errors": [], "seconds": seconds}


def test_a_json_result_keeps_its_requests_and_rescores_to_the_same_verdict(tmp_path):
    import json

    from typer.testing import CliRunner

    from shared.cli.adaptive_bench import rescored, scored
    from shared.cli.main import app as cli

    runs = {"ngram,target": {"low": [timed([100, 100]), timed([100, 100])], "high": [timed([50, 50])] * 2},
            NO_SPECULATION: {"low": [timed([200, 200])] * 2, "high": [timed([80, 80])] * 2},
            ADAPTIVE: {"low": [timed([90, 90]), timed([125, 125])], "high": [timed([50, 50])] * 2}}
    first = json.loads(json.dumps(scored({"family": "tiny", "repeats": 2}, runs, None)))
    assert first["runs"] == runs and first["family"] == "tiny"
    again = rescored(first)
    assert again["verdict"] == first["verdict"] and again["slo_tpot_ms"] == first["slo_tpot_ms"]
    assert rescored(first, slo_tpot_ms=0.5)["configs"][ADAPTIVE]["low"]["slo_attainment"] == 0.0  # TPOTs are 1 ms

    path = tmp_path / "adaptive.json"
    path.write_text(json.dumps(first))
    out = CliRunner().invoke(cli, ["bench", "adaptive", "--rescore", str(path), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["verdict"] == first["verdict"]
    path.write_text(json.dumps({k: v for k, v in first.items() if k != "runs"}))  # summaries only: nothing to score
    out = CliRunner().invoke(cli, ["bench", "adaptive", "--rescore", str(path)])
    assert out.exit_code == 1 and "is not a `bench adaptive --json` result with its runs" in out.output
