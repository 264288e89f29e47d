"""The head node and the compute node groups: launch templates, Auto Scaling groups, one placement group."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pulumi
import pulumi_aws as aws

from infra.hardware import instance_types
from infra.spec import AwsSpec, InstanceGroup

ROOT_DEVICE = "/dev/sda1"  # Ubuntu AMIs, the Deep Learning AMIs included
# Renders a node's cloud-init user data: node group, or None for the head
UserData = Callable[[InstanceGroup | None], pulumi.Output[str]]


def efa_interfaces(group: InstanceGroup, security_group_id: pulumi.Input[str]) -> list:
    """One EFA interface per network card (device 0 on card 0, device 1 on the others); one ENA without EFA."""
    cards = instance_types()[group.instance_type].network_cards if group.fabric == "efa" else 1
    efa = {"interface_type": "efa"} if group.fabric == "efa" else {}
    return [aws.ec2.LaunchTemplateNetworkInterfaceArgs(
        device_index=0 if card == 0 else 1, network_card_index=card, security_groups=[security_group_id],
        delete_on_termination="true", **efa) for card in range(cards)]


def market_options(group: InstanceGroup) -> dict:
    """Launch template arguments for the group's capacity: spot market options, or a reservation target."""
    cap = group.capacity
    if cap.type == "spot":
        price = None if cap.max_price_usd_per_hour is None else f"{cap.max_price_usd_per_hour:.4f}"
        return {"instance_market_options": aws.ec2.LaunchTemplateInstanceMarketOptionsArgs(
            market_type="spot", spot_options=aws.ec2.LaunchTemplateInstanceMarketOptionsSpotOptionsArgs(
                max_price=price, spot_instance_type="one-time", instance_interruption_behavior="terminate"))}
    if cap.type == "reservation":
        return {"capacity_reservation_specification": aws.ec2.LaunchTemplateCapacityReservationSpecificationArgs(
            capacity_reservation_target=aws.ec2.LaunchTemplateCapacityReservationSpecificationCapacityReservationTargetArgs(
                capacity_reservation_id=cap.reservation_id))}
    return {}


class Compute(pulumi.ComponentResource):
    """A cluster placement group, the head node, and per node group a launch template and an Auto Scaling group.

    Every instance requires IMDSv2 and boots from an encrypted gp3 volume. The head node sits in the public
    subnet outside the placement group; compute nodes launch into the private subnet and the placement group.
    """

    def __init__(self, name: str, spec: AwsSpec, *, ami: pulumi.Input[str], public_subnet_id: pulumi.Input[str],
                 private_subnet_ids: dict[str, pulumi.Input[str]], cluster_group_id: pulumi.Input[str],
                 head_group_id: pulumi.Input[str], instance_profile: aws.iam.InstanceProfile,
                 user_data: UserData, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("privlm:aws:Compute", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = spec.resource_tags
        self.placement_group = aws.ec2.PlacementGroup(f"{name}-placement", strategy="cluster",
                                                      tags=tags("placement"), opts=child)
        self.head = aws.ec2.Instance(
            f"{name}-head", ami=ami, instance_type=spec.head.instance_type, subnet_id=public_subnet_id,
            vpc_security_group_ids=[head_group_id, cluster_group_id], associate_public_ip_address=True,
            iam_instance_profile=instance_profile.name, key_name=spec.key_name, user_data=user_data(None),
            metadata_options=aws.ec2.InstanceMetadataOptionsArgs(http_tokens="required", http_endpoint="enabled"),
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(volume_size=spec.head.root_volume_gib,
                                                                  volume_type="gp3", encrypted=True,
                                                                  tags=tags("head-root")),
            tags=tags("head"), opts=child)
        self.groups: dict[str, aws.autoscaling.Group] = {}
        for group in spec.node_groups:
            template = aws.ec2.LaunchTemplate(
                f"{name}-{group.name}", image_id=ami, instance_type=group.instance_type, key_name=spec.key_name,
                iam_instance_profile=aws.ec2.LaunchTemplateIamInstanceProfileArgs(arn=instance_profile.arn),
                network_interfaces=efa_interfaces(group, cluster_group_id),
                metadata_options=aws.ec2.LaunchTemplateMetadataOptionsArgs(
                    http_tokens="required", http_endpoint="enabled", http_put_response_hop_limit=1),
                block_device_mappings=[aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
                    device_name=ROOT_DEVICE, ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                        volume_size=group.root_volume_gib, volume_type="gp3", encrypted="true",
                        delete_on_termination="true"))],
                user_data=user_data(group).apply(
                    lambda text: base64.b64encode(text.encode()).decode()),
                tag_specifications=[aws.ec2.LaunchTemplateTagSpecificationArgs(resource_type=kind,
                                                                               tags=tags(group.name))
                                    for kind in ("instance", "volume", "network-interface")],
                update_default_version=True, tags=tags(group.name), opts=child, **market_options(group))
            low, high = group.bounds
            self.groups[group.name] = aws.autoscaling.Group(
                f"{name}-{group.name}", min_size=low, max_size=high, desired_capacity=group.count,
                vpc_zone_identifiers=[private_subnet_ids[spec.zone_of(group)]], placement_group=self.placement_group.id,
                capacity_rebalance=group.capacity.type == "spot",
                launch_template=aws.autoscaling.GroupLaunchTemplateArgs(
                    id=template.id, version=template.latest_version.apply(str)),
                tags=[aws.autoscaling.GroupTagArgs(key=k, value=v, propagate_at_launch=True)
                      for k, v in tags(group.name).items()],
                opts=child)
        self.register_outputs({"head_public_ip": self.head.public_ip})
