"""The cluster's network in its one availability zone: VPC, subnets, gateways, S3 endpoint, DNS, security groups."""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from infra.spec import AwsSpec

WORLD = "0.0.0.0/0"


class Network(pulumi.ComponentResource):
    """A public subnet (head node, NAT gateway) and a private one (compute, FSx) in the cluster's zone.

    Compute nodes have one interface per network card and so cannot get a public address: they reach the
    internet through the NAT gateway and S3 through a gateway endpoint (free, and it keeps data traffic
    off the NAT). The cluster security group lets members talk on every port (EFA needs all traffic to
    and from its own group); the head group lets SSH in from `ssh_cidrs` only, and HTTPS from anywhere
    only when `head.https_from_anywhere` asks for it.
    """

    def __init__(self, name: str, spec: AwsSpec, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("privlm:aws:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = spec.resource_tags
        zones = list(dict.fromkeys([spec.availability_zone, *(spec.zone_of(g) for g in spec.node_groups)]))
        cidrs = spec.vpc_cidr.subnets(new_prefix=max(spec.vpc_cidr.prefixlen + 2, 20))
        self.vpc = aws.ec2.Vpc(f"{name}-vpc", cidr_block=str(spec.vpc_cidr), enable_dns_hostnames=True,
                               enable_dns_support=True, tags=tags("vpc"), opts=child)
        self.public_subnet = aws.ec2.Subnet(f"{name}-public", vpc_id=self.vpc.id, cidr_block=str(next(cidrs)),
                                            availability_zone=spec.availability_zone, tags=tags("public"),
                                            opts=child)
        # one private subnet per zone used: the spec rules allow only the cluster's zone, but the program stays
        # honest if they are skipped, so the placement policy sees where each group would really launch
        self.private_subnets: dict[str, aws.ec2.Subnet] = {}
        subnet_names = {f"{name}-public": self.public_subnet}
        for zone in zones:
            subnet_name = f"{name}-private" + ("" if zone == spec.availability_zone else f"-{zone}")
            self.private_subnets[zone] = subnet_names[subnet_name] = aws.ec2.Subnet(
                subnet_name, vpc_id=self.vpc.id, cidr_block=str(next(cidrs)), availability_zone=zone,
                tags=tags(subnet_name.removeprefix(f"{name}-")), opts=child)
        self.private_subnet = self.private_subnets[spec.availability_zone]
        gateway = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=self.vpc.id, tags=tags("igw"), opts=child)
        nat_address = aws.ec2.Eip(f"{name}-nat-ip", domain="vpc", tags=tags("nat-ip"), opts=child)
        nat = aws.ec2.NatGateway(f"{name}-nat", subnet_id=self.public_subnet.id, allocation_id=nat_address.id,
                                 tags=tags("nat"), opts=pulumi.ResourceOptions(parent=self, depends_on=[gateway]))
        tables = {kind: aws.ec2.RouteTable(f"{name}-{kind}-routes", vpc_id=self.vpc.id, tags=tags(f"{kind}-routes"),
                                           routes=[aws.ec2.RouteTableRouteArgs(cidr_block=WORLD, **route)], opts=child)
                  for kind, route in (("public", {"gateway_id": gateway.id}), ("private", {"nat_gateway_id": nat.id}))}
        for subnet_name, subnet in subnet_names.items():
            table = tables["public" if subnet is self.public_subnet else "private"]
            aws.ec2.RouteTableAssociation(subnet_name, subnet_id=subnet.id, route_table_id=table.id, opts=child)
        aws.ec2.VpcEndpoint(f"{name}-s3", vpc_id=self.vpc.id, service_name=f"com.amazonaws.{spec.region}.s3",
                            vpc_endpoint_type="Gateway", route_table_ids=[t.id for t in tables.values()],
                            tags=tags("s3-endpoint"), opts=child)
        # nodes publish `<slurm node name>.<zone>` here at boot (infra/aws/node_name.py); force_destroy removes
        # those records, which Pulumi did not create, with the zone
        self.zone_name = f"{spec.name}.privlm.internal"
        self.zone = aws.route53.Zone(f"{name}-dns", name=self.zone_name, force_destroy=True, tags=tags("dns"),
                                     comment=f"privlm cluster {spec.name}: Slurm node names",
                                     vpcs=[aws.route53.ZoneVpcArgs(vpc_id=self.vpc.id)], opts=child)
        self.cluster_group = self._security_group(name, "cluster", "privlm cluster members: all traffic between "
                                                  "them (EFA, Slurm, NCCL, Lustre)", spec)
        self._rule(f"{name}-cluster-in", spec, "ingress", self.cluster_group, "-1", peer=self.cluster_group)
        self._rule(f"{name}-cluster-out", spec, "egress", self.cluster_group, "-1", peer=self.cluster_group)
        self._rule(f"{name}-cluster-out-world", spec, "egress", self.cluster_group, "-1", cidr=WORLD)
        self.head_group = self._security_group(name, "head", "privlm head node: SSH from the allowed ranges", spec)
        for i, cidr in enumerate(spec.ssh_cidrs):
            self._rule(f"{name}-ssh-{i}", spec, "ingress", self.head_group, "tcp", 22, cidr=str(cidr))
        if spec.head.https_from_anywhere:
            self._rule(f"{name}-https", spec, "ingress", self.head_group, "tcp", 443, cidr=WORLD)
        self.register_outputs({"vpc_id": self.vpc.id, "private_subnet_id": self.private_subnet.id})

    def _security_group(self, name: str, role: str, description: str, spec: AwsSpec) -> aws.ec2.SecurityGroup:
        return aws.ec2.SecurityGroup(f"{name}-{role}", vpc_id=self.vpc.id, description=description,
                                     tags=spec.resource_tags(role), opts=pulumi.ResourceOptions(parent=self))

    def _rule(self, rule_name: str, spec: AwsSpec, direction: str, group: aws.ec2.SecurityGroup, protocol: str,
              port: int | None = None, cidr: str | None = None,
              peer: aws.ec2.SecurityGroup | None = None) -> None:
        rule = aws.vpc.SecurityGroupIngressRule if direction == "ingress" else aws.vpc.SecurityGroupEgressRule
        rule(rule_name, security_group_id=group.id, ip_protocol=protocol, from_port=port, to_port=port,
             cidr_ipv4=cidr, referenced_security_group_id=peer.id if peer else None,
             tags=spec.resource_tags(rule_name.removeprefix(f"{spec.name}-")), opts=pulumi.ResourceOptions(parent=self))
