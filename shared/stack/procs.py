"""Processes the stack owns: detached start, pid files that survive PID reuse, clean stop.

A pid file records the PID *and* the kernel start time of the process, so a recycled PID
belonging to some other program is never mistaken for ours (and never killed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie is dead for our purposes
        return None
    return int(fields[19])


@dataclass(frozen=True)
class ProcessRecord:
    """What a pid file holds about one process the stack started."""

    name: str
    pid: int
    start_ticks: int
    command: list[str]

    def alive(self) -> bool:
        return _start_ticks(self.pid) == self.start_ticks


class PidFile:
    """`<run_dir>/pids/<name>.json`: the record of one managed process."""

    def __init__(self, run_dir: Path, name: str):
        self.name = name
        self.path = run_dir / "pids" / f"{name}.json"

    def read(self) -> ProcessRecord | None:
        try:
            data = json.loads(self.path.read_text())
            return ProcessRecord(**data)
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def write(self, record: ProcessRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)))
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def live(self) -> ProcessRecord | None:
        """The recorded process if it is still the one we started; stale files are removed."""
        record = self.read()
        if record is None:
            return None
        if record.alive():
            return record
        self.remove()
        return None


def record_for(name: str, pid: int, command: list[str]) -> ProcessRecord | None:
    ticks = _start_ticks(pid)
    return None if ticks is None else ProcessRecord(name, pid, ticks, command)


def spawn(name: str, command: list[str], log_path: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> ProcessRecord:
    """Start `command` detached from our session, output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True, close_fds=True,
        )
    record = record_for(name, proc.pid, command)
    if record is None:
        raise RuntimeError(f"{name} exited immediately; see {log_path}")
    return record


def terminate(record: ProcessRecord, timeout_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `timeout_s`."""
    if not record.alive():
        return
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(record.pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:  # not a group leader we own: signal the process alone
            try:
                os.kill(record.pid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(record.pid)
            if not record.alive():
                return
            time.sleep(0.05)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())
