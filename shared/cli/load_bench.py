"""`specmesh bench load` and `specmesh bench report`: the running stack under open-loop load.

    make up && specmesh bench load --rates 2,8 --duration 10 --modes 'off;drafter,target;adaptive'
    specmesh bench load --json > run.json && specmesh bench report --input run.json
    specmesh bench report          # runs the default load, writes bench/results/<date>/

See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from shared.bench.load import LoadConfig

_D = LoadConfig(url="")
DEFAULT_MODES = ";".join(_D.modes)

Url = Annotated[Optional[str], typer.Option(help="Gateway URL (loopback only; default: settings.gateway.http_url).")]
Rates = Annotated[str, typer.Option(help="Offered rates in requests/s, comma-separated.")]
Modes = Annotated[str, typer.Option(help="';'-separated: off, adaptive, or chains such as drafter,target.")]
Processes = Annotated[str, typer.Option("--arrivals", help="Arrival processes: poisson,gamma.")]
Burst = Annotated[float, typer.Option(help="Gamma shape (< 1 is burstier than Poisson; CV = 1/sqrt(shape)).")]
Duration = Annotated[float, typer.Option(help="Seconds of arrivals per (arrivals, rate, mode) cell and round.")]
MaxReq = Annotated[int, typer.Option("--max-requests", min=1, help="Most requests per cell and round.")]
MinReq = Annotated[int, typer.Option("--min-requests", min=0, help="At a rate too low for this many requests in "
                                                                   "--duration, the cell's window grows to this / rate seconds.")]
Drain = Annotated[float, typer.Option(help="Longest wait in seconds for a cell's unfinished requests.")]
MaxTok = Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens per request.")]
Chars = Annotated[int, typer.Option("--prompt-chars", min=20, help="Characters per held-out prompt.")]
K = Annotated[int, typer.Option(help="Tokens proposed per verification in static chains.")]
Ttft = Annotated[float, typer.Option("--slo-ttft-ms", help="TTFT objective per request (ms).")]
Tpot = Annotated[float, typer.Option("--slo-tpot-ms", help="TPOT objective per request (ms).")]
Seed = Annotated[int, typer.Option(help="Seed of arrivals and prompt choice.")]
Phased = Annotated[str, typer.Option("--phased-rates", help="Rates of the phased run, e.g. 2,24,2.")]
PhaseS = Annotated[float, typer.Option("--phase-duration", help="Seconds per phase; 0 skips the phased run.")]
PhasedMode = Annotated[str, typer.Option("--phased-mode", help="Mode of the phased run.")]
Repeats = Annotated[int, typer.Option(min=1, help="Rounds per (arrivals, rate): every mode runs --duration "
                                                  "seconds per round, each mode after every other equally often; "
                                                  "a cell pools its rounds.")]


def _floats(value: str, what: str) -> list[float]:
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be numbers separated by commas, got {value!r}") from None
    if not out or any(x <= 0 for x in out):
        raise typer.BadParameter(f"{what} must be positive numbers separated by commas, got {value!r}")
    return out


def _config(url, rates, modes, arrivals, burstiness, duration, max_requests, drain, max_tokens, prompt_chars, k,
            slo_ttft_ms, slo_tpot_ms, seed, phased_rates, phase_duration, phased_mode, repeats=1,
            min_requests=0) -> LoadConfig:
    from shared.bench.load import Mode, check_loopback
    from shared.settings import get_settings

    url = url or get_settings().gateway.http_url
    cfg = LoadConfig(url=url, rates=sorted(_floats(rates, "--rates")),
                     modes=[m.strip() for m in modes.split(";") if m.strip()],
                     processes=[p.strip() for p in arrivals.split(",") if p.strip()], burstiness=burstiness,
                     duration_s=duration, max_requests=max_requests, drain_s=drain, max_tokens=max_tokens,
                     prompt_chars=prompt_chars, k=k, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, seed=seed,
                     phased_rates=_floats(phased_rates, "--phased-rates") if phase_duration > 0 else [],
                     phase_s=phase_duration, phased_mode=phased_mode, repeats=repeats, min_requests=min_requests)
    try:
        check_loopback(url)
        for m in cfg.modes + [phased_mode]:
            Mode.parse(m, k)
        for p in cfg.processes:
            cfg.arrivals(p, 1.0)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return cfg


def _meta(cfg: LoadConfig) -> dict:
    from shared.settings import get_settings

    s = get_settings()
    now = dt.datetime.now()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return {"date": now.strftime("%Y-%m-%d"), "started_at": now.isoformat(timespec="seconds"),
            "family": s.models.profile, "threads_per_process": s.engine.threads, "device": s.engine.device,
            "dtype": s.engine.dtype, "runner": s.engine.runner, "gateway": cfg.url, "commit": commit,
            "cpus": os.cpu_count(), "loadavg_1m_at_start": os.getloadavg()[0],
            "command": "specmesh " + " ".join(sys.argv[1:])}


def measure(cfg: LoadConfig) -> dict:
    """Run the load with a progress bar; the results document."""
    import httpx
    from tqdm import tqdm

    from shared.bench.load import planned_requests, run_load
    from shared.bench.report import results

    try:
        httpx.get(f"{cfg.url}/health", timeout=5, trust_env=False).raise_for_status()
    except httpx.HTTPError as exc:
        typer.secho(f"error: no healthy gateway at {cfg.url} ({exc}); run `specmesh up`", err=True, fg="red")
        raise typer.Exit(1) from exc
    meta = _meta(cfg)
    with tqdm(total=planned_requests(cfg), unit="req", desc="bench load", mininterval=1.0, file=sys.stderr) as bar:
        raw = asyncio.run(run_load(cfg, bar))
    meta["finished_at"] = dt.datetime.now().isoformat(timespec="seconds")
    meta["loadavg_1m_at_end"] = os.getloadavg()[0]
    return results(raw, cfg, meta)


def _print(doc: dict) -> None:
    from shared.bench.report import targets

    m = doc["meta"]
    typer.echo(f"family={m['family']} threads/process={m['threads_per_process']} SLO: TTFT<={doc['slo']['ttft_ms']:g}ms "
               f"TPOT<={doc['slo']['tpot_ms']:g}ms")
    typer.echo(f"{'arrivals':<9}{'rate':>6} {'mode':<26}{'sent':>5}{'fail':>5}{'tok/s':>7}{'good/s':>8}{'SLO':>6}"
               f"{'TTFT p50/p99':>16}{'TPOT p50/p99':>15}{'ITL p99':>9}  acceptance")
    for c in doc["cells"]:
        s = c["stats"]
        acc = " ".join(f"{n}={a['rate']:.2f}" for n, a in s["acceptance"].items() if a["rate"] is not None)
        f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        typer.echo(f"{c['process']:<9}{c['rate']:>6g} {c['mode']:<26}{s['requests']:>5}{s['failed']:>5}"
                   f"{s['output_tokens_per_s']:>7.0f}{s['goodput_rps']:>8.2f}{100 * (s['slo_attainment'] or 0):>5.0f}%"
                   f"{f(s['ttft_ms']['p50']) + '/' + f(s['ttft_ms']['p99']):>16}"
                   f"{f(s['tpot_ms']['p50']) + '/' + f(s['tpot_ms']['p99']):>15}{f(s['itl_ms']['p99']):>9}  {acc}")
    if doc.get("phased"):
        p = doc["phased"]
        for ph in p["phases"]:
            s = ph["stats"]
            typer.echo(f"phased {p['mode']} phase {ph['phase']} {ph['rate']:g}/s: sent {s['requests']}, SLO "
                       f"{100 * (s['slo_attainment'] or 0):.0f}%, chains {s['chains']}")
    for t in targets(doc):
        typer.echo(f"[{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['measured']}")


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("load")
    def bench_load(
        as_json: bool = typer.Option(False, "--json", help="Print the results document (JSON) on stdout."),
        url: Url = None, rates: Rates = ",".join(f"{r:g}" for r in _D.rates), modes: Modes = DEFAULT_MODES,
        arrivals: Processes = ",".join(_D.processes), burstiness: Burst = _D.burstiness,
        duration: Duration = _D.duration_s, max_requests: MaxReq = _D.max_requests, drain: Drain = _D.drain_s,
        max_tokens: MaxTok = _D.max_tokens, prompt_chars: Chars = _D.prompt_chars, k: K = _D.k,
        slo_ttft_ms: Ttft = _D.slo_ttft_ms, slo_tpot_ms: Tpot = _D.slo_tpot_ms, seed: Seed = _D.seed,
        phased_rates: Phased = ",".join(f"{r:g}" for r in _D.phased_rates), phase_duration: PhaseS = _D.phase_s,
        phased_mode: PhasedMode = _D.phased_mode, repeats: Repeats = _D.repeats,
        min_requests: MinReq = _D.min_requests,
    ) -> None:
        """Open-loop load over HTTP: per rate and mode, throughput, goodput, TTFT/TPOT/ITL, SLO, acceptance."""
        cfg = _config(url, rates, modes, arrivals, burstiness, duration, max_requests, drain, max_tokens,
                      prompt_chars, k, slo_ttft_ms, slo_tpot_ms, seed, phased_rates, phase_duration, phased_mode,
                      repeats, min_requests)
        doc = measure(cfg)
        if as_json:
            typer.echo(json.dumps(doc))
        else:
            _print(doc)

    @bench_app.command("report")
    def bench_report(
        input: Optional[Path] = typer.Option(None, "--input", exists=True, dir_okay=False,
                                             help="A JSON from `specmesh bench load --json`, or a report's results.json "
                                                  "(its records.jsonl.gz beside it is read too; default: run the load now)."),
        out: Optional[Path] = typer.Option(None, help="Folder to write (default: bench/results/<date of the run>)."),
        readme: bool = typer.Option(True, help="Point README.md's 'Latest load benchmark' line at the summary "
                                               "(only when writing under bench/results)."),
        url: Url = None, rates: Rates = ",".join(f"{r:g}" for r in _D.rates), modes: Modes = DEFAULT_MODES,
        arrivals: Processes = ",".join(_D.processes), burstiness: Burst = _D.burstiness,
        duration: Duration = _D.duration_s, max_requests: MaxReq = _D.max_requests, drain: Drain = _D.drain_s,
        max_tokens: MaxTok = _D.max_tokens, prompt_chars: Chars = _D.prompt_chars, k: K = _D.k,
        slo_ttft_ms: Ttft = _D.slo_ttft_ms, slo_tpot_ms: Tpot = _D.slo_tpot_ms, seed: Seed = _D.seed,
        phased_rates: Phased = ",".join(f"{r:g}" for r in _D.phased_rates), phase_duration: PhaseS = _D.phase_s,
        phased_mode: PhasedMode = _D.phased_mode, repeats: Repeats = _D.repeats,
        min_requests: MinReq = _D.min_requests,
    ) -> None:
        """Write bench/results/<date>/: results.json, summary.md and PNG plots (runs the load unless --input)."""
        from shared.bench.report import RESULTS_ROOT, link_readme, read_document, write_report

        if input is not None:
            try:
                doc = read_document(input, _json_part(input.read_text()))
            except (ValueError, OSError, EOFError) as exc:  # bad JSON, or a broken records.jsonl.gz beside it
                raise typer.BadParameter(f"{input} is not a `bench load --json` document: {exc}") from None
        else:
            cfg = _config(url, rates, modes, arrivals, burstiness, duration, max_requests, drain, max_tokens,
                          prompt_chars, k, slo_ttft_ms, slo_tpot_ms, seed, phased_rates, phase_duration, phased_mode,
                      repeats, min_requests)
            doc = measure(cfg)
            _print(doc)
        folder = out or RESULTS_ROOT / doc["meta"].get("date", dt.date.today().isoformat())
        written = write_report(doc, folder)
        for path in written:
            typer.echo(f"wrote {path}")
        if readme and out is None and link_readme(Path("README.md"), folder / "summary.md"):
            typer.echo(f"README.md links {folder / 'summary.md'}")


def _json_part(text: str) -> str:
    """The JSON object in `text`, skipping any lines a library printed before it."""
    start = text.find("\n{") + 1 if not text.lstrip().startswith("{") else 0
    return text[start:]
