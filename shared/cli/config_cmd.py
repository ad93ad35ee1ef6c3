"""`specmesh config`: every setting, its environment variable, default and meaning."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from pydantic import BaseModel

from shared.settings import Settings


def settings_table() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting, nested ones flattened."""
    rows = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name.upper()}__")
                continue
            default = field.get_default(call_default_factory=True)
            shown = "" if default is None or default == {} else str(default)
            rows.append((f"{prefix}{name.upper()}", shown, field.description or ""))

    walk(Settings, "SPECMESH_")
    return rows


def register(app: typer.Typer) -> None:
    @app.command()
    def config(
        markdown: Annotated[bool, typer.Option("--markdown", help="Print the README's table.")] = False,
        current: Annotated[bool, typer.Option("--current", help="Print the values in effect as JSON.")] = False,
    ) -> None:
        """List every SPECMESH_ setting."""
        if current:
            typer.echo(json.dumps(Settings().model_dump(mode="json"), indent=2))
            return
        rows = settings_table()
        if markdown:
            typer.echo("| variable | default | meaning |\n|---|---|---|")
            for var, default, text in rows:
                typer.echo(f"| `{var}` | `{default}` | {text} |")
            return
        for var, default, text in rows:
            typer.echo(f"{var:<42} {default:<28} {text}")
