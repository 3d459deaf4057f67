"""Step Functions status changes -> run and slide status (forward only), one notification per ended run."""
from __future__ import annotations

import json

import boto3
import pytest

from atlas.aws.catalog import ENV_OVERVIEW_SITE_URL, Settings
from localcloud.demo import load_handler


@pytest.fixture
def status_event(load_event):
    """``status_event(execution, status, **detail)``: tests/events/sfn_execution_status_change.json about it."""
    def make(execution: dict, status: str, **detail) -> dict:
        event = load_event("sfn_execution_status_change.json")
        event["resources"] = [execution["executionArn"]]
        event["detail"] |= {"executionArn": execution["executionArn"],
                            "stateMachineArn": execution["stateMachineArn"], "name": execution["name"],
                            "input": execution["input"], "status": status, "error": None, "cause": None} | detail
        return event
    return make


@pytest.fixture
def started(cloud, ingest, sample_slide) -> dict:
    """The sample slide uploaded and its execution started; returns DescribeExecution of it."""
    ingest.upload_and_settle(sample_slide)
    return boto3.client("stepfunctions").describe_execution(executionArn=cloud.executions()[0])


def test_failed_run_records_cause_and_tells_the_lab_once(cloud, started, lambda_context, status_event, load_event):
    status = cloud.handlers["status"].handler
    run_id = started["name"]
    # WHEN the run starts, fails, and the FAILED event arrives twice, then a late RUNNING one
    status(status_event(started, "RUNNING"), lambda_context)
    assert cloud.slide_record("sample")["status"] == "RUNNING"
    template = load_event("sfn_execution_status_change.json")["detail"]
    failed = status_event(started, "FAILED", error=template["error"], cause=template["cause"])
    status(failed, lambda_context)
    failed["id"] = "another-delivery"
    status(failed, lambda_context)
    status(status_event(started, "RUNNING"), lambda_context)
    # THEN slide and run say FAILED with error and cause, and one message went out
    for sk in ("SLIDE", f"RUN#{run_id}"):
        record = cloud.slide_record("sample", sk)
        assert (record["status"], record["error"]) == ("FAILED", "States.TaskFailed")
        assert "Essential container in task exited" in record["cause"]
    notes = cloud.notifications()
    assert [n["Subject"] for n in notes] == ["[atlas] sample: FAILED"]
    assert "Essential container in task exited" in notes[0]["Message"]
    assert started["executionArn"] in notes[0]["Message"]


def test_succeeded_run_records_where_the_results_are(cloud, started, lambda_context, status_event):
    status = cloud.handlers["status"].handler
    status(status_event(started, "RUNNING"), lambda_context)
    status(status_event(started, "SUCCEEDED", output="{}"), lambda_context)
    record = cloud.slide_record("sample")
    expected = f"s3://{cloud.settings.results_bucket}/sample/{started['name']}/"
    assert (record["status"], record["output_uri"]) == ("SUCCEEDED", expected)
    assert record["overview_uri"] == expected + "overview/index.html"
    assert cloud.slide_record("sample", f"RUN#{started['name']}")["execution_output"] == "{}"
    message = cloud.notifications()[0]["Message"]
    assert expected in message and "overview/index.html" in message


def test_with_an_overview_site_the_lab_gets_a_link_a_browser_opens(cloud, started, lambda_context, status_event,
                                                                    monkeypatch):
    # GIVEN the status Lambda deployed with the overview site's URL (as the CDK app sets it)
    monkeypatch.setenv(ENV_OVERVIEW_SITE_URL, "https://d111111abcdef8.cloudfront.net/")
    status = load_handler("status").handler
    # WHEN the run succeeds
    status(status_event(started, "SUCCEEDED", output="{}"), lambda_context)
    # THEN record and message point at the site copy publish makes (<slide>/<run>/index.html), results stay s3://
    site_page = f"https://d111111abcdef8.cloudfront.net/sample/{started['name']}/index.html"
    record = cloud.slide_record("sample")
    assert record["overview_uri"] == site_page
    assert record["output_uri"] == f"s3://{cloud.settings.results_bucket}/sample/{started['name']}/"
    message = cloud.notifications()[0]["Message"]
    assert f"Overview: {site_page}" in message.splitlines()
    assert f"Results: {record['output_uri']}" in message.splitlines()


def test_a_private_overview_is_linked_in_the_results_bucket_not_on_the_site(cloud, ingest, slide_copy,
                                                                           lambda_context, status_event, monkeypatch):
    # GIVEN a site, and a slide whose params.yml keeps its overview off it (publish releases it only in results)
    monkeypatch.setenv(ENV_OVERVIEW_SITE_URL, "https://d111111abcdef8.cloudfront.net/")
    status = load_handler("status").handler
    (slide_copy / "params.yml").write_text("overview:\n  public: false\n")
    ingest.upload_and_settle(slide_copy)
    started = boto3.client("stepfunctions").describe_execution(executionArn=cloud.executions()[0])
    # WHEN its run succeeds
    status(status_event(started, "SUCCEEDED", output="{}"), lambda_context)
    # THEN record and message name the results bucket's copy (a site link would 404), never the site
    in_results = f"s3://{cloud.settings.results_bucket}/sample/{started['name']}/overview/index.html"
    assert cloud.slide_record("sample")["overview_uri"] == in_results
    message = cloud.notifications()[0]["Message"]
    assert f"Overview: {in_results}" in message.splitlines() and "cloudfront" not in message


def test_out_of_order_events_never_move_status_back(cloud, started, lambda_context, status_event):
    status = cloud.handlers["status"].handler
    status(status_event(started, "SUCCEEDED"), lambda_context)
    result = status(status_event(started, "RUNNING"), lambda_context)
    assert result["outcome"] == "stale"
    assert cloud.slide_record("sample")["status"] == "SUCCEEDED"


def test_a_redriven_run_moves_on_again(cloud, started, lambda_context, status_event):
    status = cloud.handlers["status"].handler
    status(status_event(started, "FAILED", error="States.TaskFailed", cause="spot"), lambda_context)
    status(status_event(started, "RUNNING", redriveCount=1), lambda_context)
    assert cloud.slide_record("sample")["status"] == "RUNNING"
    status(status_event(started, "SUCCEEDED", redriveCount=1), lambda_context)
    assert cloud.slide_record("sample")["status"] == "SUCCEEDED"


def test_events_without_a_slide_are_ignored(cloud, started, lambda_context, status_event):
    result = cloud.handlers["status"].handler(status_event(started, "RUNNING", input="{}"), lambda_context)
    assert result["outcome"] == "ignored"
    assert cloud.slide_record("sample")["status"] == "READY"


def test_settings_name_every_missing_variable():
    with pytest.raises(RuntimeError, match="CATALOG_TABLE, IDEMPOTENCY_TABLE, STATE_MACHINE_ARN, NOTIFY_TOPIC_ARN, "
                                           "INGEST_BUCKET, WORK_BUCKET, RESULTS_BUCKET, BUCKET_OWNER"):
        Settings.from_env({})
    settings = Settings("c", "i", "arn:sm", "arn:topic", "in", "w", "r", "123456789012")
    assert Settings.from_env(settings.to_env()) == settings
    assert json.dumps(settings.to_env())  # plain strings, ready for a Lambda environment
    assert ENV_OVERVIEW_SITE_URL not in settings.to_env()  # unset optional settings are left out
    with_site = Settings("c", "i", "arn:sm", "arn:topic", "in", "w", "r", "123456789012",
                         overview_site_url="https://d.example/")
    assert Settings.from_env(with_site.to_env()) == with_site
    with pytest.raises(RuntimeError, match="BUCKET_OWNER='atlas' is not an AWS account id"):
        Settings.from_env(settings.to_env() | {"BUCKET_OWNER": "atlas"})


def test_the_demo_status_events_have_the_real_shape(started, load_event):
    from localcloud.demo import execution_status_event

    real = load_event("sfn_execution_status_change.json")
    made = execution_status_event(started, "FAILED", error="STAGE_FAILED", cause="boom")
    assert made.keys() == real.keys() and made["detail"].keys() == real["detail"].keys()
    assert (made["source"], made["detail-type"]) == (real["source"], real["detail-type"])
    assert isinstance(made["detail"]["startDate"], int) and isinstance(made["detail"]["stopDate"], int)
