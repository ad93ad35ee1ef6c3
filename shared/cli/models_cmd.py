"""`specmesh models ...`: train, list and evaluate the model family (filled in by the model-family work)."""

import typer

app = typer.Typer(no_args_is_help=True)
