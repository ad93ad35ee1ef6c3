"""Statistics of `specmesh bench adaptive` and its verdict on issue 6's targets. Pure, no I/O.

A *run* is one configuration in one phase of one repeat: `{"results": [...], "errors":
[...], "seconds": wall}` where each result is what the client measured of one request
(`tokens`, `ttft_ms`, `tpot_ms`, `chain`). Repeats are interleaved (every configuration
runs once per repeat, in the same conditions as the others of that repeat), so
configurations are compared **per repeat** (paired) as well as pooled: the spread of the
per-repeat ratios says whether a margin is larger than run-to-run variation.
"""

from __future__ import annotations

import statistics
from collections import Counter

from shared.bench import stats

ADAPTIVE = "adaptive"
NO_SPECULATION = "target"
PHASES = ("low", "high")
VIEWS = PHASES + ("overall",)
NO_SPEC_FLOOR = 0.98  # issue 6: under load, adaptive >= 0.98x no speculation
GROUPS = ("code-short", "code-long", "prose-short", "prose-long")  # the workload's order: prompt i is GROUPS[i % 4]


def percentile(values: list[float], q: float) -> float | None:
    """`shared.bench.stats.percentile` (linear interpolation, as numpy), None for no values."""
    return stats.percentile(values, q) if values else None


def tokens_per_s(runs: list[dict]) -> float:
    """Output tokens over wall time, pooled over `runs`."""
    seconds = sum(run["seconds"] for run in runs)
    return sum(r["tokens"] for run in runs for r in run["results"]) / seconds if seconds > 0 else 0.0


def summarise(runs: list[dict], slo_ms: float | None, chains_used: bool = False) -> dict:
    """Pooled statistics of `runs`: tokens/s, TPOT p50/p99, TTFT p50, SLO attainment."""
    results = [r for run in runs for r in run["results"]]
    tpots = [r["tpot_ms"] for r in results if r["tpot_ms"] is not None]
    ttfts = [r["ttft_ms"] for r in results if r["ttft_ms"] is not None]
    out = {
        "requests": len(results), "errors": sum(len(run["errors"]) for run in runs),
        "tokens": sum(r["tokens"] for r in results), "seconds": _r(sum(run["seconds"] for run in runs)),
        "tokens_per_s": round(tokens_per_s(runs), 2),
        "tokens_per_s_by_repeat": [round(tokens_per_s([run]), 2) for run in runs],
        "tpot_p50_ms": _r(percentile(tpots, 50)), "tpot_p99_ms": _r(percentile(tpots, 99)),
        "ttft_p50_ms": _r(percentile(ttfts, 50)),
        "slo_attainment": round(sum(1 for t in tpots if t <= slo_ms) / len(tpots), 4) if tpots and slo_ms else None,
        # per prompt domain: which chain serves code and prose best is what the router learns per class
        "tpot_p50_ms_by_domain": {d: _r(percentile([r["tpot_ms"] for r in results if r.get("domain") == d
                                                     and r["tpot_ms"] is not None], 50))
                                  for d in sorted({r.get("domain") for r in results if r.get("domain")})},
    }
    chains = Counter(r["chain"] for r in results if r["chain"])
    if chains_used or len(chains) > 1:
        out["chains_used"] = dict(chains.most_common())
    return out


def default_slo(runs: dict[str, dict[str, list[dict]]]) -> float | None:
    """Twice the no-speculation TPOT p50 of the low phase, over every repeat."""
    tpots = [r["tpot_ms"] for run in runs.get(NO_SPECULATION, {}).get("low", []) for r in run["results"]
             if r["tpot_ms"] is not None]
    return 2 * statistics.median(tpots) if tpots else None


def per_view(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """A configuration's runs by phase, plus `overall`: per repeat, its low and high run as one."""
    out = {phase: runs.get(phase, []) for phase in PHASES}
    out["overall"] = [_merge(pair) for pair in zip(*(out[phase] for phase in PHASES))]
    return out


def _merge(runs: tuple[dict, ...]) -> dict:
    return {"results": [r for run in runs for r in run["results"]],
            "errors": [e for run in runs for e in run["errors"]],
            "seconds": sum(run["seconds"] for run in runs)}


def summarise_all(runs: dict[str, dict[str, list[dict]]], slo_ms: float | None) -> dict[str, dict[str, dict]]:
    """`{config: {low|high|overall: summary}}`."""
    return {config: {view: summarise(vruns, slo_ms, chains_used=config == ADAPTIVE)
                     for view, vruns in per_view(phases).items()}
            for config, phases in runs.items()}


def per_prompt(adaptive: list[dict], reference: list[dict], resamples: int = 2000, seed: int = 0) -> dict | None:
    """Adaptive's speed against `reference`'s prompt by prompt: each request of adaptive's
    i-th run over the same prompt's (`index`) in the reference's i-th run (the same repeat,
    or the same head-to-head pair), as the reference's latency over adaptive's (greedy: the
    same tokens, so > 1 is adaptive faster). The median, how many adaptive won, and a 95%
    interval for the median from resampling whole pairs of runs (not requests): the
    requests of one run share its moment's speed (one configuration's 16-request runs at one
    in flight made 107-141 tok/s minutes apart on this 2-core machine), so they are not
    independent pairs and an interval over requests would be far too narrow. None without pairs."""
    groups = []
    for mine, theirs in zip(adaptive, reference):
        by_prompt = {r["index"]: r for r in theirs["results"] if r.get("index") is not None}
        ratios = [by_prompt[r["index"]]["latency_ms"] / r["latency_ms"] for r in mine["results"]
                  if r.get("index") in by_prompt and r["latency_ms"] > 0 and by_prompt[r["index"]]["latency_ms"] > 0]
        if ratios:
            groups.append(ratios)
    if not groups:
        return None
    pooled = [x for g in groups for x in g]
    median, low, high = stats.grouped_median_ci(groups, resamples=resamples, seed=seed)
    return {"pairs": len(pooled), "runs": len(groups), "median": round(median, 3),
            "ci95": [round(low, 3), round(high, 3)], "adaptive_faster": sum(1 for x in pooled if x > 1.0)}


def group_of(result: dict) -> str | None:
    """The prompt group (the router's request class) of one request: its `group`, or from its
    prompt's index in the workload's order (results written before they carried the group)."""
    if result.get("group"):
        return result["group"]
    index = result.get("index")
    return None if index is None else GROUPS[index % len(GROUPS)]


def ceiling(runs: dict[str, dict[str, list[dict]]], phase: str = "low", repeats: int | None = None) -> dict | None:
    """How much a router could gain in `phase` by its one lever at one request in flight:
    sending each prompt group (its request class) to that group's own best static
    configuration, against the best single static configuration. None without groups or
    static runs.

    At one request in flight requests do not share rounds, so a configuration's time is the
    sum of its requests' latencies: per configuration and group, the mean latency over the
    first `repeats` runs (the interleaved repeats, not the head-to-head runs only two
    configurations have), times the group's requests per run. `in_sample`: the best single
    configuration's time over the per-group best's, both chosen and measured on the same
    runs (the minimum of a dozen noisy means is low by luck, so this overstates the gain);
    `cross_validated`: each repeat measured with the choices made on the others (needs two
    repeats; what a router that learnt from the other repeats would get). `adaptive`: the
    best single configuration's time over adaptive's, on the same measure. The static
    configurations take the router's k for their chain, so the only gain left is the chain
    per class. Under load the router puts every class on one chain (rule 5), so there the
    ceiling is the best single configuration itself.
    """
    statics = [c for c in runs if c != ADAPTIVE and runs[c].get(phase)]
    if not statics:
        return None
    n = repeats or min(len(runs[c][phase]) for c in statics)

    def cells(config: str, picked: list[int]) -> dict[str, float]:  # group -> mean latency over the picked runs
        sums: dict[str, list[float]] = {}
        for i in picked:
            for r in runs[config][phase][i]["results"] if i < len(runs[config][phase]) else []:
                g = group_of(r)
                if g is not None and r.get("latency_ms"):
                    sums.setdefault(g, []).append(r["latency_ms"])
        return {g: statistics.fmean(v) for g, v in sums.items()}

    count: Counter = Counter()
    for c in statics:
        for g, k in Counter(group_of(r) for r in runs[c][phase][0]["results"]).items():
            count[g] = max(count[g], k)
    count.pop(None, None)
    if not count:
        return None

    def choose(picked: list[int]) -> tuple[str | None, dict[str, str], dict[str, dict[str, float]]]:
        """The best single configuration (None if none has every group) and each group's best."""
        by = {c: cells(c, picked) for c in statics}
        full = [c for c in statics if all(g in by[c] for g in count)]
        single = min(full, key=lambda c: sum(count[g] * by[c][g] for g in count), default=None)
        per_group = {g: min((c for c in statics if g in by[c]), key=lambda c: by[c][g]) for g in count
                     if any(g in by[c] for c in statics)}
        return single, per_group, by

    def total(by: dict[str, dict[str, float]], pick: dict[str, str]) -> float:
        return sum(count[g] * by[pick[g]][g] for g in count)

    everything = list(range(n))
    single, per_group, by = choose(everything)
    if single is None:  # every configuration lost some group's requests: no common measure
        return None
    single_time = total(by, dict.fromkeys(count, single))
    out = {"phase": phase, "repeats": n, "best_single": single,
           "in_sample": _ratio(single_time, total(by, per_group)),
           "groups": {g: {"best": per_group[g], "vs_best_single": _ratio(by[single][g], by[per_group[g]][g])}
                      for g in sorted(count, key=lambda g: (GROUPS.index(g) if g in GROUPS else len(GROUPS), g))}}
    mine = cells(ADAPTIVE, everything) if runs.get(ADAPTIVE, {}).get(phase) else {}
    out["adaptive"] = _ratio(single_time, sum(count[g] * mine[g] for g in count)) if all(g in mine for g in count) else None
    if n >= 2:
        held_single = held_oracle = 0.0
        for r in everything:
            s, pg, _ = choose([i for i in everything if i != r])
            on_r = {c: cells(c, [r]) for c in statics}
            if s is None or any(g not in pg or g not in on_r[s] or g not in on_r[pg[g]] for g in count):
                continue  # a configuration lost that group's requests in this repeat
            held_single += total(on_r, dict.fromkeys(count, s))
            held_oracle += total(on_r, pg)
        out["cross_validated"] = _ratio(held_single, held_oracle) if held_oracle else None
    else:
        out["cross_validated"] = None
    return out


def verdict(summaries: dict[str, dict[str, dict]], runs: dict[str, dict[str, list[dict]]] | None = None) -> dict:
    """Adaptive against the best static configuration (no speculation included) per view.

    Pooled ratio (tokens/s over tokens/s), the per-repeat ratios against that same
    configuration, and how many repeats adaptive won; given the `runs`, also prompt by
    prompt (`per_prompt`) and, in the low phase, what routing each class to its own best
    static configuration could gain at all (`ceiling`); then issue 6's four targets with `met` judged on the pooled
    ratios and `every_repeat` on the paired ones.
    """
    statics = [c for c in summaries if c != ADAPTIVE]
    out: dict = {}
    for view in VIEWS:
        best = max(statics, key=lambda c: summaries[c][view]["tokens_per_s"])
        ada, ref = summaries[ADAPTIVE][view], summaries[best][view]
        nospec = summaries[NO_SPECULATION][view]
        paired = _paired(ada, ref)
        runner_up = max((c for c in statics if c != best), key=lambda c: summaries[c][view]["tokens_per_s"], default=None)
        out[view] = {
            "best_static": best, "best_static_tokens_per_s": ref["tokens_per_s"],
            "runner_up_static": runner_up,
            "adaptive_tokens_per_s": ada["tokens_per_s"],
            "adaptive_vs_best_static": _ratio(ada["tokens_per_s"], ref["tokens_per_s"]),
            "adaptive_vs_best_static_by_repeat": paired,
            "repeats_won": sum(1 for p in paired if p > 1.0),
            "adaptive_vs_no_speculation": _ratio(ada["tokens_per_s"], nospec["tokens_per_s"]),
            "adaptive_vs_no_speculation_by_repeat": _paired(ada, nospec),
        }
        if runs is not None:
            out[view]["adaptive_vs_best_static_per_prompt"] = per_prompt(*_aligned(runs, best, view))
    if runs is not None:
        out["low"]["ceiling"] = ceiling(runs, "low")
    targets = []
    for phase in PHASES:
        v = out[phase]
        targets.append(_target(f"{phase} phase: adaptive >= the best static chain ({v['best_static']})",
                               v["adaptive_vs_best_static"], v["adaptive_vs_best_static_by_repeat"], 1.0, strict=False,
                               prompts=v.get("adaptive_vs_best_static_per_prompt")))
    v = out["overall"]
    targets.append(_target(f"whole mix: adaptive > every static chain (best: {v['best_static']})",
                           v["adaptive_vs_best_static"], v["adaptive_vs_best_static_by_repeat"], 1.0, strict=True,
                           prompts=v.get("adaptive_vs_best_static_per_prompt")))
    v = out["high"]
    targets.append(_target("high phase: adaptive >= 0.98x no speculation", v["adaptive_vs_no_speculation"],
                           v["adaptive_vs_no_speculation_by_repeat"], NO_SPEC_FLOOR, strict=False))
    out["targets"] = targets
    return out


def _aligned(runs: dict[str, dict[str, list[dict]]], reference: str, view: str) -> tuple[list[dict], list[dict]]:
    """Adaptive's runs and `reference`'s of `view`, the i-th of each phase against the i-th
    (the same repeat, then the same head-to-head pair), both phases for `overall`."""
    mine: list[dict] = []
    theirs: list[dict] = []
    for phase in (PHASES if view == "overall" else (view,)):
        a, b = runs[ADAPTIVE].get(phase, []), runs[reference].get(phase, [])
        n = min(len(a), len(b))  # a reference that was not the head-to-head opponent has no runs there
        mine += a[:n]
        theirs += b[:n]
    return mine, theirs


def _target(name: str, pooled: float, paired: list[float], floor: float, strict: bool,
            prompts: dict | None = None) -> dict:
    ok = (lambda x: x > floor) if strict else (lambda x: x >= floor)
    spread = f" (per repeat {min(paired):.3f}-{max(paired):.3f})" if len(paired) > 1 else ""
    if prompts:
        low, high = prompts["ci95"]
        spread += (f"; per prompt {prompts['median']:.3f}x (95% CI over {prompts['runs']} run pairs {low:.3f}-{high:.3f}, "
                   f"adaptive faster in {prompts['adaptive_faster']} of {prompts['pairs']})")
    return {"target": name, "measured": f"{pooled:.3f}x{spread}", "met": ok(pooled),
            "every_repeat": bool(paired) and all(ok(p) for p in paired)}


def _paired(a: dict, b: dict) -> list[float]:
    """Tokens/s of summary `a` over `b`, repeat by repeat."""
    return [round(x / y, 3) for x, y in zip(a["tokens_per_s_by_repeat"], b["tokens_per_s_by_repeat"]) if y > 0]


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else 0.0


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def markdown(result: dict) -> str:
    """The result document as a Markdown section: setup, one table, the targets."""
    conc = result["concurrency"]
    lines = [
        f"family {result['family']}, {result['threads_per_process']} torch thread(s) per process, "
        f"{result['requests_per_phase']} requests (low phase) / {result.get('requests_high_phase', result['requests_per_phase'])} "
        f"(high phase) per configuration and repeat, {result['repeats']} interleaved "
        f"repeat(s){_head_to_head(result)}, {result['max_tokens']} tokens each (greedy), in flight: low {conc['low']}, high {conc['high']}; "
        f"SLO TPOT <= {result['slo_tpot_ms']} ms",
        "",
        "| config | phase | tok/s | tok/s by repeat | TPOT p50 ms | TPOT p50 code / prose | TPOT p99 ms | TTFT p50 ms | SLO "
        "| chains used |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, views in result["configs"].items():
        for view, s in views.items():
            chains = ", ".join(f"{c} x{n}" for c, n in (s.get("chains_used") or {}).items())
            slo = "" if s["slo_attainment"] is None else f"{s['slo_attainment']:.0%}"
            lines.append(f"| {config} | {view} | {s['tokens_per_s']:.1f} | "
                         f"{' / '.join(f'{x:.0f}' for x in s['tokens_per_s_by_repeat'])} | {_f(s['tpot_p50_ms'])} | "
                         f"{' / '.join(_f(v) for v in (s.get('tpot_p50_ms_by_domain') or {}).values())} | "
                         f"{_f(s['tpot_p99_ms'])} | {_f(s['ttft_p50_ms'])} | {slo} | {chains} |")
    if (text := ceiling_text(result["verdict"]["low"].get("ceiling"))):
        lines += ["", text]
    lines += ["", "| target | measured | met (pooled) | in every repeat |", "|---|---|---|---|"]
    for t in result["verdict"]["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} | "
                     f"{'yes' if t['every_repeat'] else 'no'} |")
    return "\n".join(lines) + "\n"


def ceiling_text(c: dict | None) -> str:
    """One sentence on the low phase's `ceiling`, or "" without one."""
    if not c:
        return ""
    others = [f"{g}: {x['best']} {x['vs_best_single']:.3f}x" for g, x in c["groups"].items() if x["best"] != c["best_single"]]
    cv = "" if c["cross_validated"] is None else f", {c['cross_validated']:.3f}x cross-validated over its repeats"
    text = (f"Ceiling, {c['phase']} phase: each class on its own best static configuration would run "
            f"{c['in_sample']:.3f}x as fast as {c['best_single']} for every class ({c['repeats']} repeats, "
            f"request latencies summed, in-sample{cv}; ")
    text += ("other classes' best: " + "; ".join(others)) if others else f"{c['best_single']} is every class's best"
    if c.get("adaptive") is not None:
        return text + f"); adaptive on the same measure: {c['adaptive']:.3f}x."
    return text + ")."


def _head_to_head(result: dict) -> str:
    pairs = result.get("head_to_head_pairs") or 0
    return (f", then {pairs} head-to-head pair(s) per phase of adaptive and the phase's best static configuration "
            f"(ABBA order; their runs follow the repeats' in `tok/s by repeat`)") if pairs else ""


def _f(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"
