"""`specmesh generate` and `specmesh bench engine`: the speculative engine in one process.

    specmesh generate --chain ngram,drafter,verifier,target --max-tokens 64 "def main("
    specmesh bench engine --prompts 4 --max-tokens 32 --json

torch and transformers are imported inside the commands, so the CLI starts fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (one run, same prompts and models).")

BENCH_CHAINS = ("drafter,target", "verifier,target", "drafter,verifier,target", "ngram,target", "ngram,drafter,target", "ngram,drafter,verifier,target")


def _ks(value: str) -> int | list[int]:
    parts = [int(x) for x in value.split(",") if x.strip()]
    return parts[0] if len(parts) == 1 else parts


def _pool(family_profile: Optional[str], runner: str, device: Optional[str], dtype: Optional[str], max_len: Optional[int]):
    from shared.engine.build import RunnerPool
    from shared.models.family import ensure_family, resolve_family
    from shared.settings import get_settings

    settings = get_settings()
    family = ensure_family(family_profile) if family_profile else resolve_family(settings)
    eng = settings.engine
    return RunnerPool(family, runner or eng.runner, device or eng.device, dtype or eng.dtype, eng.max_batch, max_len or eng.max_len)


def _threads(threads: Optional[int]) -> int:
    import torch

    from shared.settings import get_settings

    n = threads or get_settings().engine.threads
    torch.set_num_threads(n)
    return n


def generate(
    prompt: str = typer.Argument(..., help="The prompt text."),
    chain: Optional[str] = typer.Option(None, help="Levels bottom first, e.g. ngram,drafter,verifier,target (default: settings)."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Tokens to generate."),
    k: str = typer.Option("4", help="Tokens proposed per verification: one value, or one per proposing level (e.g. 3,4,4)."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p times the likeliest's probability."),
    seed: Optional[int] = typer.Option(None, help="Seeded sampling: same seed and prompt, same tokens, whatever the chain."),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty", help="Minus this for a token already in the output."),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty", help="Minus this per time a token is in the output."),
    repetition_penalty: float = typer.Option(
        1.0, "--repetition-penalty", help="Logits of tokens seen so far divided (positive) or multiplied (negative) by this; 1 = off."),
    json_object: bool = typer.Option(False, "--json", help="The output is one JSON object (response_format json_object)."),
    json_schema: Optional[Path] = typer.Option(
        None, "--json-schema", exists=True, dir_okay=False, help="A JSON Schema file: the output is one object that validates against it."),
    regex: Optional[str] = typer.Option(None, "--regex", help="The whole output matches this regular expression (vLLM's guided_regex)."),
    confidence_threshold: float = typer.Option(0.0, "--confidence-threshold", help="Stop drafting below this confidence."),
    leniency: float = typer.Option(1.0, help="Middle-level leniency (>= 1; the target stays exact)."),
    runner: Optional[str] = typer.Option(None, help="lean | hf (default: settings)."),
    family: Optional[str] = typer.Option(None, help="Model family profile (tiny, small, bench); default: settings."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: settings.engine.threads)."),
    device: Optional[str] = typer.Option(None, help="torch device (default: settings)."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 (default: settings)."),
) -> None:
    """Generate text with a speculative chain and print per-level acceptance and tokens/s."""
    from shared.engine.sampling import SamplingParams
    from shared.settings import get_settings

    n_threads = _threads(threads)
    settings = get_settings()
    try:
        if sum(map(bool, (json_object, json_schema, regex))) > 1:
            raise ValueError("give one of --json, --json-schema, --regex")
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                                  presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                  repetition_penalty=repetition_penalty,
                                  response_format="json_schema" if json_schema else "json_object" if json_object
                                  else "regex" if regex else "",
                                  json_schema=_schema_text(json_schema) if json_schema else "", regex=regex or "")
        pool = _pool(family, runner, device, dtype, None)
        c = pool.chain(
            chain or settings.speculation.chain,
            k=_ks(k),
            confidence_threshold=confidence_threshold,
            leniency=leniency,
        )
    except (ValueError, KeyError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    tok = pool.tokenizer()
    ids = tok.encode(prompt)
    t0 = time.perf_counter()
    (out,) = c.generate([ids], max_tokens, sampling)
    seconds = time.perf_counter() - t0
    typer.echo(prompt + tok.decode(out, skip_special_tokens=True))
    stats = c.collect_stats()
    typer.echo("")
    for lv in stats.levels[:-1]:
        acc = "n/a" if lv.acceptance is None else f"{lv.acceptance:.3f}"
        typer.echo(f"  {lv.name:>14}: drafted {lv.drafted:5d}  accepted {lv.accepted:5d}  acceptance {acc}  forwards {lv.forwards}")
    top = stats.levels[-1]
    typer.echo(f"  {top.name:>14}: forwards {top.forwards}  ({len(out) / max(top.forwards, 1):.2f} tokens per target forward)")
    typer.echo(f"{len(out)} tokens in {seconds:.3f} s: {len(out) / seconds:.1f} tokens/s  (threads={n_threads}, runner={pool.kind}, {pool.device}/{pool.dtype})")


def _schema_text(path: Path) -> str:
    """A schema file's content as the text a request carries (ValueError if it is not JSON)."""
    from shared.engine.json_schema import canonical_schema

    try:
        return canonical_schema(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None


def _prompts(tokenizer, n: int, prompt_chars: int) -> list[list[int]]:
    from shared.models.corpus import heldout_prompts

    half = max(1, n // 2)
    texts = heldout_prompts("code", half, prompt_chars) + heldout_prompts("prose", max(1, n - half), prompt_chars)
    return [tokenizer.encode(t) for t in texts]


def _run(chain, prompts, max_tokens, batch: int = 1, sampling=None) -> tuple[list[list[int]], float]:
    from shared.engine.sampling import GREEDY

    chain.reset_stats()
    outs = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs.extend(chain.generate(prompts[i : i + batch], max_tokens, sampling or GREEDY))
    return outs, time.perf_counter() - t0


@bench_app.command("engine")
def bench_engine(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    prompts: int = typer.Option(4, "--prompts", min=1, help="Prompts (half code, half prose)."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1),
    prompt_chars: int = typer.Option(200, "--prompt-chars", min=10),
    k: int = typer.Option(4, help="Tokens proposed per verification at every level."),
    batch: int = typer.Option(1, "--batch", min=1, help="Requests per lockstep batch (transformers stays at 1)."),
    chains: str = typer.Option(";".join(BENCH_CHAINS), help="Chains to measure, separated by ';'."),
    family: Optional[str] = typer.Option(None, help="Model family profile (tiny, small, bench); default: settings."),
    runner: Optional[str] = typer.Option(None, help="lean | hf (default: settings)."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: settings.engine.threads)."),
    profile: bool = typer.Option(False, "--profile", help="Also print where the time of each chain goes (cProfile, top functions)."),
    hf: bool = typer.Option(True, "--hf/--no-hf", help="Measure transformers assisted generation on the drafter/target pair."),
    json_object: bool = typer.Option(False, "--json-object", help="Every run in JSON mode (response_format json_object; no transformers run)."),
    json_schema: Optional[Path] = typer.Option(
        None, "--json-schema", exists=True, dir_okay=False, help="Every run under this JSON Schema (no transformers run)."),
    regex: Optional[str] = typer.Option(None, "--regex", help="Every run under this regular expression (guided_regex; no transformers run)."),
) -> None:
    """Greedy: target alone, each chain, and transformers assisted generation (batch 1)."""
    from shared.engine.sampling import GREEDY, SamplingParams
    from shared.engine.stats import theoretical_speedup

    n_threads = _threads(threads)
    try:
        if sum(map(bool, (json_object, json_schema, regex))) > 1:
            raise ValueError("give one of --json-object, --json-schema, --regex")
        sampling = GREEDY if not (json_object or json_schema or regex) else SamplingParams(
            response_format="json_schema" if json_schema else "regex" if regex else "json_object",
            json_schema=_schema_text(json_schema) if json_schema else "", regex=regex or "")
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    hf = hf and sampling is GREEDY  # transformers' assisted generation takes no grammar
    pool = _pool(family, runner, None, None, None)
    tok = pool.tokenizer()
    ps = _prompts(tok, prompts, prompt_chars)
    specs = [c.strip() for c in chains.split(";") if c.strip()]
    built = {"target": pool.chain("target")}
    built.update({s: pool.chain(s, k=k) for s in specs})
    for c in built.values():  # warm up every runner and code path
        c.generate([ps[0][:16]], 4, sampling)

    ref, secs = _run(built["target"], ps, max_tokens, batch, sampling)
    base = built["target"].collect_stats()
    n_tokens = sum(len(o) for o in ref)
    target_tps = n_tokens / secs
    target_step = base.levels[-1].step_time or 0.0
    result = {
        "family": pool.family.profile,
        "threads": n_threads,
        "runner": pool.kind,
        "device": pool.device,
        "dtype": pool.dtype,
        "prompts": len(ps),
        "max_tokens": max_tokens,
        "k": k,
        "batch": batch,
        "response_format": sampling.response_format or "text",
        "target_only": {"tokens": n_tokens, "seconds": round(secs, 4), "tokens_per_s": round(target_tps, 2), "step_ms": round(target_step * 1e3, 4)},
        "chains": {},
    }
    for spec in specs:
        c = built[spec]
        if profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
        outs, secs = _run(c, ps, max_tokens, batch, sampling)
        if profile:
            prof.disable()
            typer.echo(f"--- profile of {spec}", err=True)
            pstats.Stats(prof, stream=__import__("sys").stderr).sort_stats("tottime").print_stats(12)
        stats = c.collect_stats()
        tps = sum(len(o) for o in outs) / secs
        theory = theoretical_speedup(stats.levels, target_step)
        speedup = tps / target_tps
        result["chains"][spec] = {
            "tokens_per_s": round(tps, 2),
            "speedup": round(speedup, 3),
            "acceptance": {lv.name: None if lv.acceptance is None else round(lv.acceptance, 4) for lv in stats.levels[:-1]},
            "theoretical_speedup": None if theory is None else round(theory, 3),
            "efficiency": None if not theory else round(speedup / theory, 3),
            "identical_to_target": outs == ref,
            "tokens_per_target_forward": round(sum(len(o) for o in outs) / max(stats.levels[-1].forwards, 1), 3),
            "step_ms": {lv.name: None if lv.step_time is None else round(lv.step_time * 1e3, 4) for lv in stats.levels},
        }
    if hf:
        result.update(_bench_hf(pool, ps, max_tokens))
        if "drafter,target" in result["chains"]:
            ours = result["chains"]["drafter,target"]["tokens_per_s"]
            result["drafter_target_vs_hf_assisted"] = round(ours / result["hf_assisted_tokens_per_s"], 3)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    t = result["target_only"]
    typer.echo(
        f"family={result['family']} threads={n_threads} runner={pool.kind} {pool.dtype} prompts={len(ps)} "
        f"max_tokens={max_tokens} k={k} batch={batch} response_format={result['response_format']}\n"
        f"target alone: {t['tokens_per_s']:.1f} tokens/s (step {t['step_ms']:.2f} ms)"
    )
    typer.echo(f"{'chain':<32}{'tok/s':>8}{'speedup':>9}{'theory':>8}{'effic.':>8}  identical  acceptance")
    for spec, r in result["chains"].items():
        acc = " ".join(f"{n}={a:.2f}" if a is not None else f"{n}=n/a" for n, a in r["acceptance"].items())
        theory = "n/a" if r["theoretical_speedup"] is None else f"{r['theoretical_speedup']:.2f}"
        eff = "n/a" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        typer.echo(f"{spec:<32}{r['tokens_per_s']:>8.1f}{r['speedup']:>9.2f}{theory:>8}{eff:>8}  {str(r['identical_to_target']):<9}  {acc}")
    if hf:
        typer.echo(
            f"transformers: target alone {result['hf_target_tokens_per_s']:.1f} tokens/s, "
            f"assisted (drafter,target) {result['hf_assisted_tokens_per_s']:.1f} tokens/s"
        )


def _bench_hf(pool, prompts, max_tokens) -> dict:
    """transformers `generate`, greedy, batch 1: the target alone and with `assistant_model`."""
    import torch

    from shared.engine.runner import DTYPES, load_hf_model

    dtype = DTYPES[pool.dtype]
    target = load_hf_model(pool.path("target")).to(pool.device, dtype)
    drafter = load_hf_model(pool.path("drafter")).to(pool.device, dtype)
    out = {}
    for key, kwargs in (("hf_target_tokens_per_s", {}), ("hf_assisted_tokens_per_s", {"assistant_model": drafter})):
        ids = torch.tensor([prompts[0][:16]], device=pool.device)
        target.generate(ids, max_new_tokens=4, do_sample=False, **kwargs)  # warm-up
        n, t0 = 0, time.perf_counter()
        for p in prompts:
            ids = torch.tensor([p], device=pool.device)
            gen = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, **kwargs)
            n += gen.shape[1] - ids.shape[1]
        out[key] = round(n / (time.perf_counter() - t0), 2)
    return out


def register(app: typer.Typer) -> None:
    """Add `generate` and the `bench` group (with `bench engine`) to the top-level app."""
    app.command("generate")(generate)
    app.add_typer(bench_app, name="bench", help="Benchmarks: `specmesh bench engine`.")
