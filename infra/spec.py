"""The cluster spec: one typed description of hardware that inventories, Slurm resources and cost read.

This is the on-prem part (hosts you own); the AWS part (instance types, capacity, region) extends it.
No Pulumi import here: validation runs before anything is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Host(Strict):
    """One machine of a node group."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9-]*$")
    address: IPvAnyAddress


class NodeGroup(Strict):
    """Identical GPU servers."""

    name: str
    hosts: list[Host] = Field(min_length=1)
    cpus: int = Field(gt=0)
    memory_mb: int = Field(gt=0)
    gpus: int = Field(0, ge=0)
    gpu_type: str = ""

    @model_validator(mode="after")
    def _gpus(self) -> NodeGroup:
        if self.gpu_type and self.gpus == 0:
            raise ValueError(f"node group {self.name}: gpu_type={self.gpu_type!r} but gpus=0; set gpus")
        return self


class Partition(Strict):
    name: str
    priority_tier: int = Field(1, ge=1)
    grace_time_s: int = Field(60, ge=0)
    default: bool = False
    groups: list[str] = Field(default_factory=list, description="node groups; empty means all")


class ClusterSpec(Strict):
    """An on-prem cluster: head node, node groups, fabric, partitions, shared storage."""

    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    provider: Literal["onprem"] = "onprem"
    head: Host
    node_groups: list[NodeGroup] = Field(min_length=1)
    fabric: Literal["infiniband", "efa", "ethernet"] = "ethernet"
    partitions: list[Partition] = Field(default_factory=lambda: [Partition(name="batch", default=True)])
    nfs_export: str | None = Field(None, description="path the head node exports to every node")
    ssh_user: str = "ubuntu"
    accounting: bool = False

    @model_validator(mode="after")
    def _unique(self) -> ClusterSpec:
        seen: dict[str, str] = {str(self.head.address): self.head.name}
        names = {self.head.name}
        for g in self.node_groups:
            for h in g.hosts:
                if str(h.address) in seen:
                    raise ValueError(f"host {h.name}: address {h.address} is already used by {seen[str(h.address)]}")
                if h.name in names:
                    raise ValueError(f"host {h.name}: name used twice")
                seen[str(h.address)] = h.name
                names.add(h.name)
        groups = {g.name for g in self.node_groups}
        for p in self.partitions:
            unknown = set(p.groups) - groups
            if unknown:
                raise ValueError(f"partition {p.name}: unknown node groups {sorted(unknown)} (have {sorted(groups)})")
        return self


def load_spec(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster spec YAML."""
    return ClusterSpec.model_validate(yaml.safe_load(Path(path).read_text()))
