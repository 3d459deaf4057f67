"""Buckets: every bucket private, encrypted, TLS-only, retained; ingest, work, results and site specifics."""
from __future__ import annotations

import pytest
from aws_cdk.assertions import Match
from cdk_templates import logical_id, one, resources

from infra.nag import render_intrinsics

BLOCK_ALL = {"BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True,
             "RestrictPublicBuckets": True}


def bucket_policy_statements(template, bucket_id: str) -> list[dict]:
    policies = [p for p in resources(template, "AWS::S3::BucketPolicy").values()
                if p["Properties"]["Bucket"] == {"Ref": bucket_id}]
    assert len(policies) == 1, f"{bucket_id} has {len(policies)} bucket policies"
    return policies[0]["Properties"]["PolicyDocument"]["Statement"]


def all_buckets(synth):
    for template in (synth.results, synth.pipeline):
        for bucket_id, bucket in resources(template, "AWS::S3::Bucket").items():
            yield template, bucket_id, bucket


def test_every_bucket_is_private_encrypted_and_retained(synth):
    buckets = list(all_buckets(synth))
    assert len(buckets) == 6  # results + log; ingest, work, overview + log
    for _, bucket_id, bucket in buckets:
        props = bucket["Properties"]
        assert props["PublicAccessBlockConfiguration"] == BLOCK_ALL, bucket_id
        assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0][
            "ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}, bucket_id
        assert bucket["DeletionPolicy"] == "Retain" and bucket["UpdateReplacePolicy"] == "Retain", bucket_id


def test_every_bucket_refuses_plain_http_and_old_tls(synth):
    for template, bucket_id, _ in all_buckets(synth):
        denies = [s for s in bucket_policy_statements(template, bucket_id) if s["Effect"] == "Deny"]
        conditions = [s["Condition"] for s in denies]
        assert {"Bool": {"aws:SecureTransport": "false"}} in conditions, bucket_id
        assert {"NumericLessThan": {"s3:TlsVersion": 1.2}} in conditions, bucket_id
        assert all(s["Principal"] == {"AWS": "*"} for s in denies)


def test_buckets_log_access_to_their_stacks_log_bucket_and_acls_are_off(synth):
    for template, bucket_id, bucket in all_buckets(synth):
        props = bucket["Properties"]
        if bucket_id.startswith("StorageAccessLogs"):
            assert "LoggingConfiguration" not in props  # the destination does not log into itself
            continue
        log_bucket_id, _ = one(template, "AWS::S3::Bucket", "StorageAccessLogs")
        assert props["LoggingConfiguration"]["DestinationBucketName"] == {"Ref": log_bucket_id}, bucket_id
        assert props["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}], bucket_id


def test_results_bucket_is_in_us_east_1_with_a_fixed_name(full, lean):
    assert full.results_stack.region == lean.results_stack.region == "us-east-1"
    assert full.pipeline_stack.region == "eu-west-1" and lean.pipeline_stack.region == "us-east-1"
    _, bucket = one(full.results, "AWS::S3::Bucket", "StorageResults")
    assert bucket["Properties"]["BucketName"] == "atlas-test-results-123456789012"
    _, bucket = one(lean.results, "AWS::S3::Bucket", "StorageResults")
    assert render_intrinsics(bucket["Properties"]["BucketName"]) == "lean-results-<AWS::AccountId>"
    # the pipeline finds it by that name, not by a cross-region reference
    environment = next(iter(resources(full.pipeline, "AWS::Batch::JobDefinition").values()))[
        "Properties"]["ContainerProperties"]["Environment"]
    assert {"Name": "ATLAS_RESULTS_BUCKET", "Value": "atlas-test-results-123456789012"} in environment
    # every bucket the jobs touch is the deploying account's: their requests say so (ExpectedBucketOwner)
    assert {"Name": "ATLAS_BUCKET_OWNER", "Value": "123456789012"} in environment
    lean_environment = next(iter(resources(lean.pipeline, "AWS::Batch::JobDefinition").values()))[
        "Properties"]["ContainerProperties"]["Environment"]
    assert {"Name": "ATLAS_BUCKET_OWNER", "Value": {"Ref": "AWS::AccountId"}} in lean_environment


def test_results_bucket_versioned_intelligent_tiering_old_versions_expire(full):
    _, bucket = one(full.results, "AWS::S3::Bucket", "StorageResults")
    props = bucket["Properties"]
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    rules = {r["Id"]: r for r in props["LifecycleConfiguration"]["Rules"]}
    assert rules["IntelligentTiering"]["Transitions"] == [{"StorageClass": "INTELLIGENT_TIERING",
                                                           "TransitionInDays": 0}]
    assert rules["ExpireOldVersions"]["NoncurrentVersionExpiration"] == {"NoncurrentDays": 60}
    assert rules["ExpireOldVersions"]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 7}
    # no archive tiers: every result stays instantly readable
    assert "IntelligentTieringConfigurations" not in props


def test_ingest_bucket_versioned_sends_events_to_eventbridge_and_aborts_uploads(full):
    _, bucket = one(full.pipeline, "AWS::S3::Bucket", "StorageIngest")
    props = bucket["Properties"]
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert props["NotificationConfiguration"] == {"EventBridgeConfiguration": {"EventBridgeEnabled": True}}
    (rule,) = props["LifecycleConfiguration"]["Rules"]
    assert rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 7}
    assert rule["NoncurrentVersionExpiration"] == {"NoncurrentDays": 60}
    assert "ExpirationInDays" not in rule  # raw uploads are never deleted
    # natively, without the custom resource CDK would otherwise add
    assert not resources(full.pipeline, "Custom::S3BucketNotifications")


def test_work_bucket_expires_run_staging(full):
    _, bucket = one(full.pipeline, "AWS::S3::Bucket", "StorageWork")
    (rule,) = bucket["Properties"]["LifecycleConfiguration"]["Rules"]
    assert rule["ExpirationInDays"] == 10 and rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert "VersioningConfiguration" not in bucket["Properties"]


@pytest.mark.parametrize("stack", ["results", "pipeline"])
def test_log_buckets_expire_logs_with_the_log_retention(full, stack):
    _, bucket = one(getattr(full, stack), "AWS::S3::Bucket", "StorageAccessLogs")
    (rule,) = bucket["Properties"]["LifecycleConfiguration"]["Rules"]
    assert rule["ExpirationInDays"] == 30


def test_overview_site_is_served_by_cloudfront_through_origin_access_control(full):
    site = full.pipeline_stack.site
    bucket_id = logical_id(site.bucket)
    (oac_id,) = resources(full.pipeline, "AWS::CloudFront::OriginAccessControl")
    full.pipeline.has_resource_properties("AWS::CloudFront::Distribution", {"DistributionConfig": Match.object_like({
        "Origins": [Match.object_like({"OriginAccessControlId": {"Fn::GetAtt": [oac_id, "Id"]},
                                       "DomainName": {"Fn::GetAtt": [bucket_id, "RegionalDomainName"]}})],
        "DefaultCacheBehavior": Match.object_like({"ViewerProtocolPolicy": "redirect-to-https"}),
        "Logging": Match.object_like({"Prefix": "cloudfront/"}),
    })})
    reads = [s for s in bucket_policy_statements(full.pipeline, bucket_id) if s["Effect"] == "Allow"]
    assert [s["Principal"] for s in reads] == [{"Service": "cloudfront.amazonaws.com"}]
    assert reads[0]["Action"] == "s3:GetObject"


def test_overview_site_sends_a_content_security_policy(full):
    from infra.site import CONTENT_SECURITY_POLICY

    (distribution,) = resources(full.pipeline, "AWS::CloudFront::Distribution").values()
    policy_ref = distribution["Properties"]["DistributionConfig"]["DefaultCacheBehavior"]["ResponseHeadersPolicyId"]
    (policy,) = [r for k, r in resources(full.pipeline, "AWS::CloudFront::ResponseHeadersPolicy").items()
                 if policy_ref == {"Ref": k}]
    headers = policy["Properties"]["ResponseHeadersPolicyConfig"]["SecurityHeadersConfig"]
    assert headers["ContentSecurityPolicy"] == {"ContentSecurityPolicy": CONTENT_SECURITY_POLICY, "Override": True}
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["script-src"] == "'self'" and directives["object-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'" and headers["FrameOptions"]["FrameOption"] == "DENY"
    assert headers["StrictTransportSecurity"]["AccessControlMaxAgeSec"] >= 31536000
