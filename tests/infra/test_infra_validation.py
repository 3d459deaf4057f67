"""cdk-nag (AwsSolutions) and CDK's template validation pass with reasoned acknowledgements; cfn-lint finds no error."""
from __future__ import annotations

import json

import pytest
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


def test_every_acknowledgement_is_specific_and_gives_a_reason(synth):
    acks = acknowledgements(synth)
    assert len({rule for _, rule, _ in acks}) >= 10, "the report should list the acknowledged findings"
    for path, rule, reason in acks:
        assert rule.startswith("AwsSolutions-"), (path, rule)
        assert len(reason.split()) >= 8, f"{path} {rule}: reason too thin: {reason!r}"
        if rule.startswith("AwsSolutions-IAM5"):
            assert "[" in rule, f"{path}: wildcard acknowledged wholesale, not per finding"


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
