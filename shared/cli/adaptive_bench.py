"""`specmesh bench adaptive`: static chains vs no speculation vs the router, on a mixed workload.

    make up && specmesh bench adaptive --json

Against the running stack's gateway (loopback), greedy, the same prompts for every
configuration: code and prose prompts of two lengths (held out, so short and long request
classes), in two phases, closed loop — low rate (`--requests` with `--low` in flight at
once) and high rate (`--high-requests` with `--high` in flight: several waves, so that
the phase is sustained load, not one burst timed by its slowest request).
Configurations: every served static chain whose models are up (explicit
`speculation.chain`), no speculation (`enabled: false`) and adaptive (no chain given: the
gateway uses the router's assignment). `--repeats` runs the whole
sequence several times, interleaved (repeat 1: low phase every configuration, high phase
every configuration; then repeat 2 ...), the static configurations in a rotated order each
repeat and adaptive last in each phase, so the router has seen every chain's outcomes
under that load. Then, head to head (`--confirm` pairs per phase): adaptive and the phase's
best static configuration so far, alternately in ABBA order. The machine's speed drifts
through a run (the target's time per token at 16 in flight moved by 15-20% over one
20-minute run on this 2-core machine, and one chain's tokens/s by 5-10% from one of its
runs to the next), and adaptive, last in each phase, ran 1-3 minutes after the static
chain it is compared with: a single such pair is mostly the drift. The head-to-head runs
join both configurations' runs: their pooled numbers and per-run ratios (`tok/s by
repeat`: the repeats, then the head-to-head runs) include them. Per configuration and
phase, and overall: tokens/s (output tokens over the phase's wall time; pooled and per
repeat), TPOT p50/p99 and TTFT p50 measured at the client from the stream, SLO attainment (share of requests whose TPOT is at most
`--slo-tpot-ms`, by default twice the no-speculation TPOT p50 of the low phase), and the
verdict on issue 6's targets (`shared/bench/adaptive.py`), with adaptive's speed against
the best static configuration prompt by prompt too (each request's latency against the
same prompt's in the same repeat or head-to-head pair: median and 95% interval), and the low
phase's ceiling: how much faster than the best static configuration each class on its own
best static configuration would have been (`shared/bench/adaptive.py: ceiling`; the static
configurations take the router's k, so the chain per class is all a router can add there).
Bounded: `--requests` and
`--high-requests` per configuration and repeat, `--max-seconds` per run. `--json` keeps every
request (`runs`), and `--rescore FILE` scores such a file again without a stack (after a
change to the statistics, or with another `--slo-tpot-ms`).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Optional

import typer

from shared.bench.adaptive import (
    ADAPTIVE, GROUPS, NO_SPECULATION, ceiling_text, default_slo, group_of, markdown, summarise_all, tokens_per_s, verdict,
)
from shared.bench.load import fresh_salt
from shared.bench.sse import chunks
from shared.bench.stats import chain_label
from shared.cli.client import served_model


def workload(n: int) -> list[tuple[str, str]]:
    """`n` (prompt, domain), prompt i of group `GROUPS[i % 4]`: code and prose, short (~200
    chars) and long (~700 chars; the router's classes, long from 128 prompt tokens)."""
    from shared.models.corpus import heldout_prompts

    per = max(1, (n + 3) // 4)
    groups = [(d, heldout_prompts(d, per, 200 if size == "short" else 700, seed=17))
              for d, size in (g.split("-") for g in GROUPS)]
    out = [(g[i], d) for i in range(per) for d, g in groups]
    return out[:n]


async def _one(client, prompt: str, config: str, max_tokens: int, domain: str = "") -> dict:
    body = {"model": served_model(), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True, "cache_salt": fresh_salt()}
    if config == NO_SPECULATION:
        body["speculation"] = {"enabled": False}
    elif config != ADAPTIVE:
        body["speculation"] = {"chain": config}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    chain = None
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"gateway answered {resp.status_code}: {(await resp.aread()).decode()[:300]}")
        async for chunk in chunks(resp):  # an error event raises: a failed request, not a fast one
            for choice in chunk.get("choices", []):
                ids = choice.get("token_ids") or []
                if ids:
                    now = time.perf_counter() - t0
                    first = now if first is None else first
                    last = now
                    tokens += len(ids)
            if chunk.get("speculation"):
                chain = chain_label(chunk["speculation"].get("chain") or [], chunk["speculation"].get("k") or [])
    tpot = (last - first) / (tokens - 1) * 1e3 if tokens >= 2 else None
    return {"tokens": tokens, "ttft_ms": None if first is None else first * 1e3, "tpot_ms": tpot,
            "latency_ms": (time.perf_counter() - t0) * 1e3, "chain": chain, "domain": domain}


async def _run(client, prompts: list[tuple[str, str]], config: str, concurrency: int, max_tokens: int, max_seconds: float,
               bar) -> dict:
    queue = list(enumerate(prompts))
    results: list[dict] = []
    errors: list[str] = []
    t0 = time.perf_counter()

    async def worker() -> None:
        while queue and time.perf_counter() - t0 < max_seconds:
            index, (prompt, domain) = queue.pop(0)
            try:
                result = {**await _one(client, prompt, config, max_tokens, domain), "index": index}
                results.append({**result, "group": group_of(result)})
            except Exception as exc:  # counted and shown: a failed request is not a fast one
                errors.append(str(exc)[:200])
            bar.update(1)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    bar.update(len(queue))
    return {"results": results, "errors": errors, "seconds": time.perf_counter() - t0}


async def _available_chains(settings, wait_s: float = 15.0, every_s: float = 1.0) -> list[str]:
    """Served chains whose models the router sees up (every served chain if it cannot say).

    Right after `make up` the router may not have discovered every worker yet: while a model
    some served chain needs is missing, ask again each second for up to `wait_s`, so a
    static chain is not left out of the comparison because its worker answered late (asked
    every `every_s`).
    """
    from services.router.decision import served_chains
    from shared.cli.router_cmd import ask_router
    from shared.engine.build import models_of

    served = [c for c in served_chains() if c != ("target",)]
    needed = {m for chain in served for name in chain for m in models_of(name)} - {"ngram", "target"}
    deadline = time.monotonic() + wait_s
    while True:
        try:
            models = (await ask_router(settings)).load.get("available_models")
        except Exception:
            models = None
        if models is None:
            return [",".join(c) for c in served]
        missing = needed - set(models)
        if not missing or time.monotonic() >= deadline:
            break
        await asyncio.sleep(every_s)
    if missing:
        typer.secho(f"note: the router sees no {', '.join(sorted(missing))}; chains needing them are left out",
                    err=True, fg="yellow")
    up = set(models) | {"ngram", "target"}
    return [",".join(c) for c in served if {m for name in c for m in models_of(name)} <= up]


def order(statics: list[str], repeat: int) -> list[str]:
    """The static configurations of one repeat: rotated by the repeat, so none is always first."""
    if not statics:
        return []
    shift = repeat % len(statics)
    return statics[shift:] + statics[:shift]


def head_to_head(opponent: str, pairs: int) -> list[str]:
    """The confirmation runs against one static configuration: adaptive and `opponent` in
    ABBA order (A B B A A B ...), so a machine slowing down or speeding up through them
    weighs on both alike."""
    out: list[str] = []
    for i in range(pairs):
        out += [ADAPTIVE, opponent] if i % 2 == 0 else [opponent, ADAPTIVE]
    return out


def best_static(runs: dict[str, list[dict]], statics: list[str]) -> str:
    """The static configuration with the most tokens/s over its runs so far."""
    return max(statics, key=lambda c: tokens_per_s(runs[c]))


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("adaptive")
    def bench_adaptive(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        as_markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table and the targets."),
        requests: int = typer.Option(16, "--requests", min=4, help="Requests per configuration and repeat in the low-rate phase."),
        high_requests: int = typer.Option(48, "--high-requests", min=4,
                                          help="Requests per configuration and repeat in the high-rate phase: several times "
                                               "--high, so the phase is sustained load and not one burst's slowest request."),
        repeats: int = typer.Option(3, "--repeats", min=1, help="Interleaved repeats of the whole sequence."),
        max_tokens: int = typer.Option(48, "--max-tokens", min=2),
        low: int = typer.Option(1, "--low", min=1, help="Requests in flight in the low-rate phase."),
        high: int = typer.Option(16, "--high", min=1, help="Requests in flight in the high-rate phase."),
        chains: Optional[str] = typer.Option(None, help="Static chains, ';'-separated (default: every served chain that is up)."),
        slo_tpot_ms: Optional[float] = typer.Option(None, "--slo-tpot-ms", help="TPOT objective (default: 2x no-speculation p50, low phase)."),
        max_seconds: float = typer.Option(120.0, "--max-seconds", help="Longest one configuration may run in one phase."),
        confirm: int = typer.Option(2, "--confirm", min=0,
                                    help="Then, per phase, this many pairs of adaptive and that phase's best static "
                                         "configuration head to head, in ABBA order (0: none)."),
        rescore: Optional[Path] = typer.Option(None, "--rescore", exists=True, dir_okay=False,
                                               help="Run nothing: score the requests an earlier `--json` run kept "
                                                    "(its `runs`) with this code's statistics and verdict."),
    ) -> None:
        """Every static chain, no speculation and the adaptive router: tokens/s, TPOT p50/p99, SLO attainment."""
        if rescore is not None:
            try:
                result = rescored(json.loads(rescore.read_text()), slo_tpot_ms)
            except (ValueError, KeyError, TypeError) as exc:
                typer.secho(f"error: {rescore} is not a `bench adaptive --json` result with its runs ({exc})",
                            err=True, fg="red")
                raise typer.Exit(1) from None
            show(result, as_json, as_markdown)
            return

        import httpx
        from tqdm import tqdm

        from shared.heap import freeze
        from shared.settings import get_settings

        settings = get_settings()
        prompts = {"low": workload(requests), "high": workload(high_requests)}

        async def main() -> dict:
            statics = [c.strip() for c in chains.split(";") if c.strip()] if chains else await _available_chains(settings)
            configs = statics + [NO_SPECULATION, ADAPTIVE]
            phases = [("low", low), ("high", high)]
            limits = httpx.Limits(max_connections=max(low, high) + 4)
            async with httpx.AsyncClient(base_url=settings.gateway.http_url, limits=limits,
                                         timeout=settings.gateway.request_timeout_s) as client:
                try:
                    (await client.get("/health")).raise_for_status()
                except httpx.HTTPError as exc:
                    raise RuntimeError(f"no healthy gateway at {settings.gateway.http_url} ({exc}); run `make up`") from None
                total = (sum(len(prompts[p]) for p, _ in phases) * (len(configs) * repeats + 2 * confirm)
                         + len(statics) + 1)
                runs: dict[str, dict[str, list[dict]]] = {c: {p: [] for p, _ in phases} for c in configs}
                with tqdm(total=total, desc="bench adaptive", unit="req", mininterval=1.0, leave=False) as bar:
                    for config in statics + [NO_SPECULATION]:  # warm every level up
                        await _one(client, prompts["low"][0][0], config, 4)
                        bar.update(1)
                    freeze()  # the client's start-up heap is never collected mid-request (shared.heap)
                    for repeat in range(repeats):
                        for phase, concurrency in phases:
                            for config in order(statics + [NO_SPECULATION], repeat) + [ADAPTIVE]:
                                bar.set_postfix_str(f"{repeat + 1}/{repeats} {phase} {config}", refresh=False)
                                runs[config][phase].append(
                                    await _run(client, prompts[phase], config, concurrency, max_tokens, max_seconds, bar))
                    for phase, concurrency in phases:
                        opponent = best_static({c: runs[c][phase] for c in configs}, statics + [NO_SPECULATION])
                        for i, config in enumerate(head_to_head(opponent, confirm)):
                            bar.set_postfix_str(f"head to head {i + 1}/{2 * confirm} {phase} {config}", refresh=False)
                            runs[config][phase].append(
                                await _run(client, prompts[phase], config, concurrency, max_tokens, max_seconds, bar))
            return runs

        try:
            runs = asyncio.run(main())
        except RuntimeError as exc:
            typer.secho(f"error: {exc}", err=True, fg="red")
            raise typer.Exit(1) from None
        meta = {"family": settings.models.profile, "threads_per_process": settings.engine.threads,
                "requests_per_phase": len(prompts["low"]), "requests_high_phase": len(prompts["high"]),
                "repeats": repeats, "head_to_head_pairs": confirm, "max_tokens": max_tokens,
                "concurrency": {"low": low, "high": high}, "gateway": settings.gateway.http_url}
        show(scored(meta, runs, slo_tpot_ms), as_json, as_markdown)


def scored(meta: dict, runs: dict[str, dict[str, list[dict]]], slo_tpot_ms: float | None) -> dict:
    """The result of a run: its settings (`meta`), per configuration and view the summaries, the
    verdict, and the requests themselves (`runs`: per configuration, phase and run, each
    request's tokens, TTFT, TPOT, latency, chain and prompt index), so a later version of
    the statistics can score the same run again (`--rescore`)."""
    slo = slo_tpot_ms or default_slo(runs)
    summaries = summarise_all(runs, slo)
    return {**meta, "slo_tpot_ms": None if slo is None else round(slo, 3), "configs": summaries,
            "verdict": verdict(summaries, runs), "runs": runs}


def rescored(earlier: dict, slo_tpot_ms: float | None = None) -> dict:
    """`scored` again on an earlier `--json` result's requests, its SLO kept unless one is given."""
    meta = {k: v for k, v in earlier.items() if k not in ("configs", "verdict", "runs", "slo_tpot_ms")}
    return scored(meta, earlier["runs"], slo_tpot_ms or earlier.get("slo_tpot_ms"))


def show(result: dict, as_json: bool, as_markdown: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    elif as_markdown:
        typer.echo(markdown(result), nl=False)
    else:
        _print_table(result)


def _print_table(result: dict) -> None:
    typer.echo(f"family={result['family']} threads/process={result['threads_per_process']} "
               f"requests low={result['requests_per_phase']} high={result.get('requests_high_phase', result['requests_per_phase'])} repeats={result['repeats']} max_tokens={result['max_tokens']} "
               f"in flight low={result['concurrency']['low']} high={result['concurrency']['high']} "
               f"SLO TPOT<={result['slo_tpot_ms']} ms (greedy)")
    typer.echo(f"{'config':<34}{'phase':<8}{'tok/s':>8}{'TPOT p50':>10}{'p99':>8}{'TTFT p50':>10}{'SLO':>6}  errors  tok/s by repeat")
    for config, views in result["configs"].items():
        for view, s in views.items():
            typer.echo(f"{config:<34}{view:<8}{s['tokens_per_s']:>8.1f}{s['tpot_p50_ms'] or 0:>10.2f}"
                       f"{s['tpot_p99_ms'] or 0:>8.2f}{s['ttft_p50_ms'] or 0:>10.2f}{s['slo_attainment'] or 0:>6.2f}  "
                       f"{s['errors']:>6}  {s['tokens_per_s_by_repeat']}"
                       + (f"  {s['chains_used']}" if s.get("chains_used") else ""))
    for view in ("low", "high", "overall"):
        v = result["verdict"][view]
        typer.echo(f"{view}: adaptive {v['adaptive_tokens_per_s']:.1f} tok/s = {v['adaptive_vs_best_static']:.3f}x best static "
                   f"({v['best_static']}; per repeat {v['adaptive_vs_best_static_by_repeat']}), "
                   f"{v['adaptive_vs_no_speculation']:.3f}x no speculation")
    if (text := ceiling_text(result["verdict"]["low"].get("ceiling"))):
        typer.echo(text)
    for t in result["verdict"]["targets"]:
        typer.echo(f"{'MET ' if t['met'] else 'MISS'} {t['target']}: {t['measured']}"
                   + ("" if t["every_repeat"] else " (not in every repeat)"))
