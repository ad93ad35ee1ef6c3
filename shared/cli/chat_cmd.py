"""`specmesh chat`: talk to the running stack in the terminal.

Each turn is a streamed Responses API request that continues the last one
(`previous_response_id`: the gateway keeps the conversation); the answer is printed as it
is generated, then its length, speed and chain. `/new` starts a new conversation, `/exit`
(or end of input) leaves.
"""

from __future__ import annotations

import json
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def chat(
        url: Optional[str] = typer.Option(None, help="Gateway URL (default: settings.gateway.http_url)."),
        system: Optional[str] = typer.Option(None, help="Instructions for the assistant, sent with every turn."),
        max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Most tokens of one answer."),
        temperature: float = typer.Option(0.7, min=0.0, max=2.0, help="0 is greedy."),
        chain: Optional[str] = typer.Option(None, help="Speculation chain, e.g. drafter,target (default: the router's)."),
    ) -> None:
        """Chat with the served model; the gateway keeps the conversation (stored responses)."""
        import httpx

        from shared.cli.client import api_key_header
        from shared.settings import get_settings

        base = url or get_settings().gateway.http_url
        previous: str | None = None
        typer.echo(f"SpecMesh at {base}: /new starts over, /exit leaves.", err=True)
        with httpx.Client(base_url=base, headers=api_key_header(), timeout=300, trust_env=False) as client:
            model = _served_model(client)
            while True:
                try:
                    line = input("> ")
                except (EOFError, KeyboardInterrupt):
                    typer.echo("", err=True)
                    return
                text = line.strip()
                if text in ("/exit", "/quit"):
                    return
                if text == "/new":
                    previous = None
                    typer.echo("(a new conversation)", err=True)
                    continue
                if not text:
                    continue
                body = {"model": model, "input": text, "stream": True, "max_output_tokens": max_tokens,
                        "temperature": temperature, "truncation": "auto"}
                body |= {"instructions": system} if system else {}
                body |= {"previous_response_id": previous} if previous else {}
                body |= {"speculation": {"chain": chain}} if chain else {}
                try:
                    previous = _turn(client, body) or previous
                except httpx.HTTPError as exc:
                    typer.echo(f"error: no answer from {base}: {exc}", err=True)


def _turn(client, body: dict) -> str | None:
    """Send one turn and print its answer as it streams; the response id (None on an error)."""
    with client.stream("POST", "/v1/responses", json=body) as reply:
        if reply.status_code != 200:
            reply.read()
            try:
                message = reply.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = reply.text[:300]
            typer.echo(f"error {reply.status_code}: {message}", err=True)
            return None
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: "):])
            kind = event.get("type")
            if kind == "response.output_text.delta":
                typer.echo(event["delta"], nl=False)
            elif kind == "error":
                typer.echo(f"\nerror: {event.get('message')}", err=True)
                return None
            elif kind in ("response.completed", "response.incomplete"):
                done = event["response"]
                typer.echo("")
                typer.echo(_summary(done), err=True)
                return done["id"]
    return None


def _served_model(client) -> str:
    """The gateway's model (GET /v1/models); "specmesh" when it cannot say (the turn will tell why)."""
    import httpx

    try:
        return client.get("/v1/models").json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return "specmesh"


def _summary(response: dict) -> str:
    usage, timings = response.get("usage") or {}, response.get("timings") or {}
    chain = ",".join((response.get("speculation") or {}).get("chain") or [])
    rate = timings.get("tokens_per_s")
    cut = " (cut at max tokens)" if response.get("status") == "incomplete" else ""
    return (f"[{usage.get('output_tokens', 0)} tokens{cut}" + (f", {rate:.0f} tok/s" if rate else "")
            + (f", chain {chain}" if chain else "") + "]")
