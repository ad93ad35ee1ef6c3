"""`make up` / `make down` / `make status`: the whole local stack as managed processes.

`up` starts NATS and PostgreSQL, migrates, makes sure the model family exists, starts
every service, waits until each answers a NATS ping and the gateway reports healthy, then
leaves a supervisor running that restarts whatever dies. Everything it starts has a pid
file under `<run_dir>/pids`; `down` stops exactly those processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from shared.settings import SERVICES, Settings
from shared.stack.procs import PidFile, port_open, spawn, terminate, wait_until
from shared.stack.servers import NatsServer, PostgresServer

SUPERVISOR = "supervisor"


@dataclass
class Row:
    """One line of `specmesh status`."""

    name: str
    pid: int | None
    state: str


class Stack:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.run_dir = settings.run_dir
        self.nats = NatsServer(settings)
        self.postgres = PostgresServer(settings)

    # -- services ------------------------------------------------------------------------
    def instances(self) -> list[tuple[str, str]]:
        """(instance, service) for every process to run: `target`, `target-2`, ... per replica;
        a drafter per served drafter model: `drafter` (the first), `drafter-prose`, ..."""
        return [(instance, service) for instance, service, _ in self._instances()]

    def _instances(self) -> list[tuple[str, str, str | None]]:
        out = []
        for service in SERVICES:
            n = self.settings.replicas.get(service, 1)
            models = list(dict.fromkeys(self.settings.models.drafters)) if service == "drafter" else [None]
            for j, model in enumerate(models):
                base = service if j == 0 else f"{service}-{model.removeprefix('drafter-')}"
                out += [(base if i == 1 else f"{base}-{i}", service, model) for i in range(1, n + 1)]
        return out

    def instance_model(self, instance: str) -> str | None:
        """The family member `instance` hosts when the stack chooses it (drafters), else None."""
        return next((model for name, _, model in self._instances() if name == instance), None)

    def service_command(self, name: str) -> list[str]:
        return [sys.executable, "-m", "shared.cli.main", "serve", name]

    def service_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SPECMESH_RUN_DIR"] = str(self.run_dir)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def ensure_service(self, instance: str, service: str | None = None) -> bool:
        """Start `instance` (of `service`) unless its recorded process is alive; True if it had to."""
        pidfile = PidFile(self.run_dir, instance)
        if pidfile.live():
            return False
        command = self.service_command(service or instance)
        env = self.service_env()
        model = self.instance_model(instance)
        if model is not None:
            env["SPECMESH_ENGINE__MODEL"] = model
        record = spawn(instance, command, self.run_dir / "logs" / f"{instance}.log", env=env)
        pidfile.write(record)
        return True

    async def _pings(self, names: list[str], timeout_s: float, give_up=None) -> dict[str, bool]:
        """Which services answered a NATS ping within `timeout_s` (sooner: when all did, or
        when `give_up()` says there is no use waiting)."""
        from shared.service import connect, ping

        nc = await connect(self.settings, "specmesh-cli")
        try:
            deadline = time.monotonic() + timeout_s
            up: dict[str, bool] = {name: False for name in names}
            while time.monotonic() < deadline and not all(up.values()):
                for name in [n for n, ok in up.items() if not ok]:
                    up[name] = await ping(nc, name, timeout_s=0.5) is not None
                if give_up is not None and give_up():
                    break
                if not all(up.values()):
                    await asyncio.sleep(0.3)
            return up
        finally:
            await nc.close()

    def ping_services(self, timeout_s: float = 1.0) -> dict[str, bool]:
        if not self.nats.healthy():
            return {name: False for name in SERVICES}
        return asyncio.run(self._pings(list(SERVICES), timeout_s))

    def gateway_health(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"{self.settings.gateway.http_url}/health", timeout=2) as resp:
                return json.loads(resp.read())
        except OSError:
            return None

    # -- the whole stack -----------------------------------------------------------------
    def write_env(self) -> Path:
        path = self.run_dir / "env"
        path.write_text(
            f"SPECMESH_GATEWAY_URL={self.settings.gateway.http_url}\n"
            f"SPECMESH_NATS_URL={self.settings.nats.client_url}\n"
            f"SPECMESH_DATABASE_URL={self.settings.database.sqlalchemy_url}\n"
        )
        return path

    def up(self, say=print, timeout_s: float = 300.0, check=None) -> None:
        """Start what is not running and wait until every service answers; `check(family)`,
        when given, vets the models before any service starts (it raises what is wrong)."""
        from shared.db.migrate import upgrade
        from shared.models.family import resolve_family

        self.run_dir.mkdir(parents=True, exist_ok=True)
        say("nats: " + ("starting" if not self.nats.pidfile.live() else "running"))
        self.nats.ensure()
        say("postgres: " + ("starting" if not self.postgres.pidfile.live() else "running"))
        self.postgres.ensure()
        say("migrations: alembic upgrade head")
        upgrade(self.settings)
        self.postgres.grant_app_role()
        say(f"models: profile {self.settings.models.profile} (trained on first use)")
        family = resolve_family(self.settings)
        if check is not None:
            check(family)
        for instance, service in self.instances():
            if self.ensure_service(instance, service):
                say(f"{instance}: starting")
        # A service answers pings while its setup still runs: one whose setup fails (a bad setting,
        # a missing file) exits then, so every wait gives up, and says why, as soon as one has.
        up = asyncio.run(self._pings(list(SERVICES), timeout_s, give_up=self._died))
        self._raise_if_died()
        missing = [name for name, ok in up.items() if not ok]
        if missing:
            raise RuntimeError(f"services did not answer a NATS ping in {timeout_s:.0f}s: {', '.join(missing)}; "
                               f"see {self.run_dir / 'logs'}")
        healthy = wait_until(lambda: self._died() or (self.gateway_health() or {}).get("status") == "ok", 60.0, 0.3)
        self._raise_if_died()
        if not healthy:
            raise RuntimeError(f"gateway not healthy at {self.settings.gateway.http_url}/health; see logs")
        self.ensure_supervisor()
        env = self.write_env()
        if self.settings.gateway.dev_mode:
            say("dev mode: the gateway accepts requests without an API key (SPECMESH_GATEWAY__DEV_MODE=true)")
        elif not self.settings.gateway.api_keys:
            say("warning: no API keys configured (SPECMESH_GATEWAY__API_KEYS): every API request will be refused")
        say(f"SpecMesh is up: {self.settings.gateway.http_url}  (URLs in {env})")

    def _died(self) -> list[str]:
        """The instances whose process is gone (before the supervisor runs, nothing restarts them)."""
        return [instance for instance, _ in self.instances() if not PidFile(self.run_dir, instance).live()]

    def _raise_if_died(self) -> None:
        if dead := self._died():
            raise RuntimeError("\n".join(f"{instance} exited while starting; the end of its log "
                                         f"({self.run_dir / 'logs' / f'{instance}.log'}):\n{self._log_tail(instance)}"
                                         for instance in dead))

    def _log_tail(self, instance: str, lines: int = 12) -> str:
        try:
            text = (self.run_dir / "logs" / f"{instance}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def ensure_supervisor(self) -> None:
        pidfile = PidFile(self.run_dir, SUPERVISOR)
        if pidfile.live():
            return
        command = [sys.executable, "-m", "shared.cli.main", "supervise"]
        pidfile.write(spawn(SUPERVISOR, command, self.run_dir / "logs" / "supervisor.log", env=self.service_env()))

    def supervise(self, interval_s: float = 1.0) -> None:
        """Restart any server or service that died, with backoff for those that keep dying."""
        backoff: dict[str, float] = {}
        next_try: dict[str, float] = {}
        while True:
            now = time.monotonic()
            steps = [(server.name, lambda s=server: None if s.pidfile.live() else bool(s.ensure()))
                     for server in (self.nats, self.postgres)]
            steps += [(inst, lambda i=inst, s=svc: self.ensure_service(i, s)) for inst, svc in self.instances()]
            for name, ensure in steps:
                if now < next_try.get(name, 0.0):
                    continue
                try:
                    restarted = ensure()
                    if restarted is True:
                        print(f"{time.strftime('%H:%M:%S')} restarted {name}", flush=True)
                        backoff[name] = min(backoff.get(name, 0.5) * 2, 30.0)
                        next_try[name] = now + backoff[name]
                    elif restarted is False:
                        backoff.pop(name, None)
                except Exception as exc:  # a server that cannot start now may start later
                    print(f"{time.strftime('%H:%M:%S')} {name}: {exc}", flush=True)
                    backoff[name] = min(backoff.get(name, 0.5) * 2, 30.0)
                    next_try[name] = now + backoff[name]
            time.sleep(interval_s)

    def purge(self) -> None:
        """Delete the stack's data (PostgreSQL cluster, JetStream, logs): after `down` only."""
        import shutil

        self.postgres.purge()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def down(self, say=print) -> None:
        servers = {self.nats.name, self.postgres.name}
        recorded = sorted(p.stem for p in (self.run_dir / "pids").glob("*.json") if p.stem not in servers | {SUPERVISOR})
        for name in (SUPERVISOR, *recorded):  # every process a pid file records, replicas of past configs too
            pidfile = PidFile(self.run_dir, name)
            record = pidfile.live()
            if record:
                say(f"{name}: stopping (pid {record.pid})")
                terminate(record)
            pidfile.remove()
        for server in (self.postgres, self.nats):
            if server.pidfile.live():
                say(f"{server.name}: stopping")
            server.stop()
        (self.run_dir / "env").unlink(missing_ok=True)

    def status(self) -> list[Row]:
        rows = []
        pings = self.ping_services()
        for server in (self.nats, self.postgres):
            record = server.pidfile.live()
            rows.append(Row(server.name, record.pid if record else None,
                            "up" if record and server.healthy() else ("starting" if record else "down")))
        for instance, service in self.instances():
            record = PidFile(self.run_dir, instance).live()
            state = "up" if record and pings.get(service) else ("no ping" if record else "down")
            rows.append(Row(instance, record.pid if record else None, state))
        record = PidFile(self.run_dir, SUPERVISOR).live()
        rows.append(Row(SUPERVISOR, record.pid if record else None, "up" if record else "down"))
        return rows

    def listening_ports(self) -> list[int]:
        """The stack's ports that something still listens on (for `down` checks)."""
        s = self.settings
        ports = [(s.nats.host, s.nats.port), (s.nats.host, s.nats.monitor_port), (s.database.host, s.database.port),
                 (s.gateway.host, s.gateway.port), (s.gateway.host, s.gateway.grpc_port)]
        return [port for host, port in ports if port_open(host, port)]
