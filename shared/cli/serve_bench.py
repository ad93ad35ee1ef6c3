"""`specmesh bench serve`: the running stack against the in-process engine, same prompts.

    make up && specmesh bench serve --prompts 6 --max-tokens 32 --json

For each chain, requests go one at a time (batch 1, greedy) through the gateway's
streaming API; tokens/s and mean inter-token latency are measured at the client. After
each request the same prompt runs through the same chain in this process on the same
models (services and engine alternate, so drift in the machine's speed weighs on both), so
the cost of distribution is visible: `distribution_overhead = 1 - services tokens/s /
engine tokens/s`.
"""

from __future__ import annotations

import json
import time

import typer

from shared.bench.load import fresh_salt
from shared.bench.sse import chunks_sync
from shared.cli.client import api_key_header, served_model

DEFAULT_CHAINS = "target;drafter,target;drafter,verifier,target"


def _stream_one(client, prompt: list[int], chain: str, k: int, max_tokens: int) -> tuple[list[int], list[float]]:
    """Token ids and the arrival time of each streamed chunk (seconds since the request)."""
    body = {"model": served_model(), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True, "speculation": {"chain": chain, "k": k}, "cache_salt": fresh_salt()}
    tokens: list[int] = []
    arrivals: list[float] = []
    t0 = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"gateway answered {resp.status_code}: {resp.read().decode()}")
        for chunk in chunks_sync(resp):
            for choice in chunk.get("choices", []):
                ids = choice.get("token_ids") or []
                if ids:
                    tokens.extend(ids)
                    arrivals.extend([time.perf_counter() - t0] * len(ids))
    return tokens, arrivals


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("serve")
    def bench_serve(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        prompts: int = typer.Option(4, "--prompts", min=1, help="Prompts (half code, half prose)."),
        max_tokens: int = typer.Option(32, "--max-tokens", min=1),
        k: int = typer.Option(4, help="Tokens proposed per verification at every level."),
        chains: str = typer.Option(DEFAULT_CHAINS, help="Chains to measure, separated by ';'."),
    ) -> None:
        """Services vs in-process engine, batch 1, greedy: tokens/s, inter-token latency, overhead."""
        import httpx
        import torch

        from shared.engine.build import RunnerPool
        from shared.models.corpus import heldout_prompts
        from shared.models.family import resolve_family
        from shared.settings import get_settings

        settings = get_settings()
        family = resolve_family(settings)
        pool = RunnerPool(family, settings.engine.runner, settings.engine.device, settings.engine.dtype,
                          max_len=settings.engine.max_len)
        tok = pool.tokenizer()
        half = max(1, prompts // 2)
        texts = heldout_prompts("code", half, 200) + heldout_prompts("prose", max(1, prompts - half), 200)
        ps = [tok.encode(t)[-128:] for t in texts]
        specs = [c.strip() for c in chains.split(";") if c.strip()]
        torch.set_num_threads(settings.engine.threads)

        result = {"family": family.profile, "threads_per_process": settings.engine.threads, "prompts": len(ps),
                  "max_tokens": max_tokens, "k": k, "gateway": settings.gateway.http_url, "chains": {}}
        with httpx.Client(base_url=settings.gateway.http_url, timeout=settings.gateway.request_timeout_s,
                          headers=api_key_header()) as client:
            try:
                client.get("/health").raise_for_status()
            except httpx.HTTPError as exc:
                typer.secho(f"error: no healthy gateway at {settings.gateway.http_url} ({exc}); run `make up`",
                            err=True, fg="red")
                raise typer.Exit(1) from exc
            for spec in specs:
                # Services and engine alternate prompt by prompt, so that drift in the machine's
                # speed (frequent on shared cores) weighs on both sides alike.
                chain = pool.chain(spec, k=k)
                _stream_one(client, ps[0][:16], spec, k, 4)  # warm up every level of the chain
                chain.generate([ps[0][:16]], 4)
                svc_outs, eng_outs, gaps, svc_s, eng_s = [], [], [], 0.0, 0.0
                for p in ps:
                    t0 = time.perf_counter()
                    toks, arrivals = _stream_one(client, p, spec, k, max_tokens)
                    svc_s += time.perf_counter() - t0
                    svc_outs.append(toks)
                    gaps += [b - a for a, b in zip(arrivals, arrivals[1:])]
                    t0 = time.perf_counter()
                    eng_outs.append(chain.generate([p], max_tokens)[0])
                    eng_s += time.perf_counter() - t0
                n_svc, n_eng = sum(len(o) for o in svc_outs), sum(len(o) for o in eng_outs)
                svc = {"tokens_per_s": round(n_svc / svc_s, 2), "ms_per_token": round(1e3 * svc_s / max(n_svc, 1), 3),
                       "mean_itl_ms": round(1e3 * sum(gaps) / max(len(gaps), 1), 3)}
                eng = {"tokens_per_s": round(n_eng / eng_s, 2), "ms_per_token": round(1e3 * eng_s / max(n_eng, 1), 3)}
                result["chains"][spec] = {"services": svc, "engine": eng,
                                          "distribution_overhead": round(1 - svc["tokens_per_s"] / eng["tokens_per_s"], 3),
                                          "identical": svc_outs == eng_outs}
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        typer.echo(f"family={result['family']} threads/process={settings.engine.threads} prompts={len(ps)} "
                   f"max_tokens={max_tokens} k={k} (batch 1, greedy)")
        typer.echo(f"{'chain':<28}{'services tok/s':>15}{'ITL ms':>8}{'engine tok/s':>14}{'overhead':>10}  identical")
        for spec, r in result["chains"].items():
            typer.echo(f"{spec:<28}{r['services']['tokens_per_s']:>15.1f}{r['services']['mean_itl_ms']:>8.2f}"
                       f"{r['engine']['tokens_per_s']:>14.1f}{r['distribution_overhead']:>10.3f}  {r['identical']}")
