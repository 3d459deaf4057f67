"""``atlas doctor``: check a deployment, read-only, with your credentials."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from atlas.aws.release import RESULTS_REGION

# Defaults of infra/config.py's AtlasConfig for the keys doctor reads (cdk.json may leave them out).
DEFAULT_PREFIX, DEFAULT_REGION = "atlas", RESULTS_REGION


def doctor(cdk_json: Path = typer.Option(Path("cdk.json"), help="the CDK app's cdk.json with the environments"),
           environment: str = typer.Option(None, "--environment", "-e",
                                           help="environment in cdk.json (default: its atlas:environment)")) -> None:
    """One line per check with the fix; exit 1 if any check fails (see docs/runbook.md)."""
    import boto3

    from atlas.aws.doctor import Deployment, check_deployment

    context = json.loads(cdk_json.read_text())["context"]
    name = environment or context["atlas:environment"]
    settings = context["atlas:environments"][name]
    session = boto3.Session()
    account = settings.get("account") or session.client("sts").get_caller_identity()["Account"]
    deployment = Deployment(prefix=settings.get("name_prefix", DEFAULT_PREFIX),
                            region=settings.get("region", DEFAULT_REGION), account=account,
                            grantee_account_ids=tuple(settings.get("grantee_account_ids", ())))
    checks = check_deployment(session, deployment)
    for check in checks:
        typer.secho(str(check), fg="green" if check.ok else "red")
    failed = [c for c in checks if not c.ok]
    if failed:
        typer.secho(f"{len(failed)} of {len(checks)} checks failed ({name}, account {account})", fg="red", bold=True)
        raise typer.Exit(1)
    typer.secho(f"all {len(checks)} checks passed ({name}, account {account})", fg="green", bold=True)


def register(app: typer.Typer) -> None:
    app.command()(doctor)
