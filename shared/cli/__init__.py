"""The `specmesh` command line: one typer app, one module per group of commands."""
