"""`specmesh router explain [--json]`: ask the running router why it assigns what it does;
`specmesh router replay`: what a router resumed from the history would decide, offline.

    specmesh router explain                 # per class: the winner, why, every chain's best k
    specmesh router explain --class code-short --all --json
    specmesh router replay --batch 1,16     # services/router/replay.py

`explain` is one NATS request/reply on `specmesh.router.explain`; the router answers from
the same decision it last published. `replay` reads PostgreSQL only.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="The router: why each request class gets its chain and k.")


async def ask_router(settings, request_class: str = "", timeout_s: float = 3.0):
    """The router's `Explanation`; raises RuntimeError with an actionable message if none answers."""
    import nats
    import nats.errors

    from shared.messages import SUBJECT_EXPLAIN, ExplainQuery, Explanation, decode, encode
    from shared.nats_auth import credentials

    try:
        nc = await nats.connect(settings.nats.client_url, connect_timeout=3, max_reconnect_attempts=0,
                                **credentials(settings))
    except Exception as exc:
        raise RuntimeError(f"cannot reach NATS at {settings.nats.client_url} ({exc}); run `make up`") from None
    try:
        msg = await nc.request(SUBJECT_EXPLAIN, encode(ExplainQuery(request_class)), timeout=timeout_s)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        raise RuntimeError("no router answered on specmesh.router.explain; is the stack up (`specmesh status`)?") from None
    finally:
        await nc.close()
    return decode(msg.data, Explanation)


def _levels(c: dict) -> str:
    parts = []
    for lv in c["levels"]:
        text = f"{lv['model']} t={lv['step_ms']:.3f}"
        if "alpha" in lv:
            text += f" a={lv['alpha']:.2f}"
            if lv.get("draft_rate", 1.0) < 0.999:
                text += f" p={lv['draft_rate']:.2f}"
        parts.append(text)
    return " | ".join(parts)


def format_explanation(data: dict, show_all: bool = False) -> str:
    load = data.get("load", {})
    store = data.get("store", {})
    lines = [f"router table version {data['version']}  batch {load.get('batch')} "
             f"(held {load.get('held_batch')} for the under-load rules)  outcomes {load.get('outcomes')}  "
             f"profiles {load.get('profiles')}  served models {load.get('available_models')}",
             f"history: written {store.get('written')}  buffered {store.get('buffered')}  dropped {store.get('dropped')}  "
             f"database up {store.get('database_up')}",
             "step time per forward (ms = a + b * tokens written): " + ", ".join(
                 f"{m} a={f['a_ms']:.3f} b={f['b_ms_per_token']:.4f} (n={f['samples']})"
                 for m, f in (load.get("step_fits") or {}).items())]
    for cls, choice in data.get("classes", {}).items():
        win = choice["winner"]
        lines += ["", f"[{cls}] -> {win['chain']} k={win['k']}  {win['ms_per_token']:.3f} ms/token  ({choice['reason']})",
                  f"  why: {choice['why']}", f"  specialist drafter: {choice.get('specialist')}",
                  f"  {'chain':<36}{'k':<12}{'ms/token':>9}{'model':>8}{'calib':>7}  inputs (t ms per forward, a acceptance)"]
        rows = choice["candidates"] if show_all else choice["candidates"][:8]
        for c in rows:
            mark = "*" if c["chain"] == win["chain"] and c["k"] == win["k"] else " "
            lines.append(f" {mark}{c['chain']:<36}{str(c['k']):<12}{c['ms_per_token']:>9.3f}{c['model_ms']:>8.3f}"
                         f"{c['calibration']:>7.2f}  {_levels(c)}")
        if not show_all and len(choice["candidates"]) > len(rows):
            lines.append(f"  ... {len(choice['candidates']) - len(rows)} more chains (--all)")
    return "\n".join(lines)


@app.command()
def explain(
    as_json: Annotated[bool, typer.Option("--json", help="Print the router's whole answer as JSON.")] = False,
    request_class: Annotated[Optional[str], typer.Option("--class", help="Only this request class.")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Every candidate chain, not the best 8.")] = False,
) -> None:
    """Per request class: every candidate chain's predicted ms/token (best k), its inputs, and why the winner won."""
    from shared.settings import get_settings

    try:
        reply = asyncio.run(ask_router(get_settings(), request_class or ""))
    except RuntimeError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(1) from None
    if reply.error:
        typer.secho(f"error: the router answered: {reply.error}", err=True, fg="red")
        raise typer.Exit(1)
    data = {"version": reply.version, "classes": reply.classes, "load": reply.load, "store": reply.store}
    typer.echo(json.dumps(data, indent=2) if as_json else format_explanation(data, show_all))


@app.command()
def replay(
    batch: Annotated[str, typer.Option("--batch", help="Comma-separated batches (requests per target) to decide at.")] = "1,4,16",
    rows: Annotated[int, typer.Option("--rows", min=1, help="Newest rows per history table to resume from.")] = 100000,
    request_class: Annotated[Optional[str], typer.Option("--class", help="Only this request class.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the decisions as JSON.")] = False,
    until: Annotated[Optional[str], typer.Option("--until", help="Only history written at or before this ISO 8601 "
                                                  "time (e.g. 2026-12-02T07:05:00Z; no zone: UTC).")] = None,
) -> None:
    """What a router resumed from the history in PostgreSQL would decide per class at each batch (no running router needed)."""
    from services.router.replay import format_replay, load_history, replay as replay_history
    from shared.request_class import CLASSES
    from shared.settings import get_settings

    try:
        batches = [float(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or any(not 1.0 <= b <= 1024 for b in batches):
        typer.secho(f"error: --batch takes numbers from 1 to 1024 separated by commas, got {batch!r}", err=True, fg="red")
        raise typer.Exit(2)
    if request_class and request_class not in CLASSES:
        typer.secho(f"error: unknown class {request_class!r}; the classes are {', '.join(CLASSES)}", err=True, fg="red")
        raise typer.Exit(2)
    moment = None
    if until:
        try:
            moment = datetime.fromisoformat(until.strip().replace("Z", "+00:00"))
        except ValueError:
            typer.secho(f"error: --until takes an ISO 8601 time such as 2026-12-02T07:05:00Z, got {until!r}",
                        err=True, fg="red")
            raise typer.Exit(2) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
    settings = get_settings()
    try:
        history = asyncio.run(load_history(settings.database.app_url, rows, moment))
    except Exception as exc:
        typer.secho(f"error: cannot read the router history at {settings.database.host}:{settings.database.port} "
                    f"({type(exc).__name__}: {exc}); is PostgreSQL up (`make up`)?", err=True, fg="red")
        raise typer.Exit(1) from None
    data = replay_history(settings, history, batches, request_class or "")
    typer.echo(json.dumps(data, indent=2) if as_json else format_replay(data))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="router", help="The router: `specmesh router explain [--json]`, `specmesh router replay`.")
