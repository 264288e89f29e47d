"""The Pulumi program under the SDK's mocks: each example stack's graph and outputs (policies: test_policy_pack.py)."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pulumi.runtime import rpc

from infra.inventory import validate_inventory
from infra.offline import FAKE_AMI, Graph, Recorded, check, run, stack_config
from infra.spec import AwsSpec, SpecError, parse_spec

AWS_STACKS = ["p5-spot", "p4d-ondemand", "g5-inference"]
MUNGE = "test-munge-key-that-must-never-appear-in-user-data"
LT = "aws:ec2/launchTemplate:LaunchTemplate"
ASG = "aws:autoscaling/group:Group"


def config(stack: str, **cluster_changes: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(stack_config(stack))
    cfg["privlm:cluster"].update(cluster_changes)
    cfg["privlm:mungeKey"] = MUNGE
    return cfg


@pytest.fixture(scope="module")
def graphs() -> dict[str, Graph]:
    return {s: run(config(s), stack=s) for s in AWS_STACKS}


def secret(value: str) -> dict[str, str]:
    """How the engine receives a secret value (the SDK's wire format)."""
    return {rpc._special_sig_key: rpc._special_secret_sig, "value": value}


def one(graph: Graph, token: str) -> Recorded:
    found = graph.of_type(token)
    assert len(found) == 1, [r.name for r in found]
    return found[0]


def user_data(graph: Graph, token: str) -> str:
    text = one(graph, token).inputs["userData"]
    return base64.b64decode(text).decode() if token == LT else text


@pytest.mark.parametrize("stack", AWS_STACKS)
def test_example_stack_passes_every_policy(graphs: dict[str, Graph], stack: str) -> None:
    graph = graphs[stack]
    assert graph.count() >= 30
    assert check(graph) == []


def test_p5_spot_has_32_efa_interfaces_spot_options_and_the_placement_group(graphs: dict[str, Graph]) -> None:
    graph = graphs["p5-spot"]
    template = one(graph, LT)
    interfaces = template.inputs["networkInterfaces"]
    assert [(i["networkCardIndex"], i["deviceIndex"], i["interfaceType"]) for i in interfaces] == \
        [(0, 0, "efa")] + [(card, 1, "efa") for card in range(1, 32)]
    assert template.inputs["instanceMarketOptions"] == {"marketType": "spot", "spotOptions": {
        "maxPrice": "40.0000", "spotInstanceType": "one-time", "instanceInterruptionBehavior": "terminate"}}
    assert template.inputs["metadataOptions"]["httpTokens"] == "required"
    assert template.inputs["blockDeviceMappings"][0]["ebs"]["encrypted"] == "true"
    assert template.inputs["imageId"] == FAKE_AMI
    group = one(graph, ASG)
    placement = graph.by_id(group.inputs["placementGroup"])
    assert placement is not None and placement.inputs["strategy"] == "cluster"
    assert (group.inputs["minSize"], group.inputs["desiredCapacity"], group.inputs["maxSize"]) == (0, 2, 4)
    assert group.inputs["capacityRebalance"] is True
    subnet = graph.by_id(group.inputs["vpcZoneIdentifiers"][0])
    assert subnet is not None and subnet.inputs["availabilityZone"] == "us-east-1a"
    assert subnet.name == "p5-spot-private"


def test_p4d_on_demand_has_4_efa_interfaces_no_market_options_and_persistent_lustre(graphs: dict[str, Graph]) -> None:
    graph = graphs["p4d-ondemand"]
    template = one(graph, LT)
    assert [i["networkCardIndex"] for i in template.inputs["networkInterfaces"]] == [0, 1, 2, 3]
    assert "instanceMarketOptions" not in template.inputs
    lustre = one(graph, "aws:fsx/lustreFileSystem:LustreFileSystem")
    assert (lustre.inputs["deploymentType"], lustre.inputs["storageCapacity"],
            lustre.inputs["perUnitStorageThroughput"]) == ("PERSISTENT_2", 4800, 250)
    assert lustre.inputs["subnetIds"] == "p4d-ondemand-private-id"  # pulumi-aws 7: one string


def test_g5_inference_has_one_plain_interface_no_lustre_and_https_on_the_head_only(graphs: dict[str, Graph]) -> None:
    graph = graphs["g5-inference"]
    (interface,) = one(graph, LT).inputs["networkInterfaces"]
    assert "interfaceType" not in interface and interface["deviceIndex"] == 0
    assert graph.of_type("aws:fsx/lustreFileSystem:LustreFileSystem") == []
    world = [r for r in graph.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")
             if r.inputs.get("cidrIpv4") == "0.0.0.0/0"]
    assert [(r.inputs["securityGroupId"], r.inputs["fromPort"]) for r in world] == [("g5-inference-head-id", 443)]
    assert not [r for r in graph.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")
                if r.inputs.get("fromPort") == 22]  # no ssh_cidrs: no SSH at all, SSM only


def test_cluster_group_lets_members_talk_on_every_port(graphs: dict[str, Graph]) -> None:
    graph = graphs["p5-spot"]
    for token in ("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
                  "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"):
        assert any(r.inputs.get("referencedSecurityGroupId") == "p5-spot-cluster-id" == r.inputs["securityGroupId"]
                   and r.inputs["ipProtocol"] == "-1" for r in graph.of_type(token)), token
    ssh = [r for r in graph.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")
           if r.inputs.get("fromPort") == 22]
    assert [(r.inputs["cidrIpv4"], r.inputs["securityGroupId"]) for r in ssh] == [("203.0.113.0/24",
                                                                                  "p5-spot-head-id")]


def test_bucket_is_versioned_encrypted_private_and_linked_to_lustre(graphs: dict[str, Graph]) -> None:
    graph = graphs["p5-spot"]
    bucket = one(graph, "aws:s3/bucket:Bucket")
    assert one(graph, "aws:s3/bucketVersioning:BucketVersioning").inputs == {
        "bucket": bucket.id, "versioningConfiguration": {"status": "Enabled"}}
    block = one(graph, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock").inputs
    assert all(block[k] is True for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls",
                                          "restrictPublicBuckets"))
    link = one(graph, "aws:fsx/dataRepositoryAssociation:DataRepositoryAssociation").inputs
    assert link["dataRepositoryPath"] == "s3://p5-spot-data-0001" and link["fileSystemId"] == "p5-spot-lustre-id"
    assert link["s3"]["autoExportPolicy"]["events"] == ["NEW", "CHANGED", "DELETED"]
    playbooks = bootstrap_object(graph, "playbooks").inputs
    assert playbooks["key"].startswith("bootstrap/playbooks-") and playbooks["bucket"] == bucket.id


def test_instance_role_gets_only_its_bucket_logs_and_munge_key(graphs: dict[str, Graph]) -> None:
    graph = graphs["p5-spot"]
    statements = {s["Sid"]: s for s in json.loads(one(graph, "aws:iam/rolePolicy:RolePolicy").inputs["policy"])[
        "Statement"]}
    assert statements["ClusterBucketObjects"]["Resource"] == ["arn:aws:s3:::p5-spot-data-0001/*"]
    assert statements["MungeKey"]["Resource"] == ["arn:aws:ssm:us-east-1:123456789012:p5-spot-munge-key"]
    assert statements["ClusterMetrics"]["Condition"] == {"StringEquals": {"cloudwatch:namespace": "privlm/p5-spot"}}
    wildcard = [sid for sid, s in statements.items() if "*" in s["Resource"]]
    assert wildcard == ["ClusterMetrics", "SeeNameHolders", "SessionManager"]  # scoped by condition, or no ARN
    assert not any(a.endswith(":*") or a == "*" for s in statements.values() for a in s["Action"])
    parameter = one(graph, "aws:ssm/parameter:Parameter").inputs
    assert (parameter["type"], parameter["value"]) == ("SecureString", secret(MUNGE))  # a secret in the state too


def bootstrap_object(graph: Graph, kind: str) -> Recorded:
    (found,) = [r for r in graph.of_type("aws:s3/bucketObjectv2:BucketObjectv2") if r.name.endswith(f"-{kind}")]
    return found


def test_user_data_fetches_key_and_inventory_claims_a_name_and_holds_no_secret(graphs: dict[str, Graph]) -> None:
    graph = graphs["p5-spot"]
    inventory_key = bootstrap_object(graph, "inventory").inputs["key"]
    scripts = {}
    for kind, token in (("node", LT), ("head", "aws:ec2/instance:Instance")):
        text = user_data(graph, token)
        assert text.startswith("#cloud-config\n") and MUNGE not in text
        scripts[kind] = script = yaml.safe_load(text)["runcmd"][0][2]
        assert "aws ssm get-parameter --region us-east-1 --name /privlm/p5-spot/munge-key --with-decryption" in script
        assert f"s3://p5-spot-data-0001/{inventory_key} /opt/privlm/hosts.yml" in script  # one inventory for all
        assert "--zone-name p5-spot.privlm.internal" in script
        assert script.rstrip().endswith('site.yml --limit "$name"')
    assert "--names p5-0,p5-1,p5-2,p5-3 " in scripts["node"] and "--names head " in scripts["head"]


def test_dns_zone_is_private_to_the_vpc_and_nodes_may_change_only_its_records(graphs: dict[str, Graph]) -> None:
    graph = graphs["p5-spot"]
    zone = one(graph, "aws:route53/zone:Zone")
    assert zone.inputs["name"] == "p5-spot.privlm.internal"
    assert zone.inputs["vpcs"] == [{"vpcId": one(graph, "aws:ec2/vpc:Vpc").id}]
    statements = {s["Sid"]: s for s in json.loads(one(graph, "aws:iam/rolePolicy:RolePolicy").inputs["policy"])[
        "Statement"]}
    assert statements["PublishNodeName"]["Resource"] == ["arn:aws:route53:us-east-1:123456789012:p5-spot-dns"]


@pytest.mark.parametrize("stack", ["p5-spot", "g5-inference"])
def test_the_cluster_inventory_passes_the_inventory_validation(graphs: dict[str, Graph], stack: str,
                                                               tmp_path: Path) -> None:
    graph = graphs[stack]
    (tmp_path / "hosts.yml").write_text(bootstrap_object(graph, "inventory").inputs["content"])
    assert validate_inventory(tmp_path) == []
    inventory = yaml.safe_load((tmp_path / "hosts.yml").read_text())["all"]
    slots = list(inventory["children"]["slurm_nodes"]["hosts"])
    assert len(slots) == one(graph, ASG).inputs["maxSize"]  # the controller knows every node the group may reach
    assert {h["ansible_host"] for h in inventory["hosts"].values()} == {
        f"{name}.{stack}.privlm.internal" for name in ["head", *slots]}


def test_p5_nodes_get_8_h100_and_lustre_in_the_inventory(graphs: dict[str, Graph]) -> None:
    inventory = yaml.safe_load(bootstrap_object(graphs["p5-spot"], "inventory").inputs["content"])["all"]
    assert {k: inventory["hosts"]["p5-3"][k] for k in ("slurm_node_name", "slurm_gpus", "slurm_gpu_type",
                                                       "slurm_cpus")} == {"slurm_node_name": "p5-3",
                                                                          "slurm_gpus": 8, "slurm_gpu_type": "h100",
                                                                          "slurm_cpus": 192}
    assert inventory["vars"]["shared_storage_mounts"] == [
        {"path": "/fsx", "type": "lustre", "source": "fs-0abc.fsx.p5-spot-lustre.amazonaws.com@tcp:/abcdefgh"}]


def test_outputs_and_the_rendered_spec_round_trip(graphs: dict[str, Graph]) -> None:
    outputs = graphs["p5-spot"].outputs
    assert outputs["head_address"] == "198.51.100.10"
    assert outputs["partitions"] == ["train", "urgent"]
    assert (outputs["bucket"], outputs["fsx_mount_name"]) == ("p5-spot-data-0001", "abcdefgh")
    spec = parse_spec(yaml.safe_load(outputs["cluster_spec"]))
    assert isinstance(spec, AwsSpec) and spec.node_groups[0].instance_type == "p5.48xlarge"
    assert [(m.path, m.type) for m in spec.storage] == [("/fsx", "lustre")]
    nfs = parse_spec(yaml.safe_load(graphs["g5-inference"].outputs["cluster_spec"]))
    assert [m.source for m in nfs.storage] == ["head.g5-inference.privlm.internal:/shared"]


def test_spec_errors_stop_the_program_before_any_resource() -> None:
    with pytest.raises(SpecError, match=r"ERROR ssh_cidrs.0: 0.0.0.0/0 opens SSH"):
        run(config("p5-spot", ssh_cidrs=["0.0.0.0/0"]))


@pytest.mark.parametrize("stack", AWS_STACKS)
def test_boot_scripts_are_valid_bash(graphs: dict[str, Graph], stack: str) -> None:
    import subprocess

    for token in (LT, "aws:ec2/instance:Instance"):
        script = yaml.safe_load(user_data(graphs[stack], token))["runcmd"][0][2]
        check = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
