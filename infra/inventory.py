"""Ansible inventories: rendered from the cluster spec, and validated before any host is touched.

`validate_inventory` makes the checks of `playbooks/validate.yml` in Python, on the variables as
Ansible resolves them (`ansible-inventory --list`), so `privlm cluster configure` refuses a bad
inventory without starting a playbook.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from infra.spec import OnPremSpec

DEFAULT_SLURMD_PORT = 6818


class InventoryError(ValueError):
    """An inventory with a missing or contradictory field; the message names the host and the field."""


def render_inventory(spec: OnPremSpec) -> dict[str, Any]:
    """hosts.yml for an on-prem spec: head node as controller, every node group's hosts as Slurm nodes."""
    nodes: dict[str, Any] = {}
    for group, host in spec.hosts():
        node: dict[str, Any] = {"ansible_host": str(host.address), "slurm_cpus": group.cpus,
                                "slurm_real_memory": group.memory_mb, "privlm_fabric": group.fabric}
        if group.gpus:
            node |= {"slurm_gpus": group.gpus.count, "slurm_gpu_type": group.gpus.type}
        nodes[host.name] = node
    partitions = []
    for p in spec.partitions:
        members = [h.name for g, h in spec.hosts() if not p.node_groups or g.name in p.node_groups]
        partitions.append({"name": p.name, "priority_tier": p.priority_tier, "grace_time": p.grace_time_s,
                           "default": p.default, "max_time": p.max_time,
                           **({"nodes": ",".join(members)} if p.node_groups else {})})
    mounts = [{"path": m.path, "type": m.type, "source": m.source or f"{spec.head.address}:{m.path}"}
              for m in spec.storage]
    exports = [{"path": m.path} for m in spec.storage if m.type == "nfs" and not m.source]
    group_vars: dict[str, Any] = {"ansible_user": spec.ssh_user, "slurm_cluster_name": spec.name,
                                  "slurm_accounting": spec.accounting, "slurm_partitions": partitions,
                                  "shared_storage_mounts": mounts}
    head = {"ansible_host": str(spec.head.address), **({"shared_storage_nfs_exports": exports} if exports else {})}
    return {"all": {"vars": group_vars, "hosts": {spec.head.name: head, **nodes},
                    "children": {"slurm_controller": {"hosts": {spec.head.name: None}},
                                 "slurm_nodes": {"hosts": dict.fromkeys(nodes)}}}}


def write_inventory(spec: OnPremSpec, directory: Path) -> Path:
    """Write hosts.yml for the spec into `directory`; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.yml"
    path.write_text(f"# Rendered by privlm from the cluster spec of {spec.name}; edit the spec, not this file.\n"
                    + yaml.safe_dump(render_inventory(spec), sort_keys=False))
    return path


def inventory_file(path: Path) -> Path:
    """The hosts file of an inventory directory (hosts.yml next to group_vars/), or the file itself."""
    path = Path(path)
    hosts = path / "hosts.yml" if path.is_dir() else path
    if not hosts.is_file():
        raise InventoryError(f"{path}: no hosts.yml (an inventory directory holds hosts.yml and group_vars/)")
    return hosts


def resolve_inventory(path: Path) -> dict[str, Any]:
    """`ansible-inventory --list` of the inventory: groups with their hosts and each host's variables."""
    ansible_inventory = Path(sys.executable).parent / "ansible-inventory"
    proc = subprocess.run([str(ansible_inventory), "-i", str(inventory_file(path)), "--list"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise InventoryError(f"{path}: Ansible cannot read it: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout)


def group_hosts(inventory: dict[str, Any], group: str) -> list[str]:
    """Hosts of a group, including those of its child groups, in inventory order."""
    node = inventory.get(group) or {}
    hosts = list(node.get("hosts", []))
    for child in node.get("children", []):
        hosts += [h for h in group_hosts(inventory, child) if h not in hosts]
    return hosts


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validate_inventory(path: Path) -> list[str]:
    """Problems that stop a run before any host is touched, each naming host and field ([] when fine)."""
    inventory = resolve_inventory(path)
    hostvars: dict[str, dict[str, Any]] = inventory.get("_meta", {}).get("hostvars", {})
    controllers, nodes = group_hosts(inventory, "slurm_controller"), group_hosts(inventory, "slurm_nodes")
    problems = []
    if len(controllers) != 1:
        problems.append(f"group slurm_controller: needs exactly one host, has {', '.join(controllers) or 'none'}")
    if not nodes:
        problems.append("group slurm_nodes: has no hosts")
    endpoints: dict[str, str] = {}
    names: dict[str, str] = {}
    for host in nodes:
        hv = hostvars.get(host, {})
        gpus, gpu_type = hv.get("slurm_gpus", 0), hv.get("slurm_gpu_type", "")
        if gpu_type and not (_is_count(gpus) and gpus > 0):
            problems.append(f"host {host}: field slurm_gpus is missing or 0 but slurm_gpu_type={gpu_type}; "
                            "give the GPU count")
        if _is_count(gpus) and gpus > 0 and not gpu_type:
            problems.append(f"host {host}: field slurm_gpu_type is missing but slurm_gpus={gpus}; "
                            "give the GPU type (Gres=gpu:TYPE:N), e.g. h100")
        for field in ("slurm_cpus", "slurm_real_memory", "slurm_gpus", "slurm_port"):
            if field in hv and not _is_count(hv[field]):
                problems.append(f"host {host}: field {field}={hv[field]} must be a non-negative integer")
        endpoint = f"{hv.get('ansible_host', host)}:{hv.get('slurm_port', DEFAULT_SLURMD_PORT)}"
        if endpoint in endpoints:
            problems.append(f"host {host}: address {endpoint} is already used by {endpoints[endpoint]} "
                            "(field ansible_host, or slurm_port for several slurmd on one host)")
        endpoints.setdefault(endpoint, host)
        name = hv.get("slurm_node_name", host)
        if name in names:
            problems.append(f"host {host}: field slurm_node_name={name} is already used by {names[name]}")
        names.setdefault(name, host)
    partitions = hostvars.get(controllers[0], {}).get("slurm_partitions", []) if controllers else []
    defaults = []
    for p in partitions:
        if not isinstance(p, dict) or "name" not in p or "priority_tier" not in p:
            problems.append(f"slurm_partitions: {json.dumps(p)} needs fields name and priority_tier")
        elif p.get("default"):
            defaults.append(p["name"])
    if len(defaults) > 1:
        problems.append(f"slurm_partitions: only one may have default: true, not {', '.join(defaults)}")
    return problems


def check_inventory(path: Path) -> None:
    """Raise InventoryError with every problem of the inventory, before any host is touched."""
    problems = validate_inventory(path)
    if problems:
        raise InventoryError(f"{path}: " + "; ".join(problems))
