"""Catalog: tables, the three Lambdas wired to their events with dead-letter queues, least privilege."""
from __future__ import annotations

import ast
import inspect

from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer
from cdk_templates import actions_of, logical_id, one, policy_statements, resources

from atlas.aws import catalog
from infra.bundling import ARCHITECTURE, REPO_ROOT, RUNTIME
from infra.nag import render_intrinsics

HANDLERS = catalog.HANDLERS


def test_catalog_table_on_demand_with_point_in_time_recovery_retained(synth):
    _, table = one(synth.pipeline, "AWS::DynamoDB::Table", "CatalogTable")
    props = table["Properties"]
    assert props["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"},
                                  {"AttributeName": "sk", "KeyType": "RANGE"}]
    assert props["AttributeDefinitions"] == [{"AttributeName": "pk", "AttributeType": "S"},
                                             {"AttributeName": "sk", "AttributeType": "S"}]
    assert props["BillingMode"] == "PAY_PER_REQUEST"
    assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert props["DeletionProtectionEnabled"] is True and table["DeletionPolicy"] == "Retain"


def test_idempotency_table_expires_records(synth):
    _, table = one(synth.pipeline, "AWS::DynamoDB::Table", "CatalogIdempotencyTable")
    props = table["Properties"]
    powertools = inspect.signature(DynamoDBPersistenceLayer).parameters  # what the handlers' store expects
    assert props["KeySchema"] == [{"AttributeName": powertools["key_attr"].default, "KeyType": "HASH"}]
    assert props["TimeToLiveSpecification"] == {"AttributeName": powertools["expiry_attr"].default, "Enabled": True}
    assert props["BillingMode"] == "PAY_PER_REQUEST"


def function(synth, name: str) -> tuple[str, dict]:
    return one(synth.pipeline, "AWS::Lambda::Function", f"Catalog{name.capitalize()}Function")


def settings_env_names() -> list[str]:
    return list(catalog.Settings("a", "b", "c", "d", "e", "f", "g", "h", overview_site_url="i").to_env())


def test_each_handler_exists_and_gets_the_settings_atlas_catalog_reads(full):
    stack = full.pipeline_stack
    for name in HANDLERS:
        _, fn = function(full, name)
        props = fn["Properties"]
        module, attr = props["Handler"].rsplit(".", 1)
        source = REPO_ROOT / (module.replace(".", "/") + ".py")
        body = ast.parse(source.read_text()).body  # the entry point: a function, or one made by CatalogFunction
        assert attr in {n.name for n in body if isinstance(n, ast.FunctionDef)} | {
            t.id for n in body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        env = props["Environment"]["Variables"]
        assert set(env) == set(settings_env_names())
        assert env[catalog.ENV_CATALOG_TABLE] == {"Ref": logical_id(stack.catalog.table)}
        assert env[catalog.ENV_STATE_MACHINE_ARN] == {"Ref": logical_id(stack.pipeline.state_machine)}
        assert env[catalog.ENV_RESULTS_BUCKET] == "atlas-test-results-123456789012"
        assert env[catalog.ENV_INGEST_BUCKET] == {"Ref": logical_id(stack.storage.ingest)}
        assert env[catalog.ENV_BUCKET_OWNER] == "123456789012"  # the deploying account owns every bucket
        assert env[catalog.ENV_SERVICE_NAME] == catalog.SERVICE_NAME
        assert env[catalog.ENV_OVERVIEW_SITE_URL] == {"Fn::Join": ["", [
            "https://", {"Fn::GetAtt": [logical_id(stack.site.distribution), "DomainName"]}, "/"]]}
        assert (props["Runtime"], props["Architectures"]) == (RUNTIME.name, [ARCHITECTURE.name])
        assert props["TracingConfig"] == {"Mode": "Active"}


def rule_for(synth, name: str) -> dict:
    function_id, _ = function(synth, name)
    (rule,) = [r["Properties"] for r in resources(synth.pipeline, "AWS::Events::Rule").values()
               if r["Properties"]["Targets"][0]["Arn"] == {"Fn::GetAtt": [function_id, "Arn"]}]
    return rule


def test_rules_use_the_event_patterns_of_atlas_catalog(full):
    stack = full.pipeline_stack
    ingest, machine = {"Ref": logical_id(stack.storage.ingest)}, {"Ref": logical_id(stack.pipeline.state_machine)}
    patterns = catalog.event_patterns(ingest_bucket=ingest, state_machine_arn=machine)
    for name in HANDLERS:
        assert rule_for(full, name)["EventPattern"] == patterns[name]


def test_undeliverable_and_failed_events_land_in_a_dead_letter_queue(synth):
    for name in HANDLERS:
        queue_id, queue = one(synth.pipeline, "AWS::SQS::Queue", f"Catalog{name.capitalize()}DeadLetters")
        (target,) = rule_for(synth, name)["Targets"]
        assert target["DeadLetterConfig"] == {"Arn": {"Fn::GetAtt": [queue_id, "Arn"]}}
        assert target["RetryPolicy"] == {"MaximumEventAgeInSeconds": 6 * 3600, "MaximumRetryAttempts": 8}
        _, fn = function(synth, name)
        assert fn["Properties"]["DeadLetterConfig"] == {"TargetArn": {"Fn::GetAtt": [queue_id, "Arn"]}}
        assert queue["Properties"]["SqsManagedSseEnabled"] is True
        assert queue["Properties"]["MessageRetentionPeriod"] == 14 * 24 * 3600


def actions(synth, name: str) -> dict[str, list]:
    """Action -> resources granted to a function's role."""
    role = f"Catalog{name.capitalize()}FunctionServiceRoleDefaultPolicy"
    granted: dict[str, list] = {}
    for statement in policy_statements(synth.pipeline, role):
        for action in actions_of(statement):
            granted.setdefault(action, []).append(statement["Resource"])
    return granted


def test_each_function_may_do_what_its_handler_does_and_no_more(full):
    stack = full.pipeline_stack
    catalog_fn, trigger, status = (actions(full, n) for n in HANDLERS)
    assert "events:PutEvents" in catalog_fn and "events:PutEvents" not in trigger
    assert trigger["states:StartExecution"] == [{"Ref": logical_id(stack.pipeline.state_machine)}]
    assert "states:StartExecution" not in catalog_fn and "states:StartExecution" not in status
    assert "sns:Publish" in trigger and "sns:Publish" in status and "sns:Publish" not in catalog_fn
    assert "s3:GetObject*" in catalog_fn and "s3:GetObject*" in trigger
    # status reads only slides' manifest.json and params.yml (is a run's overview public?), in the ingest
    # bucket and in the work bucket's rerun copies
    status_reads = {render_intrinsics(r) for listed in status["s3:GetObject*"] for r in listed}
    objects = {r.split(">", 1)[1] for r in status_reads if "/" in r}
    assert objects == {f"/{prefix}*/{name}" for prefix in ("", "reruns/") for name in ("manifest.json", "params.yml")}
    for granted in (catalog_fn, trigger, status):
        assert not any(a.startswith(("s3:Put", "s3:Delete")) for a in granted)  # raw data is only read
        assert "dynamodb:UpdateItem" in granted


def test_functions_log_as_json_with_the_configured_retention(full):
    for name in HANDLERS:
        _, fn = function(full, name)
        assert fn["Properties"]["LoggingConfig"]["LogFormat"] == "JSON"
        _, group = one(full.pipeline, "AWS::Logs::LogGroup", f"Catalog{name.capitalize()}Logs")
        assert group["Properties"]["RetentionInDays"] == 30


def test_each_function_has_reserved_concurrency(synth):
    reserved = {name: function(synth, name)[1]["Properties"]["ReservedConcurrentExecutions"] for name in HANDLERS}
    assert all(isinstance(n, int) and n > 0 for n in reserved.values()), reserved
    assert reserved["catalog"] >= reserved["trigger"] >= reserved["status"]  # one event per object, per slide, per run
