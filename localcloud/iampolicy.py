"""Evaluate IAM requests against the policies of a synthesized CloudFormation template, offline.

Test tooling for the IAM sufficiency check (tests/infra/test_iam_sufficiency.py), never shipped.
The evaluation is AWS's policy logic as implemented by ``@cloud-copilot/iam-simulate`` (npm,
installed by ``./dev setup`` into ``localcloud/iamcheck``): identity policies, the resource's own
policy (bucket, topic, key, queue, Lambda permissions), explicit denies, every condition operator,
KMS key policy semantics; it also refuses actions and resource ARNs that IAM does not know.

Intrinsics are resolved with ``names``: logical id -> physical name or ARN (``Ref``), and
``"<id>.<attr>"`` -> value (``Fn::GetAtt``); a bucket's ``Arn`` follows from its name.
"""
from __future__ import annotations

import fnmatch
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIMULATOR = Path(__file__).resolve().parent / "iamcheck"
# Context every request of ours carries: boto3 speaks TLS 1.2+ to every endpoint.
TLS_CONTEXT = {"aws:SecureTransport": "true"}


@dataclass
class TemplateView:
    """A template's resources with intrinsics resolved to the physical names of one deployment."""

    template: dict
    names: dict[str, str]
    account: str
    region: str
    unresolved: set[str] = field(default_factory=set)

    @property
    def resources(self) -> dict[str, dict]:
        return self.template["Resources"]

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "Ref" in value:
            pseudo = {"AWS::AccountId": self.account, "AWS::Region": self.region, "AWS::Partition": "aws",
                      "AWS::URLSuffix": "amazonaws.com"}
            return pseudo.get(value["Ref"]) or self._name(value["Ref"])
        if "Fn::GetAtt" in value:
            logical, attribute = value["Fn::GetAtt"]
            if f"{logical}.{attribute}" in self.names:
                return self.names[f"{logical}.{attribute}"]
            if attribute == "Arn" and self.resources.get(logical, {}).get("Type") == "AWS::S3::Bucket":
                return f"arn:aws:s3:::{self._name(logical)}"
            return self._name(f"{logical}.{attribute}")
        if "Fn::Join" in value:
            separator, parts = value["Fn::Join"]
            return separator.join(str(self.resolve(p)) for p in parts)
        return {k: self.resolve(v) for k, v in value.items()}

    def _name(self, key: str) -> str:
        if key not in self.names:
            self.unresolved.add(key)  # stands for a resource no request names: matches nothing
            return f"unresolved:{key}"
        return self.names[key]

    def role_policies(self, role_id: str) -> list[dict]:
        """Identity policies of a role: its inline policies, the AWS::IAM::Policy resources attached to it,
        and the AWS managed policies it names (documents from moto's copy of them)."""
        role = self.resources[role_id]["Properties"]
        policies = [{"name": p["PolicyName"], "policy": self.resolve(p["PolicyDocument"])}
                    for p in role.get("Policies", [])]
        for logical, resource in self.resources.items():
            if resource["Type"] == "AWS::IAM::Policy" and {"Ref": role_id} in resource["Properties"].get("Roles", []):
                policies.append({"name": logical, "policy": self.resolve(resource["Properties"]["PolicyDocument"])})
        for arn in role.get("ManagedPolicyArns", []):
            name = str(self.resolve(arn)).rsplit("/", 1)[-1]
            policies.append({"name": name, "policy": aws_managed_policy(name)})
        return policies

    def resource_policy(self, arn: str) -> dict | None:
        """The policy of the resource ``arn`` names (bucket of an object ARN, topic, key, queue, function)."""
        if arn.startswith("arn:aws:s3:::"):
            bucket = arn.removeprefix("arn:aws:s3:::").split("/", 1)[0]
            return self._policy_of("AWS::S3::BucketPolicy", "Bucket", bucket)
        if arn.startswith("arn:aws:sns:"):
            return self._policy_of("AWS::SNS::TopicPolicy", "Topics", arn)
        if arn.startswith("arn:aws:sqs:"):
            return self._policy_of("AWS::SQS::QueuePolicy", "Queues", arn)
        if arn.startswith("arn:aws:kms:"):
            for logical, resource in self.resources.items():
                if resource["Type"] == "AWS::KMS::Key" and self.resolve({"Fn::GetAtt": [logical, "Arn"]}) == arn:
                    return self.resolve(resource["Properties"]["KeyPolicy"])
        if arn.startswith("arn:aws:lambda:"):
            return self._lambda_permissions(arn)
        return None

    def _policy_of(self, type_: str, key: str, target: str) -> dict | None:
        for resource in self.resources.values():
            if resource["Type"] != type_:
                continue
            targets = self.resolve(resource["Properties"][key])
            targets = targets if isinstance(targets, list) else [targets]
            # a queue policy names queue URLs; the names map gives each queue's URL and ARN
            if target in targets or any(self.names.get(f"url:{t}") == target for t in targets):
                return self.resolve(resource["Properties"]["PolicyDocument"])
        return None

    def _lambda_permissions(self, function_arn: str) -> dict | None:
        statements = []
        for logical, resource in self.resources.items():
            props = resource["Properties"] if resource["Type"] == "AWS::Lambda::Permission" else None
            if props and self.resolve(props["FunctionName"]) == function_arn:
                principal = props["Principal"]
                statement = {"Sid": logical, "Effect": "Allow", "Action": props["Action"], "Resource": function_arn,
                             "Principal": {"Service": principal} if principal.endswith(".amazonaws.com")
                             else {"AWS": principal}}
                if "SourceArn" in props:
                    statement["Condition"] = {"ArnLike": {"aws:SourceArn": self.resolve(props["SourceArn"])}}
                statements.append(statement)
        return {"Version": "2012-10-17", "Statement": statements} if statements else None

    def encryption_key(self, topic_arn: str) -> str | None:
        """ARN of the KMS key of an SNS topic (publishing to it also needs the key)."""
        for logical, resource in self.resources.items():
            if resource["Type"] == "AWS::SNS::Topic" and self.resolve({"Ref": logical}) == topic_arn:
                key = resource["Properties"].get("KmsMasterKeyId")
                return self.resolve(key) if key else None
        return None


def aws_managed_policy(name: str) -> dict:
    """The document of an AWS managed policy, from moto's copy of AWS's managed policies."""
    from moto.iam.aws_managed_policies import aws_managed_policies_data

    return json.loads(aws_managed_policies_data)[name]["Document"]


@dataclass(frozen=True)
class Request:
    """One request to evaluate: who (a role ARN or a service principal), what, on which resource."""

    principal: str
    action: str
    resource: str
    context: tuple[tuple[str, str], ...] = ()


def simulate(view: TemplateView, cases: dict[Request, list[dict]]) -> dict[Request, tuple[str | None, Any]]:
    """Evaluate each request with its identity policies (and its resource's policy from the template).

    Returns request -> (decision, errors): decision "Allowed", "ExplicitlyDenied", "ImplicitlyDenied",
    or None with the simulator's errors when the request is not valid IAM (unknown action, ARN).
    """
    batch = []
    for i, (request, identity) in enumerate(cases.items()):
        simulation = {
            "identityPolicies": identity,
            "resourcePolicy": view.resource_policy(request.resource),
            "request": {"action": request.action, "principal": request.principal,
                        "resource": {"resource": request.resource, "accountId": view.account},
                        "contextVariables": {**TLS_CONTEXT, **dict(request.context)}},
        }
        if simulation["resourcePolicy"] is None:
            del simulation["resourcePolicy"]
        batch.append({"id": i, "simulation": simulation})
    done = subprocess.run(["node", str(SIMULATOR / "simulate.mjs")], input=json.dumps(batch), text=True,
                          capture_output=True, cwd=SIMULATOR, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"iam-simulate failed (run ./dev setup to install it): {done.stderr[-2000:]}")
    results = {r["id"]: (r["decision"], r["errors"]) for r in json.loads(done.stdout)}
    return {request: results[i] for i, request in enumerate(cases)}


def unused_grants(policies: list[dict], requests: list[Request]) -> list[str]:
    """``action on resource`` of every Allow (action pattern x resource pattern) of ``policies`` that no
    request matches: what a role is granted but never used."""
    def matches(pattern: str, value: str, *, case: bool) -> bool:
        return fnmatch.fnmatchcase(value if case else value.lower(), pattern if case else pattern.lower())

    out = []
    for policy in policies:
        for statement in policy["policy"]["Statement"]:
            if statement["Effect"] != "Allow":
                continue
            actions, resources = statement["Action"], statement.get("Resource", "*")
            for action in [actions] if isinstance(actions, str) else actions:
                for resource in [resources] if isinstance(resources, str) else resources:
                    if not any(matches(action, r.action, case=False) and matches(resource, r.resource, case=True)
                               for r in requests):
                        out.append(f"{action} on {resource}")
    return sorted(set(out))


def physical_names(template: dict, *, account: str, region: str, names: dict[str, str]) -> dict[str, str]:
    """Names and ARNs of every resource of ``template`` for :class:`TemplateView`: ``names`` gives the
    physical name (``Ref``) of those a request may name (buckets, tables, topic, state machine); the
    others are named after their logical id, and ARNs follow from the names as AWS forms them."""
    out: dict[str, str] = {}
    prefix = f"{region}:{account}"
    for logical, resource in template["Resources"].items():
        props, type_ = resource.get("Properties", {}), resource["Type"]
        name = names.get(logical, logical)
        if type_ == "AWS::S3::Bucket":
            out[logical] = name
        elif type_ == "AWS::DynamoDB::Table":
            out[logical], out[f"{logical}.Arn"] = name, f"arn:aws:dynamodb:{prefix}:table/{name}"
        elif type_ == "AWS::SNS::Topic":
            out[logical] = name if name.startswith("arn:") else f"arn:aws:sns:{prefix}:{name}"
        elif type_ == "AWS::SQS::Queue":
            url, arn = f"https://sqs.{region}.amazonaws.com/{account}/{name}", f"arn:aws:sqs:{prefix}:{name}"
            out[logical], out[f"{logical}.Arn"], out[f"url:{url}"] = url, arn, arn
        elif type_ == "AWS::StepFunctions::StateMachine":
            out[logical] = name if name.startswith("arn:") else f"arn:aws:states:{prefix}:stateMachine:{name}"
        elif type_ == "AWS::Batch::JobQueue":
            out[logical] = out[f"{logical}.JobQueueArn"] = f"arn:aws:batch:{prefix}:job-queue/{props['JobQueueName']}"
        elif type_ == "AWS::Batch::JobDefinition":
            out[logical] = f"arn:aws:batch:{prefix}:job-definition/{props['JobDefinitionName']}:1"
        elif type_ == "AWS::Logs::LogGroup":
            group = props.get("LogGroupName", name)
            out[logical], out[f"{logical}.Arn"] = group, f"arn:aws:logs:{prefix}:log-group:{group}:*"
        else:
            kind = {"AWS::Lambda::Function": "function:", "AWS::Events::Rule": "rule/", "AWS::KMS::Key": "key/",
                    "AWS::CloudWatch::Alarm": "alarm:"}.get(type_)
            service = type_.split("::")[1].lower()
            out[logical] = name
            if kind:
                out[f"{logical}.Arn"] = f"arn:aws:{'events' if service == 'events' else service}:{prefix}:{kind}{name}"
            if type_ == "AWS::IAM::Role":
                out[f"{logical}.Arn"] = f"arn:aws:iam::{account}:role/{name}"
    return out
