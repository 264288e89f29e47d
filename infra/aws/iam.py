"""What the cluster's instances may do, and no more: their bucket, logs and metrics, munge key, DNS names, SSM."""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws

from infra.spec import AwsSpec

ASSUME_EC2 = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
# Session Manager's channel and registration actions take no resource ARN (AWS SSM docs, minimum policy).
SESSION_MANAGER = ["ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel",
                   "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel", "ssmmessages:OpenDataChannel"]


def instance_policy(bucket_arn: str, log_group_arn: str, munge_parameter_arn: str, zone_arn: str,
                    metrics_namespace: str) -> str:
    """The instance role's policy document: every statement names its resources but three read-or-scoped ones."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "ListClusterBucket", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [bucket_arn]},
        {"Sid": "ClusterBucketObjects", "Effect": "Allow",
         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
         "Resource": [f"{bucket_arn}/*"]},
        {"Sid": "ClusterLogs", "Effect": "Allow",
         "Action": ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
         "Resource": [log_group_arn, f"{log_group_arn}:*"]},
        {"Sid": "ClusterMetrics", "Effect": "Allow", "Action": ["cloudwatch:PutMetricData"], "Resource": ["*"],
         "Condition": {"StringEquals": {"cloudwatch:namespace": metrics_namespace}}},
        {"Sid": "MungeKey", "Effect": "Allow", "Action": ["ssm:GetParameter"], "Resource": [munge_parameter_arn]},
        {"Sid": "PublishNodeName", "Effect": "Allow", "Action": ["route53:ChangeResourceRecordSets"],
         "Resource": [zone_arn]},
        # node_name.py takes over the Slurm name of a terminated instance; this read takes no resource ARN
        {"Sid": "SeeNameHolders", "Effect": "Allow", "Action": ["ec2:DescribeInstances"], "Resource": ["*"]},
        {"Sid": "SessionManager", "Effect": "Allow", "Action": SESSION_MANAGER, "Resource": ["*"]},
    ]})


class Identity(pulumi.ComponentResource):
    """The instance profile of every node, the munge key as an SSM SecureString, and the cluster's log group.

    The munge key comes from the stack's secret config (`pulumi config set --secret privlm:mungeKey ...`):
    it is encrypted in the Pulumi state and in SSM, and nodes fetch it at boot with their role.
    """

    def __init__(self, name: str, spec: AwsSpec, bucket_arn: pulumi.Input[str], zone_arn: pulumi.Input[str],
                 munge_key: pulumi.Input[str], opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("privlm:aws:Identity", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = spec.resource_tags
        self.log_group = aws.cloudwatch.LogGroup(f"{name}-logs", name=f"/privlm/{spec.name}", retention_in_days=30,
                                                 tags=tags("logs"), opts=child)
        self.munge_key = aws.ssm.Parameter(f"{name}-munge-key", name=f"/privlm/{spec.name}/munge-key",
                                           type="SecureString", value=munge_key, tags=tags("munge-key"), opts=child)
        self.role = aws.iam.Role(f"{name}-node", assume_role_policy=ASSUME_EC2, tags=tags("node"), opts=child)
        aws.iam.RolePolicy(f"{name}-node", role=self.role.id, opts=child, policy=pulumi.Output.all(
            bucket_arn, self.log_group.arn, self.munge_key.arn, zone_arn).apply(
                lambda arns: instance_policy(*arns, metrics_namespace=f"privlm/{spec.name}")))
        self.profile = aws.iam.InstanceProfile(f"{name}-node", role=self.role.name, tags=tags("node"), opts=child)
        self.register_outputs({"instance_profile": self.profile.name})
