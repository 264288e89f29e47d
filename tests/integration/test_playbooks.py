"""The playbooks applied for real to this machine: Slurm up, jobs run, reruns idempotent, preemption, 2 nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.integration.slurm_fixture import SlurmCluster, read_pid

pytestmark = pytest.mark.integration
PLAYBOOKS = REPO / "playbooks"
VENV_BIN = Path(sys.executable).parent


def wait_for(predicate: Callable[[], object], timeout: float = 60, every: float = 0.3) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def alive(pidfile: str) -> bool:
    pid = read_pid(pidfile)
    return pid is not None and Path(f"/proc/{pid}").exists()


def test_local_cluster_runs_munge_slurmctld_slurmd_and_a_batch_job(slurm_cluster: SlurmCluster,
                                                                   tmp_path: Path) -> None:
    assert slurm_cluster.nodes == ["localnode"]
    assert slurm_cluster.node_states() == {"localnode": "idle"}
    daemons = {Path(f).name: alive(f) for f in slurm_cluster.pidfiles()}
    assert daemons == {"slurmd-privlm-local-localnode.pid": True, "slurmctld-privlm-local.pid": True,
                       "munged.pid": True}
    config = slurm_cluster.run("scontrol", "show", "config").stdout
    for setting in ("JobRequeue              = 1", "PreemptMode             = REQUEUE",
                    "PreemptType             = preempt/partition_prio", "preempt_send_user_signal",
                    f"HealthCheckProgram      = {slurm_cluster.slurm_conf.parent}/node-health.sh"):
        assert setting in config, setting
    out = tmp_path / "hello.out"
    job = slurm_cluster.sbatch("-o", str(out), "--wrap", "echo hello from $SLURMD_NODENAME")
    assert wait_for(lambda: slurm_cluster.job_field(job, "JobState") == "COMPLETED"), \
        slurm_cluster.job_field(job, "JobState")
    assert out.read_text().strip() == "hello from localnode"


def test_rerun_changes_nothing(slurm_cluster: SlurmCluster) -> None:
    from infra.cluster import configure

    result = configure(slurm_cluster.inventory, "site.yml", quiet=True)
    assert result.ok, result.output[-3000:]
    assert result.changed == 0, result.stats
    assert result.stats["ok"]  # it did visit the host


def preemptible_job(path: Path, log: Path) -> Path:
    """A batch script that records its starts and the signals it gets (where a job would checkpoint)."""
    path.write_text(f"""#!/bin/bash
echo "start ${{SLURM_RESTART_COUNT:-0}}" >> {log}
trap 'echo USR2 >> {log}' USR2
trap 'echo TERM >> {log}; exit 143' TERM
for i in $(seq 600); do sleep 0.2; done
""")
    return path


def test_preempted_job_gets_its_signal_and_is_requeued(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    cluster, log = slurm_cluster, tmp_path / "low.log"
    low = cluster.sbatch("-p", cluster.low_partition, "--exclusive", "--requeue", "--signal=B:USR2@60",
                 "-o", "/dev/null", str(preemptible_job(tmp_path / "low.sh", log)))
    try:
        assert wait_for(lambda: log.exists() and "start 0" in log.read_text())
        high = cluster.sbatch("-p", cluster.high_partition, "--exclusive", "-o", "/dev/null", "--wrap", "sleep 1")
        assert wait_for(lambda: "USR2" in log.read_text(), 30), "the preempted job never got SIGUSR2"
        assert wait_for(lambda: int(cluster.job_field(low, "Restarts") or 0) >= 1, 30), \
            cluster.job_field(low, "JobState")
        assert wait_for(lambda: cluster.job_field(high, "JobState") == "COMPLETED", 60)
        assert wait_for(lambda: "start 1" in log.read_text(), 60), log.read_text()  # requeued, then ran again
        # its signal first (time to checkpoint), TERM when GraceTime is over, then the requeued run
        assert log.read_text().splitlines() == ["start 0", "USR2", "TERM", "start 1"]
    finally:
        cluster.run("scancel", low)


def run_health(config: dict, tmp_path: Path, program: str = "/usr/local/sbin/privlm-node-health",
               env: dict[str, str] | None = None) -> tuple[int, dict]:
    """Run the health check with `config` as what the node must have; its exit code and JSON report."""
    path = tmp_path / "health.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run([program], capture_output=True, text=True,
                          env={**(os.environ if env is None else env), "PRIVLM_NODE_HEALTH_CONFIG": str(path)})
    return proc.returncode, json.loads(proc.stdout)


def test_node_health_reports_json_with_its_exit_code(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    installed = json.loads(Path("/etc/privlm-node-health.json").read_text())
    assert installed["expected_gpus"] == 0 and installed["fabric"] == "ethernet"
    rc, report = run_health({"min_free_gb": 0}, tmp_path)
    assert (rc, report["status"]) == (0, "healthy")
    assert [c["check"] for c in report["checks"]] == ["gpus", "fabric", "mounts", "disk"]
    rc, report = run_health({"min_free_gb": 10**9}, tmp_path)
    assert (rc, report["status"]) == (1, "degraded")
    rc, report = run_health({"expected_gpus": 8, "fabric": "infiniband", "mounts": ["/nonexistent-shared"],
                             "min_free_gb": 0}, tmp_path)
    assert (rc, report["status"]) == (2, "unusable")
    assert {c["check"]: c["status"] for c in report["checks"]} == {"gpus": "fail", "fabric": "fail",
                                                                   "mounts": "fail", "disk": "ok"}
    cli = subprocess.run([str(VENV_BIN / "privlm"), "cluster", "health"], capture_output=True, text=True)
    assert cli.returncode == {"healthy": 0, "degraded": 1}[json.loads(cli.stdout)["status"]]


def test_hardware_roles_skip_by_facts_with_a_message_in_check_mode(slurm_cluster: SlurmCluster) -> None:
    from infra.cluster import configure

    result = configure(slurm_cluster.inventory, "site.yml", check=True, tags="hardware,storage", quiet=True)
    assert result.ok and result.changed == 0, result.output[-3000:]
    for message in ("nvidia_driver: skipped on localhost: no NVIDIA GPU on the PCI bus",
                    "infiniband: skipped on localhost: no InfiniBand device",
                    "efa: skipped on localhost: no Elastic Fabric Adapter",
                    "shared_storage: skipped on localhost: no shared_storage_mounts"):
        assert message in result.output
    assert "NCCL environment for jobs (ethernet)" in result.output


def test_ansible_lint_production_profile_and_syntax_check() -> None:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    lint = subprocess.run([str(VENV_BIN / "ansible-lint"), "playbooks"], capture_output=True, text=True, cwd=REPO,
                          env=env)
    assert lint.returncode == 0, lint.stdout[-3000:] + lint.stderr[-3000:]
    assert "Profile 'production' was required, and it passed" in lint.stdout + lint.stderr
    runs = [("example", p.name) for p in sorted(PLAYBOOKS.glob("*.yml"))] + [("local", "site.yml"),
                                                                            ("local-2node", "slurm.yml"),
                                                                            ("local", "monitoring.yml")]
    assert {p for _, p in runs} == {"site.yml", "slurm.yml", "validate.yml", "monitoring.yml"}
    for inventory, playbook in runs:
        check = subprocess.run([str(VENV_BIN / "ansible-playbook"), "--syntax-check", "-i",
                                f"inventories/{inventory}/hosts.yml", playbook], capture_output=True, text=True,
                               cwd=PLAYBOOKS, env=env)
        assert check.returncode == 0, (inventory, playbook, check.stderr)


def test_sysctls_and_memlock_limits_are_written_by_their_modules(slurm_cluster: SlurmCluster) -> None:
    import yaml

    sysctls = yaml.safe_load((PLAYBOOKS / "roles" / "common" / "defaults" / "main.yml").read_text())["common_sysctls"]
    written = dict(line.split(" = ", 1) for line in Path("/etc/sysctl.d/90-privlm.conf").read_text().splitlines()
                   if " = " in line and not line.startswith("#"))
    assert written == {key: str(value) for key, value in sysctls.items()}
    limits = [line.split() for line in Path("/etc/security/limits.d/90-privlm-memlock.conf").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert sorted(limits) == [["*", "hard", "memlock", "unlimited"], ["*", "soft", "memlock", "unlimited"]]


def test_a_wrong_variable_stops_its_role_before_any_task(tmp_path: Path) -> None:
    """The argument spec is checked when the role starts: the field and the reason, and not one task run."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "ANSIBLE_NOCOLOR": "1"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"shared_storage_mounts": [{"path": "/shared", "type": "nfs"}]}))  # no source
    run = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", "inventories/local/hosts.yml", "site.yml",
                          "--check", "--tags", "storage", "-e", f"@{bad}"], capture_output=True, text=True,
                         cwd=PLAYBOOKS, env=env, timeout=300)
    assert run.returncode == 2, run.stdout[-3000:]
    assert "missing required arguments: source found in shared_storage_mounts" in run.stdout, run.stdout[-3000:]
    assert "TASK [shared_storage : Client packages]" not in run.stdout


def test_two_nodes_on_one_machine_run_srun_n2_with_accounting(slurm_cluster_2node: SlurmCluster) -> None:
    cluster = slurm_cluster_2node
    assert cluster.nodes == ["n1", "n2"] and cluster.accounting
    out = cluster.run("srun", "-N2", "-n2", "--label", "printenv", "SLURMD_NODENAME")
    assert out.returncode == 0, out.stderr
    assert sorted(line.split(": ")[1] for line in out.stdout.splitlines() if line) == ["n1", "n2"]

    def accounted() -> str:
        return cluster.run("sacct", "-a", "-X", "-n", "-P", "-S", "now-10minutes",
                           "-o", "JobName,State,NodeList").stdout

    assert wait_for(lambda: "printenv|COMPLETED|n[1-2]" in accounted(), 30), accounted()


def test_slurmdbd_uses_its_own_database_user_not_mariadb_root(slurm_cluster_2node: SlurmCluster) -> None:
    conf = dict(line.split("=", 1) for line in (slurm_cluster_2node.slurm_conf.parent / "slurmdbd.conf")
                .read_text().splitlines() if "=" in line and not line.startswith("#"))
    assert (conf["StorageUser"], conf["StorageLoc"]) == ("slurm", "slurm_acct_db")
    assert conf["StoragePass"] == (slurm_cluster_2node.slurm_conf.parent / "slurmdbd.dbpass").read_text()
    grants = subprocess.run(["mysql", "-u", "slurm", f"-p{conf['StoragePass']}", "-N", "-e", "SHOW GRANTS"],
                            capture_output=True, text=True, env={**os.environ, "HOME": "/nonexistent"})
    assert grants.returncode == 0, grants.stderr
    assert [line.split(" TO ")[0].split(" IDENTIFIED")[0] for line in grants.stdout.splitlines()] == [
        "GRANT USAGE ON *.*", "GRANT ALL PRIVILEGES ON `slurm_acct_db`.*"]  # nothing beyond its database
    denied = subprocess.run(["mysql", "-u", "slurm", f"-p{conf['StoragePass']}", "-e", "SELECT 1 FROM mysql.user"],
                            capture_output=True, text=True)
    assert denied.returncode != 0 and "denied" in denied.stderr


def test_two_node_cluster_runs_beside_the_one_node_cluster(slurm_cluster: SlurmCluster,
                                                           slurm_cluster_2node: SlurmCluster) -> None:
    assert slurm_cluster.slurm_conf != slurm_cluster_2node.slurm_conf
    assert slurm_cluster.node_states() == {"localnode": "idle"}
    assert set(slurm_cluster_2node.node_states()) == {"n1", "n2"}


def test_a_failing_health_check_drains_the_node_and_a_passing_one_resumes_it(
        slurm_cluster_2node: SlurmCluster, tmp_path: Path) -> None:
    cluster = slurm_cluster_2node
    hook = str(cluster.slurm_conf.parent / "node-health.sh")  # what slurmd runs, with SLURMD_NODENAME set
    as_slurmd = {**{k: v for k, v in os.environ.items() if k != "SLURM_CONF"}, "SLURMD_NODENAME": "n2"}

    def node(field: str) -> str:
        return next((t.split("=", 1)[1] for t in cluster.run("scontrol", "show", "node", "n2").stdout.split()
                     if t.startswith(f"{field}=")), "")

    try:
        rc, report = run_health({"expected_gpus": 8, "min_free_gb": 0}, tmp_path, hook, as_slurmd)
        assert (rc, report["node"]) == (2, "n2")
        assert wait_for(lambda: "DRAIN" in node("State"), 10), node("State")
        assert node("Reason").startswith("privlm-node-health:")
        rc, _ = run_health({"min_free_gb": 0}, tmp_path, hook, as_slurmd)
        assert rc == 0
        assert wait_for(lambda: "DRAIN" not in node("State"), 10), node("State")
    finally:
        cluster.run("scontrol", "update", "nodename=n2", "state=resume")
