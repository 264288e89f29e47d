"""An AWS GPU cluster from an `AwsSpec`: network, storage, identity, compute, and the outputs other tools read."""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_aws as aws
import yaml

from infra.aws.bootstrap import HEAD, NODE_NAME_SCRIPT, BootFacts, cluster_inventory, content_key, mounts, user_data
from infra.aws.compute import Compute
from infra.aws.iam import Identity
from infra.aws.network import Network
from infra.aws.storage import Storage
from infra.spec import AwsSpec, InstanceGroup

# The AWS Deep Learning Base AMI (NVIDIA driver, EFA, Lustre-ready kernel), newest, from a public SSM parameter.
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


def rendered_spec(spec: AwsSpec, facts: BootFacts) -> str:
    """The spec as created, as YAML `load_spec` reads: shared storage with the Lustre and NFS sources filled in."""
    created = spec.model_copy(update={"storage": mounts(spec, facts)})
    return f"# Cluster spec of {spec.name} as created by `pulumi up`\n" + yaml.safe_dump(
        created.model_dump(mode="json", exclude_none=True), sort_keys=False)


class AwsCluster(pulumi.ComponentResource):
    """Everything one AWS cluster is, in one region and one availability zone."""

    def __init__(self, spec: AwsSpec, munge_key: pulumi.Input[str], opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("privlm:aws:Cluster", spec.name, None, opts)
        provider = aws.Provider(f"{spec.name}-{spec.region}", region=spec.region,
                                opts=pulumi.ResourceOptions(parent=self))
        child = pulumi.ResourceOptions(parent=self, providers={"aws": provider})
        ami = spec.ami or aws.ssm.get_parameter_output(
            name=DLAMI_PARAMETER, opts=pulumi.InvokeOutputOptions(provider=provider)).value
        self.network = Network(spec.name, spec, opts=child)
        self.storage = Storage(spec.name, spec, self.network.private_subnet.id, self.network.cluster_group.id,
                               opts=child)
        self.identity = Identity(spec.name, spec, self.storage.bucket.arn, self.network.zone.arn, munge_key,
                                 opts=child)
        lustre = self.storage.lustre
        facts = pulumi.Output.all(
            self.storage.bucket.bucket, self.identity.munge_key.name, self.network.zone.zone_id,
            lustre.dns_name if lustre else "", lustre.mount_name if lustre else "").apply(
                lambda v: BootFacts(bucket=v[0], playbooks_key=self.storage.playbooks_key, munge_parameter=v[1],
                                    zone_id=v[2], zone_name=self.network.zone_name, lustre_dns=v[3],
                                    lustre_mount_name=v[4]))
        inventory = facts.apply(lambda f: cluster_inventory(spec, f))
        inventory_key = inventory.apply(lambda text: content_key("inventory", text, ".yml"))
        node_name_key = content_key("node-name", NODE_NAME_SCRIPT.read_bytes(), ".py")
        uploads = [self.storage.upload("inventory", inventory_key, content=inventory),
                   self.storage.upload("node-name", node_name_key, source=pulumi.FileAsset(str(NODE_NAME_SCRIPT)))]

        def boot(group: InstanceGroup | None) -> pulumi.Output[str]:
            return pulumi.Output.all(facts, inventory_key).apply(
                lambda v: user_data(spec, group, v[0], v[1], node_name_key))

        self.compute = Compute(
            spec.name, spec, ami=ami, public_subnet_id=self.network.public_subnet.id,
            private_subnet_ids={zone: s.id for zone, s in self.network.private_subnets.items()},
            cluster_group_id=self.network.cluster_group.id, head_group_id=self.network.head_group.id,
            instance_profile=self.identity.profile, user_data=boot,
            opts=pulumi.ResourceOptions(parent=self, providers={"aws": provider}, depends_on=uploads))
        self.outputs: dict[str, Any] = {
            "head_address": self.compute.head.public_ip,
            "head_private_address": self.compute.head.private_ip,
            "head_name": f"{HEAD}.{self.network.zone_name}",
            "partitions": [p.name for p in spec.partitions],
            "bucket": self.storage.bucket.bucket,
            "fsx_dns_name": lustre.dns_name if lustre else None,
            "fsx_mount_name": lustre.mount_name if lustre else None,
            "cluster_spec": facts.apply(lambda f: rendered_spec(spec, f)),
        }
        self.register_outputs(self.outputs)
