"""The playbooks applied for real to this machine: Slurm up, jobs run, reruns idempotent, preemption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.integration
PLAYBOOKS = REPO / "playbooks"


def sbatch(*args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(f"{field}="):
            return token.split("=", 1)[1]
    return ""


def wait_for(predicate, timeout: float = 60, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def test_local_cluster_is_idle_and_runs_a_batch_job(slurm_cluster, tmp_path: Path) -> None:
    assert slurm_cluster.nodes == ["localnode"]
    out = tmp_path / "hello.out"
    job = sbatch("-o", str(out), "--wrap", "echo hello from $SLURMD_NODENAME")
    assert wait_for(lambda: job_field(job, "JobState") == "COMPLETED", 60), job_field(job, "JobState")
    assert out.read_text().strip() == "hello from localnode"


def test_rerun_changes_nothing(slurm_cluster) -> None:
    from infra.cluster import configure

    result = configure(slurm_cluster.inventory, "slurm.yml", quiet=True)
    assert result.rc == 0 and result.changed == 0, result.stats


def test_preempted_job_gets_its_signal_and_is_requeued(slurm_cluster, tmp_path: Path) -> None:
    marker = tmp_path / "signalled"
    script = tmp_path / "low.sh"
    script.write_text(f"""#!/bin/bash
trap 'echo USR2 >> {marker}' USR2  # checkpoint here; Slurm requeues after GraceTime
for i in $(seq 600); do sleep 0.2; done
""")
    low = sbatch("-p", "batch", "-c", "2", "--requeue", "--signal=B:USR2@60", "-o", "/dev/null", str(script))
    assert wait_for(lambda: job_field(low, "JobState") == "RUNNING", 60)
    high = sbatch("-p", "urgent", "-c", "2", "-o", "/dev/null", "--wrap", "sleep 2")
    assert wait_for(marker.exists, 60), "the preempted job never got SIGUSR2"
    assert wait_for(lambda: int(job_field(low, "Restarts") or 0) >= 1, 60), job_field(low, "JobState")
    assert wait_for(lambda: job_field(high, "JobState") == "COMPLETED", 60)
    subprocess.run(["scancel", low], check=False)


def test_node_health_reports_json_with_its_exit_code(slurm_cluster, tmp_path: Path) -> None:
    healthy = subprocess.run([sys.executable, "-m", "privlm.cli", "cluster", "health"], capture_output=True, text=True,
                             cwd=REPO)
    assert healthy.returncode == 0 and json.loads(healthy.stdout)["status"] == "healthy"
    config = tmp_path / "health.json"
    config.write_text(json.dumps({"expected_gpus": 8, "mounts": ["/nonexistent-shared"]}))
    broken = subprocess.run(["/usr/local/sbin/privlm-node-health"], capture_output=True, text=True,
                            env={**os.environ, "PRIVLM_NODE_HEALTH_CONFIG": str(config)})
    report = json.loads(broken.stdout)
    assert broken.returncode == 2 and report["status"] == "unusable"
    assert {c["check"]: c["status"] for c in report["checks"]} == {"gpus": "fail", "fabric": "ok", "mounts": "fail",
                                                                   "disk": "ok"}


def test_hardware_roles_skip_by_facts_with_a_message_in_check_mode(slurm_cluster) -> None:
    from infra.cluster import configure

    result = configure(slurm_cluster.inventory, "site.yml", check=True, quiet=True)
    assert result.rc == 0, result.output[-3000:]
    for message in ("nvidia_driver: skipped on localhost: no NVIDIA GPU", "infiniband: skipped on localhost",
                    "efa: skipped on localhost", "shared_storage: skipped on localhost"):
        assert message in result.output


def test_ansible_lint_and_syntax_check() -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    lint = subprocess.run([str(Path(sys.executable).parent / "ansible-lint"), "playbooks"], capture_output=True,
                          text=True, cwd=REPO, env=env)
    assert lint.returncode == 0 and "Profile 'production' was required, and it passed" in lint.stdout + lint.stderr
    for playbook in ("site.yml", "slurm.yml", "validate.yml"):
        check = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "--syntax-check", "-i",
                                "inventories/example/hosts.yml", playbook], capture_output=True, text=True,
                               cwd=PLAYBOOKS, env=env)
        assert check.returncode == 0, check.stderr


def test_two_nodes_on_one_machine_run_srun_n2(slurm_cluster_2node) -> None:
    assert slurm_cluster_2node.nodes == ["n1", "n2"]
    out = subprocess.run(["srun", "-N2", "-n2", "--label", "printenv", "SLURMD_NODENAME"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(line.split(": ")[1] for line in out.stdout.split("\n") if line) == ["n1", "n2"]
