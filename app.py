#!/usr/bin/env python3
"""The CDK app: ``cdk synth`` / ``cdk deploy`` (or ``python app.py``, which writes cdk.out/).

The environment comes from context ``atlas:environment`` (default in cdk.json), its settings
from ``atlas:environments`` (see docs/deploy.md). cdk.json's context is also applied when this
file runs without the CDK CLI, so ``python app.py`` synthesizes the same templates.
"""
import json
import os
import sys
from pathlib import Path

from aws_cdk import App

from infra.config import ConfigError, load_config
from infra.stacks import build_app

CDK_JSON = Path(__file__).resolve().parent / "cdk.json"

context = json.loads(CDK_JSON.read_text())["context"]
if "CDK_CONTEXT_JSON" not in os.environ:
    # Run directly (not by the CDK CLI): synthesize offline, without packaging the Lambda code.
    # The asset hash comes from the sources, so the templates are the same as the CLI's.
    context.setdefault("aws:cdk:bundling-stacks", [])
app = App(context=context)  # the CLI's -c values still win
try:
    config = load_config(app.node.try_get_context, default_account=os.environ.get("CDK_DEFAULT_ACCOUNT"))
except ConfigError as exc:
    sys.exit(f"{exc}\n(see docs/deploy.md for every setting)")
build_app(app, config)
app.synth()
