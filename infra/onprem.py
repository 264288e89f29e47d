"""On-prem through Pulumi: the spec's Ansible inventory, the playbooks run by `pulumi up`, nodes drained on destroy."""

from __future__ import annotations

import hashlib
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_command as command
import yaml

from infra.cluster import PLAYBOOKS, playbooks_digest
from infra.inventory import inventory_file, write_inventory
from infra.spec import OnPremSpec

VENV_BIN = Path(sys.executable).parent  # ansible-playbook is installed next to the interpreter running Pulumi
# Every node of the cluster this inventory's controller runs, drained so running jobs finish and no new one starts.
DRAIN = ("SLURM_CONF={{ slurm_conf_dir | default('/etc/slurm') }}/slurm.conf; export SLURM_CONF; "
         "for node in $(sinfo -h -N -o %N | sort -u); do "
         "scontrol update nodename=$node state=drain reason='pulumi destroy'; done")


@dataclass(frozen=True)
class AnsibleSettings:
    """How `pulumi up` runs the playbooks (stack settings privlm:inventory, ansibleCheck, ansibleTags, playbook)."""

    inventory: Path | None = None  # an inventory kept by hand; default: rendered from the spec into inventory_dir
    inventory_dir: Path = Path.home() / ".privlm" / "inventories"
    check: bool = False
    tags: str | None = None
    playbook: str = "site.yml"


def inventory_digest(hosts: Path) -> str:
    """A hash of the inventory's hosts file and its group_vars/host_vars: a changed inventory reruns the playbook."""
    variables = sorted(p for d in ("group_vars", "host_vars") for p in (hosts.parent / d).rglob("*") if p.is_file())
    files = [hosts, *variables]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def playbook_command(hosts: Path, settings: AnsibleSettings) -> str:
    """The ansible-playbook command line that configures the inventory's hosts."""
    args = [str(VENV_BIN / "ansible-playbook"), "-i", str(hosts), settings.playbook]
    if settings.check:
        args += ["--check", "--diff"]
    if settings.tags:
        args += ["--tags", settings.tags]
    return shlex.join(args)


def drain_command(hosts: Path, settings: AnsibleSettings) -> str:
    """The ad-hoc Ansible command, run on the controller, that drains every Slurm node of the cluster."""
    args = [str(VENV_BIN / "ansible"), "slurm_controller", "-i", str(hosts), "--become",
            "-m", "ansible.builtin.shell", "-a", DRAIN]
    return shlex.join(args + (["--check"] if settings.check else []))


class OnPremCluster(pulumi.ComponentResource):
    """Hosts you own, made a Slurm cluster by our playbooks; `pulumi destroy` drains them (nothing is deleted).

    The configure command is replaced, so the playbook reruns, when the inventory or any playbook file
    changes (its triggers); the drain command has no triggers, so only a destroy runs its delete.
    """

    def __init__(self, spec: OnPremSpec, settings: AnsibleSettings, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("privlm:onprem:Cluster", spec.name, None, opts)
        hosts = (inventory_file(settings.inventory) if settings.inventory
                 else write_inventory(spec, settings.inventory_dir / spec.name)).resolve()
        environment = {"ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(PLAYBOOKS / "roles"),
                       "ANSIBLE_NOCOLOR": "1"}
        configure_line = playbook_command(hosts, settings)
        self.configure = command.local.Command(
            f"{spec.name}-configure", create=configure_line, update=configure_line, dir=str(PLAYBOOKS),
            environment=environment, triggers=[inventory_digest(hosts), playbooks_digest()],
            opts=pulumi.ResourceOptions(parent=self))
        self.drain = command.local.Command(
            f"{spec.name}-drain", create="true", delete=drain_command(hosts, settings), dir=str(PLAYBOOKS),
            environment=environment, opts=pulumi.ResourceOptions(parent=self, depends_on=[self.configure]))
        self.outputs = {"head_address": str(spec.head.address), "partitions": [p.name for p in spec.partitions],
                        "inventory": str(hosts), "ansible_output": self.configure.stdout,
                        "cluster_spec": yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True),
                                                       sort_keys=False)}
        self.register_outputs(self.outputs)
