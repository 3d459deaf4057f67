"""cdk-nag (AwsSolutions) and CDK's template validation pass with reasoned acknowledgements; cfn-lint finds no error."""
from __future__ import annotations

import json
import re

import pytest
from cdk_templates import actions_of
from cfnlint.api import ManualArgs, lint


def test_synth_passes_cdk_nag_and_cloudformation_validation(synth):
    report = json.loads((synth.outdir / "validation-report.json").read_text())
    violations = [f"{p['pluginName']}: {v['ruleName']} at {c['constructPath']}"
                  for p in report["pluginReports"] for v in p["violations"] for c in v["violatingConstructs"]]
    assert synth.error is None and violations == [], "\n".join(violations) or str(synth.error)


def acknowledgements(synth) -> list[tuple[str, str, str]]:
    """(construct path, rule, reason) of every acknowledged finding, from the validation report."""
    report = json.loads((synth.outdir / "validation-report.json").read_text())
    return [(c["constructPath"], v["ruleName"], v["reason"])
            for p in report["pluginReports"] for v in p.get("suppressedViolations", [])
            for c in v["violatingConstructs"]]


# What a reviewer accepted may be waived, and nothing wider: CDK's grant_* action families, and
# AWS managed policies limited to a service's own logs / agent.
REVIEWED_ACTION_WILDCARDS = {"s3:GetObject*", "s3:GetBucket*", "s3:List*", "s3:DeleteObject*", "s3:Abort*",
                             "kms:GenerateDataKey*"}
REVIEWED_MANAGED_POLICIES = {"service-role/AWSLambdaBasicExecutionRole",
                             "service-role/AmazonEC2ContainerServiceforEC2Role"}
# Actions IAM cannot scope to a resource (Resource "*" is the only form AWS accepts): X-Ray, the ECR
# login, CloudWatch Logs' vended log delivery (the state machine's logs) and Step Functions' Batch
# .sync polling (job ids exist only at run time).
NO_RESOURCE_LEVEL_ACTIONS = {
    "xray:PutTraceSegments", "xray:PutTelemetryRecords", "xray:GetSamplingRules", "xray:GetSamplingTargets",
    "ecr:GetAuthorizationToken", "batch:DescribeJobs",
    "logs:CreateLogDelivery", "logs:GetLogDelivery", "logs:UpdateLogDelivery", "logs:DeleteLogDelivery",
    "logs:ListLogDeliveries", "logs:PutResourcePolicy", "logs:DescribeResourcePolicies", "logs:DescribeLogGroups",
}


def _finding(rule: str) -> tuple[str, str]:
    """``AwsSolutions-IAM5[Action::s3:List*]`` -> ("Action", "s3:List*")."""
    kind, _, value = rule[rule.index("[") + 1:-1].partition("::")
    return kind, value


def _statements_at(synth, construct_path: str) -> list[dict]:
    """Statements of the IAM policy resource at a construct path (as the validation report names it)."""
    stack_id, *parts = construct_path.split("/")
    stack = next(s for s in (synth.results_stack, synth.pipeline_stack) if s.node.id == stack_id)
    element = stack
    for part in parts:
        element = element.node.find_child(part)
    template = synth.templates[stack.stack_name]
    return template["Resources"][stack.resolve(stack.get_logical_id(element))]["Properties"]["PolicyDocument"][
        "Statement"]


def test_every_acknowledgement_is_one_finding_with_a_reason(synth):
    acks = acknowledgements(synth)
    assert acks, "the validation report lists no acknowledged findings: is cdk-nag running?"
    for path, rule, reason in acks:
        assert rule.startswith("AwsSolutions-") and reason.strip(), (path, rule)
        if rule.startswith(("AwsSolutions-IAM4", "AwsSolutions-IAM5")):
            assert "[" in rule, f"{path}: {rule} acknowledged wholesale, not per finding"


def test_acknowledged_wildcards_stay_within_what_was_reviewed(synth):
    """A waiver never covers more than CDK's grant families, our own buckets' objects, this app's
    Batch jobs, or actions that IAM cannot scope; a new kind of wildcard needs a review here."""
    prefix = synth.config.name_prefix
    for path, rule, _ in acknowledgements(synth):
        if rule.startswith("AwsSolutions-IAM4"):
            policy = _finding(rule)[1].rsplit(":policy/", 1)[-1]
            assert policy in REVIEWED_MANAGED_POLICIES, (path, policy)
        if not rule.startswith("AwsSolutions-IAM5"):
            continue
        kind, value = _finding(rule)
        if kind == "Action":
            assert value in REVIEWED_ACTION_WILDCARDS, (path, value)
        elif value == "*":
            scoped_nowhere = [s for s in _statements_at(synth, path) if s["Resource"] == "*"]
            actions = {a for s in scoped_nowhere for a in actions_of(s)}
            assert scoped_nowhere and actions <= NO_RESOURCE_LEVEL_ACTIONS, (path, actions)
        else:
            # any object of one of our buckets, or a named file of any slide there (e.g. <Ingest.Arn>/*/params.yml)
            bucket_objects = (re.fullmatch(r"<Storage\w+\.Arn>/([\w.-]+/)*\*(/[\w.-]+)?", value) is not None
                              or value.endswith(".Arn>/*") or value.startswith(f"arn:aws:s3:::{prefix}-"))
            batch_jobs = re.fullmatch(rf"arn:aws:batch:[a-z0-9-]+:(\d{{12}}|<AWS::AccountId>):"
                                      rf"(job/\*|job-definition/{prefix}-[a-z-]+:\*)",
                                      value)
            assert bucket_objects or batch_jobs, (path, value)


def test_no_rule_is_acknowledged_where_it_protects_data(synth):
    """Encryption, public access, TLS and logging of data buckets are fixed, never waived."""
    for path, rule, _ in acknowledgements(synth):
        assert rule not in {"AwsSolutions-S2", "AwsSolutions-S10", "AwsSolutions-DDB3", "AwsSolutions-SNS2",
                            "AwsSolutions-SNS3", "AwsSolutions-SQS4", "AwsSolutions-SF1", "AwsSolutions-SF2"}, path
        assert rule != "AwsSolutions-S1", f"{path} must log its access"


@pytest.mark.parametrize("stack", ["results", "pipeline"])
def test_cfn_lint_finds_no_errors(synth, stack):
    stack_obj = getattr(synth, f"{stack}_stack")
    template = (synth.outdir / stack_obj.template_file).read_text()
    matches = lint(template, config=ManualArgs(regions=[stack_obj.region]))
    errors = [f"{m.rule.id} {m.message} ({m.path})" for m in matches if m.rule.severity == "error"]
    assert errors == [], "\n".join(errors)
