"""S3 buckets: ingest (labs upload), work (run staging), results (published), and their access logs.

Every bucket blocks public access, refuses plain HTTP and TLS below 1.2, is encrypted (SSE-S3,
so external readers and S3 access logging need no KMS grants), has ACLs off, logs its server
access into a separate log bucket and is retained when its stack is deleted: data outlives code.
"""
from __future__ import annotations

from aws_cdk import Aws, Duration, RemovalPolicy
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.config import AtlasConfig

ABORT_INCOMPLETE_UPLOADS = Duration.days(7)


def results_bucket_name(config: AtlasConfig) -> str:
    """The results bucket's name, ``<prefix>-results-<account>``.

    Fixed rather than generated: analysts are told this name, and the processing stack in
    another region finds the bucket by it without a cross-region reference.
    """
    return f"{config.name('results')}-{config.account or Aws.ACCOUNT_ID}"


def secure_bucket(scope: Construct, id: str, *, log_bucket: s3.IBucket | None,
                  lifecycle_rules: list[s3.LifecycleRule], versioned: bool = True,
                  object_ownership: s3.ObjectOwnership = s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
                  bucket_name: str | None = None) -> s3.Bucket:
    """A private bucket with this project's safety defaults (see the module docstring).

    ``log_bucket`` None marks the bucket *as* a log destination: it logs nowhere (it would log
    its own log writes; cdk-nag recognizes log destinations).
    """
    return s3.Bucket(
        scope, id,
        bucket_name=bucket_name,
        block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
        enforce_ssl=True,
        minimum_tls_version=1.2,
        encryption=s3.BucketEncryption.S3_MANAGED,
        object_ownership=object_ownership,
        versioned=versioned,
        lifecycle_rules=lifecycle_rules,
        server_access_logs_bucket=log_bucket,
        server_access_logs_prefix=f"{id}/" if log_bucket else None,
        removal_policy=RemovalPolicy.RETAIN,
    )


def log_bucket(scope: Construct, config: AtlasConfig, *, acls_for_cloudfront: bool = False) -> s3.Bucket:
    """The access-log bucket of a stack; logs expire with the configured log retention.

    CloudFront's standard logs are delivered through bucket ACLs, so the pipeline stack's log
    bucket keeps ACLs available to the bucket owner (``BUCKET_OWNER_PREFERRED``); S3 server
    access logs use the bucket policy either way.
    """
    return secure_bucket(
        scope, "AccessLogs", log_bucket=None, versioned=False,
        object_ownership=(s3.ObjectOwnership.BUCKET_OWNER_PREFERRED if acls_for_cloudfront
                          else s3.ObjectOwnership.BUCKET_OWNER_ENFORCED),
        lifecycle_rules=[s3.LifecycleRule(id="ExpireLogs", expiration=Duration.days(config.log_retention_days),
                                          abort_incomplete_multipart_upload_after=ABORT_INCOMPLETE_UPLOADS)])


class ResultsStorage(Construct):
    """The published results bucket (us-east-1) and its own access-log bucket.

    Requester pays and the grants to external accounts are added by :class:`infra.access.ResultsAccess`.
    A requester-pays bucket cannot receive server access logs, hence the separate plain log bucket.

    Attributes
    ----------
    bucket : s3.Bucket
        Results, ``<slide_id>/<run_id>/...`` plus ``<slide_id>/latest.json``.
    log_bucket : s3.Bucket
    """

    def __init__(self, scope: Construct, id: str, *, config: AtlasConfig) -> None:
        super().__init__(scope, id)
        self.log_bucket = log_bucket(self, config)
        self.bucket = secure_bucket(
            self, "Results", log_bucket=self.log_bucket, bucket_name=results_bucket_name(config),
            lifecycle_rules=[
                # Intelligent-Tiering moves rarely read results to cheaper tiers and back on access,
                # with no retrieval fee; archive tiers stay off so every object is instantly readable.
                s3.LifecycleRule(id="IntelligentTiering", transitions=[s3.Transition(
                    storage_class=s3.StorageClass.INTELLIGENT_TIERING, transition_after=Duration.days(0))]),
                s3.LifecycleRule(id="ExpireOldVersions",
                                 noncurrent_version_expiration=Duration.days(config.noncurrent_version_days),
                                 abort_incomplete_multipart_upload_after=ABORT_INCOMPLETE_UPLOADS),
            ])


class PipelineStorage(Construct):
    """Buckets of the processing region: ingest, work and the access-log bucket.

    Attributes
    ----------
    ingest : s3.Bucket
        Lab uploads ``<slide_id>/{markers.csv, raw/*.ome.tif, params.yml, manifest.json}``;
        raw data is kept (versioned, retained) so a failed slide can be fixed and rerun.
    work : s3.Bucket
        Run staging ``<run_id>/<stage>/...`` between Batch jobs; expires after ``work_retention_days``.
    log_bucket : s3.Bucket
        Access logs of these buckets, the overview site and its CloudFront distribution.
    """

    def __init__(self, scope: Construct, id: str, *, config: AtlasConfig) -> None:
        super().__init__(scope, id)
        self.log_bucket = log_bucket(self, config, acls_for_cloudfront=True)
        self.ingest = secure_bucket(
            self, "Ingest", log_bucket=self.log_bucket,
            lifecycle_rules=[s3.LifecycleRule(
                id="AbortUploadsExpireOldVersions",
                abort_incomplete_multipart_upload_after=ABORT_INCOMPLETE_UPLOADS,
                noncurrent_version_expiration=Duration.days(config.noncurrent_version_days))])
        # Object Created events go to EventBridge. Set on the CloudFormation resource: the L2
        # `event_bridge_enabled` would add a custom-resource Lambda to do what CloudFormation does natively.
        self.ingest.node.default_child.notification_configuration = s3.CfnBucket.NotificationConfigurationProperty(
            event_bridge_configuration=s3.CfnBucket.EventBridgeConfigurationProperty(event_bridge_enabled=True))
        self.work = secure_bucket(
            self, "Work", log_bucket=self.log_bucket, versioned=False,
            lifecycle_rules=[s3.LifecycleRule(
                id="ExpireRunStaging", expiration=Duration.days(config.work_retention_days),
                abort_incomplete_multipart_upload_after=Duration.days(1))])
