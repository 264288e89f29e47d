"""privlm-daemon, which runs Slurm's daemons by PID file where there is no systemd: start, reuse, restart, stop."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.helpers import REPO

DAEMON = REPO / "playbooks" / "roles" / "common" / "files" / "privlm-daemon"


def daemon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(DAEMON), *args], capture_output=True, text=True, timeout=30)


def pid_of(pidfile: Path) -> int:
    return int(pidfile.read_text())


def is_running(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_self_daemonizing_program_is_started_reused_restarted_and_stopped(tmp_path: Path) -> None:
    pidfile, config = tmp_path / "d.pid", tmp_path / "d.conf"
    config.write_text("a\n")
    # a program that daemonizes itself and writes its PID file, like slurmctld or munged
    command = ["--", "sh", "-c", f"setsid sleep 300 >/dev/null 2>&1 & echo $! > {pidfile}"]
    first = daemon("start", str(pidfile), "--config", str(config), *command)
    assert first.returncode == 0 and first.stdout.startswith("started"), first.stderr
    pid = pid_of(pidfile)
    try:
        again = daemon("start", str(pidfile), "--config", str(config), *command)
        assert again.stdout.strip() == f"running {pid}"  # idempotent: nothing to do
        time.sleep(1.1)
        config.write_text("b\n")  # newer than the PID file: the daemon runs an old configuration
        restarted = daemon("start", str(pidfile), "--config", str(config), *command)
        assert restarted.stdout.startswith("restarted") and pid_of(pidfile) != pid
        assert not is_running(pid)
        pid = pid_of(pidfile)
        assert daemon("status", str(pidfile)).stdout.strip() == f"running {pid}"
        assert daemon("stop", str(pidfile)).stdout.strip() == f"stopped {pid}"
        assert not is_running(pid) and not pidfile.exists()
        assert daemon("status", str(pidfile)).returncode == 3
    finally:
        if pidfile.exists() and is_running(pid_of(pidfile)):
            os.kill(pid_of(pidfile), 9)


def test_foreground_program_is_backgrounded_with_a_log(tmp_path: Path) -> None:
    pidfile, log = tmp_path / "fg.pid", tmp_path / "fg.log"
    started = daemon("start", str(pidfile), "--log", str(log), "--", "sh", "-c", "echo hello; exec sleep 300")
    assert started.stdout.startswith("started"), started.stderr
    pid = pid_of(pidfile)
    try:
        time.sleep(0.3)
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"  # the PID is the program's
        assert os.getsid(pid) == pid  # its own session: it outlives the Ansible task that started it
        assert log.read_text() == "hello\n"
    finally:
        daemon("stop", str(pidfile))
    assert not is_running(pid)


def test_a_program_that_fails_to_start_is_reported(tmp_path: Path) -> None:
    out = daemon("start", str(tmp_path / "x.pid"), "--", "false")
    assert out.returncode == 1 and "failed to start: false" in out.stderr
    assert daemon("stop", str(tmp_path / "x.pid")).stdout.strip() == "not running"
