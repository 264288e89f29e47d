"""A real Slurm cluster on this machine, brought up by our playbook and torn down by PID.

`SlurmCluster("local")` applies playbooks/site.yml to playbooks/inventories/local; `"local-2node"` to
the two-slurmd inventory, which has its own configuration directory and ports so both run side by
side. `up()` waits until every node is idle; `down()` stops, by the PID in its file, each daemon that
was not already running before `up()` (a developer's own cluster is reused and left running).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from infra.cluster import PLAYBOOKS, RunResult, configure
from infra.inventory import group_hosts, resolve_inventory

DAEMON = "/usr/local/sbin/privlm-daemon"
MUNGE_PIDFILE = "/run/munge/munged.pid"
MARIADB_PIDFILE = "/run/privlm-mariadbd.pid"  # roles/slurm_controller/defaults
DAEMON_NAMES = {"munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd"}
READY_STATES = {"idle", "mix", "alloc", "comp"}


def slurm_conf_values(path: Path) -> dict[str, str]:
    """Key=value settings of a slurm.conf-style file (first occurrence wins; node lines are skipped)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        if value and not key.startswith("#") and key not in ("NodeName", "PartitionName"):
            values.setdefault(key.strip(), value.split()[0])
    return values


def read_pid(pidfile: str) -> int | None:
    try:
        return int(Path(pidfile).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class SlurmCluster:
    """One cluster: its SLURM_CONF, partitions (a preemptible low tier, a high tier) and node names."""

    inventory_name: str
    playbook: str = "site.yml"
    inventory: Path = field(init=False)
    name: str = field(init=False)
    slurm_conf: Path = field(init=False)
    partitions: dict[str, str] = field(init=False)
    accounting: bool = field(init=False)
    nodes: list[str] = field(default_factory=list)
    first_run: RunResult | None = None
    _preexisting: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.inventory = PLAYBOOKS / "inventories" / self.inventory_name
        inv = resolve_inventory(self.inventory)
        controller = inv["_meta"]["hostvars"][group_hosts(inv, "slurm_controller")[0]]
        self.name = controller["slurm_cluster_name"]
        self.slurm_conf = Path(controller.get("slurm_conf_dir", "/etc/slurm")) / "slurm.conf"
        tiers = sorted(controller["slurm_partitions"], key=lambda p: p["priority_tier"])
        self.partitions = {"low": tiers[0]["name"], "high": tiers[-1]["name"]}
        self.accounting = bool(controller.get("slurm_accounting", False))

    @property
    def low_partition(self) -> str:
        """The preemptible partition (lowest PriorityTier, the default)."""
        return self.partitions["low"]

    @property
    def high_partition(self) -> str:
        """The partition whose jobs preempt (requeue) those of the low one."""
        return self.partitions["high"]

    @property
    def env(self) -> dict[str, str]:
        """os.environ with SLURM_CONF for this cluster: pass it to sbatch, srun, squeue, sacct, submitit."""
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}

    def run(self, *cmd: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster."""
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout, check=check)

    def sbatch(self, *args: str) -> str:
        """Submit a batch job (sbatch ARGS...); its job id."""
        return self.run("sbatch", "--parsable", *args, check=True).stdout.strip().split(";")[0]

    def job_field(self, job: str, field: str) -> str:
        """One field of `scontrol show job`, e.g. JobState, Restarts, NodeList ("" once the job is purged)."""
        for token in self.run("scontrol", "show", "job", job).stdout.split():
            if token.startswith(f"{field}="):
                return token.split("=", 1)[1]
        return ""

    def node_states(self) -> dict[str, str]:
        """Node name -> sinfo's short state (idle, alloc, drain, ...)."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", timeout=30).stdout.split()
        return dict(zip(out[::2], out[1::2], strict=False))

    def up(self, timeout: float = 120) -> RunResult:
        """Apply the playbook, then wait until every node is idle (or busy with someone's jobs)."""
        self._preexisting = {p.pid for p in psutil.process_iter(["name", "status"])
                             if p.info["name"] in DAEMON_NAMES and p.info["status"] != psutil.STATUS_ZOMBIE}
        result = configure(self.inventory, self.playbook, quiet=True)
        self.first_run = result
        if not result.ok:
            raise RuntimeError(f"playbook failed on {self.inventory_name}: {result.output[-4000:]}")
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if states and set(states.values()) <= READY_STATES:
                self.nodes = sorted(states)
                return result
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes of {self.name} not ready after {timeout} s: {states}\n{self.logs()}")

    def pidfiles(self) -> list[str]:
        """PID files of this cluster's daemons, in the order to stop them (munge last)."""
        if not self.slurm_conf.exists():
            return [MUNGE_PIDFILE]
        conf = slurm_conf_values(self.slurm_conf)
        nodes = re.findall(r"^NodeName=(\S+)", self.slurm_conf.read_text(), re.MULTILINE)
        files = [conf["SlurmdPidFile"].replace("%n", n) for n in nodes] + [conf["SlurmctldPidFile"]]
        dbd_conf = self.slurm_conf.parent / "slurmdbd.conf"
        if conf.get("AccountingStorageType") == "accounting_storage/slurmdbd" and dbd_conf.exists():
            files += [slurm_conf_values(dbd_conf)["PidFile"], MARIADB_PIDFILE]
        return [*files, MUNGE_PIDFILE]

    def started_pidfiles(self) -> list[str]:
        """The PID files whose daemon up() started (it was not running before)."""
        return [f for f in self.pidfiles() if (pid := read_pid(f)) is not None and pid not in self._preexisting]

    def down(self) -> list[str]:
        """Stop, by PID, every daemon that up() started; returns their PID files.

        Jobs still queued or completing are cancelled first, and their end waited for: a step that
        finishes after munged is gone cannot report its exit and hangs in the next session.
        """
        stopped = self.started_pidfiles()
        if stopped and self.slurm_conf.exists():
            self.run("scancel", "--full", "--user", os.environ.get("USER", "root"), timeout=30)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.run("squeue", "-h", timeout=30).stdout.strip():
                time.sleep(0.5)
        for pidfile in stopped:
            subprocess.run([DAEMON, "stop", pidfile], capture_output=True, timeout=30)
        return stopped

    def logs(self, lines: int = 30) -> str:
        """The tail of slurmctld's and the slurmds' logs, for failure messages."""
        conf = slurm_conf_values(self.slurm_conf) if self.slurm_conf.exists() else {}
        log_dir = Path(conf.get("SlurmctldLogFile", "/nonexistent")).parent
        parts = []
        for log in sorted(log_dir.glob("*.log")):
            parts.append(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)
