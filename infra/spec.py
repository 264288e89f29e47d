"""The cluster spec: the one typed description of hardware that inventories, Slurm resources and cost read.

`ClusterSpec` holds what every provider shares (name, partitions, accounting, storage); each provider
subclasses it and registers itself in `PROVIDERS` (`onprem`, hosts you own; `aws`, EC2 with region,
instance types and capacity). No Pulumi import: a spec is validated, with errors that name the field,
the value and the fix, before anything is created or configured: structure by pydantic (`parse_spec`
raises), then ParallelCluster-style rules over the spec and the hardware catalog (`check_spec` returns
errors and warnings).
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import ConfigDict, Field, IPvAnyAddress, IPvAnyNetwork, ValidationError, model_validator

from infra.findings import Finding
from privlm.validation import Strict as _Strict
from privlm.validation import render

Fabric = Literal["infiniband", "efa", "ethernet"]
NAME = r"^[a-z][a-z0-9-]*$"


class SpecError(ValueError):
    """A cluster spec that cannot be used; the message names the field, the value and the fix."""


class Strict(_Strict):
    """privlm.validation's strict base, frozen: a spec is read once and never changed."""

    model_config = ConfigDict(frozen=True)


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


class Capacity(Strict):
    """How EC2 capacity is bought: on-demand, spot (optionally capped), or a targeted capacity reservation."""

    type: Literal["on-demand", "spot", "reservation"] = "on-demand"
    max_price_usd_per_hour: float | None = Field(None, gt=0, description="spot only; default: the on-demand price")
    reservation_id: str | None = Field(None, pattern=r"^cr-[0-9a-f]{8,17}$", description="reservation only")

    @model_validator(mode="after")
    def _check_capacity(self) -> Capacity:
        if self.max_price_usd_per_hour is not None and self.type != "spot":
            raise ValueError(f"max_price_usd_per_hour applies to spot capacity only, not type={self.type!r}; "
                             "remove it or set type: spot")
        if (self.reservation_id is None) == (self.type == "reservation"):
            raise ValueError("reservation_id (cr-...) is required with type: reservation and only there")
        return self


class InstanceGroup(NodeGroup):
    """AWS: identical EC2 instances of one type in an Auto Scaling group (count, between min and max)."""

    instance_type: str
    count: int = Field(ge=0, description="instances to run now (the Auto Scaling group's desired capacity)")
    min_count: int | None = Field(None, ge=0, description="default: count")
    max_count: int | None = Field(None, ge=1, description="default: count")
    capacity: Capacity = Field(default_factory=Capacity)
    availability_zone: str | None = Field(None, description="default: the cluster's availability_zone")
    root_volume_gib: int = Field(200, ge=50)

    @property
    def bounds(self) -> tuple[int, int]:
        """(min, max) instances of the group."""
        return (self.count if self.min_count is None else self.min_count,
                self.count if self.max_count is None else self.max_count)

    @model_validator(mode="after")
    def _check_counts(self) -> InstanceGroup:
        low, high = self.bounds
        if not low <= self.count <= high:
            raise ValueError(f"node group {self.name}: count={self.count} must lie between min_count={low} "
                             f"and max_count={high}")
        return self


class HeadNode(Strict):
    """AWS: the head node (slurmctld, NFS exports), outside the placement group, with a public address."""

    instance_type: str = "m7i.2xlarge"
    root_volume_gib: int = Field(200, ge=50)
    https_from_anywhere: bool = Field(False, description="open 443/tcp to the world on the head node (a web UI)")


class FsxLustre(Strict):
    """AWS: FSx for Lustre in the cluster's subnet, linked to the cluster's S3 bucket (import and export)."""

    capacity_gib: int = Field(1200, gt=0)
    deployment_type: Literal["SCRATCH_2", "PERSISTENT_1", "PERSISTENT_2"] = "SCRATCH_2"  # all linkable to S3
    throughput_mb_per_tib: int | None = Field(None, description="PERSISTENT only: 125, 250, 500 or 1000 (P2)")
    mount_path: str = Field("/fsx", pattern=r"^/")


class Tags(Strict):
    """Tags on every resource, so the bill can be read by cluster, owner and cost centre."""

    owner: str = Field(min_length=1)
    cost_centre: str = Field(min_length=1)


class AwsSpec(ClusterSpec):
    """EC2 in one region and one availability zone: a head node and Auto Scaling node groups in a placement group."""

    provider: Literal["aws"] = "aws"
    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")
    availability_zone: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d[a-z]$")
    head: HeadNode = Field(default_factory=HeadNode)
    node_groups: list[InstanceGroup] = Field(min_length=1)
    fsx: FsxLustre | None = None
    ssh_cidrs: list[IPvAnyNetwork] = Field(default_factory=list, description="empty: no SSH, use SSM")
    vpc_cidr: IPv4Network = IPv4Network("10.42.0.0/16")
    key_name: str | None = Field(None, description="EC2 key pair for SSH; none: SSM Session Manager only")
    ami: str | None = Field(None, pattern=r"^ami-[0-9a-f]+$", description="default: the AWS Deep Learning Base AMI")
    tags: Tags

    def zone_of(self, group: InstanceGroup) -> str:
        """The availability zone a node group runs in."""
        return group.availability_zone or self.availability_zone

    def resource_tags(self, name: str) -> dict[str, str]:
        """The tags every resource carries: its name, the cluster, the owner and the cost centre."""
        return {"Name": f"{self.name}-{name}", "privlm:cluster": self.name, "owner": self.tags.owner,
                "cost-centre": self.tags.cost_centre}


PROVIDERS: dict[str, type[ClusterSpec]] = {"onprem": OnPremSpec, "aws": AwsSpec}


def parse_spec(data: dict[str, Any], source: str = "the cluster spec") -> ClusterSpec:
    """Validate a spec of any registered provider (`provider:` picks the model; default onprem)."""
    provider = data.get("provider", "onprem")
    if provider not in PROVIDERS:
        raise SpecError(f"provider: {provider!r} is not supported; use one of {sorted(PROVIDERS)}")
    try:
        return PROVIDERS[provider].model_validate(data)
    except ValidationError as exc:
        raise SpecError(render(exc, source, "cluster spec")) from None


def load_spec(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster spec YAML file."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a cluster spec is a YAML mapping (name, provider, node_groups, ...)")
    return parse_spec(data, str(path))


# Valid FSx for Lustre sizes (CreateFileSystem StorageCapacity, AWS FSx API reference): for the SSD types
# SCRATCH_2, PERSISTENT_1 and PERSISTENT_2, 1200, 2400, then multiples of 2400 GiB.
FSX_STEP_GIB = {"SCRATCH_2": 2400, "PERSISTENT_1": 2400, "PERSISTENT_2": 2400}
FSX_THROUGHPUT = {"PERSISTENT_1": (50, 100, 200), "PERSISTENT_2": (125, 250, 500, 1000)}


def check_spec(spec: ClusterSpec) -> list[Finding]:
    """Errors, then warnings, of the rules below for an AWS spec ([] for other providers)."""
    if not isinstance(spec, AwsSpec):
        return []
    findings = [f for rule in AWS_RULES for f in rule(spec)]
    return sorted(findings, key=lambda f: f.level != "error")


def _catalog_types(spec: AwsSpec) -> Iterator[tuple[int, InstanceGroup, Any]]:
    from infra.hardware import instance_types

    catalog = instance_types()
    for i, group in enumerate(spec.node_groups):
        yield i, group, catalog.get(group.instance_type)


def _instance_types_known(spec: AwsSpec) -> Iterator[Finding]:
    from infra.hardware import instance_types

    for i, group, itype in _catalog_types(spec):
        if itype is None:
            yield Finding("error", f"node_groups.{i}.instance_type",
                          f"{group.instance_type!r} is not in the hardware catalog (infra/catalog/instances.csv); "
                          f"use one of {sorted(instance_types())} or add a row with its source and date")


def _efa_needs_an_efa_type(spec: AwsSpec) -> Iterator[Finding]:
    from infra.hardware import instance_types

    with_efa = sorted(n for n, t in instance_types().items() if t.efa_interfaces and t.gpus)
    for i, group, itype in _catalog_types(spec):
        if group.fabric == "efa" and itype is not None and itype.efa_interfaces == 0:
            yield Finding("error", f"node_groups.{i}.fabric",
                          f"fabric 'efa' but {group.instance_type} has no EFA interface; use an EFA type "
                          f"({', '.join(with_efa)}) or set fabric: ethernet")


def _no_infiniband_on_aws(spec: AwsSpec) -> Iterator[Finding]:
    for i, group in enumerate(spec.node_groups):
        if group.fabric == "infiniband":
            yield Finding("error", f"node_groups.{i}.fabric",
                          "fabric 'infiniband' does not exist on EC2; use efa (GPU-to-GPU across nodes) or ethernet")


def _type_offered_in_region(spec: AwsSpec) -> Iterator[Finding]:
    for i, group, itype in _catalog_types(spec):
        if itype is not None and spec.region not in itype.prices:
            yield Finding("error", f"node_groups.{i}.instance_type",
                          f"{group.instance_type} has no capacity in region {spec.region} per infra/catalog/"
                          f"regions.csv; use region {' or '.join(itype.regions) or '(none listed)'}, another type, "
                          "or add the region's row with its source")


def _one_zone_for_the_placement_group(spec: AwsSpec) -> Iterator[Finding]:
    if not spec.availability_zone.startswith(spec.region):
        yield Finding("error", "availability_zone",
                      f"{spec.availability_zone} is not in region {spec.region}; use a zone such as {spec.region}a")
    for i, group in enumerate(spec.node_groups):
        zone = spec.zone_of(group)
        if zone != spec.availability_zone:
            yield Finding("error", f"node_groups.{i}.availability_zone",
                          f"{zone} is outside the cluster's zone {spec.availability_zone}, but compute nodes share "
                          f"one cluster placement group, which lives in one zone; remove availability_zone or set it "
                          f"to {spec.availability_zone}")


def _ssh_not_open_to_the_world(spec: AwsSpec) -> Iterator[Finding]:
    for i, cidr in enumerate(spec.ssh_cidrs):
        if cidr.prefixlen == 0:
            yield Finding("error", f"ssh_cidrs.{i}",
                          f"{cidr} opens SSH to the whole internet; list your office or VPN ranges "
                          "(e.g. 203.0.113.0/24) or leave ssh_cidrs empty and use SSM Session Manager")


def _spot_price_below_on_demand(spec: AwsSpec) -> Iterator[Finding]:
    for i, group, itype in _catalog_types(spec):
        cap = group.capacity.max_price_usd_per_hour
        price = itype.prices.get(spec.region) if itype else None
        on_demand = price.usd_per_hour if price else None
        if cap is not None and on_demand is not None and cap > on_demand:
            yield Finding("warning", f"node_groups.{i}.capacity.max_price_usd_per_hour",
                          f"{cap} is above the on-demand price of {group.instance_type} in {spec.region} "
                          f"({on_demand} USD/h); spot is never worth more: lower it to at most {on_demand} "
                          "or use capacity type on-demand")


def _fsx_size_and_throughput(spec: AwsSpec) -> Iterator[Finding]:
    fsx = spec.fsx
    if fsx is None:
        return
    step = FSX_STEP_GIB[fsx.deployment_type]
    if fsx.capacity_gib not in (1200, 2400) and fsx.capacity_gib % step:
        next_size = min(v for v in (1200, 2400, -(-fsx.capacity_gib // step) * step) if v >= fsx.capacity_gib)
        yield Finding("error", "fsx.capacity_gib",
                      f"{fsx.capacity_gib} GiB is not a valid size for {fsx.deployment_type}; use 1200, 2400 or a "
                      f"multiple of {step} GiB (the next valid size is {next_size})")
    allowed = FSX_THROUGHPUT.get(fsx.deployment_type)
    if allowed and fsx.throughput_mb_per_tib not in allowed:
        yield Finding("error", "fsx.throughput_mb_per_tib",
                      f"{fsx.throughput_mb_per_tib} is not a throughput of {fsx.deployment_type}; use one of {allowed}")
    if not allowed and fsx.throughput_mb_per_tib is not None:
        yield Finding("error", "fsx.throughput_mb_per_tib",
                      f"{fsx.deployment_type} has a fixed throughput; remove throughput_mb_per_tib or use PERSISTENT_2")


AWS_RULES = (_instance_types_known, _efa_needs_an_efa_type, _no_infiniband_on_aws, _type_offered_in_region,
             _one_zone_for_the_placement_group, _ssh_not_open_to_the_world, _spot_price_below_on_demand,
             _fsx_size_and_throughput)
