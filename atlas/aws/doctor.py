"""``atlas doctor``: read a deployment with the caller's credentials and check what synth cannot.

Every check is read-only and names its fix. What is checked (see docs/runbook.md):

- the results bucket is requester pays and blocks all public access;
- its policy grants list/read to exactly the configured accounts;
- every compute environment behind the deployment's job queues uses its launch template's latest
  version (Batch otherwise keeps the version it was created with);
- the job queues are enabled and valid;
- the notification topic's policy lets CloudWatch publish (otherwise alarms never arrive).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from botocore.exceptions import ClientError

CLOUDWATCH = "cloudwatch.amazonaws.com"


@dataclass(frozen=True)
class Check:
    """One check: what was looked at, whether it holds, what was found, and the fix when it does not."""

    name: str
    ok: bool
    found: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.found}" + ("" if self.ok else f" -- fix: {self.fix}")  # noqa: E501


@dataclass(frozen=True)
class Deployment:
    """What the deployment should be: its name prefix, processing region, account and grantees."""

    prefix: str
    region: str
    account: str
    grantee_account_ids: tuple[str, ...]
    results_region: str = "us-east-1"

    @property
    def results_bucket(self) -> str:
        return f"{self.prefix}-results-{self.account}"

    @property
    def topic_arn(self) -> str:
        return f"arn:aws:sns:{self.region}:{self.account}:{self.prefix}-notifications"


def _statements(policy: str | None) -> list[dict]:
    statements = json.loads(policy)["Statement"] if policy else []
    return statements if isinstance(statements, list) else [statements]


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


def check_results_bucket(s3, deployment: Deployment) -> list[Check]:
    """Requester pays, public access block, and the grantees of the bucket policy."""
    bucket = deployment.results_bucket
    try:
        payer = s3.get_bucket_request_payment(Bucket=bucket, ExpectedBucketOwner=deployment.account).get(
            "Payer", "BucketOwner")
    except ClientError as exc:
        return [Check(f"results bucket {bucket}", False, f"cannot be read: {exc}",
                      "deploy the results stack, or run with credentials of the deploying account")]
    checks = [Check("results bucket requester pays", payer == "Requester", f"payer is {payer}",
                    "redeploy the results stack (its custom resource sets Payer=Requester)")]
    try:
        block = s3.get_public_access_block(Bucket=bucket, ExpectedBucketOwner=deployment.account)[
            "PublicAccessBlockConfiguration"]
    except ClientError:
        block = {}
    off = sorted(k for k in ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")
                 if not block.get(k))
    checks.append(Check("results bucket blocks public access", not off,
                        "all four settings on" if not off else f"off: {', '.join(off)}",
                        "redeploy the results stack (block_public_access=BLOCK_ALL); find who changed it"))
    try:
        policy = s3.get_bucket_policy(Bucket=bucket, ExpectedBucketOwner=deployment.account)["Policy"]
    except ClientError:
        policy = None
    granted = set()
    for statement in _statements(policy):
        if statement.get("Effect") == "Allow" and "s3:GetObject" in _listed(statement.get("Action", [])):
            for principal in _listed(statement.get("Principal", {}).get("AWS", [])):
                granted.add(principal.split(":")[4] if principal.startswith("arn:") else principal)
    expected = set(deployment.grantee_account_ids)
    found = f"{len(granted)} account(s) granted"
    if granted != expected:
        found += (f"; not configured: {', '.join(sorted(granted - expected)) or '-'}; "
                  f"configured but missing: {', '.join(sorted(expected - granted)) or '-'}")
    checks.append(Check("results bucket grants as configured", granted == expected, found,
                        "cdk diff / cdk deploy the results stack (someone changed the policy by hand, or the "
                        "configuration was not deployed)"))
    return checks


def check_batch(batch, ec2, deployment: Deployment) -> list[Check]:
    """Queues enabled and valid; their compute environments on the launch template's latest version."""
    queues = [q for page in batch.get_paginator("describe_job_queues").paginate() for q in page["jobQueues"]
              if q["jobQueueName"].startswith(f"{deployment.prefix}-")]
    if not queues:
        return [Check("job queues", False, f"no queue named {deployment.prefix}-* in {deployment.region}",
                      "deploy the pipeline stack, or check the region and prefix")]
    checks = []
    for queue in sorted(queues, key=lambda q: q["jobQueueName"]):
        ok = queue["state"] == "ENABLED" and queue["status"] == "VALID"
        checks.append(Check(f"job queue {queue['jobQueueName']}", ok, f"{queue['state']}, {queue['status']}",
                            "aws batch update-job-queue --state ENABLED, or read its statusReason and redeploy"))
    arns = sorted({o["computeEnvironment"] for q in queues for o in q["computeEnvironmentOrder"]})
    for environment in batch.describe_compute_environments(computeEnvironments=arns)["computeEnvironments"]:
        template = environment.get("computeResources", {}).get("launchTemplate") or {}
        name = environment["computeEnvironmentName"]
        if not template.get("launchTemplateId"):
            checks.append(Check(f"compute environment {name}", False, "has no launch template",
                                "redeploy the pipeline stack"))
            continue
        latest = ec2.describe_launch_templates(LaunchTemplateIds=[template["launchTemplateId"]])[
            "LaunchTemplates"][0]["LatestVersionNumber"]
        version = template.get("version")
        ok = version in (str(latest), "$Latest")
        checks.append(Check(f"compute environment {name}", ok,
                            f"launch template version {version or '(none: frozen at creation)'}, latest {latest}",
                            "redeploy the pipeline stack (compute environments name the template's latest "
                            "version)"))
    return checks


def check_topic(sns, deployment: Deployment) -> list[Check]:
    """The topic's policy allows CloudWatch to publish (alarms)."""
    try:
        policy = sns.get_topic_attributes(TopicArn=deployment.topic_arn)["Attributes"].get("Policy")
    except ClientError as exc:
        return [Check("notification topic", False, f"{deployment.topic_arn} cannot be read: {exc}",
                      "deploy the pipeline stack, or check the region and prefix")]
    allowed = any(s.get("Effect") == "Allow" and CLOUDWATCH in _listed(s.get("Principal", {}).get("Service", []))
                  and "sns:Publish" in _listed(s.get("Action", [])) for s in _statements(policy))
    return [Check("alarms can reach the topic", allowed,
                  "CloudWatch may publish" if allowed else "no statement lets cloudwatch.amazonaws.com publish",
                  "redeploy the pipeline stack (its topic policy allows CloudWatch alarms of this account)")]


def check_deployment(session, deployment: Deployment) -> list[Check]:
    """Every check, in order; ``session`` is a boto3 Session with the caller's credentials."""
    s3 = session.client("s3", region_name=deployment.results_region)
    return (check_results_bucket(s3, deployment)
            + check_batch(session.client("batch", region_name=deployment.region),
                          session.client("ec2", region_name=deployment.region), deployment)
            + check_topic(session.client("sns", region_name=deployment.region), deployment))
