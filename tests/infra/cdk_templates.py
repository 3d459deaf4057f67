"""Synthesis of the CDK app for the infra tests, and helpers over the synthesized templates.

The fixtures in conftest.py synthesize each configuration once per session.

Two configurations cover both shapes of the deployment:

``full``  processing in eu-west-1 (results stack in us-east-1), Spot on, GPU queue on, two grantee
          accounts, e-mail subscriptions, segmentation weights, a monthly budget, a fixed account.
``lean``  everything in us-east-1, on-demand only, no GPU queue, no grantees, no budget, no account.

Synth runs offline: cdk.json's context is applied as the CLI would, Lambda bundling is skipped
(``aws:cdk:bundling-stacks=[]``) and the container images are only recorded. cdk-nag and CDK's
CloudFormation validation run as in ``cdk synth``; a failure is kept for the validation tests
instead of breaking every other test.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# jsii warns on stderr that this machine's Node 20 is end-of-life; synth works the same.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

from aws_cdk import App, Stack
from aws_cdk.assertions import Template

from infra.config import ENVIRONMENT_KEY, ENVIRONMENTS_KEY, AtlasConfig, load_config
from infra.nag import render_intrinsics
from infra.stacks import PipelineStack, ResultsStack, build_app

ROOT = Path(__file__).resolve().parents[2]
CDK_CONTEXT = json.loads((ROOT / "cdk.json").read_text())["context"]

FULL = {
    "name_prefix": "atlas-test", "account": "123456789012", "region": "eu-west-1",
    "grantee_account_ids": ["111122223333", "044455556666"],
    "cpu_instance_types": ["c6i", "m6i.4xlarge"], "cpu_max_vcpus": 128, "spot": True,
    "gpu": True, "gpu_instance_types": ["g5", "g6"], "gpu_max_vcpus": 32,
    "notification_emails": ["lab@example.org", "ops@example.org"], "log_retention_days": 30,
    "work_retention_days": 10, "noncurrent_version_days": 60, "scratch_volume_gib": 300, "monthly_budget_usd": 500,
    "segment_weights_url": "https://models.example.org/unet.onnx", "segment_weights_sha256": "ab" * 32,
    "tags": {"project": "tissue-atlas", "cost-center": "lab-42"},
}
LEAN = {"name_prefix": "lean", "region": "us-east-1", "spot": False, "gpu": False}


def context_for(settings: dict[str, Any]) -> dict[str, Any]:
    """cdk.json's context with ``settings`` as the selected environment, bundling skipped."""
    return {**CDK_CONTEXT, "aws:cdk:bundling-stacks": [], ENVIRONMENT_KEY: "test",
            ENVIRONMENTS_KEY: {"test": settings}}


@dataclass
class Synth:
    """One synthesized app: its config, stacks, templates, cloud assembly and validation outcome."""

    config: AtlasConfig
    results_stack: ResultsStack
    pipeline_stack: PipelineStack
    results: Template
    pipeline: Template
    outdir: Path
    error: Exception | None

    @property
    def templates(self) -> dict[str, dict]:
        """Template JSON by stack name."""
        return {stack.stack_name: json.loads((self.outdir / stack.template_file).read_text())
                for stack in (self.results_stack, self.pipeline_stack)}


def synthesize(settings: dict[str, Any], outdir: Path) -> Synth:
    app = App(context=context_for(settings), outdir=str(outdir))
    config = load_config(app.node.try_get_context)
    results_stack, pipeline_stack = build_app(app, config)
    try:
        app.synth()
        error = None
    except RuntimeError as exc:  # validation failed; templates are written before validation
        error = exc
    templates = {s: Template.from_json(json.loads((outdir / s.template_file).read_text()))
                 for s in (results_stack, pipeline_stack)}
    return Synth(config, results_stack, pipeline_stack, templates[results_stack], templates[pipeline_stack],
                 outdir, error)


# --- helpers over template JSON ------------------------------------------------------------------
def resources(template: Template, type_: str, id_prefix: str = "") -> dict[str, dict]:
    """Resources of a type whose logical id starts with ``id_prefix`` (construct path without '/')."""
    return {k: v for k, v in template.find_resources(type_).items() if k.startswith(id_prefix)}


def one(template: Template, type_: str, id_prefix: str) -> tuple[str, dict]:
    found = resources(template, type_, id_prefix)
    assert len(found) == 1, f"expected one {type_} with id {id_prefix}*, found {sorted(found)}"
    return next(iter(found.items()))


def state_machine_definition(template: Template) -> dict:
    """The state machine's Amazon States Language document (intrinsics rendered as ``<...>``)."""
    _, machine = one(template, "AWS::StepFunctions::StateMachine", "Pipeline")
    return json.loads(render_intrinsics(machine["Properties"]["DefinitionString"]))


def policy_statements(template: Template, id_prefix: str) -> list[dict]:
    """Statements of the IAM policies whose logical id starts with ``id_prefix``."""
    return [s for p in resources(template, "AWS::IAM::Policy", id_prefix).values()
            for s in p["Properties"]["PolicyDocument"]["Statement"]]


def actions_of(statement: dict) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else action


def logical_id(construct) -> str:
    """Logical id of an L2 construct's CloudFormation resource."""
    stack = Stack.of(construct)
    return stack.resolve(stack.get_logical_id(construct.node.default_child))
