"""`specmesh up | down | status | logs | serve | supervise | db`: run the local stack."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from shared.settings import SERVICES, get_settings


def register(app: typer.Typer) -> None:
    @app.command()
    def up() -> None:
        """Start NATS, PostgreSQL, migrations and every service; return once all are healthy."""
        from shared.stack.stack import Stack

        def check(family) -> None:  # `specmesh models check`'s problems stop the start before any service
            from shared.cli.models_check import check_family

            problems = check_family(family, get_settings())["problems"]
            if problems:
                raise RuntimeError("the models cannot be served as configured (specmesh models check):\n  "
                                   + "\n  ".join(problems))

        try:
            Stack(get_settings()).up(say=lambda line: typer.echo(line, err=True), check=check)
        except Exception as exc:
            typer.secho(f"error: {exc}", err=True, fg="red")
            raise typer.Exit(1) from exc
        typer.echo(get_settings().gateway.http_url)

    @app.command()
    def down(purge: Annotated[bool, typer.Option("--purge", help="Also delete all data under the run dir.")] = False) -> None:
        """Stop exactly what `specmesh up` started (by pid file)."""
        from shared.stack.stack import Stack

        stack = Stack(get_settings())
        stack.down(say=lambda line: typer.echo(line, err=True))
        if purge:
            stack.purge()
        left = stack.listening_ports()
        if left:
            typer.secho(f"warning: ports still listening: {left}", err=True, fg="yellow")

    @app.command()
    def status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
        """Each server and service: pid and whether it answers."""
        from shared.stack.stack import Stack

        rows = Stack(get_settings()).status()
        if as_json:
            typer.echo(json.dumps([row.__dict__ for row in rows], indent=2))
            return
        for row in rows:
            typer.echo(f"{row.name:<11} {row.state:<9} {row.pid or '-'}")
        if any(row.state != "up" for row in rows):
            raise typer.Exit(3)

    @app.command()
    def logs(
        name: Annotated[str | None, typer.Argument(help="One server or service; all when omitted.")] = None,
        lines: Annotated[int, typer.Option("-n", help="Lines from the end of each log.")] = 40,
    ) -> None:
        """Show the last lines of the stack's logs."""
        log_dir = get_settings().run_dir / "logs"
        paths = [log_dir / f"{name}.log"] if name else sorted(log_dir.glob("*.log"))
        for path in paths:
            if not path.exists():
                typer.secho(f"no log {path}", err=True, fg="yellow")
                continue
            typer.secho(f"==> {path} <==", bold=True)
            typer.echo("".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:]))

    @app.command()
    def serve(name: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICES)}.")]) -> None:
        """Run one service in the foreground (what `up` and compose.yaml start)."""
        if name not in SERVICES:
            typer.secho(f"error: unknown service {name!r}; expected one of {', '.join(SERVICES)}", err=True, fg="red")
            raise typer.Exit(2)
        settings = get_settings()
        logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                            format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
        if name in settings.cpus:
            from shared.settings import parse_cpus

            cores = parse_cpus(settings.cpus[name]) & os.sched_getaffinity(0)
            if not cores:
                typer.secho(f"error: SPECMESH_CPUS__{name.upper()}={settings.cpus[name]} names no core this machine "
                            f"offers ({sorted(os.sched_getaffinity(0))})", err=True, fg="red")
                raise typer.Exit(2)
            os.sched_setaffinity(0, cores)
            logging.getLogger("specmesh").info("%s pinned to cores %s", name, sorted(cores))
        from services import load_service

        asyncio.run(load_service(name)(settings).run())

    @app.command()
    def ping(name: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICES)}.")]) -> None:
        """Exit 0 if service NAME answers a NATS `micro` ping (a container healthcheck)."""
        from shared.service import connect, ping as micro_ping

        async def once() -> dict | None:
            nc = await connect(get_settings(), "specmesh-ping")
            try:
                return await micro_ping(nc, name, timeout_s=2.0)
            finally:
                await nc.close()

        reply = asyncio.run(once())
        if reply is None:
            typer.secho(f"{name}: no answer", err=True, fg="red")
            raise typer.Exit(1)
        typer.echo(json.dumps(reply))

    @app.command("nats-config")
    def nats_config(
        out: Annotated[Path, typer.Option("--out", help="Where to write it (mode 0600).")] = Path("nats.conf"),
    ) -> None:
        """Write a NATS server configuration with one user per service (for a NATS started elsewhere, e.g. compose)."""
        from shared.stack.servers import nats_config

        settings = get_settings()
        if settings.nats.secret is None:
            typer.secho("set SPECMESH_NATS__SECRET: the services derive their NATS passwords from it", err=True, fg="red")
            raise typer.Exit(2)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(nats_config(settings))
        out.chmod(0o600)
        typer.echo(f"wrote {out}")

    @app.command(hidden=True)
    def supervise() -> None:
        """Restart whatever dies (started by `up`)."""
        from shared.stack.stack import Stack

        Stack(get_settings()).supervise()

    db = typer.Typer(no_args_is_help=True, help="Database migrations.")
    app.add_typer(db, name="db")

    @db.command("upgrade")
    def db_upgrade(revision: str = "head") -> None:
        """alembic upgrade (default: head)."""
        from shared.db.migrate import upgrade

        upgrade(get_settings(), revision)

    @db.command("downgrade")
    def db_downgrade(revision: str = "base") -> None:
        """alembic downgrade (default: base)."""
        from shared.db.migrate import downgrade

        downgrade(get_settings(), revision)
