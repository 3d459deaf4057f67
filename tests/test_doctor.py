"""``atlas doctor`` against the emulator: a deployment as the CDK app makes it passes every check;
each thing that breaks an alarm, a grant, requester pays or a launch template update is named."""
from __future__ import annotations

import json

import boto3
import pytest
from fake_aws import use_fake_aws
from moto import mock_aws
from typer.testing import CliRunner

from atlas.aws.doctor import Deployment, check_deployment
from atlas.cli import app

ACCOUNT, REGION = "123456789012", "eu-west-1"
DEPLOYMENT = Deployment(prefix="atlas-t", region=REGION, account=ACCOUNT,
                        grantee_account_ids=("111122223333", "044455556666"))


def grant_policy(bucket: str, accounts) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "GranteesListAndRead", "Effect": "Allow",
         "Principal": {"AWS": [f"arn:aws:iam::{a}:root" for a in accounts]},
         "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]})  # noqa: E501


@pytest.fixture
def payer(monkeypatch) -> dict:
    """Who pays for the results bucket: moto 5.2.5 neither stores nor returns request payment, so
    GetBucketRequestPayment answers from this dict (a botocore hook on every client doctor makes)."""
    state = {"Payer": "Requester"}
    client = boto3.Session.client

    def answering_client(self, service, *args, **kwargs):
        made = client(self, service, *args, **kwargs)
        if service == "s3":
            made.meta.events.register("after-call.s3.GetBucketRequestPayment",
                                      lambda parsed, **_: parsed.update(Payer=state["Payer"]))
        return made

    monkeypatch.setattr(boto3.Session, "client", answering_client)
    return state


@pytest.fixture
def deployed(monkeypatch, payer):
    """The resources doctor reads, shaped as the CDK app deploys them."""
    use_fake_aws(monkeypatch, region=REGION)
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        bucket = DEPLOYMENT.results_bucket
        s3.create_bucket(Bucket=bucket)
        s3.put_bucket_request_payment(Bucket=bucket, RequestPaymentConfiguration={"Payer": "Requester"})
        block_all = dict.fromkeys(("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets"),
                                  True)
        s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=block_all)
        s3.put_bucket_policy(Bucket=bucket, Policy=grant_policy(bucket, DEPLOYMENT.grantee_account_ids))

        ec2, iam = boto3.client("ec2", region_name=REGION), boto3.client("iam", region_name=REGION)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24")["Subnet"]["SubnetId"]
        group = ec2.create_security_group(GroupName="jobs", Description="jobs", VpcId=vpc)["GroupId"]
        template = ec2.create_launch_template(LaunchTemplateName="instances", LaunchTemplateData={
            "MetadataOptions": {"HttpTokens": "required"}})["LaunchTemplate"]["LaunchTemplateId"]
        trust = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                                   "Principal": {"Service": "batch.amazonaws.com"}}]})
        service_role = iam.create_role(RoleName="batch", AssumeRolePolicyDocument=trust)["Role"]["Arn"]
        profile = iam.create_instance_profile(InstanceProfileName="instances")["InstanceProfile"]["Arn"]
        batch = boto3.client("batch", region_name=REGION)
        environment = batch.create_compute_environment(
            computeEnvironmentName="CpuSpot-abc", type="MANAGED", state="ENABLED", serviceRole=service_role,
            computeResources={"type": "SPOT", "minvCpus": 0, "maxvCpus": 16, "instanceTypes": ["c6i"],
                              "subnets": [subnet], "securityGroupIds": [group], "instanceRole": profile,
                              "launchTemplate": {"launchTemplateId": template, "version": "1"}})
        batch.create_job_queue(jobQueueName="atlas-t-cpu", state="ENABLED", priority=1, computeEnvironmentOrder=[
            {"order": 1, "computeEnvironment": environment["computeEnvironmentArn"]}])

        sns = boto3.client("sns", region_name=REGION)
        topic = sns.create_topic(Name="atlas-t-notifications")["TopicArn"]
        sns.set_topic_attributes(TopicArn=topic, AttributeName="Policy", AttributeValue=json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Principal": {"Service": "cloudwatch.amazonaws.com"}, "Action": "sns:Publish",
                 "Resource": topic, "Condition": {"StringEquals": {"aws:SourceAccount": ACCOUNT}}}]}))
        yield {"payer": payer, "s3": s3, "ec2": ec2, "template": template, "batch": batch, "sns": sns, "topic": topic}


def failed(deployment=DEPLOYMENT) -> dict[str, str]:
    return {c.name: str(c) for c in check_deployment(boto3.Session(), deployment) if not c.ok}


def test_a_deployment_as_made_passes_every_check(deployed):
    checks = check_deployment(boto3.Session(), DEPLOYMENT)
    assert [c.name for c in checks if not c.ok] == []
    names = {c.name for c in checks}
    assert {"results bucket requester pays", "results bucket blocks public access", "results bucket grants as configured",  # noqa: E501
            "job queue atlas-t-cpu", "compute environment CpuSpot-abc", "alarms can reach the topic"} <= names


def test_each_drift_is_named_with_its_fix(deployed):
    s3, bucket = deployed["s3"], DEPLOYMENT.results_bucket
    deployed["payer"]["Payer"] = "BucketOwner"
    s3.put_bucket_policy(Bucket=bucket, Policy=grant_policy(bucket, ["111122223333", "999988887777"]))
    # a launch template change the compute environment never saw
    deployed["ec2"].create_launch_template_version(LaunchTemplateId=deployed["template"], SourceVersion="1",
                                                   LaunchTemplateData={"MetadataOptions": {"HttpTokens": "optional"}})
    deployed["batch"].update_job_queue(jobQueue="atlas-t-cpu", state="DISABLED")
    deployed["sns"].set_topic_attributes(TopicArn=deployed["topic"], AttributeName="Policy", AttributeValue=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "sns:Publish",
                                                 "Resource": deployed["topic"],
                                                 "Condition": {"Bool": {"aws:SecureTransport": "false"}}}]}))
    problems = failed()
    assert "payer is BucketOwner" in problems["results bucket requester pays"]
    assert "not configured: 999988887777; configured but missing: 044455556666" in problems[
        "results bucket grants as configured"]
    assert "launch template version 1, latest 2" in problems["compute environment CpuSpot-abc"]
    assert "DISABLED" in problems["job queue atlas-t-cpu"]
    assert "no statement lets cloudwatch.amazonaws.com publish" in problems["alarms can reach the topic"]
    assert all("-- fix: " in line for line in problems.values())


def test_the_cli_reads_cdk_json_and_exits_1_on_a_failure(deployed, tmp_path):
    settings = {"name_prefix": "atlas-t", "region": REGION, "account": ACCOUNT,
                "grantee_account_ids": list(DEPLOYMENT.grantee_account_ids)}
    cdk_json = tmp_path / "cdk.json"
    cdk_json.write_text(json.dumps({"context": {"atlas:environment": "t", "atlas:environments": {"t": settings}}}))
    result = CliRunner().invoke(app, ["doctor", "--cdk-json", str(cdk_json)])
    assert result.exit_code == 0, result.output
    assert "checks passed" in result.output
    deployed["batch"].update_job_queue(jobQueue="atlas-t-cpu", state="DISABLED")
    result = CliRunner().invoke(app, ["doctor", "--cdk-json", str(cdk_json)])
    assert result.exit_code == 1 and "FAIL job queue atlas-t-cpu" in result.output
