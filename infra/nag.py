"""cdk-nag (AwsSolutions pack) as a synth-time validation, and the one way to acknowledge a finding.

Every acknowledgement sits next to the construct it concerns, with the reason a reviewer needs.
cdk-nag 3 acknowledges findings one by one (``AwsSolutions-IAM5[Resource::<arn>]``), so
:func:`acknowledge_wildcards` spells a wildcard's finding id the way cdk-nag renders it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aws_cdk import Acknowledgment, App, Stack, Validations
from cdk_nag import AwsSolutionsChecks
from constructs import IConstruct

PLUGIN = "AwsSolutions"
# The wildcard actions of CDK's bucket.grant_read: a read-only set, scoped to one bucket by the grant.
S3_READ_ACTIONS = ("s3:GetObject*", "s3:GetBucket*", "s3:List*")


def add_checks(app: App) -> None:
    """Run the AwsSolutions rules after synth; an unacknowledged finding fails the synth.

    Acknowledged findings are listed with their reasons in ``cdk.out/validation-report.json``.
    """
    Validations.of(app).add_plugins(AwsSolutionsChecks(app))


def acknowledge(scope: IConstruct, rule: str, reason: str) -> None:
    """Acknowledge finding ``rule`` (e.g. ``AwsSolutions-CFR1``) on ``scope`` and below.

    Qualified with the plugin name, so CDK's validation (not cdk-nag silently) suppresses it and
    records it in the validation report.
    """
    Validations.of(scope).acknowledge(Acknowledgment(id=f"{PLUGIN}::{rule}", reason=reason))


def acknowledge_wildcards(scope: IConstruct, reason: str, *, actions: Iterable[str] = (),
                          resources: Iterable[str] = ()) -> None:
    """Acknowledge IAM5 (wildcard) findings for these actions and resource ARNs (tokens allowed)."""
    for action in actions:
        acknowledge(scope, f"AwsSolutions-IAM5[Action::{action}]", reason)
    for arn in resources:
        acknowledge(scope, f"AwsSolutions-IAM5[Resource::{render_intrinsics(Stack.of(scope).resolve(arn))}]", reason)


def managed_policy_finding(name: str) -> str:
    """IAM4 finding id of an AWS managed policy, e.g. ``service-role/AWSLambdaBasicExecutionRole``."""
    return f"AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/{name}]"


def render_intrinsics(value: Any) -> str:
    """A resolved CloudFormation value as cdk-nag prints it: ``<Logical.Attr>``, ``<AWS::AccountId>``.

    Also how the infra tests read templates (e.g. a state machine's DefinitionString).
    """
    if isinstance(value, str):
        return value
    if "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(render_intrinsics(p) for p in parts)
    if "Fn::GetAtt" in value:
        return "<{}.{}>".format(*value["Fn::GetAtt"])
    if "Ref" in value:
        return f"<{value['Ref']}>"
    raise ValueError(f"cannot render {value!r} as a cdk-nag finding id")
