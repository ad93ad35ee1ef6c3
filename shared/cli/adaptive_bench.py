"""`specmesh bench adaptive`: static chains vs no speculation vs the router, on a mixed workload.

    make up && specmesh bench adaptive --json

One run against the running stack's gateway (loopback), greedy, the same prompts for every
configuration: code and prose prompts of two lengths (held out, so short and long request
classes), in two phases — low rate (`--low` requests in flight at once) and high rate
(`--high` at once, closed loop). Configurations: every served static chain whose models
are up (explicit `speculation.chain`), no speculation (`enabled: false`) and adaptive (no
chain given: the gateway uses the router's assignment). Per configuration and phase, and
overall: tokens/s (output tokens over the phase's wall time), TPOT p50/p99 and TTFT p50
measured at the client from the stream, SLO attainment (share of requests whose TPOT is
at most `--slo-tpot-ms`, by default twice the no-speculation TPOT p50 of the low phase).
Adaptive runs last in each phase, so the router has seen every chain's outcomes under that
load. Bounded: `--requests` per phase and configuration, `--max-seconds` per run.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from typing import Optional

import typer

ADAPTIVE = "adaptive"
NO_SPECULATION = "target"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def workload(n: int) -> list[str]:
    """`n` prompts, alternating code and prose, short (~200 chars) and long (~700 chars)."""
    from shared.models.corpus import heldout_prompts

    per = max(1, (n + 3) // 4)
    groups = [heldout_prompts(d, per, chars, seed=17) for d in ("code", "prose") for chars in (200, 700)]
    out = [g[i] for i in range(per) for g in groups]
    return out[:n]


async def _one(client, prompt: str, config: str, max_tokens: int) -> dict:
    body = {"model": "specmesh", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True}
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
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                ids = choice.get("token_ids") or []
                if ids:
                    now = time.perf_counter() - t0
                    first = now if first is None else first
                    last = now
                    tokens += len(ids)
            if chunk.get("speculation"):
                chain = ",".join(chunk["speculation"].get("chain") or [])
    tpot = (last - first) / (tokens - 1) * 1e3 if tokens >= 2 else None
    return {"tokens": tokens, "ttft_ms": None if first is None else first * 1e3, "tpot_ms": tpot,
            "latency_ms": (time.perf_counter() - t0) * 1e3, "chain": chain}


async def _run(client, prompts: list[str], config: str, concurrency: int, max_tokens: int, max_seconds: float,
               bar) -> dict:
    queue = list(prompts)
    results: list[dict] = []
    errors: list[str] = []
    t0 = time.perf_counter()

    async def worker() -> None:
        while queue and time.perf_counter() - t0 < max_seconds:
            prompt = queue.pop(0)
            try:
                results.append(await _one(client, prompt, config, max_tokens))
            except Exception as exc:  # counted and shown: a failed request is not a fast one
                errors.append(str(exc)[:200])
            bar.update(1)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    bar.update(len(queue))
    return {"results": results, "errors": errors, "seconds": time.perf_counter() - t0}


def summarise(runs: list[dict], slo_ms: float | None) -> dict:
    results = [r for run in runs for r in run["results"]]
    seconds = sum(run["seconds"] for run in runs)
    tpots = [r["tpot_ms"] for r in results if r["tpot_ms"] is not None]
    ttfts = [r["ttft_ms"] for r in results if r["ttft_ms"] is not None]
    tokens = sum(r["tokens"] for r in results)
    out = {
        "requests": len(results), "errors": sum(len(run["errors"]) for run in runs), "tokens": tokens,
        "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
        "tpot_p50_ms": _r(percentile(tpots, 50)), "tpot_p99_ms": _r(percentile(tpots, 99)),
        "ttft_p50_ms": _r(percentile(ttfts, 50)),
        "slo_attainment": round(sum(1 for t in tpots if t <= slo_ms) / len(tpots), 4) if tpots and slo_ms else None,
    }
    chains = Counter(r["chain"] for r in results if r["chain"])
    if len(chains) > 1 or any(run.get("adaptive") for run in runs):
        out["chains_used"] = dict(chains.most_common())
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


async def _available_chains(settings) -> list[str]:
    """Served chains whose models the router sees up (every served chain if it cannot say)."""
    from services.router.decision import served_chains
    from shared.cli.router_cmd import ask_router

    chains = [",".join(c) for c in served_chains() if c != ("target",)]
    try:
        models = (await ask_router(settings)).load.get("available_models")
    except Exception:
        models = None
    if models is None:
        return chains
    up = set(models) | {"ngram", "target"}
    return [c for c in chains if set(c.split(",")) <= up]


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("adaptive")
    def bench_adaptive(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        requests: int = typer.Option(24, "--requests", min=4, help="Requests per configuration and phase."),
        max_tokens: int = typer.Option(48, "--max-tokens", min=2),
        low: int = typer.Option(1, "--low", min=1, help="Requests in flight in the low-rate phase."),
        high: int = typer.Option(16, "--high", min=1, help="Requests in flight in the high-rate phase."),
        chains: Optional[str] = typer.Option(None, help="Static chains, ';'-separated (default: every served chain that is up)."),
        slo_tpot_ms: Optional[float] = typer.Option(None, "--slo-tpot-ms", help="TPOT objective (default: 2x no-speculation p50, low phase)."),
        max_seconds: float = typer.Option(120.0, "--max-seconds", help="Longest one configuration may run in one phase."),
    ) -> None:
        """Every static chain, no speculation and the adaptive router: tokens/s, TPOT p50/p99, SLO attainment."""
        import httpx
        from tqdm import tqdm

        from shared.settings import get_settings

        settings = get_settings()
        prompts = workload(requests)

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
                total = len(prompts) * len(configs) * len(phases) + len(statics) + 1
                runs: dict[str, dict[str, dict]] = {}
                with tqdm(total=total, desc="bench adaptive", unit="req", mininterval=1.0, leave=False) as bar:
                    for config in statics + [NO_SPECULATION]:  # warm every level up
                        await _one(client, prompts[0], config, 4)
                        bar.update(1)
                    for phase, concurrency in phases:
                        for config in configs:
                            bar.set_postfix_str(f"{phase} {config}", refresh=False)
                            run = await _run(client, prompts, config, concurrency, max_tokens, max_seconds, bar)
                            run["adaptive"] = config == ADAPTIVE
                            runs.setdefault(config, {})[phase] = run
            return {"configs": configs, "runs": runs}

        try:
            data = asyncio.run(main())
        except RuntimeError as exc:
            typer.secho(f"error: {exc}", err=True, fg="red")
            raise typer.Exit(1) from None
        runs = data["runs"]
        baseline = [r["tpot_ms"] for r in runs[NO_SPECULATION]["low"]["results"] if r["tpot_ms"] is not None]
        slo = slo_tpot_ms or (2 * statistics.median(baseline) if baseline else None)
        result = {"family": settings.models.profile, "threads_per_process": settings.engine.threads,
                  "requests_per_phase": len(prompts), "max_tokens": max_tokens, "concurrency": {"low": low, "high": high},
                  "slo_tpot_ms": _r(slo), "gateway": settings.gateway.http_url, "configs": {}}
        for config in data["configs"]:
            per = runs[config]
            result["configs"][config] = {"low": summarise([per["low"]], slo), "high": summarise([per["high"]], slo),
                                         "overall": summarise([per["low"], per["high"]], slo)}
        statics = [c for c in data["configs"] if c != ADAPTIVE]
        verdict = {}
        for phase in ("low", "high", "overall"):
            best = max(statics, key=lambda c: result["configs"][c][phase]["tokens_per_s"])
            ada = result["configs"][ADAPTIVE][phase]["tokens_per_s"]
            verdict[phase] = {"best_static": best, "best_static_tokens_per_s": result["configs"][best][phase]["tokens_per_s"],
                              "adaptive_tokens_per_s": ada,
                              "adaptive_vs_best_static": round(ada / max(result["configs"][best][phase]["tokens_per_s"], 1e-9), 3),
                              "adaptive_vs_no_speculation": round(ada / max(result["configs"][NO_SPECULATION][phase]["tokens_per_s"], 1e-9), 3)}
        result["verdict"] = verdict
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        typer.echo(f"family={result['family']} threads/process={result['threads_per_process']} requests/phase={len(prompts)} "
                   f"max_tokens={max_tokens} in flight low={low} high={high} SLO TPOT<={result['slo_tpot_ms']} ms (greedy)")
        typer.echo(f"{'config':<34}{'phase':<8}{'tok/s':>8}{'TPOT p50':>10}{'p99':>8}{'TTFT p50':>10}{'SLO':>6}  errors")
        for config, phases in result["configs"].items():
            for phase, s in phases.items():
                typer.echo(f"{config:<34}{phase:<8}{s['tokens_per_s']:>8.1f}{s['tpot_p50_ms'] or 0:>10.2f}"
                           f"{s['tpot_p99_ms'] or 0:>8.2f}{s['ttft_p50_ms'] or 0:>10.2f}{s['slo_attainment'] or 0:>6.2f}  {s['errors']}"
                           + (f"  {s['chains_used']}" if s.get("chains_used") else ""))
        for phase, v in verdict.items():
            typer.echo(f"{phase}: adaptive {v['adaptive_tokens_per_s']:.1f} tok/s = {v['adaptive_vs_best_static']:.3f}x best static "
                       f"({v['best_static']}), {v['adaptive_vs_no_speculation']:.3f}x no speculation")
