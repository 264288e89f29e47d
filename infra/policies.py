"""Policies over the resource graph the program records (infra/offline.py): what must hold before `pulumi up`.

Each policy reads the recorded inputs (camelCase keys, as the engine receives them) and returns violations
that name the resource and the fix. They run in the tests and in `privlm infra check STACK`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib
import inspect
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from infra.hardware import instance_types
from infra.offline import Graph, Recorded

REQUIRED_TAGS = ("privlm:cluster", "owner", "cost-centre")
WORLD = {"0.0.0.0/0", "::/0"}
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
INSTANCE = "aws:ec2/instance:Instance"
ASG = "aws:autoscaling/group:Group"
SECRET_PATTERNS = {
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "an AWS secret access key": re.compile(r"aws_secret_access_key\s*[=:]", re.IGNORECASE),
    "a password assignment": re.compile(r"\bpassword\s*[=:]\s*\S", re.IGNORECASE),
}


@dataclass(frozen=True)
class Violation:
    """One resource breaking one policy, with what to change."""

    policy: str
    resource: str
    message: str

    def __str__(self) -> str:
        return f"[{self.policy}] {self.resource}: {self.message}"


Policy = Callable[[Graph], Iterator[Violation]]
POLICIES: dict[str, Policy] = {}


def policy(name: str) -> Callable[[Policy], Policy]:
    """Register a policy under a name (the name appears in each violation)."""
    def register(fn: Policy) -> Policy:
        POLICIES[name] = fn
        return fn
    return register


def check(graph: Graph, only: list[str] | None = None) -> list[Violation]:
    """Every violation of the registered policies (or of `only` these) in the graph."""
    return [v for name, fn in POLICIES.items() if only is None or name in only for v in fn(graph)]


@policy("placement")
def compute_in_placement_group_and_one_zone(graph: Graph) -> Iterator[Violation]:
    """Every node group launches into the cluster placement group, in subnets of one availability zone."""
    zones: dict[str, str] = {}
    for group in graph.of_type(ASG):
        placement = graph.by_id(group.get("placementGroup", default=""))
        if placement is None or placement.get("strategy") != "cluster":
            yield Violation("placement", group.name, "not in a cluster placement group; set placement_group to the "
                            "cluster's aws.ec2.PlacementGroup(strategy='cluster')")
        for subnet_id in group.get("vpcZoneIdentifiers", default=[]):
            subnet = graph.by_id(subnet_id)
            zones[f"{group.name} subnet {subnet_id}"] = subnet.get("availabilityZone") if subnet else "unknown"
    if len(set(zones.values())) > 1:
        listing = ", ".join(f"{k} in {v}" for k, v in sorted(zones.items()))
        yield Violation("placement", "node groups", f"span several availability zones ({listing}); a cluster "
                        "placement group lives in one zone: launch every group into the private subnet of that zone")


@policy("efa")
def efa_interface_per_network_card(graph: Graph) -> Iterator[Violation]:
    """A launch template with EFA has one EFA interface per network card: device 0 on card 0, 1 on the others."""
    catalog = instance_types()
    for template in graph.of_type(LAUNCH_TEMPLATE):
        interfaces = template.get("networkInterfaces", default=[])
        efa = [i for i in interfaces if i.get("interfaceType") == "efa"]
        itype = catalog.get(template.get("instanceType", default=""))
        if not efa or itype is None:
            continue
        cards = sorted(int(i.get("networkCardIndex", 0)) for i in efa)
        if cards != list(range(itype.network_cards)):
            yield Violation("efa", template.name, f"{len(efa)} EFA interfaces on network cards {cards}, but "
                            f"{itype.name} has {itype.network_cards} network cards; add one EFA interface per card "
                            f"(network_card_index 0..{itype.network_cards - 1})")
        wrong = [int(i.get("networkCardIndex", 0)) for i in efa
                 if int(i.get("deviceIndex", -1)) != (0 if int(i.get("networkCardIndex", 0)) == 0 else 1)]
        if wrong:
            yield Violation("efa", template.name, f"EFA interfaces on cards {wrong} have the wrong device_index; "
                            "use 0 on card 0 and 1 on every other card")


def _head_groups(graph: Graph) -> set[str]:
    """Security groups of instances launched outside node groups (the head), not of any launch template."""
    on_head = {sg for i in graph.of_type(INSTANCE) for sg in i.get("vpcSecurityGroupIds", default=[])}
    on_nodes = {sg for t in graph.of_type(LAUNCH_TEMPLATE) for ni in t.get("networkInterfaces", default=[])
                for sg in ni.get("securityGroups", [])} | {
                sg for t in graph.of_type(LAUNCH_TEMPLATE) for sg in t.get("vpcSecurityGroupIds", default=[])}
    return on_head - on_nodes


def _world_ingress(graph: Graph) -> Iterator[tuple[Recorded, str, dict]]:
    """(resource, security group id, rule) for every ingress rule open to 0.0.0.0/0 or ::/0, in any spelling."""
    for r in graph.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"):
        if {r.get("cidrIpv4"), r.get("cidrIpv6")} & WORLD:
            yield r, r.get("securityGroupId"), r.inputs
    for r in graph.of_type("aws:ec2/securityGroupRule:SecurityGroupRule"):
        if r.get("type") == "ingress" and set(r.get("cidrBlocks", default=[]) + r.get("ipv6CidrBlocks", default=[])) \
                & WORLD:
            yield r, r.get("securityGroupId"), r.inputs
    for r in graph.of_type("aws:ec2/securityGroup:SecurityGroup"):
        for rule in r.get("ingress", default=[]):
            if set(rule.get("cidrBlocks", []) + rule.get("ipv6CidrBlocks", [])) & WORLD:
                yield r, r.id, rule


@policy("security-groups")
def nothing_open_to_the_world(graph: Graph) -> Iterator[Violation]:
    """No ingress from anywhere, except HTTPS (443/tcp) on the head node's own group."""
    head = _head_groups(graph)
    for resource, group_id, rule in _world_ingress(graph):
        ports = (rule.get("fromPort"), rule.get("toPort"))
        https = rule.get("ipProtocol", rule.get("protocol")) == "tcp" and ports == (443, 443)
        if not (https and group_id in head):
            yield Violation("security-groups", resource.name,
                            f"ingress {rule.get('ipProtocol', rule.get('protocol'))} ports {ports} from the whole "
                            "internet; allow only ssh_cidrs (SSH) or head.https_from_anywhere (443 on the head)")


@policy("encryption")
def encrypted_at_rest(graph: Graph) -> Iterator[Violation]:
    """Every EBS volume, bucket and file system is encrypted."""
    for t in graph.of_type(LAUNCH_TEMPLATE):
        for bdm in t.get("blockDeviceMappings", default=[]):
            if str((bdm.get("ebs") or {}).get("encrypted")).lower() != "true":
                yield Violation("encryption", t.name, f"volume {bdm.get('deviceName')} is not encrypted; "
                                "set ebs.encrypted='true'")
    for i in graph.of_type(INSTANCE):
        volumes = [i.get("rootBlockDevice", default={}), *i.get("ebsBlockDevices", default=[])]
        if any(v.get("encrypted") is not True for v in volumes):
            yield Violation("encryption", i.name, "a volume is not encrypted; set encrypted=True on every block device")
    for v in graph.of_type("aws:ebs/volume:Volume"):
        if v.get("encrypted") is not True:
            yield Violation("encryption", v.name, "EBS volume is not encrypted; set encrypted=True")
    encrypted = {r.get("bucket") for r in graph.of_type(
        "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration")
        if r.get("rules", default=[{}])[0].get("applyServerSideEncryptionByDefault")}
    for b in graph.of_type("aws:s3/bucket:Bucket"):
        if b.id not in encrypted:
            yield Violation("encryption", b.name, "bucket has no default encryption; add a "
                            "BucketServerSideEncryptionConfiguration (aws:kms)")
    for fs in graph.of_type("aws:fsx/lustreFileSystem:LustreFileSystem"):
        if fs.get("deploymentType", default="SCRATCH_1") == "SCRATCH_1":
            yield Violation("encryption", fs.name, "SCRATCH_1 does not encrypt data in transit; use SCRATCH_2 or "
                            "PERSISTENT_2 (encrypted at rest and in transit)")


@policy("imdsv2")
def imdsv2_required(graph: Graph) -> Iterator[Violation]:
    """Instances answer only session-token (IMDSv2) metadata requests."""
    for r in graph.of_type(LAUNCH_TEMPLATE) + graph.of_type(INSTANCE):
        if r.get("metadataOptions", "httpTokens") != "required":
            yield Violation("imdsv2", r.name, "IMDSv1 is allowed; set metadata_options.http_tokens='required'")


def _user_data(r: Recorded) -> str:
    text = r.get("userData", default="")
    if r.type == LAUNCH_TEMPLATE:
        try:
            return base64.b64decode(text, validate=True).decode(errors="replace")
        except (binascii.Error, ValueError):
            return text
    return text


@policy("secrets")
def no_plaintext_secret_in_user_data(graph: Graph) -> Iterator[Violation]:
    """User data is readable by anyone with ec2:DescribeInstanceAttribute: no secret may be in it."""
    for r in graph.of_type(LAUNCH_TEMPLATE) + graph.of_type(INSTANCE):
        text = _user_data(r)
        found = [what for what, pattern in SECRET_PATTERNS.items() if pattern.search(text)]
        found += ["a stack secret (privlm:mungeKey)" for s in graph.secrets if s and s in text]
        if found:
            yield Violation("secrets", r.name, f"user data contains {', '.join(found)}; keep secrets in SSM "
                            "Parameter Store (SecureString) and fetch them at boot with the instance role")


@functools.cache
def _taggable(token: str) -> bool:
    """Whether the pulumi_aws resource class of a type token takes `tags`."""
    match = re.match(r"^aws:([^/]+)/[^:]+:(\w+)$", token)
    if not match:
        return False
    with warnings.catch_warnings():  # the module announces its deprecated classes on import
        warnings.simplefilter("ignore", DeprecationWarning)
        cls = getattr(importlib.import_module(f"pulumi_aws.{match[1]}"), match[2], None)
    return cls is not None and "tags" in inspect.signature(cls._internal_init).parameters


def _missing(tags: dict) -> list[str]:
    return [k for k in REQUIRED_TAGS if not tags.get(k)]


@policy("tags")
def tagged_for_the_bill(graph: Graph) -> Iterator[Violation]:
    """Every resource that takes tags has cluster, owner and cost centre, and so does what node groups launch."""
    fix = "tag it with AwsSpec.resource_tags()"
    for r in graph.resources:
        if not r.custom or not _taggable(r.type):
            continue
        if r.type == ASG:
            tags = {t.get("key"): t.get("value") for t in r.get("tags", default=[]) if t.get("propagateAtLaunch")}
        else:
            tags = r.get("tags", default={})
        if _missing(tags):
            yield Violation("tags", r.name, f"missing tags {_missing(tags)}; {fix}")
        if r.type == LAUNCH_TEMPLATE:
            specs = {s.get("resourceType"): s.get("tags", {}) for s in r.get("tagSpecifications", default=[])}
            for kind in ("instance", "volume"):
                if _missing(specs.get(kind, {})):
                    yield Violation("tags", r.name, f"launched {kind}s miss tags {_missing(specs.get(kind, {}))}; "
                                    f"add a tag_specifications entry for {kind}")
