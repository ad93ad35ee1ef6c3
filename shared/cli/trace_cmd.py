"""`specmesh trace show <request-id>` and `specmesh trace list`: traces from the local span files.

Every service writes its spans to `<run_dir>/traces/<service>.jsonl` (shared/tracing.py);
these commands read them back, find the trace of a request id (or a trace id, as in the
`x-trace-id` response header) and print its span tree with start offsets and durations.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Annotated

import typer

from shared.settings import get_settings

app = typer.Typer(no_args_is_help=True, help="Request traces from the local span files (<run_dir>/traces).")

# Attributes worth a column in the tree (the rest: --attributes).
SHOWN = ("specmesh.level", "specmesh.batch_size", "specmesh.k", "specmesh.tokens", "specmesh.returned",
         "specmesh.emitted", "specmesh.accepted", "specmesh.epoch", "specmesh.position", "gen_ai.usage.input_tokens",
         "gen_ai.usage.output_tokens", "specmesh.chain", "http.route", "rpc.method")


def trace_dir(run_dir: Path | None = None) -> Path:
    return (run_dir or get_settings().run_dir) / "traces"


def find_trace(spans: list[dict], ident: str) -> str | None:
    """The trace id of request `ident` (a request id or a trace id), the newest if several."""
    if any(s["trace_id"] == ident for s in spans):
        return ident
    found = [s for s in spans if s.get("attributes", {}).get("specmesh.request_id") == ident
             or s.get("attributes", {}).get("gen_ai.response.id") == ident]
    return max(found, key=lambda s: s["start_ns"])["trace_id"] if found else None


def span_tree(spans: list[dict]) -> list[tuple[int, dict]]:
    """(depth, span) in tree order: children by start time; spans whose parent is missing are roots."""
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict]] = defaultdict(list)
    for s in spans:
        children[s["parent_id"] if s["parent_id"] in ids else None].append(s)
    out: list[tuple[int, dict]] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: (s["start_ns"], s["end_ns"])):
            out.append((depth, s))
            walk(s["span_id"], depth + 1)

    walk(None, 0)
    return out


def render(spans: list[dict], attributes: bool = False) -> str:
    """The span tree as text: offset from the trace's start, duration, service, name, key attributes."""
    if not spans:
        return ""
    t0 = min(s["start_ns"] for s in spans)
    t1 = max(s["end_ns"] for s in spans)
    services = sorted({s["service"] for s in spans})
    lines = [f"trace {spans[0]['trace_id']}  {(t1 - t0) / 1e6:.1f} ms  {len(spans)} spans  ({', '.join(services)})",
             f"{'start ms':>9} {'dur ms':>8}  {'service':<9} span"]
    for depth, s in span_tree(spans):
        attrs = s.get("attributes", {})
        shown = attrs if attributes else {k: v for k, v in attrs.items() if k in SHOWN}
        extra = " ".join(f"{k.split('.', 1)[-1] if k.startswith('specmesh.') else k}={_short(v)}"
                         for k, v in shown.items())
        status = f"  ERROR: {s.get('error') or ''}" if s.get("status") == "ERROR" else ""
        lines.append(f"{(s['start_ns'] - t0) / 1e6:9.2f} {(s['end_ns'] - s['start_ns']) / 1e6:8.2f}  "
                     f"{s['service']:<9} {'  ' * depth}{s['name']}  {extra}{status}".rstrip())
        for event in s.get("events", []):  # rollbacks are events of the step's span
            detail = " ".join(f"{k.split('.', 1)[-1]}={_short(v)}" for k, v in event.get("attributes", {}).items()
                              if k != "specmesh.level")
            lines.append(f"{(event['ns'] - t0) / 1e6:9.2f} {'':>8}  {s['service']:<9} {'  ' * (depth + 1)}"
                         f"· {event['name']}  {detail}".rstrip())
    return "\n".join(lines)


def _short(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def register(main: typer.Typer) -> None:
    main.add_typer(app, name="trace")


@app.command()
def show(
    request_id: Annotated[str, typer.Argument(help="A request id (cmpl-..., chatcmpl-..., gen-...) or a trace id.")],
    attributes: Annotated[bool, typer.Option("--attributes", "-a", help="Every attribute of every span.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The trace's spans as JSON lines.")] = False,
) -> None:
    """Print the span tree of one request with timings."""
    from shared.tracing import read_spans

    directory = trace_dir()
    spans = read_spans(directory)
    tid = find_trace(spans, request_id)
    if tid is None:
        typer.secho(f"no trace of {request_id!r} in {directory} (spans are written about a second after they end)",
                    err=True, fg="red")
        raise typer.Exit(1)
    mine = [s for s in spans if s["trace_id"] == tid]
    if as_json:
        for s in mine:
            typer.echo(json.dumps(s))
        return
    typer.echo(render(mine, attributes))


@app.command("list")
def list_(n: Annotated[int, typer.Option("-n", help="How many requests.")] = 20) -> None:
    """The latest traced requests: start, request id, trace id, duration."""
    from shared.tracing import read_spans

    spans = read_spans(trace_dir())
    roots = [s for s in spans if s["service"] == "gateway" and "specmesh.request_id" in s.get("attributes", {})
             and s["name"] != "router.assignment"]
    for s in sorted(roots, key=lambda s: s["start_ns"])[-n:]:
        typer.echo(f"{s['attributes']['specmesh.request_id']:<40} {s['trace_id']}  "
                   f"{(s['end_ns'] - s['start_ns']) / 1e6:8.1f} ms  {s['status']}")
