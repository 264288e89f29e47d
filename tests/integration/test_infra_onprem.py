"""The on-prem path's Ansible commands, as the Pulumi program records them, run for real in check mode."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from infra.offline import run
from tests.helpers import REPO

pytestmark = pytest.mark.integration
LOCAL = REPO / "playbooks" / "inventories" / "local"
SPEC = {"provider": "onprem", "name": "privlm-local", "head": {"name": "localhost", "address": "127.0.0.1"},
        "node_groups": [{"name": "cpu", "cpus": 2, "memory_mb": 1000,
                         "hosts": [{"name": "localnode", "address": "127.0.0.2"}]}]}


def machine_state() -> dict[str, float | None]:
    """Modification times of what a real (non-check) run would touch first."""
    paths = ["/var/lib/dpkg/status", "/etc/slurm/slurm.conf", "/etc/munge/munge.key", "/etc/slurm"]
    return {p: Path(p).stat().st_mtime if Path(p).exists() else None for p in paths}


def sh(command: dict) -> subprocess.CompletedProcess:
    """Run a recorded command.local.Command step as pulumi-command does: /bin/sh -c in its dir and environment."""
    return subprocess.run(["/bin/sh", "-c", command["line"]], cwd=command["dir"], capture_output=True, text=True,
                          env={**os.environ, **command["environment"]}, timeout=600)


def test_recorded_playbook_and_drain_commands_run_in_check_mode_and_change_nothing() -> None:
    graph = run({"privlm:cluster": SPEC, "privlm:inventory": str(LOCAL), "privlm:ansibleCheck": True})
    recorded = {r.name: r.inputs for r in graph.of_type("command:local:Command")}
    configure, drain = recorded["privlm-local-configure"], recorded["privlm-local-drain"]
    assert "--check --diff" in configure["create"] and str(LOCAL / "hosts.yml") in configure["create"]
    before = machine_state()
    up = sh({**configure, "line": configure["create"]})
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-2000:]
    assert "PLAY RECAP" in up.stdout and "failed=0" in up.stdout and "unreachable=0" in up.stdout
    assert "TASK [slurm_controller" in up.stdout  # the whole site.yml ran, through to Slurm
    destroy = sh({**drain, "line": drain["delete"]})
    assert destroy.returncode == 0, destroy.stdout + destroy.stderr
    assert "localhost | SKIPPED" in destroy.stdout  # check mode: the drain is reported, not done
    assert machine_state() == before
