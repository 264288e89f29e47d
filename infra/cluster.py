"""Apply our playbooks to an inventory through ansible-runner, after validating the inventory."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.inventory import check_inventory, inventory_file

PLAYBOOKS = Path(__file__).resolve().parents[1] / "playbooks"


def playbooks_digest(root: Path = PLAYBOOKS) -> str:
    """A hash of every playbook file's path and content: what Pulumi compares to rerun or re-upload them."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class RunResult:
    """What a playbook run did, from ansible-runner's stats (per-host counts summed over hosts)."""

    status: str
    rc: int
    changed: int
    failures: int
    stats: dict[str, Any] = field(default_factory=dict)
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.failures == 0


def configure(inventory: Path, playbook: str = "site.yml", check: bool = False, limit: str | None = None,
              tags: str | None = None, quiet: bool = False, extravars: dict[str, Any] | None = None) -> RunResult:
    """Validate the inventory, then run `playbook` on its hosts; progress streams to the terminal unless quiet.

    Raises InventoryError (naming the host and the field) before any host is touched.
    """
    import ansible_runner

    check_inventory(inventory)
    hosts = inventory_file(inventory).resolve()
    private = Path(tempfile.mkdtemp(prefix="privlm-ansible-"))
    venv_bin = str(Path(sys.executable).parent)  # ansible-playbook lives next to this interpreter
    try:
        run = ansible_runner.run(
            private_data_dir=str(private), project_dir=str(PLAYBOOKS), playbook=playbook, inventory=str(hosts),
            cmdline="--check --diff" if check else None, limit=limit, tags=tags, quiet=quiet, extravars=extravars or {},
            suppress_env_files=True,  # or settings of an earlier run leak into this one
            envvars={"ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(PLAYBOOKS / "roles"),
                     "ANSIBLE_NOCOLOR": "1", "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"},
        )
        stats = run.stats or {}
        output = run.stdout.read() if run.stdout else ""
        changed = sum((stats.get("changed") or {}).values())
        failures = sum((stats.get("failures") or {}).values()) + sum((stats.get("dark") or {}).values())
        return RunResult(run.status, run.rc, changed, failures, stats, output)
    finally:
        shutil.rmtree(private, ignore_errors=True)
