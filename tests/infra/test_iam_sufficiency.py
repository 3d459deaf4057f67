"""IAM sufficiency, proven offline: every AWS call our code makes is allowed by the deployed role.

The emulator does not enforce IAM, so the event-driven demo (localcloud.demo: the real Lambda
handlers, every stage as an ``atlas stage`` job) runs with every AWS call recorded (botocore event
hooks, localcloud.awscalls): component -> (IAM action, resource ARN). Each is evaluated against that
component's role in the synthesized template, and its resource's own policy, by AWS's policy logic
(iam-simulate, localcloud.iampolicy). Integrations no code of ours calls (Step Functions -> Batch
.sync with tags, EventBridge -> Lambda and SQS, CloudWatch and Budgets -> SNS with KMS, Batch -> ECR
and Logs, CloudFront -> S3) are a table of AWS's documented required permissions, checked the same way.

The report of every request, its decision and the actions granted but never used is written to
``test-artifacts/iam-sufficiency.md``.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest
from cdk_templates import ROOT, logical_id, synthesize

from localcloud import awscalls
from localcloud.iampolicy import Request, TemplateView, physical_names, simulate, unused_grants

ACCOUNT, REGION, PREFIX = "123456789012", "us-east-1", "atlas-demo"
REPORT = ROOT / "test-artifacts" / "iam-sufficiency.md"
DEMO_RESULTS = f"{PREFIX}-results"
JOB_ID = "3f1c0d6e-1b2a-4c5d-9e8f-0a1b2c3d4e5f"

# (who, action, resource, context, AWS documentation) for integrations no code of ours calls.
# who: "state-machine", "execution-role", "lambda:<name>" (a role), or a service principal.
DOCUMENTED = [
    ("state-machine", "batch:SubmitJob", "{queue}", (), "https://docs.aws.amazon.com/step-functions/latest/dg/batch-iam.html"),
    ("state-machine", "batch:SubmitJob", "{job_definition}", (), "same; SubmitJob is authorized on queue and definition"),  # noqa: E501
    ("state-machine", "batch:SubmitJob", "{job}", (), "https://docs.aws.amazon.com/service-authorization/latest/reference/list_awsbatch.html (SubmitJob: job, job-queue required)"),  # noqa: E501
    ("state-machine", "batch:TagResource", "{job}", (), "https://docs.aws.amazon.com/batch/latest/userguide/tag-resources.html (tags on SubmitJob: tag on create)"),  # noqa: E501
    ("state-machine", "batch:DescribeJobs", "*", (), "https://docs.aws.amazon.com/step-functions/latest/dg/batch-iam.html (Run a Job .sync)"),  # noqa: E501
    ("state-machine", "batch:TerminateJob", "{job}", (), "same (stopping an execution terminates the job)"),
    ("state-machine", "events:PutTargets", "{batch_rule}", (), "same"),
    ("state-machine", "events:PutRule", "{batch_rule}", (), "same"),
    ("state-machine", "events:DescribeRule", "{batch_rule}", (), "same"),
    ("state-machine", "logs:CreateLogDelivery", "*", (), "https://docs.aws.amazon.com/step-functions/latest/dg/cw-logs.html"),
    ("state-machine", "logs:PutResourcePolicy", "*", (), "same"),
    ("state-machine", "xray:PutTraceSegments", "*", (), "https://docs.aws.amazon.com/step-functions/latest/dg/concepts-xray-tracing.html"),
    ("execution-role", "ecr:GetAuthorizationToken", "*", (), "https://docs.aws.amazon.com/AmazonECS/latest/developerguide/task_execution_IAM_role.html"),
    ("execution-role", "ecr:BatchGetImage", "{repository}", (), "same"),
    ("execution-role", "ecr:GetDownloadUrlForLayer", "{repository}", (), "same"),
    ("execution-role", "logs:CreateLogStream", "{job_log_stream}", (), "same (awslogs driver)"),
    ("execution-role", "logs:PutLogEvents", "{job_log_stream}", (), "same"),
    ("events.amazonaws.com", "lambda:InvokeFunction", "{function}", (("aws:SourceArn", "{rule}"),),
     "https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-use-resource-based.html"),
    ("events.amazonaws.com", "sqs:SendMessage", "{dead_letters}", (("aws:SourceArn", "{rule}"),),
     "https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-rule-dlq.html"),
    ("lambda", "sqs:SendMessage", "{dead_letters}", (), "https://docs.aws.amazon.com/lambda/latest/dg/invocation-async-retain-records.html"),
    ("lambda", "logs:PutLogEvents", "{function_log_stream}", (), "https://docs.aws.amazon.com/lambda/latest/dg/monitoring-cloudwatchlogs.html"),
    ("lambda", "xray:PutTraceSegments", "*", (), "https://docs.aws.amazon.com/lambda/latest/dg/services-xray.html"),
    ("cloudwatch.amazonaws.com", "sns:Publish", "{topic}", (("aws:SourceAccount", ACCOUNT), ("aws:SourceArn", "{alarm}")),  # noqa: E501
     "https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/Notify_Users_Alarm_Changes.html"),
    ("cloudwatch.amazonaws.com", "kms:GenerateDataKey", "{topic_key}", (),
     "https://docs.aws.amazon.com/sns/latest/dg/sns-key-management.html (AWS services publishing to encrypted topics)"),
    ("cloudwatch.amazonaws.com", "kms:Decrypt", "{topic_key}", (), "same"),
    ("budgets.amazonaws.com", "sns:Publish", "{topic}", (("aws:SourceAccount", ACCOUNT), ("aws:SourceArn", "{budget}")),
     "https://docs.aws.amazon.com/cost-management/latest/userguide/budgets-sns-policy.html"),
    ("budgets.amazonaws.com", "kms:GenerateDataKey", "{topic_key}", (), "same (encrypted topics)"),
    ("budgets.amazonaws.com", "kms:Decrypt", "{topic_key}", (), "same"),
    ("cloudfront.amazonaws.com", "s3:GetObject", "{site_object}", (("aws:SourceArn", "{distribution}"),),
     "https://docs.aws.amazon.com/AmazonCloudFront/latest/DeveloperGuide/private-content-restricting-access-to-s3.html"),
]


def principal_arn(role_id: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role/{role_id}"


def role_of(resource: dict, key: str) -> str:
    return resource["Properties"][key]["Fn::GetAtt"][0]


def component_roles(template: dict) -> dict[str, str]:
    """component -> role logical id, read from the resources that assume them (works for any version)."""
    roles = {}
    for resource in template["Resources"].values():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::Lambda::Function" and props["Handler"].startswith("functions."):
            roles[f"lambda:{props['Handler'].split('.')[1]}"] = role_of(resource, "Role")
        elif resource["Type"] == "AWS::Batch::JobDefinition":
            stage = props["JobDefinitionName"].removeprefix(f"{PREFIX}-").removesuffix("-merge")
            roles[f"job:{stage}"] = props["ContainerProperties"]["JobRoleArn"]["Fn::GetAtt"][0]
            roles["execution-role"] = props["ContainerProperties"]["ExecutionRoleArn"]["Fn::GetAtt"][0]
        elif resource["Type"] == "AWS::StepFunctions::StateMachine":
            roles["state-machine"] = role_of(resource, "RoleArn")
    return roles


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """The templates of a deployment named like the demo's resources (same account and region)."""
    settings = {"name_prefix": PREFIX, "account": ACCOUNT, "region": REGION, "spot": True, "gpu": False,
                "monthly_budget_usd": 100}
    from infra.config import ConfigError

    try:
        return synthesize(settings, tmp_path_factory.mktemp("iam"))
    except ConfigError:  # the app of before the budget key (to run this check on earlier commits)
        settings.pop("monthly_budget_usd")
        return synthesize(settings, tmp_path_factory.mktemp("iam"))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Every AWS call of the demo's components, with the demo's resource names."""
    from localcloud import demo

    out = tmp_path_factory.mktemp("demo")
    calls_file = out / "calls.jsonl"
    created = {}
    original_create, original_invoke = demo.LocalCloud.create.__func__, demo.LocalCloud.invoke

    def create(cls, prefix=PREFIX):
        cloud = original_create(cls, prefix)   # with its overview site bucket, where the publish job copies to
        created["cloud"] = cloud
        return cloud

    def invoke(self, name, event):
        token = awscalls.component.set(f"lambda:{name}")
        try:
            return original_invoke(self, name, event)
        finally:
            awscalls.component.reset(token)

    saved = dict(os.environ)
    awscalls.install(calls_file)
    recording = str(Path(awscalls.__file__).parent / "recording")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo.LocalCloud, "create", classmethod(create))
        mp.setattr(demo.LocalCloud, "invoke", invoke)
        os.environ.update({"PYTHONPATH": os.pathsep.join(filter(None, [recording, os.environ.get("PYTHONPATH")]))})
        try:
            result = demo.run_demo(out, say=lambda line: None)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    assert result.record["status"] == "SUCCEEDED", result.record
    return awscalls.read_calls(calls_file), created["cloud"]


def view_of(deployment, cloud) -> TemplateView:
    stack = deployment.pipeline_stack
    settings = cloud.settings
    names = {logical_id(stack.storage.ingest): cloud.ingest_bucket, logical_id(stack.storage.work): settings.work_bucket,  # noqa: E501
             logical_id(stack.site.bucket): cloud.site_bucket,
             logical_id(stack.catalog.table): settings.catalog_table,
             logical_id(stack.catalog.idempotency_table): settings.idempotency_table,
             logical_id(stack.notifications.topic): settings.notify_topic_arn,
             logical_id(stack.pipeline.state_machine): settings.state_machine_arn}
    template = deployment.templates[stack.stack_name]
    return TemplateView(template, physical_names(template, account=ACCOUNT, region=REGION, names=names),
                        ACCOUNT, REGION)


def recorded_requests(view: TemplateView, calls, results_bucket: str) -> tuple[dict, list]:
    """component -> set of Requests; and the calls no mapping covers."""
    by_component, unmapped = defaultdict(set), []
    roles = component_roles(view.template)
    for call in calls:
        if call.component is None:
            continue  # the harness and the lab's upload: not a deployed component
        pairs = awscalls.iam_requests(call, ACCOUNT)
        if pairs is None:
            unmapped.append(call)
            continue
        role = roles[call.component]
        for action, resource in pairs:
            demo_bucket = f"arn:aws:s3:::{DEMO_RESULTS}"
            if resource == demo_bucket or resource.startswith(demo_bucket + "/"):
                resource = f"arn:aws:s3:::{results_bucket}" + resource[len(demo_bucket):]
            by_component[call.component].add(Request(principal_arn(role), action, resource))
            key = view.encryption_key(resource) if action == "sns:Publish" else None
            if key:  # publishing to an encrypted topic also uses its key, as the publisher
                for kms in ("kms:GenerateDataKey", "kms:Decrypt"):
                    by_component[call.component].add(Request(principal_arn(role), kms, key))
    return by_component, unmapped


def documented_requests(view: TemplateView) -> dict[Request, tuple[str, str]]:
    """Request -> (who, doc) of every DOCUMENTED row, expanded over the template's resources."""
    resources = view.resources
    roles = component_roles(view.template)
    of_type = defaultdict(list)
    for logical, resource in resources.items():
        of_type[resource["Type"]].append(logical)
    lambdas = {f"lambda:{r['Properties']['Handler'].split('.')[1]}": logical
               for logical, r in resources.items()
               if r["Type"] == "AWS::Lambda::Function" and r["Properties"]["Handler"].startswith("functions.")}
    values = {
        "queue": [view.names[q] for q in of_type["AWS::Batch::JobQueue"]],
        "job_definition": [view.names[d] for d in of_type["AWS::Batch::JobDefinition"]],
        "job": [f"arn:aws:batch:{REGION}:{ACCOUNT}:job/{JOB_ID}"],
        "batch_rule": [f"arn:aws:events:{REGION}:{ACCOUNT}:rule/StepFunctionsGetEventsForBatchJobsRule"],
        "repository": [f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/cdk-hnb659fds-container-assets-{ACCOUNT}-{REGION}"],
        "job_log_stream": [view.names[f"{g}.Arn"].removesuffix("*") + "log-stream:align/default/1"
                           for g in of_type["AWS::Logs::LogGroup"] if g.startswith("BatchJobLogs")],
        "topic": [view.names[t] for t in of_type["AWS::SNS::Topic"]],
        "topic_key": [view.names[f"{k}.Arn"] for k in of_type["AWS::KMS::Key"]],
        "alarm": [view.names[f"{a}.Arn"] for a in of_type["AWS::CloudWatch::Alarm"]],
        "budget": [f"arn:aws:budgets::{ACCOUNT}:budget/{PREFIX}-monthly"] if of_type["AWS::Budgets::Budget"] else [],
        "site_object": [f"arn:aws:s3:::{PREFIX}-site/S1/S1-abc/index.html"],
        "distribution": [f"arn:aws:cloudfront::{ACCOUNT}:distribution/{d}" for d in of_type["AWS::CloudFront::Distribution"]],  # noqa: E501
    }
    out = {}
    for who, action, resource, context, doc in DOCUMENTED:
        if who == "lambda" or who == "events.amazonaws.com":
            targets = []
            for name, function in lambdas.items():
                rule = next(logical for logical, r in resources.items() if r["Type"] == "AWS::Events::Rule"
                            and any(t["Arn"] == {"Fn::GetAtt": [function, "Arn"]} for t in r["Properties"]["Targets"]))
                (target,) = resources[rule]["Properties"]["Targets"]
                queue = target["DeadLetterConfig"]["Arn"]["Fn::GetAtt"][0]
                group = next(g for g in of_type["AWS::Logs::LogGroup"]
                             if g.startswith(f"Catalog{name.split(':')[1].capitalize()}Logs"))
                targets.append((roles[name], {"function": view.names[f"{function}.Arn"], "rule": view.names[f"{rule}.Arn"],  # noqa: E501
                                              "dead_letters": view.names[f"{queue}.Arn"],
                                              "function_log_stream": view.names[f"{group}.Arn"].removesuffix("*")
                                              + "log-stream:2025/01/01/[$LATEST]abc"}))
            for role, filled in targets:
                principal = principal_arn(role) if who == "lambda" else who
                if resource.strip("{}") in filled:
                    ctx = tuple((k, v.format(**filled)) for k, v in context)
                    out[Request(principal, action, resource.format(**filled), ctx)] = (who, doc)
            continue
        if who == "budgets.amazonaws.com" and not values["budget"]:
            continue  # no budget configured, nothing publishes as Budgets
        principal = principal_arn(roles[who]) if who in roles else who
        keys = [k for k in values if f"{{{k}}}" in resource or any(f"{{{k}}}" in v for _, v in context)]
        combos = [{}]
        for key in keys:
            combos = [{**c, key: v} for c in combos for v in values[key]]
        for filled in combos:
            ctx = tuple((k, v.format(**filled)) for k, v in context)
            out[Request(principal, action, resource.format(**filled), ctx)] = (who, doc)
    return out


def identity(view: TemplateView, request: Request) -> list[dict]:
    role = request.principal.rsplit("/", 1)[-1] if request.principal.startswith("arn:aws:iam::") else None
    return view.role_policies(role) if role else []


def test_every_call_of_the_demo_and_every_documented_integration_is_allowed(deployment, recorded):
    calls, cloud = recorded
    view = view_of(deployment, cloud)
    results_bucket = f"{PREFIX}-results-{ACCOUNT}"
    by_component, unmapped = recorded_requests(view, calls, results_bucket)
    assert unmapped == [], "map these operations in localcloud.awscalls.iam_requests"
    assert {"lambda:catalog", "lambda:trigger", "lambda:status", "job:align", "job:publish"} <= set(by_component)

    cases = {r: identity(view, r) for requests in by_component.values() for r in requests}
    documented = documented_requests(view)
    cases.update({r: identity(view, r) for r in documented})
    decisions = simulate(view, cases)

    lines = ["# IAM sufficiency", "", "## Calls recorded in the demo", "",
             "| component | action | resource | decision |", "|---|---|---|---|"]
    for component, requests in sorted(by_component.items()):
        for r in sorted(requests, key=lambda r: (r.action, r.resource)):
            lines.append(f"| {component} | {r.action} | {r.resource} | {decisions[r][0] or decisions[r][1]} |")
    lines += ["", "## AWS-documented permissions of the integrations", "",
              "| principal | action | resource | decision | documented at |", "|---|---|---|---|---|"]
    for r, (who, doc) in documented.items():
        lines.append(f"| {who} | {r.action} | {r.resource} | {decisions[r][0] or decisions[r][1]} | {doc} |")
    lines += ["", "## Granted but never used (by a recorded call or a documented integration)", ""]
    by_role = defaultdict(list)
    for request in cases:
        by_role[request.principal].append(request)
    for principal, requests in sorted(by_role.items()):
        if principal.startswith("arn:aws:iam::"):
            role = principal.rsplit("/", 1)[-1]
            lines.append(f"- {role}: " + "; ".join(unused_grants(view.role_policies(role), requests)))
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text("\n".join(lines) + "\n")

    denied = [f"{r.principal} {r.action} {r.resource}: {d or e}" for r, (d, e) in decisions.items() if d != "Allowed"]
    assert denied == [], f"{len(denied)} request(s) the deployed policies would refuse (report: {REPORT}):\n" + \
        "\n".join(denied)


def test_the_check_refuses_what_the_template_does_not_allow(deployment, recorded):
    """The evaluator is live: the same calls by the wrong role, or an action nobody was granted, are denied."""
    calls, cloud = recorded
    view = view_of(deployment, cloud)
    roles = component_roles(view.template)
    by_component, _ = recorded_requests(view, calls, f"{PREFIX}-results-{ACCOUNT}")
    writes = [r for r in by_component["job:publish"] if r.action == "s3:PutObject" and PREFIX + "-results" in r.resource]  # noqa: E501
    assert writes
    as_stitch = {Request(principal_arn(roles["job:align"]), r.action, r.resource): [] for r in writes}
    for request in as_stitch:
        as_stitch[request] = identity(view, request)
    bogus = Request(principal_arn(roles["lambda:status"]), "states:StartExecution", cloud.settings.state_machine_arn)
    decisions = simulate(view, {**as_stitch, bogus: identity(view, bogus)})
    assert {d for d, _ in decisions.values()} == {"ImplicitlyDenied"}


def test_every_request_of_the_lambdas_and_jobs_to_our_buckets_names_their_owner(recorded):
    """ExpectedBucketOwner (and ExpectedSourceBucketOwner on copies) = the deploying account on every S3
    request the Lambdas and the stage jobs make to the app's buckets (set from the environment the CDK app
    gives them): S3 refuses the request if a bucket of that name belongs to anyone else."""
    calls, cloud = recorded
    ours = {cloud.ingest_bucket, cloud.settings.work_bucket, cloud.settings.results_bucket, cloud.site_bucket}
    to_ours = [c for c in calls if c.service == "s3" and (c.component or "").startswith(("lambda:", "job:"))
               and c.params.get("Bucket") in ours]
    assert {c.component for c in to_ours} >= {"lambda:catalog", "lambda:trigger", "job:align", "job:publish"}
    assert {c.params["Bucket"] for c in to_ours} == ours
    unnamed = [(c.component, c.operation, c.params["Bucket"]) for c in to_ours
               if c.params.get("ExpectedBucketOwner") != ACCOUNT]
    assert unnamed == []
    copies = [c for c in to_ours if "CopySource" in c.params]
    assert all(c.params.get("ExpectedSourceBucketOwner") == ACCOUNT for c in copies)


def test_recorded_calls_keep_their_parameters(recorded):
    calls, _ = recorded
    gets = [c for c in calls if c.component == "lambda:catalog" and c.operation == "GetObject"]
    assert gets and all(c.params.get("Range", "").startswith("bytes=") for c in gets)  # ranged reads, recorded
    assert json.dumps(calls[0].params)
