"""Results access: requester pays switched on by a custom resource, before any grant; one grant per account."""
from __future__ import annotations

import json

from cdk_templates import logical_id, one, resources

from infra.nag import render_intrinsics


def sdk_call(resource: dict, phase: str) -> dict:
    return json.loads(render_intrinsics(resource["Properties"][phase]))


def test_requester_pays_is_switched_on_at_create_and_update(synth):
    _, custom = one(synth.results, "Custom::AWS", "AccessRequesterPays")
    bucket_id = logical_id(synth.results_stack.storage.bucket)
    for phase in ("Create", "Update"):
        call = sdk_call(custom, phase)
        assert (call["service"], call["action"]) == ("S3", "PutBucketRequestPayment")
        assert call["parameters"] == {"Bucket": f"<{bucket_id}>", "RequestPaymentConfiguration": {"Payer": "Requester"}}
    assert "Delete" not in custom["Properties"]  # the retained bucket stays requester pays


def test_custom_resource_may_only_set_request_payment_on_that_bucket(synth):
    bucket_id = logical_id(synth.results_stack.storage.bucket)
    (statement,) = [s for p in resources(synth.results, "AWS::IAM::Policy", "AccessRequesterPays").values()
                    for s in p["Properties"]["PolicyDocument"]["Statement"]]
    assert statement == {"Action": "s3:PutBucketRequestPayment", "Effect": "Allow",
                         "Resource": {"Fn::GetAtt": [bucket_id, "Arn"]}}


def test_grants_wait_for_requester_pays(synth):
    """CloudFormation creates the bucket, then requester pays, then the policy with the grants."""
    custom_id, custom = one(synth.results, "Custom::AWS", "AccessRequesterPays")
    bucket_id = logical_id(synth.results_stack.storage.bucket)
    _, policy = one(synth.results, "AWS::S3::BucketPolicy", "StorageResultsPolicy")
    assert custom_id in policy["DependsOn"]
    assert {"Ref": bucket_id} in custom["Properties"]["Create"]["Fn::Join"][1]  # after the bucket


def grants(synth) -> list[dict]:
    _, policy = one(synth.results, "AWS::S3::BucketPolicy", "StorageResultsPolicy")
    return [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"]


def test_each_grantee_account_may_list_and_get_and_nothing_more(full):
    bucket_arn = {"Fn::GetAtt": [logical_id(full.results_stack.storage.bucket), "Arn"]}
    expected = []
    for account in ("111122223333", "044455556666"):
        principal = {"AWS": f"arn:aws:iam::{account}:root"}
        expected += [
            {"Sid": f"GranteeList{account}", "Effect": "Allow", "Principal": principal, "Action": "s3:ListBucket",
             "Resource": bucket_arn},
            {"Sid": f"GranteeRead{account}", "Effect": "Allow", "Principal": principal, "Action": "s3:GetObject",
             "Resource": {"Fn::Join": ["", [bucket_arn, "/*"]]}},
        ]
    assert grants(full) == expected


def test_no_grantees_no_grants(lean):
    assert grants(lean) == []
