"""Run our playbooks against an inventory through ansible-runner, after validating the inventory."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.inventory import InventoryError, validate_inventory

PLAYBOOKS = Path(__file__).resolve().parents[1] / "playbooks"


@dataclass
class RunResult:
    """What a playbook run did, from ansible-runner's stats."""

    status: str
    rc: int
    changed: int
    failures: int
    stats: dict[str, Any]
    output: str = ""


def configure(inventory: Path, playbook: str = "site.yml", check: bool = False, limit: str | None = None,
              quiet: bool = False, extravars: dict[str, Any] | None = None) -> RunResult:
    """Validate the inventory, then apply `playbook` with ansible-runner (output streamed unless quiet)."""
    import ansible_runner

    problems = validate_inventory(inventory)
    if problems:
        raise InventoryError(f"{inventory}: " + "; ".join(problems))
    inventory_path = inventory / "hosts.yml" if inventory.is_dir() else inventory
    private = Path(tempfile.mkdtemp(prefix="privlm-ansible-"))
    bin_dir = str(Path(os.sys.executable).parent)
    cmdline = "--check --diff" if check else ""
    try:
        run = ansible_runner.run(
            private_data_dir=str(private), project_dir=str(PLAYBOOKS), playbook=playbook,
            inventory=str(inventory_path.resolve()), cmdline=cmdline, limit=limit, quiet=quiet,
            suppress_env_files=True, extravars=extravars or {},
            envvars={"ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(PLAYBOOKS / "roles"),
                     "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "ANSIBLE_NOCOLOR": "1"},
        )
        stats = run.stats or {}
        output = run.stdout.read() if run.stdout else ""
        return RunResult(run.status, run.rc, sum((stats.get("changed") or {}).values()),
                         sum((stats.get("failures") or {}).values()) + sum((stats.get("dark") or {}).values()), stats,
                         output)
    finally:
        shutil.rmtree(private, ignore_errors=True)
