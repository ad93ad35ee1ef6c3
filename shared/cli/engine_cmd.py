"""`specmesh generate` and `specmesh bench engine`: the in-process engine (filled in by the engine work)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the engine's commands to the top-level app."""
