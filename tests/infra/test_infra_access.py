"""Results access: requester pays switched on by a custom resource, before any grant; one grant per account."""
from __future__ import annotations

import json

from cdk_templates import LEAN, logical_id, one, resources, synthesize

from infra.access import GRANT_SID, MAX_GRANTEES
from infra.nag import render_intrinsics
from infra.storage import results_bucket_name as bucket_name

S3_BUCKET_POLICY_LIMIT = 20 * 1024


def resolve(value, names: dict[str, str]):
    """A policy document with bucket ARNs (``Fn::GetAtt [id, Arn]``) and joins resolved to strings."""
    if isinstance(value, list):
        return [resolve(v, names) for v in value]
    if isinstance(value, dict):
        if "Fn::GetAtt" in value:
            return f"arn:aws:s3:::{names[value['Fn::GetAtt'][0]]}"
        if "Fn::Join" in value:
            separator, parts = value["Fn::Join"]
            return separator.join(resolve(p, names) for p in parts)
        return {k: resolve(v, names) for k, v in value.items()}
    return value


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


def test_grantee_accounts_may_list_and_get_and_nothing_more(full):
    bucket_arn = {"Fn::GetAtt": [logical_id(full.results_stack.storage.bucket), "Arn"]}
    (grant,) = grants(full)
    assert (grant["Sid"], grant["Effect"]) == (GRANT_SID, "Allow")
    assert sorted(grant["Principal"]["AWS"]) == ["arn:aws:iam::044455556666:root", "arn:aws:iam::111122223333:root"]
    assert sorted(grant["Action"]) == ["s3:GetObject", "s3:ListBucket"]
    assert grant["Resource"] == [bucket_arn, {"Fn::Join": ["", [bucket_arn, "/*"]]}]
    assert "Condition" not in grant


def test_bucket_policy_for_the_most_grantees_fits_s3s_20_kb(tmp_path):
    """The policy as S3 receives it (intrinsics resolved to the real bucket name), for 500 accounts
    and for MAX_GRANTEES, stays under S3's 20 KB bucket policy limit."""
    for count in (500, MAX_GRANTEES):
        settings = {**LEAN, "account": "123456789012", "grantee_account_ids": [f"{i:012d}" for i in range(count)]}
        synth = synthesize(settings, tmp_path / str(count))
        assert synth.error is None, synth.error
        _, policy = one(synth.results, "AWS::S3::BucketPolicy", "StorageResultsPolicy")
        bucket = synth.results_stack.storage.bucket
        document = resolve(policy["Properties"]["PolicyDocument"], {logical_id(bucket): bucket_name(synth.config)})
        size = len(json.dumps(document, separators=(",", ":")))
        assert size < S3_BUCKET_POLICY_LIMIT, (count, size)
        (grant,) = [s for s in document["Statement"] if s.get("Sid") == GRANT_SID]
        assert len(grant["Principal"]["AWS"]) == count
    assert MAX_GRANTEES >= 500


def test_no_grantees_no_grants(lean):
    assert grants(lean) == []
