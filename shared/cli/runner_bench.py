"""`specmesh bench runner`: a checkpoint's decoding speed on the lean and transformers runners.

    specmesh bench runner --checkpoint /models/qwen3-0.6b --batches 1,4,8 --json

See shared/bench/runner.py for the workload and what is measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("runner")
    def bench_runner(
        checkpoint: Optional[Path] = typer.Option(None, help="A transformers checkpoint folder (default: the family's target)."),
        batches: str = typer.Option("1,4,8", help="Batch sizes, comma-separated."),
        prompt_tokens: int = typer.Option(200, "--prompt-tokens", min=1, help="Tokens of each (random) prompt."),
        max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Tokens each request generates."),
        device: Optional[str] = typer.Option(None, help="cpu or cuda (default: settings.engine.device)."),
        dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: settings.engine.dtype)."),
        threads: Optional[int] = typer.Option(None, help="torch threads (default: settings.engine.threads)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """The target alone, greedy, on each runner that takes the checkpoint: tokens/s by batch size."""
        from tqdm import tqdm

        from shared.bench.runner import run_runner_bench
        from shared.cli.engine_cmd import _threads
        from shared.engine.runner import DTYPES
        from shared.settings import get_settings

        try:
            sizes = sorted({int(b) for b in batches.split(",") if b.strip()})
        except ValueError:
            sizes = []
        if not sizes or sizes[0] < 1:
            typer.echo(f"error: --batches takes positive whole numbers, comma-separated; got {batches!r}", err=True)
            raise typer.Exit(2)
        eng = get_settings().engine
        dtype = dtype or eng.dtype
        if dtype not in DTYPES:
            typer.echo(f"error: --dtype must be one of {', '.join(DTYPES)}; got {dtype!r}", err=True)
            raise typer.Exit(2)
        if checkpoint is None:
            from shared.models.family import resolve_family

            checkpoint = resolve_family(get_settings()).path("target")
        if not (checkpoint / "config.json").is_file():
            typer.echo(f"error: {checkpoint} is not a transformers checkpoint folder (no config.json)", err=True)
            raise typer.Exit(2)
        n_threads = _threads(threads)
        bar = tqdm(total=2 * len(sizes), desc="runs", unit="run", disable=as_json)
        result = run_runner_bench(checkpoint, sizes, prompt_tokens, max_tokens, device or eng.device, dtype,
                                  progress=bar.update)
        bar.close()
        result["threads"] = n_threads
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        typer.echo(f"{result['checkpoint']}: {result['model_type']}, {result['parameters'] / 1e6:.1f}M parameters, "
                   f"{result['device']} {result['dtype']}, threads={n_threads}, prompts of {prompt_tokens} tokens, "
                   f"{max_tokens} tokens each")
        for name, why in result["skipped"].items():
            typer.echo(f"{name}: not run ({why})")
        typer.echo(f"{'runner':<8}{'batch':>7}{'tokens/s':>11}{'seconds':>10}")
        for row in result["rows"]:
            typer.echo(f"{row['runner']:<8}{row['batch']:>7}{row['tokens_per_s']:>11.1f}{row['seconds']:>10.2f}")
        typer.echo(f"identical tokens across runners: {result['identical']}")
