"""`specmesh bench prefix`: chat turns with prefix caching off and on, side by side.

    specmesh bench prefix --conversations 8 --system-chars 600 --json

See shared/bench/prefix.py for the workload and what is measured.
"""

from __future__ import annotations

import json
from typing import Optional

import typer


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("prefix")
    def bench_prefix(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        chain: str = typer.Option("drafter,target", help="The chain both modes run (levels bottom first)."),
        k: int = typer.Option(4, help="Tokens proposed per verification at every level."),
        conversations: int = typer.Option(8, min=1, help="Conversations of two turns each."),
        system_chars: int = typer.Option(600, "--system-chars", min=0, help="Characters of the system text every conversation opens with."),
        question_chars: int = typer.Option(120, "--question-chars", min=10, help="Characters of each question."),
        max_tokens: int = typer.Option(32, "--max-tokens", min=2, help="Tokens each turn generates."),
        family: Optional[str] = typer.Option(None, help="Model family profile (tiny, small, bench); default: settings."),
        runner: Optional[str] = typer.Option(None, help="lean or hf (transformers); default: settings.engine.runner."),
        threads: Optional[int] = typer.Option(None, help="torch threads (default: settings.engine.threads)."),
    ) -> None:
        """Prefix caching off and on, one conversation after another on each: TTFT and TPOT."""
        from tqdm import tqdm

        from shared.bench.prefix import run_prefix_bench
        from shared.cli.engine_cmd import _pool, _threads
        from shared.engine.build import RunnerPool
        from shared.models.corpus import heldout_prompts

        n_threads = _threads(threads)
        off = _pool(family, runner, None, None, None)
        on = RunnerPool(off.family, off.kind, off.device, off.dtype, off.max_batch, off.max_len, prefix_caching=True)
        tok = off.tokenizer()
        system = tok.encode(heldout_prompts("prose", 1, system_chars, seed=7)[0]) if system_chars else \
            [tok.bos_token_id] if tok.bos_token_id is not None else []
        asked = heldout_prompts("code", conversations, question_chars, seed=8) + \
            heldout_prompts("prose", conversations, question_chars, seed=9)
        encoded = [tok.encode(q, add_special_tokens=False) for q in asked]
        questions = [(encoded[i], encoded[conversations + i]) for i in range(conversations)]
        longest = max(len(system) + len(a) + len(b) for a, b in questions) + 2 * max_tokens + 2 * k
        if longest > off.max_len:
            typer.echo(f"error: a second turn reaches {longest} tokens, over engine.max_len={off.max_len}; "
                       f"shorten --system-chars / --question-chars / --max-tokens", err=True)
            raise typer.Exit(2)
        try:
            chains = {"off": off.chain(chain, k=k), "on": on.chain(chain, k=k)}
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        for c in chains.values():  # warm up every runner and code path
            c.generate([system[:8] + questions[0][0][:8]], 4)
        bar = tqdm(total=conversations, desc="conversations", unit="conv", disable=as_json)
        result = run_prefix_bench(chains, {"off": off.get("target"), "on": on.get("target")}, system, questions,
                                  max_tokens, progress=bar.update)
        bar.close()
        result |= {"family": off.family.profile, "chain": chain, "k": k, "threads": n_threads, "runner": off.kind,
                   "device": off.device, "dtype": off.dtype}
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        typer.echo(f"family={result['family']} chain={chain} k={k} threads={n_threads} conversations={conversations} "
                   f"system={len(system)} tokens max_tokens={max_tokens}")
        typer.echo(f"{'prefix caching':<16}{'turn':>6}{'TTFT p50 ms':>13}{'TTFT mean ms':>14}{'TPOT p50 ms':>13}"
                   f"{'cached':>9}")
        for name, mode in result["modes"].items():
            for turn in ("turn_1", "turn_2"):
                t = mode[turn]
                typer.echo(f"{name:<16}{turn[-1]:>6}{t['ttft_ms_p50']:>13.2f}{t['ttft_ms_mean']:>14.2f}"
                           f"{t['tpot_ms_p50']:>13.2f}{mode['cached_share']:>9.0%}")
        typer.echo(f"TTFT, off / on: turn 1 {result['ttft_speedup']['turn_1']:.2f}x, turn 2 "
                   f"{result['ttft_speedup']['turn_2']:.2f}x; identical tokens: {result['identical']}")
