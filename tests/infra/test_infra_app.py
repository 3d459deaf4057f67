"""``python app.py`` (what ``cdk synth`` runs) synthesizes both stacks offline, or stops on bad config."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from cdk_templates import ROOT

from infra.config import ENVIRONMENT_KEY, ENVIRONMENTS_KEY


def run_app(tmp_path, context: dict) -> subprocess.CompletedProcess:
    """Run app.py the way the CDK CLI does: context in CDK_CONTEXT_JSON, output in CDK_OUTDIR."""
    env = {**os.environ, "CDK_OUTDIR": str(tmp_path / "cdk.out"),
           "CDK_CONTEXT_JSON": json.dumps({"aws:cdk:bundling-stacks": [], **context})}
    return subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_app_synthesizes_the_default_environment_offline(tmp_path):
    done = run_app(tmp_path, {})
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "cdk.out" / "manifest.json").read_text())
    stacks = {name: artifact["environment"] for name, artifact in manifest["artifacts"].items()
              if artifact["type"] == "aws:cloudformation:stack"}
    assert stacks == {"atlas-dev-results": "aws://unknown-account/us-east-1",
                      "atlas-dev-pipeline": "aws://unknown-account/us-east-1"}
    report = json.loads((tmp_path / "cdk.out" / "validation-report.json").read_text())
    assert all(p["conclusion"] == "success" for p in report["pluginReports"])


def test_bad_config_stops_synth_with_every_problem_and_no_traceback(tmp_path):
    bad = {"grantee_account_ids": ["12345"], "gpu": True, "gpu_instance_types": [], "results_region": "eu-west-1"}
    done = run_app(tmp_path, {ENVIRONMENT_KEY: "broken", ENVIRONMENTS_KEY: {"broken": bad}})
    assert done.returncode == 1
    assert "grantee_account_ids[0] '12345' is not a 12-digit AWS account ID" in done.stderr
    assert "gpu is true but gpu_instance_types is empty" in done.stderr
    assert "results_region 'eu-west-1' is not 'us-east-1'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "cdk.out" / "manifest.json").exists()


def test_unknown_environment_is_named(tmp_path):
    done = run_app(tmp_path, {ENVIRONMENT_KEY: "prod"})
    assert done.returncode == 1 and "environment 'prod' is not defined -- fix: choose one of 'dev'" in done.stderr
