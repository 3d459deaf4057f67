"""Who may read the results, and who pays: requester pays plus read grants to named accounts.

CloudFormation has no property for requester pays, so a custom resource calls
``PutBucketRequestPayment`` on create and on update. The bucket policy, which carries the
external grants, is made to depend on it: CloudFormation switches requester pays on *before*
any external account can read, so no request is ever billed to the owner.

Grants scale by being compact: one statement lists every grantee account as a principal and allows
both actions on both resources (``s3:ListBucket`` only applies to the bucket, ``s3:GetObject`` only to
objects), about 34 bytes per account. S3 limits a bucket policy to 20 KB, which holds
``MAX_GRANTEES`` accounts; the configuration refuses more (docs/runbook.md says what to do then).
"""
from __future__ import annotations

from aws_cdk import Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from aws_cdk import custom_resources as cr
from constructs import Construct

from infra.nag import acknowledge, managed_policy_finding

GRANTEE_ACTIONS = ("s3:ListBucket", "s3:GetObject")
GRANT_SID = "GranteesListAndRead"
# Grantees one bucket policy holds within S3's 20 KB (tests/infra/test_infra_access.py measures it).
MAX_GRANTEES = 550


class ResultsAccess(Construct):
    """Requester pays on ``bucket`` and list/get for each grantee account (account principals).

    With ``BucketOwnerEnforced`` ACLs are off, so the bucket policy is the only grant; grantees
    delegate to their own users and roles through IAM and send ``x-amz-request-payer: requester``.

    Attributes
    ----------
    requester_pays : custom_resources.AwsCustomResource
        The ``PutBucketRequestPayment`` call.
    """

    def __init__(self, scope: Construct, id: str, *, bucket: s3.Bucket, grantee_account_ids: tuple[str, ...]) -> None:
        super().__init__(scope, id)
        call = cr.AwsSdkCall(
            service="S3", action="PutBucketRequestPayment",
            parameters={"Bucket": bucket.bucket_name, "RequestPaymentConfiguration": {"Payer": "Requester"}},
            physical_resource_id=cr.PhysicalResourceId.of(f"{bucket.bucket_name}-requester-pays"))
        self.requester_pays = cr.AwsCustomResource(
            self, "RequesterPays", on_create=call, on_update=call,
            # No on_delete: the bucket is retained, and so is the way it is billed.
            policy=cr.AwsCustomResourcePolicy.from_statements([iam.PolicyStatement(
                actions=["s3:PutBucketRequestPayment"], resources=[bucket.bucket_arn])]),
            install_latest_aws_sdk=False)
        if grantee_account_ids:
            # 🚨 Cross-account read of the published results: the grantees pay their requests.
            bucket.add_to_resource_policy(iam.PolicyStatement(
                sid=GRANT_SID, principals=[iam.AccountPrincipal(a) for a in grantee_account_ids],
                actions=list(GRANTEE_ACTIONS), resources=[bucket.bucket_arn, bucket.arn_for_objects("*")]))
        bucket.policy.node.add_dependency(self.requester_pays)
        # The call runs in CDK's singleton provider Lambda, created at stack level.
        provider = Stack.of(self).node.find_child("AWS" + cr.AwsCustomResource.PROVIDER_FUNCTION_UUID.replace("-", ""))
        acknowledge(provider, managed_policy_finding("service-role/AWSLambdaBasicExecutionRole"),
                    "CDK's AwsCustomResource provider; the AWS managed policy only lets it write its own logs.")
