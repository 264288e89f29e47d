"""node_name.py, which booting EC2 nodes run, against moto's S3, EC2 and Route 53 (in-process)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from infra.aws.node_name import NoFreeName, claim_name, main

NAMES = ["p5-0", "p5-1"]


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(var, value)
    with mock_aws():
        clients = {s: boto3.client(s, region_name="us-east-1") for s in ("s3", "ec2", "route53")}
        clients["s3"].create_bucket(Bucket="cluster-data")
        yield clients


def instance(ec2: Any) -> str:
    return ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]


def claim(aws: dict[str, Any], instance_id: str) -> str:
    return claim_name(aws["s3"], aws["ec2"], "cluster-data", NAMES, instance_id)


def test_nodes_get_distinct_names_and_a_reboot_keeps_its_name(aws: dict[str, Any]) -> None:
    a, b = instance(aws["ec2"]), instance(aws["ec2"])
    assert (claim(aws, a), claim(aws, b)) == ("p5-0", "p5-1")
    assert claim(aws, a) == "p5-0"
    body = aws["s3"].get_object(Bucket="cluster-data", Key="claims/p5-1")["Body"].read().decode()
    assert body == b


def test_a_full_group_refuses_and_a_terminated_holder_gives_its_name_up(aws: dict[str, Any]) -> None:
    a, b, c = (instance(aws["ec2"]) for _ in range(3))
    claim(aws, a), claim(aws, b)
    with pytest.raises(NoFreeName, match="all of p5-0, p5-1 are held by running instances; raise the group's "
                                         "max_count"):
        claim(aws, c)
    aws["ec2"].terminate_instances(InstanceIds=[a])
    assert claim(aws, c) == "p5-0"


def test_a_takeover_needs_the_claim_unchanged_since_it_was_read(aws: dict[str, Any]) -> None:
    from infra.aws import node_name

    a, b = instance(aws["ec2"]), instance(aws["ec2"])
    claim(aws, a)
    aws["ec2"].terminate_instances(InstanceIds=[a])
    stale = aws["s3"].head_object(Bucket="cluster-data", Key="claims/p5-0")["ETag"]
    assert claim(aws, b) == "p5-0"  # took it over
    # a second newcomer that read the claim before b took it over loses the race
    assert not node_name._conditional_put(aws["s3"], "cluster-data", "claims/p5-0", "i-late", IfMatch=stale)


def test_main_publishes_the_name_in_the_private_zone_and_prints_it(aws: dict[str, Any],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    vpc = aws["ec2"].create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    zone = aws["route53"].create_hosted_zone(Name="c.privlm.internal", CallerReference="t",
                                             VPC={"VPCRegion": "us-east-1", "VPCId": vpc},
                                             HostedZoneConfig={"PrivateZone": True})["HostedZone"]["Id"]
    main(["--region", "us-east-1", "--bucket", "cluster-data", "--zone-id", zone, "--zone-name",
          "c.privlm.internal", "--names", ",".join(NAMES), "--instance-id", instance(aws["ec2"]),
          "--address", "10.42.16.7"])
    assert capsys.readouterr().out == "p5-0\n"
    records = aws["route53"].list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]
    assert [(r["Name"], r["ResourceRecords"][0]["Value"]) for r in records if r["Type"] == "A"] == [
        ("p5-0.c.privlm.internal.", "10.42.16.7")]
