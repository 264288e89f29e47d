"""Data and checkpoints: an S3 bucket (versioned, encrypted, private) and FSx for Lustre linked to it."""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from infra.cluster import PLAYBOOKS, playbooks_digest
from infra.spec import AwsSpec


class Storage(pulumi.ComponentResource):
    """The cluster's bucket, the playbooks the nodes run at boot, and FSx for Lustre importing and exporting it.

    Lustre is what jobs read and write at GPU speed; its data repository association keeps `/` of the file
    system in step with the bucket, so checkpoints land in S3 without a copy step.
    """

    def __init__(self, name: str, spec: AwsSpec, subnet_id: pulumi.Input[str], security_group_id: pulumi.Input[str],
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("privlm:aws:Storage", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = spec.resource_tags
        self.bucket = aws.s3.Bucket(f"{name}-data", bucket_prefix=f"{spec.name}-data-", tags=tags("data"), opts=child)
        aws.s3.BucketVersioning(f"{name}-data", bucket=self.bucket.id, opts=child,
                                versioning_configuration=aws.s3.BucketVersioningVersioningConfigurationArgs(
                                    status="Enabled"))
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{name}-data", bucket=self.bucket.id, opts=child,
            rules=[aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                bucket_key_enabled=True,
                apply_server_side_encryption_by_default=aws.s3.
                BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                    sse_algorithm="aws:kms"))])
        aws.s3.BucketPublicAccessBlock(f"{name}-data", bucket=self.bucket.id, block_public_acls=True,
                                       block_public_policy=True, ignore_public_acls=True,
                                       restrict_public_buckets=True, opts=child)
        self._name, self._spec = name, spec
        # named by content: changed playbooks are a new object, new user data and new launch template versions
        self.playbooks_key = f"bootstrap/playbooks-{playbooks_digest()}.zip"
        self.upload("playbooks", self.playbooks_key, source=pulumi.FileArchive(str(PLAYBOOKS)))
        self.lustre: aws.fsx.LustreFileSystem | None = None
        if spec.fsx:
            fsx = spec.fsx
            self.lustre = aws.fsx.LustreFileSystem(
                f"{name}-lustre", storage_capacity=fsx.capacity_gib, deployment_type=fsx.deployment_type,
                per_unit_storage_throughput=fsx.throughput_mb_per_tib, subnet_ids=subnet_id,
                security_group_ids=[security_group_id], file_system_type_version="2.15",
                data_compression_type="LZ4", tags=tags("lustre"), opts=child)
            events = ["NEW", "CHANGED", "DELETED"]
            aws.fsx.DataRepositoryAssociation(
                f"{name}-lustre-s3", file_system_id=self.lustre.id, file_system_path="/",
                data_repository_path=self.bucket.bucket.apply(lambda b: f"s3://{b}"),
                batch_import_meta_data_on_create=True, tags=tags("lustre-s3"), opts=child,
                s3=aws.fsx.DataRepositoryAssociationS3Args(
                    auto_import_policy=aws.fsx.DataRepositoryAssociationS3AutoImportPolicyArgs(events=events),
                    auto_export_policy=aws.fsx.DataRepositoryAssociationS3AutoExportPolicyArgs(events=events)))
        self.register_outputs({"bucket": self.bucket.bucket})

    def upload(self, kind: str, key: pulumi.Input[str], content: pulumi.Input[str] | None = None,
               source: pulumi.Asset | pulumi.Archive | None = None) -> aws.s3.BucketObjectv2:
        """Put a bootstrap object (playbooks, inventory, script) into the bucket, KMS-encrypted and tagged."""
        return aws.s3.BucketObjectv2(f"{self._name}-{kind}", bucket=self.bucket.id, key=key, content=content,
                                     source=source, server_side_encryption="aws:kms",
                                     tags=self._spec.resource_tags(kind), opts=pulumi.ResourceOptions(parent=self))
