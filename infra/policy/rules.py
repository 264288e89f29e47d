"""The privlm policies: what must hold for a stack's AWS resources before `pulumi up` creates them.

Each policy is a CrossGuard `StackValidationPolicy` (pulumi-policy). `pulumi preview --policy-pack infra/policy`
runs them on the resources the engine plans; `privlm infra check` runs the same objects on the resources the
program registers under the SDK's mocks (infra/offline.py). Properties have the engine's camelCase names.
A reference to another resource is followed through the engine's property dependencies, or, where there are
none (the mocks record none), through the referenced resource's `id`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib
import inspect
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pulumi_policy import EnforcementLevel, PolicyResource, ReportViolation, StackValidationArgs, StackValidationPolicy

from infra.findings import Level, get
from infra.hardware import instance_types

REQUIRED_TAGS = ("privlm:cluster", "owner", "cost-centre")
WORLD = {"0.0.0.0/0", "::/0"}
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
INSTANCE = "aws:ec2/instance:Instance"
ASG = "aws:autoscaling/group:Group"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
SSM_PARAMETER = "aws:ssm/parameter:Parameter"
SUBNET = "aws:ec2/subnet:Subnet"
PLACEMENT_GROUP = "aws:ec2/placementGroup:PlacementGroup"
BUCKET = "aws:s3/bucket:Bucket"
SECRET_PATTERNS = {
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "an AWS secret access key": re.compile(r"aws_secret_access_key\s*[=:]", re.IGNORECASE),
    "a password assignment": re.compile(r"\bpassword\s*[=:]\s*\S", re.IGNORECASE),
}
# A policy's enforcement level, as the level of the Findings `privlm infra check` prints for it.
LEVELS: dict[EnforcementLevel, Level] = {EnforcementLevel.MANDATORY: "error", EnforcementLevel.ADVISORY: "warning"}


@dataclass
class Stack:
    """The resources of one stack, with the lookups the policies share."""

    resources: Sequence[PolicyResource]

    def of_type(self, *tokens: str) -> list[PolicyResource]:
        return [r for r in self.resources if r.resource_type in tokens]

    def refs(self, resource: PolicyResource, prop: str, token: str) -> list[PolicyResource]:
        """The resources of type `token` that `resource.props[prop]` refers to (an id, ids, or objects holding them)."""
        known = (resource.property_dependencies or {}).get(prop)
        if known:
            return [r for r in known if r.resource_type == token]
        ids = set(_strings(get(resource.props, prop)))
        return [r for r in self.of_type(token) if get(r.props, "id") in ids]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, Sequence):
        for v in value:
            yield from _strings(v)


Rule = Callable[[Stack], Iterator[tuple[PolicyResource | None, str]]]


def stack_policy(name: str, rule: Rule, level: EnforcementLevel = EnforcementLevel.MANDATORY) -> StackValidationPolicy:
    """A CrossGuard stack policy from a rule that yields (resource or None for the whole stack, message)."""
    def validate(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        for resource, message in rule(Stack(args.resources)):
            report_violation(message, resource.urn if resource is not None else None)
    return StackValidationPolicy(name=name, description=(rule.__doc__ or name).strip(), validate=validate,
                                 enforcement_level=level)


def compute_in_placement_group_and_one_zone(stack: Stack) -> Iterator[tuple[PolicyResource | None, str]]:
    """Every node group launches into the cluster placement group, in subnets of one availability zone."""
    zones: dict[str, str] = {}
    for group in stack.of_type(ASG):
        placement = stack.refs(group, "placementGroup", PLACEMENT_GROUP)
        if not placement or get(placement[0].props, "strategy") != "cluster":
            yield group, ("not in a cluster placement group; set placement_group to the cluster's "
                          "aws.ec2.PlacementGroup(strategy='cluster')")
        for subnet in stack.refs(group, "vpcZoneIdentifiers", SUBNET):
            zones[f"{group.name} subnet {subnet.name}"] = get(subnet.props, "availabilityZone", default="unknown")
    if len(set(zones.values())) > 1:
        listing = ", ".join(f"{k} in {v}" for k, v in sorted(zones.items()))
        yield None, (f"node groups span several availability zones ({listing}); a cluster placement group lives "
                     "in one zone: launch every group into the private subnet of that zone")


def efa_interface_per_network_card(stack: Stack) -> Iterator[tuple[PolicyResource | None, str]]:
    """A launch template with EFA has one EFA interface per network card: device 0 on card 0, 1 on the others."""
    catalog = instance_types()
    for template in stack.of_type(LAUNCH_TEMPLATE):
        efa = [i for i in get(template.props, "networkInterfaces", default=[]) if get(i, "interfaceType") == "efa"]
        itype = catalog.get(get(template.props, "instanceType", default=""))
        if not efa or itype is None:
            continue
        cards = sorted(int(get(i, "networkCardIndex", default=0)) for i in efa)
        if cards != list(range(itype.network_cards)):
            yield template, (f"{len(efa)} EFA interfaces on network cards {cards}, but {itype.name} has "
                             f"{itype.network_cards} network cards; add one EFA interface per card "
                             f"(network_card_index 0..{itype.network_cards - 1})")
        wrong = [card for i in efa if int(get(i, "deviceIndex", default=-1)) != (
                 0 if (card := int(get(i, "networkCardIndex", default=0))) == 0 else 1)]
        if wrong:
            yield template, (f"EFA interfaces on cards {wrong} have the wrong device_index; use 0 on card 0 and 1 "
                             "on every other card")


def _head_groups(stack: Stack) -> set[str]:
    """URNs of the security groups of instances launched outside node groups (the head), not of any template."""
    on_head = {g.urn for i in stack.of_type(INSTANCE) for g in stack.refs(i, "vpcSecurityGroupIds", SECURITY_GROUP)}
    on_nodes = {g.urn for t in stack.of_type(LAUNCH_TEMPLATE)
                for prop in ("networkInterfaces", "vpcSecurityGroupIds") for g in stack.refs(t, prop, SECURITY_GROUP)}
    return on_head - on_nodes


def _world_ingress(stack: Stack) -> Iterator[tuple[PolicyResource, set[str], Mapping[str, Any]]]:
    """(resource, URNs of its security group, rule) for every ingress rule open to 0.0.0.0/0 or ::/0."""
    for r in stack.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"):
        if {get(r.props, "cidrIpv4"), get(r.props, "cidrIpv6")} & WORLD:
            yield r, {g.urn for g in stack.refs(r, "securityGroupId", SECURITY_GROUP)}, r.props
    for r in stack.of_type("aws:ec2/securityGroupRule:SecurityGroupRule"):
        cidrs = [*get(r.props, "cidrBlocks", default=[]), *get(r.props, "ipv6CidrBlocks", default=[])]
        if get(r.props, "type") == "ingress" and set(cidrs) & WORLD:
            yield r, {g.urn for g in stack.refs(r, "securityGroupId", SECURITY_GROUP)}, r.props
    for r in stack.of_type(SECURITY_GROUP):
        for rule in get(r.props, "ingress", default=[]):
            if set([*get(rule, "cidrBlocks", default=[]), *get(rule, "ipv6CidrBlocks", default=[])]) & WORLD:
                yield r, {r.urn}, rule


def nothing_open_to_the_world(stack: Stack) -> Iterator[tuple[PolicyResource | None, str]]:
    """No ingress from anywhere, except HTTPS (443/tcp) on the head node's own group."""
    head = _head_groups(stack)
    for resource, groups, rule in _world_ingress(stack):
        protocol = get(rule, "ipProtocol", default=get(rule, "protocol"))
        ports = (get(rule, "fromPort"), get(rule, "toPort"))
        if not (protocol == "tcp" and ports == (443, 443) and groups and groups <= head):
            yield resource, (f"ingress {protocol} ports {ports} from the whole internet; allow only ssh_cidrs (SSH) "
                             "or head.https_from_anywhere (443 on the head)")


def encrypted_at_rest(stack: Stack) -> Iterator[tuple[PolicyResource | None, str]]:
    """Every EBS volume, bucket and file system is encrypted (Lustre in transit too)."""
    for t in stack.of_type(LAUNCH_TEMPLATE):
        for bdm in get(t.props, "blockDeviceMappings", default=[]):
            if str(get(bdm, "ebs", "encrypted")).lower() != "true":
                yield t, f"volume {get(bdm, 'deviceName')} is not encrypted; set ebs.encrypted='true'"
    for i in stack.of_type(INSTANCE):
        volumes = [get(i.props, "rootBlockDevice", default={}), *get(i.props, "ebsBlockDevices", default=[])]
        if any(get(v, "encrypted") is not True for v in volumes):
            yield i, "a volume is not encrypted; set encrypted=True on every block device"
    for v in stack.of_type("aws:ebs/volume:Volume"):
        if get(v.props, "encrypted") is not True:
            yield v, "EBS volume is not encrypted; set encrypted=True"
    encrypted = {b.urn for c in stack.of_type(
        "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration")
        if get(c.props, "rules", 0, "applyServerSideEncryptionByDefault") for b in stack.refs(c, "bucket", BUCKET)}
    for b in stack.of_type(BUCKET):
        if b.urn not in encrypted:
            yield b, "bucket has no default encryption; add a BucketServerSideEncryptionConfiguration (aws:kms)"
    for fs in stack.of_type("aws:fsx/lustreFileSystem:LustreFileSystem"):
        if get(fs.props, "deploymentType", default="SCRATCH_1") == "SCRATCH_1":
            yield fs, ("SCRATCH_1 does not encrypt data in transit; use SCRATCH_2 or PERSISTENT_2 (encrypted at rest "
                       "and in transit)")


def imdsv2_required(stack: Stack) -> Iterator[tuple[PolicyResource | None, str]]:
    """Instances answer only session-token (IMDSv2) metadata requests."""
    for r in stack.of_type(LAUNCH_TEMPLATE, INSTANCE):
        if get(r.props, "metadataOptions", "httpTokens") != "required":
            yield r, "IMDSv1 is allowed; set metadata_options.http_tokens='required'"


def _user_data(r: PolicyResource) -> str:
    text = get(r.props, "userData", default="")
    if r.resource_type == LAUNCH_TEMPLATE:
        try:
            return base64.b64decode(text, validate=True).decode(errors="replace")
        except (binascii.Error, ValueError):
            return text
    return text


def no_plaintext_secret_in_user_data(stack: Stack) -> Iterator[tuple[PolicyResource | None, str]]:
    """User data is readable by anyone with ec2:DescribeInstanceAttribute: no secret may be in it."""
    secure = {p.name: get(p.props, "value") for p in stack.of_type(SSM_PARAMETER)
              if get(p.props, "type") == "SecureString" and get(p.props, "value")}
    for r in stack.of_type(LAUNCH_TEMPLATE, INSTANCE):
        text = _user_data(r)
        found = [what for what, pattern in SECRET_PATTERNS.items() if pattern.search(text)]
        found += [f"the value of SecureString {name}" for name, value in secure.items() if value in text]
        if found:
            yield r, (f"user data contains {', '.join(found)}; keep secrets in SSM Parameter Store (SecureString) "
                      "and fetch them at boot with the instance role")


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


def _missing(tags: Mapping[str, Any]) -> list[str]:
    return [k for k in REQUIRED_TAGS if not get(tags, k)]


def tagged_for_the_bill(stack: Stack) -> Iterator[tuple[PolicyResource | None, str]]:
    """Every resource that takes tags has cluster, owner and cost centre, and so does what node groups launch."""
    for r in stack.resources:
        if not _taggable(r.resource_type):
            continue
        if r.resource_type == ASG:
            tags = {get(t, "key"): get(t, "value") for t in get(r.props, "tags", default=[])
                    if get(t, "propagateAtLaunch")}
        else:
            tags = get(r.props, "tags", default={})
        if _missing(tags):
            yield r, f"missing tags {_missing(tags)}; tag it with AwsSpec.resource_tags()"
        if r.resource_type == LAUNCH_TEMPLATE:
            specs = {get(s, "resourceType"): get(s, "tags", default={})
                     for s in get(r.props, "tagSpecifications", default=[])}
            for kind in ("instance", "volume"):
                if _missing(specs.get(kind, {})):
                    yield r, (f"launched {kind}s miss tags {_missing(specs.get(kind, {}))}; add a "
                              f"tag_specifications entry for {kind}")


POLICIES: list[StackValidationPolicy] = [
    stack_policy("placement", compute_in_placement_group_and_one_zone),
    stack_policy("efa", efa_interface_per_network_card),
    stack_policy("security-groups", nothing_open_to_the_world),
    stack_policy("encryption", encrypted_at_rest),
    stack_policy("imdsv2", imdsv2_required),
    stack_policy("secrets", no_plaintext_secret_in_user_data),
    stack_policy("tags", tagged_for_the_bill),
]
