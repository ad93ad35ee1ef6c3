"""Pid files: a live process is recognised, a dead or recycled PID is not (and is never signalled)."""

from __future__ import annotations

import subprocess
import sys

from shared.stack.procs import PidFile, ProcessRecord, record_for, spawn, terminate


def test_live_record_and_stale_file(tmp_path):
    record = spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "s.log")
    pidfile = PidFile(tmp_path, "sleeper")
    pidfile.write(record)
    assert pidfile.live() == record
    terminate(record, timeout_s=5)
    assert not record.alive()
    assert pidfile.live() is None
    assert not pidfile.path.exists()


def test_recycled_pid_is_not_ours(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        real = record_for("x", proc.pid, ["x"])
        impostor = ProcessRecord("x", proc.pid, real.start_ticks + 1, ["x"])
        pidfile = PidFile(tmp_path, "x")
        pidfile.write(impostor)
        assert pidfile.live() is None  # same PID, other start time: not ours
        terminate(impostor)
        assert proc.poll() is None  # and it was not killed
    finally:
        proc.kill()
        proc.wait()


def test_garbage_pid_file_is_ignored(tmp_path):
    pidfile = PidFile(tmp_path, "bad")
    pidfile.path.parent.mkdir(parents=True)
    pidfile.path.write_text("{not json")
    assert pidfile.live() is None
