"""The demo path end to end against the real components: Slurm from our playbook, an MLflow server, Ray.

`privlm demo` runs in a fresh directory (its data and runs land there) with SLURM_CONF pointing at the
test cluster, so pretraining and the fine-tune are Slurm jobs; each station is checked on what it left.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import MlflowServer
from tests.helpers import PRIVLM, read_losses, run_env
from tests.integration.slurm_fixture import SlurmCluster

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


OWNER_VAR = "PRIVLM_TEST_OWNER"
LEFTOVER = re.compile(r"ray::|raylet|gcs_server|submitit\.local")


def leftover_processes(owner: str) -> list[str]:
    """Ray and submitit processes still alive that carry this test's owner tag in their environment (other Ray
    clusters on the machine are not ours to judge)."""
    import psutil

    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            command = " ".join(proc.info["cmdline"] or [])
            if LEFTOVER.search(command) and proc.environ().get(OWNER_VAR) == owner:
                left.append(f"{proc.pid} {command[:200]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_demo_goes_from_raw_text_to_a_served_promoted_model_with_its_cost(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    server = MlflowServer(tmp_path)
    server.start()
    try:
        owner = f"demo-{uuid.uuid4().hex}"  # inherited by every process the demo starts, and by nothing else
        env = {**run_env(), "SLURM_CONF": str(slurm_cluster.slurm_conf), "MLFLOW_TRACKING_URI": server.uri,
               "PRIVLM_JOBS_DIR": str(tmp_path / "jobs"), "RAY_AUTH_MODE": "disabled", "COLUMNS": "200",
               OWNER_VAR: owner}
        work = tmp_path / "demo"
        work.mkdir()
        demo = [*PRIVLM, "demo", "--steps", "60", "--port", str(free_port())]
        out = subprocess.run(demo, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        summary = json.loads((work / "runs" / "demo-summary.json").read_text())

        # data: shards, tokenizer and report for both corpora
        for name in ("tiny-cpu", "tiny-cpu-lora"):
            report = json.loads((work / "data" / name / "report.json").read_text())
            assert (work / "data" / name / "index.json").is_file() and report["splits"]["train"]["tokens"] > 0
        # training ran as Slurm jobs, and the loss went down
        assert summary["executor"] == "slurm"
        losses = read_losses(work / "runs" / "tiny-cpu")
        assert max(losses) == 60 and losses[60] < losses[min(losses)] - 1.0
        assert (work / "runs" / "tiny-cpu-lora" / "model" / "config.json").is_file()
        # registry: two versions with lineage, the fine-tune is champion
        from mlflow import MlflowClient

        client = MlflowClient(server.uri)
        champion = client.get_model_version_by_alias("privlm-tiny", "champion")
        assert champion.tags["privlm.recipe"] == "tiny-cpu-lora"
        assert champion.tags["privlm.parent"].startswith("privlm-tiny/")
        assert champion.tags["privlm.data_fingerprint"] and champion.tags["privlm.git_commit"]
        # serving: an OpenAI-shaped completion from that champion
        completion = summary["completion"]
        assert completion["object"] == "text_completion" and completion["choices"][0]["text"]
        assert completion["usage"]["completion_tokens"] > 0
        # cost: the real-sized plan's totals and this run's measured throughput
        cost = summary["cost"]
        totals = cost["totals"]
        assert totals["cloud"] > 0 and totals["own"] > 0
        assert cost["cheaper"] == min(totals, key=totals.get)  # the option with the lower total over the horizon
        assert cost["measured"]["tokens_per_s"] > 0
        # nothing the demo started is left running: no Ray, no Serve, no submitit controller
        left = leftover_processes(owner)
        assert left == [], left

        # a second run reuses data and models and says so
        again = subprocess.run(demo, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stdout[-4000:]
        assert again.stdout.count("(unchanged, reused)") >= 4, again.stdout[-4000:]
    finally:
        server.stop()
