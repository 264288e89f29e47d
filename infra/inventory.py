"""Ansible inventories: rendered from the cluster spec, and validated before any host is touched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from infra.spec import ClusterSpec


class InventoryError(ValueError):
    """An inventory with a missing or contradictory field; the message names the host and the field."""


def render_inventory(spec: ClusterSpec) -> dict[str, Any]:
    """The inventory (hosts.yml) and group variables that describe the spec's cluster."""
    nodes: dict[str, Any] = {}
    for g in spec.node_groups:
        for h in g.hosts:
            nodes[h.name] = {"ansible_host": str(h.address), "slurm_cpus": g.cpus, "slurm_real_memory": g.memory_mb,
                             "slurm_gpus": g.gpus, "slurm_gpu_type": g.gpu_type}
    partitions = [{"name": p.name, "priority_tier": p.priority_tier, "grace_time": p.grace_time_s,
                   "default": p.default, **({"nodes": ",".join(h.name for g in spec.node_groups if g.name in p.groups
                                                               for h in g.hosts)} if p.groups else {})}
                  for p in spec.partitions]
    group_vars = {"slurm_cluster_name": spec.name, "slurm_partitions": partitions, "privlm_fabric": spec.fabric,
                  "slurm_accounting": spec.accounting, "ansible_user": spec.ssh_user}
    if spec.nfs_export:
        group_vars["shared_storage_mounts"] = [{"path": spec.nfs_export, "type": "nfs",
                                                "source": f"{spec.head.address}:{spec.nfs_export}"}]
    exports = {"shared_storage_nfs_exports": [{"path": spec.nfs_export}]} if spec.nfs_export else {}
    head = {spec.head.name: {"ansible_host": str(spec.head.address), **exports}}
    return {"all": {"vars": group_vars, "hosts": {**head, **nodes},
                    "children": {"slurm_controller": {"hosts": {spec.head.name: None}},
                                 "slurm_nodes": {"hosts": dict.fromkeys(nodes)}}}}


def write_inventory(spec: ClusterSpec, directory: Path) -> Path:
    """Write hosts.yml for the spec; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.yml"
    path.write_text("# Rendered by privlm from the cluster spec; edit the spec, not this file.\n"
                    + yaml.safe_dump(render_inventory(spec), sort_keys=False))
    return path


def _hosts(inventory: dict[str, Any], group: str) -> dict[str, dict[str, Any]]:
    """Hosts of a group with their variables: group vars (outer first), then the host's own vars."""
    own: dict[str, dict[str, Any]] = {}
    members: dict[str, dict[str, Any]] = {}

    def walk(node: dict[str, Any], inherited: dict[str, Any], inside: bool) -> None:
        merged = {**inherited, **(node.get("vars") or {})}
        for name, hv in (node.get("hosts") or {}).items():
            own.setdefault(name, {}).update(hv or {})
            if inside:
                members[name] = {**members.get(name, {}), **merged}
        for child, sub in (node.get("children") or {}).items():
            walk(sub or {}, merged, inside or child == group)

    walk(inventory.get("all", inventory), {}, group == "all")
    return {name: {**group_vars, **own[name]} for name, group_vars in members.items()}


def load_inventory(path: Path) -> dict[str, Any]:
    """hosts.yml of an inventory directory (or the file itself), with group_vars/all.yml as all.vars."""
    path = Path(path)
    hosts = path / "hosts.yml" if path.is_dir() else path
    if not hosts.is_file():
        raise InventoryError(f"{path}: no hosts.yml (an inventory directory holds hosts.yml and group_vars/)")
    data = yaml.safe_load(hosts.read_text()) or {}
    group_vars = hosts.parent / "group_vars" / "all.yml"
    if group_vars.is_file():
        root = data.setdefault("all", {})
        root["vars"] = {**(yaml.safe_load(group_vars.read_text()) or {}), **(root.get("vars") or {})}
    return data


def validate_inventory(path: Path) -> list[str]:
    """Problems that stop a run before any host is touched, each naming host and field ([] when fine)."""
    inv = load_inventory(path)
    problems = []
    controllers, nodes = _hosts(inv, "slurm_controller"), _hosts(inv, "slurm_nodes")
    if len(controllers) != 1:
        problems.append(f"group slurm_controller: needs exactly one host, has {sorted(controllers) or 'none'}")
    if not nodes:
        problems.append("group slurm_nodes: has no hosts")
    endpoints: dict[str, str] = {}
    for name, hv in nodes.items():
        if hv.get("slurm_gpu_type") and not int(hv.get("slurm_gpus") or 0):
            problems.append(f"host {name}: field slurm_gpus is missing or 0 but slurm_gpu_type="
                            f"{hv['slurm_gpu_type']!r}; give the GPU count")
        if "ansible_host" not in hv and hv.get("ansible_connection") != "local":
            problems.append(f"host {name}: field ansible_host is missing; give the node's address")
        for field in ("slurm_cpus", "slurm_real_memory", "slurm_gpus"):
            if field in hv and (not isinstance(hv[field], int) or hv[field] < 0):
                problems.append(f"host {name}: field {field}={hv[field]!r} must be a non-negative integer")
        endpoint = f"{hv.get('ansible_host', name)}:{hv.get('slurm_port', 6818)}"
        if endpoint in endpoints:
            problems.append(f"host {name}: address {endpoint} is already used by {endpoints[endpoint]} "
                            "(field ansible_host, or slurm_port for several slurmd on one host)")
        endpoints[endpoint] = name
    return problems
