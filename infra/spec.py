"""The cluster spec: the one typed description of hardware that inventories, Slurm resources and cost read.

`ClusterSpec` holds what every provider shares (name, partitions, accounting, storage); each provider
subclasses it and registers itself in `PROVIDERS` (here: `onprem`, hosts you own; the AWS part adds
`aws` with region, instance types and capacity). No Pulumi import: a spec is validated, with errors
that name the field, the value and the fix, before anything is created or configured.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress, ValidationError, model_validator

Fabric = Literal["infiniband", "efa", "ethernet"]
NAME = r"^[a-z][a-z0-9-]*$"


class SpecError(ValueError):
    """A cluster spec that cannot be used; the message names the field, the value and the fix."""


class Strict(BaseModel):
    """Unknown fields are errors, so a typo never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Gpus(Strict):
    """The GPUs of each server in a node group: Slurm sees them as `Gres=gpu:<type>:<count>`."""

    count: int = Field(ge=1, description="GPUs per server")
    type: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Slurm GRES type, e.g. h100, a100, l40s")


class Host(Strict):
    """One machine: its name (Slurm NodeName, Ansible host) and the address Ansible and Slurm reach it on."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9-]*$")
    address: IPvAnyAddress


class NodeGroup(Strict):
    """Identical servers (same GPUs and fabric); each provider says how they come to exist."""

    name: str = Field(pattern=NAME)
    gpus: Gpus | None = None
    fabric: Fabric = "ethernet"


class HostGroup(NodeGroup):
    """On-prem: a list of servers with the same CPUs, memory, GPUs and fabric."""

    hosts: list[Host] = Field(min_length=1)
    cpus: int = Field(gt=0, description="logical CPUs per server (Slurm CPUs)")
    memory_mb: int = Field(gt=0, description="memory per server that Slurm may hand out (RealMemory), MB")


class Partition(Strict):
    """A Slurm partition; a job in a higher priority tier preempts (requeues) jobs in lower tiers."""

    name: str = Field(pattern=NAME)
    priority_tier: int = Field(1, ge=1)
    grace_time_s: int = Field(60, ge=0, description="seconds a preempted job has, after its signal, to checkpoint")
    default: bool = False
    max_time: str = Field("INFINITE", description="Slurm time limit, e.g. 7-00:00:00")
    node_groups: list[str] = Field(default_factory=list, description="node groups in it; empty means all")


class Mount(Strict):
    """Shared storage every node mounts; an NFS mount without `source` is exported by the head node."""

    path: str = Field(pattern=r"^/")
    type: Literal["nfs", "lustre"] = "nfs"
    source: str | None = Field(None, description="server:/export (NFS) or addr@tcp:/fsname (Lustre)")


class ClusterSpec(Strict):
    """What every provider's cluster has: Slurm partitions, accounting, shared storage."""

    provider: str
    name: str = Field(pattern=NAME)
    partitions: list[Partition] = Field(default_factory=lambda: [Partition(name="batch", default=True)])
    accounting: bool = Field(False, description="slurmdbd with MariaDB on the head node (sacct)")
    storage: list[Mount] = Field(default_factory=list)
    ssh_user: str = "ubuntu"
    node_groups: list[NodeGroup] = Field(min_length=1)

    providers_with_efa: ClassVar[frozenset[str]] = frozenset({"aws"})

    @model_validator(mode="after")
    def _check_cluster(self) -> ClusterSpec:
        groups = {g.name for g in self.node_groups}
        if len(groups) != len(self.node_groups):
            raise ValueError("node_groups: two groups share a name; give each group its own name")
        for g in self.node_groups:
            if g.fabric == "efa" and self.provider not in self.providers_with_efa:
                raise ValueError(f"node group {g.name}: fabric='efa' exists only on AWS; "
                                 f"use 'infiniband' or 'ethernet' for provider {self.provider!r}")
        names = [p.name for p in self.partitions]
        if len(set(names)) != len(names):
            raise ValueError(f"partitions: names must be unique, got {names}")
        defaults = [p.name for p in self.partitions if p.default]
        if len(defaults) > 1:
            raise ValueError(f"partitions: only one may have default: true, got {defaults}")
        for p in self.partitions:
            unknown = sorted(set(p.node_groups) - groups)
            if unknown:
                raise ValueError(f"partition {p.name}: node_groups {unknown} do not exist; "
                                 f"use some of {sorted(groups)}")
        return self


class OnPremSpec(ClusterSpec):
    """Servers you own: a head node (slurmctld, slurmdbd, NFS) and node groups of compute hosts."""

    provider: Literal["onprem"] = "onprem"
    head: Host
    node_groups: list[HostGroup] = Field(min_length=1)

    def hosts(self) -> Iterator[tuple[HostGroup, Host]]:
        """Every compute host with its node group."""
        for group in self.node_groups:
            for host in group.hosts:
                yield group, host

    @model_validator(mode="after")
    def _check_hosts(self) -> OnPremSpec:
        by_address = {str(self.head.address): self.head.name}
        names = {self.head.name}
        for _, host in self.hosts():
            if host.name in names:
                raise ValueError(f"host {host.name}: name is used twice; give each host its own name")
            if str(host.address) in by_address:
                raise ValueError(f"host {host.name}: address {host.address} is already used by "
                                 f"{by_address[str(host.address)]}; give each host its own address")
            names.add(host.name)
            by_address[str(host.address)] = host.name
        return self


PROVIDERS: dict[str, type[ClusterSpec]] = {"onprem": OnPremSpec}


def parse_spec(data: dict[str, Any]) -> ClusterSpec:
    """Validate a spec of any registered provider (`provider:` picks the model; default onprem)."""
    provider = data.get("provider", "onprem")
    if provider not in PROVIDERS:
        raise SpecError(f"provider: {provider!r} is not supported; use one of {sorted(PROVIDERS)}")
    try:
        return PROVIDERS[provider].model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(x) for x in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()]
        raise SpecError("; ".join(problems)) from None


def load_spec(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster spec YAML file."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a cluster spec is a YAML mapping (name, provider, node_groups, ...)")
    return parse_spec(data)
