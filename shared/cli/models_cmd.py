"""`specmesh models ...`: train, list and evaluate the model family.

    specmesh models train --profile tiny
    specmesh models list --json
    specmesh models eval --profile tiny --json
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True)


class ProfileName(str, Enum):
    tiny = "tiny"
    small = "small"
    bench = "bench"


def _cache_dir(cache_dir: Optional[Path]) -> Optional[Path]:
    return cache_dir.expanduser() if cache_dir else None


@app.command()
def train(
    profile: ProfileName = typer.Option(ProfileName.tiny, help="Which family to train."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache folder (default: SPECMESH_MODELS__CACHE_DIR)."),
) -> None:
    """Train the tokenizer and the family of `profile` (instant when cached; resumable)."""
    import time

    from shared.models.family import ensure_family

    started = time.perf_counter()
    family = ensure_family(profile.value, _cache_dir(cache_dir), progress=True)
    typer.echo(f"family {family.profile} ready at {family.root} ({time.perf_counter() - started:.1f} s)")
    for entry in family.models.values():
        typer.echo(f"  {entry.name:<14} {entry.params:>10,} params  domain={entry.domain:<5} {entry.path}")


@app.command("list")
def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    profile: Optional[ProfileName] = typer.Option(None, help="Profile to list (default: the settings' family, folders included)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache folder (default: SPECMESH_MODELS__CACHE_DIR)."),
) -> None:
    """Each model's name, role, folder, parameter count and domain (trains the family if missing)."""
    from shared.models.family import ensure_family, resolve_family
    from shared.settings import get_settings

    if profile is None and cache_dir is None:
        family = resolve_family(get_settings())
    else:
        family = ensure_family((profile or ProfileName(get_settings().models.profile)).value, _cache_dir(cache_dir))
    rows = [
        {"name": e.name, "role": e.role, "path": str(e.path), "params": e.params, "domain": e.domain}
        for e in family.models.values()
    ]
    if as_json:
        typer.echo(json.dumps({"profile": family.profile, "root": str(family.root), "models": rows}, indent=2))
        return
    typer.echo(f"family {family.profile} at {family.root}")
    for row in rows:
        typer.echo(f"  {row['name']:<14} role={row['role']:<14} {row['params']:>10,} params  domain={row['domain']:<5} {row['path']}")


@app.command("eval")
def evaluate(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    profile: Optional[ProfileName] = typer.Option(None, help="Profile to measure (default: the settings' family)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache folder (default: SPECMESH_MODELS__CACHE_DIR)."),
    windows: int = typer.Option(32, min=1, help="Held-out windows per domain."),
    seq_len: int = typer.Option(128, min=8, help="Tokens per window."),
    latency: bool = typer.Option(True, help="Also time each model's decoding step (1 thread)."),
) -> None:
    """Per pair and domain: greedy agreement and 1 - TV; per model: step latency; per chain: predicted speedup."""
    from shared.models.evaluate import evaluate_family, format_report
    from shared.models.family import ensure_family, resolve_family
    from shared.settings import get_settings

    if profile is None and cache_dir is None:
        family = resolve_family(get_settings())
    else:
        family = ensure_family((profile or ProfileName(get_settings().models.profile)).value, _cache_dir(cache_dir))
    report = evaluate_family(family, windows=windows, seq_len=seq_len, latency=latency, progress=not as_json)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@app.command("check")
def check(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """What the services will make of the settings' models, before `specmesh up`: each one's
    architecture, runner (lean, or transformers and why), context, end tokens and memory; the
    target's sampling defaults and chat template; exit status 1 if something is wrong."""
    from shared.cli.models_check import check_family
    from shared.models.family import VocabularyMismatch, resolve_family
    from shared.settings import get_settings

    settings = get_settings()
    try:
        family = resolve_family(settings)
    except (VocabularyMismatch, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    report = check_family(family, settings)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        eng = settings.engine
        typer.echo(f"family {report['profile']} at {report['root']}; engine: {eng.runner} runner, {eng.dtype}, "
                   f"max_batch {eng.max_batch}, max_len {eng.max_len}")
        typer.echo(f"  {'model':<14}{'type':<14}{'params':>10}  {'runner':<7}{'context':>8}  {'end tokens':<16}"
                   f"{'weights':>10}{'KV cache':>10}")
        for m in report["models"]:
            typer.echo(f"  {m['name']:<14}{m['model_type']:<14}{m['params'] / 1e6:>9.2f}M  {m['runner']:<7}"
                       f"{m['context'] or '?':>8}  {str(m['eos_token_ids']):<16}{_mib(m['weights_bytes']):>10}"
                       f"{_mib(m['kv_cache_bytes']):>10}")
        for m in report["models"]:
            if m["runner_reason"]:
                typer.echo(f"  {m['name']} runs on transformers: {m['runner_reason']}")
        defaults = report["sampling"]["defaults"]
        typer.echo(f"target sampling defaults: {', '.join(f'{k}={v}' for k, v in defaults.items())} "
                   f"(from {report['sampling']['source']})" if defaults else "target sampling defaults: OpenAI's")
        typer.echo(f"chat template: {report['chat_template']}")
        typer.echo("problems: " + ("none" if not report["problems"] else "\n  " + "\n  ".join(report["problems"])))
    if report["problems"]:
        raise typer.Exit(1)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"
