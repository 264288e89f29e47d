"""The CrossGuard policy pack (infra/policy) on the real program's mock-recorded resources.

A compliant stack passes, a stack built to break each policy fails with that policy's message, through
`privlm infra check`'s path (infra.offline.check) and through the pack's own analyzer server, driven over gRPC
the way the Pulumi CLI drives it for `pulumi preview --policy-pack infra/policy`.
"""

from __future__ import annotations

import base64
import copy
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pulumi
import pytest
import yaml
from google.protobuf import empty_pb2, json_format, struct_pb2
from pulumi.runtime.proto import analyzer_pb2, analyzer_pb2_grpc
from pulumi_policy.deserialize import serialize_properties

from infra.offline import PLACEHOLDER_SECRET, Graph, check, run, stack_config
from infra.policy.rules import POLICIES
from tests.helpers import REPO

MUNGE = "test-munge-key-that-must-never-appear-in-user-data"
LT = "aws:ec2/launchTemplate:LaunchTemplate"
ASG = "aws:autoscaling/group:Group"
PACK = REPO / "infra" / "policy"


def config(stack: str, **cluster_changes: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(stack_config(stack))
    cfg["privlm:cluster"].update(cluster_changes)
    cfg["privlm:mungeKey"] = MUNGE
    return cfg


@pytest.mark.parametrize("stack", ["p5-spot", "p4d-ondemand", "g5-inference"])
def test_every_example_stack_passes_every_policy(stack: str) -> None:
    graph = run(config(stack), stack=stack)
    assert graph.count() >= 30
    assert check(graph) == []


# Stacks built to break one policy each: an invalid spec forced past the rules (validate=False), or a
# transform that changes what the program registers, as a careless code change would. Transforms see the
# engine's camelCase properties.

def sabotage(token: str, change: Callable[[dict], None]) -> Callable:
    def transform(args: pulumi.ResourceTransformArgs) -> pulumi.ResourceTransformResult | None:
        if args.type_ != token:
            return None
        props = copy.deepcopy(dict(args.props))
        change(props)
        return pulumi.ResourceTransformResult(props, args.opts)
    return transform


def _drop_last_interface(props: dict) -> None:
    props["networkInterfaces"] = props["networkInterfaces"][:-1]


def _unencrypted_root(props: dict) -> None:
    props["blockDeviceMappings"][0]["ebs"]["encrypted"] = "false"


def _secret_in_head_user_data(props: dict) -> None:
    props["userData"] += f"\n# MUNGE_KEY={MUNGE}\n"


def _world_on_cluster_group(props: dict) -> None:
    if props.get("referencedSecurityGroupId") and props.get("fromPort") is None:
        props.pop("referencedSecurityGroupId")
        props["cidrIpv4"] = "0.0.0.0/0"


BROKEN: dict[str, tuple[str, dict[str, Any], list[Callable], str]] = {
    "group in another zone": ("placement", {"node_groups": [
        {"name": "p5", "instance_type": "p5.48xlarge", "count": 2, "fabric": "efa",
         "availability_zone": "us-east-1b"},
        {"name": "p5b", "instance_type": "p5.48xlarge", "count": 1, "fabric": "efa"}]}, [],
        "stack: node groups span several availability zones"),
    "group outside the placement group": ("placement", {}, [sabotage(ASG, lambda p: p.pop("placementGroup"))],
                                          "p5-spot-p5: not in a cluster placement group"),
    "one EFA interface short": ("efa", {}, [sabotage(LT, _drop_last_interface)],
                                "p5-spot-p5: 31 EFA interfaces on network cards"),
    "SSH from anywhere": ("security-groups", {"ssh_cidrs": ["0.0.0.0/0"]}, [],
                          "p5-spot-ssh-0: ingress tcp ports (22.0, 22.0) from the whole internet"),
    "cluster group open to the world": ("security-groups", {}, [
        sabotage("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule", _world_on_cluster_group)],
        "p5-spot-cluster-in: ingress -1 ports (None, None) from the whole internet"),
    "unencrypted node volume": ("encryption", {}, [sabotage(LT, _unencrypted_root)],
                                "p5-spot-p5: volume /dev/sda1 is not encrypted"),
    "bucket without default encryption": ("encryption", {}, [sabotage(
        "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
        lambda p: p["rules"][0].pop("applyServerSideEncryptionByDefault"))],
        "p5-spot-data: bucket has no default encryption"),
    "Lustre without encryption in transit": ("encryption", {}, [
        sabotage("aws:fsx/lustreFileSystem:LustreFileSystem", lambda p: p.update(deploymentType="SCRATCH_1"))],
        "p5-spot-lustre: SCRATCH_1 does not encrypt data in transit"),
    "IMDSv1 on the head": ("imdsv2", {}, [sabotage("aws:ec2/instance:Instance",
                                                   lambda p: p.update(metadataOptions={"httpTokens": "optional"}))],
                           "p5-spot-head: IMDSv1 is allowed"),
    "munge key in user data": ("secrets", {}, [sabotage("aws:ec2/instance:Instance", _secret_in_head_user_data)],
                               "p5-spot-head: user data contains the value of SecureString p5-spot-munge-key"),
    "Lustre without owner": ("tags", {}, [sabotage("aws:fsx/lustreFileSystem:LustreFileSystem",
                                                   lambda p: p["tags"].pop("owner"))],
                             "p5-spot-lustre: missing tags ['owner']"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_each_policy_fails_on_a_stack_built_to_break_it(case: str) -> None:
    name, changes, transforms, message = BROKEN[case]
    findings = check(run(config("p5-spot", **changes), validate=False, transforms=transforms))
    assert {f.rule for f in findings} == {name}, [str(f) for f in findings]
    assert any(str(f).startswith(f"ERROR [{name}] {message}") for f in findings), [str(f) for f in findings]


def test_every_policy_has_a_breaking_stack() -> None:
    assert {case[0] for case in BROKEN.values()} == {p.name for p in POLICIES}


def test_only_runs_the_named_policies() -> None:
    graph = run(config("p5-spot"), validate=False, transforms=[sabotage(LT, _unencrypted_root)])
    assert check(graph, only=["tags", "imdsv2"]) == []
    assert [f.rule for f in check(graph, only=["encryption"])] == ["encryption"]


def test_secret_patterns_catch_keys_a_careless_script_might_embed() -> None:
    leak = "export AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP\n-----BEGIN OPENSSH PRIVATE KEY-----\n"
    graph = run(config("g5-inference"), transforms=[sabotage(LT, lambda p: p.update(
        userData=base64.b64encode(base64.b64decode(p["userData"]) + leak.encode()).decode()))])
    (finding,) = check(graph)
    assert str(finding) == ("ERROR [secrets] g5-inference-g5: user data contains an AWS access key id, a private key; "
                            "keep secrets in SSM Parameter Store (SecureString) and fetch them at boot with the "
                            "instance role")


def test_without_a_munge_key_the_offline_run_uses_a_placeholder_that_stays_out_of_user_data() -> None:
    cfg = config("g5-inference")
    del cfg["privlm:mungeKey"]
    graph = run(cfg)
    assert graph.secrets == [PLACEHOLDER_SECRET]
    (parameter,) = graph.of_type("aws:ssm/parameter:Parameter")
    assert parameter.inputs["value"]["value"] == PLACEHOLDER_SECRET
    assert check(graph, only=["secrets"]) == []


def test_an_async_transform_is_refused_with_the_fix() -> None:
    async def later(args: pulumi.ResourceTransformArgs) -> None:
        return None

    with pytest.raises(TypeError, match=r"transform later on .*: the offline run takes synchronous transforms only"):
        run(config("g5-inference"), transforms=[later])


# The pack as the Pulumi CLI runs it: PulumiPolicy.yaml, then __main__.py serving the analyzer over gRPC.

def test_pack_project_file_runs_python_in_the_project_virtualenv() -> None:
    project = yaml.safe_load((PACK / "PulumiPolicy.yaml").read_text())
    assert project["runtime"]["name"] == "python" and project["version"]
    assert (PACK / project["runtime"]["options"]["virtualenv"]).resolve() == REPO / ".venv"
    requirements = (PACK / "requirements.txt").read_text()
    assert "pulumi-policy>=1.21,<2" in requirements
    assert '"pulumi-policy>=1.21,<2"' in (REPO / "pyproject.toml").read_text()


@pytest.fixture(scope="module")
def analyzer() -> Iterator[analyzer_pb2_grpc.AnalyzerStub]:
    """The pack's analyzer, started as the CLI starts it (from the pack's directory); it prints its port."""
    proc = subprocess.Popen([sys.executable, str(PACK / "__main__.py")], cwd=PACK, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip().isdigit(), f"no port from the pack: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        with grpc.insecure_channel(f"127.0.0.1:{line.strip()}") as channel:
            yield analyzer_pb2_grpc.AnalyzerStub(channel)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def engine_request(graph: Graph) -> analyzer_pb2.AnalyzeStackRequest:
    """The resources as the engine sends them: outputs without `id`, references as property dependencies."""
    by_id: dict[str, list[str]] = {}
    for r in graph.resources:
        by_id.setdefault(r.id, []).append(f"urn:pulumi:test::privlm::{r.type}::{r.name}")
    resources = []
    for r in graph.resources:
        deps = {key: analyzer_pb2.AnalyzerPropertyDependencies(urns=urns) for key, value in r.outputs.items()
                if (urns := [u for i in _strings(value) for u in by_id.get(i, [])])}
        resources.append(analyzer_pb2.AnalyzerResource(
            type=r.type, name=r.name, urn=f"urn:pulumi:test::privlm::{r.type}::{r.name}",
            properties=json_format.ParseDict(serialize_properties(r.outputs), struct_pb2.Struct()),
            propertyDependencies=deps))
    return analyzer_pb2.AnalyzeStackRequest(resources=resources)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_the_pack_serves_every_policy_as_mandatory(analyzer: analyzer_pb2_grpc.AnalyzerStub) -> None:
    info = analyzer.GetAnalyzerInfo(empty_pb2.Empty())
    assert info.name == "privlm"
    assert [p.name for p in info.policies] == [p.name for p in POLICIES]
    assert {p.enforcementLevel for p in info.policies} == {analyzer_pb2.MANDATORY}


def test_the_pack_passes_a_compliant_stack_from_property_dependencies(
        analyzer: analyzer_pb2_grpc.AnalyzerStub) -> None:
    response = analyzer.AnalyzeStack(engine_request(run(config("p5-spot"), stack="p5-spot")))
    assert [d.message for d in response.diagnostics] == []


@pytest.mark.parametrize("case", ["SSH from anywhere", "unencrypted node volume", "group outside the placement group",
                                  "munge key in user data"])
def test_the_pack_fails_a_bad_stack_with_the_policy_message(analyzer: analyzer_pb2_grpc.AnalyzerStub,
                                                            case: str) -> None:
    name, changes, transforms, message = BROKEN[case]
    graph = run(config("p5-spot", **changes), validate=False, transforms=transforms)
    response = analyzer.AnalyzeStack(engine_request(graph))
    resource, text = message.split(": ", 1)
    assert [(d.policyName, d.enforcementLevel) for d in response.diagnostics] == [(name, analyzer_pb2.MANDATORY)]
    (diagnostic,) = response.diagnostics
    assert diagnostic.urn.endswith(f"::{resource}") and text in diagnostic.message
