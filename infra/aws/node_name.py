"""Runs on a booting EC2 node: claim a Slurm node name of its group and publish it in the cluster's DNS zone.

The controller's slurm.conf lists every node a group may scale to (`p5-0` ... `p5-3`, NodeAddr
`p5-0.<zone>`), so all nodes share one slurm.conf. An Auto Scaling group gives no index, so a node
claims the first free name with an S3 conditional write (`If-None-Match: *`: exactly one writer wins)
of `claims/<name>` holding its instance id; a name whose holder is no longer running is taken over with
`If-Match` on the claim's ETag, so two newcomers cannot both take it. The node then UPSERTs
`<name>.<zone>` to its private address in the cluster's private hosted zone, where Slurm and Ansible
find it. Standard library and boto3 only: pulumi never runs here.
"""

from __future__ import annotations

import argparse
from typing import Any

LIVE_STATES = {"pending", "running", "stopping", "stopped"}


class NoFreeName(RuntimeError):
    """Every name of the group is held by a live instance: max_count is reached."""


def _conditional_put(s3: Any, bucket: str, key: str, instance_id: str, **condition: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.put_object(Bucket=bucket, Key=key, Body=instance_id.encode(), **condition)
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
            return False
        raise
    return True


def holder_is_live(ec2: Any, instance_id: str) -> bool:
    """Whether the instance holding a claim still exists (not terminated or shutting down)."""
    from botocore.exceptions import ClientError

    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError:
        return False  # unknown id: long gone
    states = [i["State"]["Name"] for r in reservations for i in r["Instances"]]
    return any(s in LIVE_STATES for s in states)


def claim_name(s3: Any, ec2: Any, bucket: str, names: list[str], instance_id: str) -> str:
    """The first of `names` this instance holds or wins; raises NoFreeName when all are held by live instances."""
    for name in names:
        key = f"claims/{name}"
        if _conditional_put(s3, bucket, key, instance_id, IfNoneMatch="*"):
            return name
        claim = s3.get_object(Bucket=bucket, Key=key)
        holder = claim["Body"].read().decode()
        if holder == instance_id:
            return name  # a reboot: keep the name
        if not holder_is_live(ec2, holder) and _conditional_put(s3, bucket, key, instance_id,
                                                                IfMatch=claim["ETag"]):
            return name
    raise NoFreeName(f"all of {', '.join(names)} are held by running instances; raise the group's max_count")


def publish_address(route53: Any, zone_id: str, fqdn: str, address: str) -> None:
    """Point `fqdn` at this node's private address (A record, 60 s TTL)."""
    route53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={"Changes": [{
        "Action": "UPSERT", "ResourceRecordSet": {"Name": fqdn, "Type": "A", "TTL": 60,
                                                  "ResourceRecords": [{"Value": address}]}}]})


def main(argv: list[str] | None = None) -> None:
    """Claim a name, publish it, print it (the boot script passes it to ansible-playbook --limit)."""
    import boto3

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for option in ("--region", "--bucket", "--zone-id", "--zone-name", "--instance-id", "--address"):
        parser.add_argument(option, required=True)
    parser.add_argument("--names", required=True, help="comma-separated names to claim from, in order")
    parser.add_argument("--endpoint-url", default=None, help="tests: a local S3/EC2/Route 53 endpoint")
    args = parser.parse_args(argv)
    clients = {service: boto3.client(service, region_name=args.region, endpoint_url=args.endpoint_url)
               for service in ("s3", "ec2", "route53")}
    name = claim_name(clients["s3"], clients["ec2"], args.bucket, args.names.split(","), args.instance_id)
    publish_address(clients["route53"], args.zone_id, f"{name}.{args.zone_name}", args.address)
    print(name)


if __name__ == "__main__":
    main()
