"""The results folder of a load run: `bench/results/<date>/` with `results.json` (statistics
and the phased run's requests), `records.jsonl.gz` (every request), `summary.md` and three PNG plots (latency vs rate per mode, SLO attainment and goodput vs rate, chain
choices over time in the phased run).

    specmesh bench report                      # runs `bench load`, then writes the folder
    specmesh bench report --input run.json     # from `specmesh bench load --json > run.json`

`results(raw, cfg, meta)` turns the driver's records into the JSON document;
`write_report(doc, folder)` writes everything from that document alone, so a report can be
rebuilt from any saved JSON.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import statistics
from dataclasses import asdict
from pathlib import Path

from shared.bench.load import ADAPTIVE, OFF
from shared.bench.stats import (RequestRecord, Slo, cell_stats, chain_counts, chain_label, grouped_median_ci,
                                 paired_ratios)
from shared.request_class import LONG_PROMPT_TOKENS

RESULTS_ROOT = Path("bench/results")
README_MARKER = "Latest load benchmark:"


def _round(value, digits: int = 5):
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    return value


def results(raw: dict, cfg, meta: dict) -> dict:
    """The JSON document of a run: meta, config, per-cell stats, the phased run with its
    requests, and every cell's requests under `records`."""
    slo = cfg.slo
    doc: dict = {"meta": meta, "config": asdict(cfg), "slo": {"ttft_ms": cfg.slo_ttft_ms, "tpot_ms": cfg.slo_tpot_ms},
                 "cells": [], "phased": None, "records": []}
    for index, cell in enumerate(raw["cells"]):
        doc["cells"].append({"process": cell["process"], "rate": cell["rate"], "mode": cell["mode"],
                             "rounds": cell.get("rounds", 1), "stats": cell_stats(cell["records"], slo, cell["wall_s"])})
        doc["records"] += [_record(r, slo, index) for r in cell["records"]]
    phased = raw.get("phased")
    if phased:
        phases = []
        for i, rate in enumerate(phased["rates"]):
            recs = [r for r in phased["records"] if r.phase == i]
            phases.append({"phase": i, "rate": rate, "stats": cell_stats(recs, slo, phased["phase_s"])})
        doc["phased"] = {k: phased[k] for k in ("mode", "rates", "phase_s", "wall_s")} | {
            "phases": phases, "records": [_record(r, slo, "phased") for r in phased["records"]]}
    return _round(doc)


def _record(r: RequestRecord, slo: Slo, cell) -> dict:
    """A record for the document: ITL gaps are summarised per cell, so only their count stays."""
    d = r.to_dict() | {"slo_met": slo.met(r), "cell": cell, "chunks": len(r.itl_s) + (r.ttft_s is not None)}
    del d["itl_s"]
    return d


def targets(doc: dict) -> list[dict]:
    """Issue 8's targets, each `{target, measured, met}`; empty without an adaptive mode."""
    out: list[dict] = []
    for process in _processes(doc):
        cells = {(c["rate"], c["mode"]): c["stats"] for c in doc["cells"] if c["process"] == process}
        rates = sorted({r for r, _ in cells})
        modes = list(dict.fromkeys(m for _, m in cells))
        if ADAPTIVE not in modes or not rates:
            continue
        static = [m for m in modes if m != ADAPTIVE]
        chains = [m for m in static if m != OFF]
        for rate in rates:
            a = cells[(rate, ADAPTIVE)]["slo_attainment"]
            best = max((cells[(rate, m)]["slo_attainment"] or 0.0, m) for m in static) if static else None
            if best:
                out.append({"target": f"{process} {rate:g}/s: adaptive SLO attainment >= every static mode's",
                            "measured": f"adaptive {_pct(a)} vs best static {_pct(best[0])} ({best[1]})",
                            "met": a is not None and a >= best[0]})
        top, low = rates[-1], rates[0]
        if OFF in modes:
            a, off = cells[(top, ADAPTIVE)]["goodput_rps"], cells[(top, OFF)]["goodput_rps"]
            out.append({"target": f"{process} {top:g}/s (highest): adaptive goodput >= 0.98x no speculation",
                        "measured": f"{a:.2f} vs {off:.2f} req/s ({a / off if off else math.inf:.2f}x)",
                        "met": a >= 0.98 * off})
        if chains:
            a = cells[(low, ADAPTIVE)]["tpot_ms"]["p50"]
            best = min((cells[(low, m)]["tpot_ms"]["p50"] or math.inf, m) for m in chains)
            out.append({"target": f"{process} {low:g}/s (lowest): adaptive TPOT p50 <= the best static chain's",
                        "measured": f"{_ms(a, 2)} vs {_ms(best[0], 2)} ms ({best[1]}){_paired(doc, process, low, best[1])}"
                                    f"{_ceiling(doc, process, low, chains)}",
                        "met": a is not None and a <= best[0]})
    return out


def _paired(doc: dict, process: str, rate: float, mode: str) -> str:
    """The paired comparison of adaptive with `mode` at one rate, for the targets' table:
    p50s of two cells of a few dozen requests differ by several percent from noise alone.
    The interval resamples whole rounds: a round of one mode is one stretch of time, and the
    machine's speed moves from stretch to stretch (requests of one round are not independent)."""
    index = {(c["process"], c["rate"], c["mode"]): i for i, c in enumerate(doc["cells"])}
    mine, theirs = index.get((process, rate, ADAPTIVE)), index.get((process, rate, mode))
    records = doc.get("records") or []
    rounds = sorted({r.get("round", 0) for r in records if r.get("cell") == mine})
    groups = [paired_ratios([r for r in records if r.get("cell") == mine and r.get("round", 0) == i],
                            [r for r in records if r.get("cell") == theirs and r.get("round", 0) == i]) for i in rounds]
    ratios = [x for g in groups for x in g]
    if not ratios:
        return ""
    mid, low, high = grouped_median_ci(groups)
    slower = sum(x > 1 for x in ratios)
    over = f", resampling its {len(rounds)} rounds" if len(rounds) > 1 else ""
    return (f"; per request against its twin in that cell, TPOT {mid:.3f}x (95% CI {low:.3f}-{high:.3f}{over}, "
            f"slower in {slower} of {len(ratios)})")


def _ceiling(doc: dict, process: str, rate: float, chains: list[str]) -> str:
    """What choosing the chain per request class could reach at one rate, for the targets'
    table: each class's TPOTs from the static chain with the lowest TPOT p50 in that class,
    pooled, their p50; in sample (chosen and measured on the same requests, so low by luck)
    and with each round measured on the chains the other rounds chose. The static modes run
    the same k, so the class's chain is all a router adds at a rate where requests rarely
    meet. "" without classes."""
    index = {(c["process"], c["rate"], c["mode"]): i for i, c in enumerate(doc["cells"])}
    cells = {index[(process, rate, m)]: m for m in chains if (process, rate, m) in index}
    by: dict[tuple[str, str, int], list[float]] = {}  # (mode, class, round) -> TPOTs
    for r in doc.get("records") or []:
        if r.get("cell") in cells and r.get("tpot_s") is not None and r.get("domain"):
            size = "long" if (r.get("prompt_tokens") or 0) >= LONG_PROMPT_TOKENS else "short"
            by.setdefault((cells[r["cell"]], f"{r['domain']}-{size}", r.get("round", 0)), []).append(r["tpot_s"])
    classes = sorted({c for _, c, _ in by})
    rounds = sorted({i for _, _, i in by})
    if not classes:
        return ""

    def tpots(mode: str, cls: str, picked: list[int]) -> list[float]:
        return [x for i in picked for x in by.get((mode, cls, i), [])]

    def pick(picked: list[int]) -> dict[str, str]:  # classes no chain ran in those rounds are left out
        best = {cls: min((m for m in cells.values() if tpots(m, cls, picked)), default=None,
                         key=lambda m: statistics.median(tpots(m, cls, picked))) for cls in classes}
        return {cls: m for cls, m in best.items() if m is not None}

    chosen = pick(rounds)
    in_sample = statistics.median([x for cls, m in chosen.items() for x in tpots(m, cls, rounds)])
    text = f"; each class on its own best static chain: TPOT p50 {in_sample * 1e3:.2f} ms in sample"
    if len(rounds) > 1:
        held = []
        for i in rounds:
            others = pick([j for j in rounds if j != i])
            held += [x for cls, m in others.items() for x in tpots(m, cls, [i])]
        if held:
            text += f", {statistics.median(held) * 1e3:.2f} cross-validated over rounds"
    return text + " (" + ", ".join(f"{cls} {m}" for cls, m in chosen.items()) + ")"


def _processes(doc: dict) -> list[str]:
    return list(dict.fromkeys(c["process"] for c in doc["cells"]))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _ms(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _q(s: dict) -> str:
    return " / ".join(_ms(s[f"p{q}"]) for q in (50, 90, 99))


def _acceptance(acc: dict) -> str:
    return ", ".join(f"{name} {_pct(a['rate'])}" for name, a in acc.items()) or "-"


def _chains(counts: dict) -> str:
    return ", ".join(f"{c} x{n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def markdown(doc: dict, images: list[str]) -> str:
    meta, cfg = doc["meta"], doc["config"]
    lines = [f"# Load benchmark, {meta.get('date', '')}", "",
             f"Family **{meta.get('family', '?')}** (the only one trained), "
             f"{meta.get('threads_per_process', '?')} torch thread(s) per model process, device "
             f"{meta.get('device', '?')}, gateway {meta.get('gateway', '?')}, commit {meta.get('commit', '?')}, "
             f"on {meta.get('cpus', '?')} CPU cores shared with other work"
             + (f" (1-minute load average {meta['loadavg_1m_at_start']:.1f} at the start, "
                f"{meta.get('loadavg_1m_at_end', math.nan):.1f} at the end)" if "loadavg_1m_at_start" in meta else "")
             + ".", "",
             f"Open-loop arrivals for {cfg['duration_s']:g} s per cell"
             + (f" (longer at low rates: at least {cfg['min_requests']} requests expected)" if cfg.get("min_requests") else "")
             + f" (at most {cfg['max_requests']} requests, "
             f"{cfg['drain_s']:g} s drain)"
             + (f", {cfg['repeats']} rounds per rate, each running every mode, each mode after every other equally often; "
                f"a cell pools its rounds" if cfg.get("repeats", 1) > 1 else "")
             + f", gamma shape {cfg['burstiness']:g}; prompts of {cfg['prompt_chars']} "
             f"characters, code and prose mixed; {cfg['max_tokens']} tokens each, greedy, k = {cfg['k']}. "
             f"SLO per request: TTFT <= {doc['slo']['ttft_ms']:g} ms and TPOT <= {doc['slo']['tpot_ms']:g} ms. "
             f"Goodput = requests meeting their SLO per second of wall time.", "",
             f"Command: `{meta.get('command', 'specmesh bench report')}`", ""]
    checks = targets(doc)
    if checks:
        lines += ["## Targets (issue 8)", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in checks]
        lines.append("")
    for process in _processes(doc):
        lines += [f"## {process} arrivals", "",
                  "| rate/s | mode | sent | failed | req/s | tok/s | goodput/s | SLO | TTFT ms p50/p90/p99 "
                  "| TPOT ms p50/p90/p99 | ITL ms p50/p90/p99 | acceptance | chains |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in doc["cells"]:
            if c["process"] != process:
                continue
            s = c["stats"]
            lines.append(f"| {c['rate']:g} | {c['mode']} | {s['requests']} | {s['failed']} | "
                         f"{s['throughput_rps']:.2f} | {s['output_tokens_per_s']:.0f} | {s['goodput_rps']:.2f} | "
                         f"{_pct(s['slo_attainment'])} | {_q(s['ttft_ms'])} | {_q(s['tpot_ms'])} | "
                         f"{_q(s['itl_ms'])} | {_acceptance(s['acceptance'])} | {_chains(s['chains'])} |")
        lines.append("")
    phased = doc.get("phased")
    if phased:
        lines += [f"## Phased run ({phased['mode']}, Poisson, "
                  f"{' -> '.join(f'{r:g}' for r in phased['rates'])} req/s, {phased['phase_s']:g} s each)", "",
                  "| phase | rate/s | sent | failed | SLO | TTFT ms p50/p90/p99 | TPOT ms p50/p90/p99 | chains |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in phased["phases"]:
            s = p["stats"]
            lines.append(f"| {p['phase']} | {p['rate']:g} | {s['requests']} | {s['failed']} | {_pct(s['slo_attainment'])} | "
                         f"{_q(s['ttft_ms'])} | {_q(s['tpot_ms'])} | {_chains(s['chains'])} |")
        lines.append("")
    if images:
        lines += ["## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images] + [""]
    errors = sorted({e for c in doc["cells"] for e in c["stats"]["errors"]})
    if errors:
        lines += ["## Errors seen", ""] + [f"- {e}" for e in errors] + [""]
    return "\n".join(lines)


def _modes(doc: dict) -> list[str]:
    return list(dict.fromkeys(c["mode"] for c in doc["cells"]))


def plot_latency(doc: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    processes, modes = _processes(doc), _modes(doc)
    metrics = [("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)")]
    fig, axes = plt.subplots(len(processes), 3, figsize=(15, 4 * len(processes)), squeeze=False)
    for row, process in enumerate(processes):
        for col, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            for i, mode in enumerate(modes):
                cells = sorted((c for c in doc["cells"] if c["process"] == process and c["mode"] == mode),
                               key=lambda c: c["rate"])
                rates = [c["rate"] for c in cells]
                for q, style in (("p50", "-o"), ("p99", "--x")):
                    ys = [c["stats"][key][q] if c["stats"][key][q] is not None else math.nan for c in cells]
                    ax.plot(rates, ys, style, color=f"C{i}", label=f"{mode} {q}")
            ax.set_yscale("log")
            ax.set_xlabel("offered rate (requests/s)")
            ax.set_ylabel(label)
            ax.set_title(f"{label.split()[0]} vs rate, {process}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_slo(doc: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    processes, modes = _processes(doc), _modes(doc)
    fig, axes = plt.subplots(2, len(processes), figsize=(6 * len(processes), 8), squeeze=False)
    for col, process in enumerate(processes):
        for i, mode in enumerate(modes):
            cells = sorted((c for c in doc["cells"] if c["process"] == process and c["mode"] == mode),
                           key=lambda c: c["rate"])
            rates = [c["rate"] for c in cells]
            att = [100 * (c["stats"]["slo_attainment"] or 0.0) for c in cells]
            axes[0][col].plot(rates, att, "-o", color=f"C{i}", label=mode)
            axes[1][col].plot(rates, [c["stats"]["goodput_rps"] for c in cells], "-o", color=f"C{i}", label=mode)
        if rates:
            axes[1][col].plot(rates, rates, ":", color="grey", label="offered")
        axes[0][col].set_title(f"SLO attainment vs rate, {process}")
        axes[0][col].set_ylabel("requests meeting SLO (%)")
        axes[0][col].set_ylim(-5, 105)
        axes[1][col].set_title(f"goodput vs rate, {process}")
        axes[1][col].set_ylabel("goodput (requests/s)")
        for ax in axes[:, col]:
            ax.set_xlabel("offered rate (requests/s)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_chains(doc: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    phased = doc["phased"]
    recs = phased["records"]
    names = sorted(chain_counts(RequestRecord.from_dict(r) for r in recs if r["chain"]))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    for i, name in enumerate(names):
        pts = [(r["scheduled_s"], i) for r in recs if chain_label(r["chain"], r["k"]) == name]
        top.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, color=f"C{i}", label=name)
    top.set_yticks(range(len(names)), names)
    top.set_title(f"chain per request ({phased['mode']}), phased run")
    for ok, color, label in ((True, "C2", "SLO met"), (False, "C3", "SLO missed")):
        pts = [(r["scheduled_s"], 1e3 * r["ttft_s"]) for r in recs if r["slo_met"] == ok and r["ttft_s"]]
        bottom.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, color=color, label=label)
    bottom.set_yscale("log")
    bottom.set_ylabel("TTFT (ms)")
    bottom.set_xlabel("arrival time (s)")
    rate_ax = bottom.twinx()
    edges = [i * phased["phase_s"] for i in range(len(phased["rates"]) + 1)]
    rate_ax.step(edges, phased["rates"] + phased["rates"][-1:], where="post", color="k", alpha=0.5,
                 label="offered rate")
    rate_ax.set_ylabel("offered rate (requests/s)")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        for edge in edges[1:-1]:
            ax.axvline(edge, color="grey", ls=":")
    bottom.legend(loc="upper left", fontsize=7)
    rate_ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def to_json(doc: dict) -> str:
    """The document without the cells' records, indented; the phased run's records one per line."""
    body = {k: v for k, v in doc.items() if k != "records"}
    phased = body.get("phased")
    if not phased or not phased.get("records"):
        return json.dumps(body, indent=1) + "\n"
    body["phased"] = {k: v for k, v in phased.items() if k != "records"}
    head = json.dumps(body, indent=1)
    records = ",\n".join(json.dumps(r, separators=(",", ":")) for r in phased["records"])
    return head[:-5] + f',\n  "records": [\n{records}\n  ]\n }}\n}}\n'


def read_document(path: Path, text: str) -> dict:
    """A document from `bench load --json` output, or a report's results.json: its requests
    are then read back from the records.jsonl.gz beside it, so a rebuilt report loses nothing."""
    doc = json.loads(text)
    beside = path.parent / "records.jsonl.gz"
    if "records" not in doc and beside.exists():
        with gzip.open(beside, "rt") as f:
            doc["records"] = [json.loads(line) for line in f if line.strip()]
    return doc


def write_report(doc: dict, folder: Path) -> list[Path]:
    """Write results.json, the plots and summary.md into `folder`; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "results.json"]
    written[0].write_text(to_json(doc))
    if doc.get("records"):
        with gzip.open(folder / "records.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in doc["records"])
        written.append(folder / "records.jsonl.gz")
    images = []
    if doc["cells"]:
        plot_latency(doc, folder / "latency_vs_rate.png")
        plot_slo(doc, folder / "slo_vs_rate.png")
        images += ["latency_vs_rate.png", "slo_vs_rate.png"]
    if doc.get("phased") and doc["phased"].get("records"):  # a phased run cut short may have sent none
        plot_chains(doc, folder / "chains_over_time.png")
        images.append("chains_over_time.png")
    written += [folder / i for i in images]
    (folder / "summary.md").write_text(markdown(doc, images))
    written.append(folder / "summary.md")
    return written


def link_readme(readme: Path, summary: Path) -> bool:
    """Point README's `Latest load benchmark:` line at `summary` (relative); False if no such line."""
    if not readme.exists():
        return False
    text = readme.read_text()
    rel = summary.resolve().relative_to(readme.resolve().parent).as_posix()
    line = f"{README_MARKER} [{rel}]({rel})"
    new, n = re.subn(rf"^{re.escape(README_MARKER)}.*$", line, text, count=1, flags=re.M)
    if n and new != text:
        readme.write_text(new)
    return bool(n)
