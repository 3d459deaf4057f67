"""Ops: ``atlas status`` and ``atlas rerun`` against the emulated catalog table and state machine (moto).

The slide gets to the catalog the real way: the sample slide is uploaded with ``atlas upload``'s
code to the emulated ingest bucket, whose S3 events go through EventBridge to the real catalog and
trigger handlers (:class:`localcloud.demo.LocalCloud`), which start the execution. Step Functions' status
changes are the events AWS sends, handed to the real status handler. Stage progress is what the
stage jobs leave in the work bucket: completion records made by :func:`atlas.pipeline.records.new_record`
with a small output file each, standing for the jobs' real outputs (their content does not matter
to status, cost or reuse; the job wrapper's own skip check is run on the reused ones).
"""
from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from fake_aws import use_fake_aws
from moto import mock_aws
from typer.testing import CliRunner

from atlas.aws import catalog, ops
from atlas.aws.job import check_raw_inputs, run_stage_job
from atlas.aws.s3 import S3Uri
from atlas.aws.store import S3Store
from atlas.aws.upload import upload_slide
from atlas.cli import app
from atlas.cli.data import usd
from atlas.errors import InvalidInput
from atlas.params import parse_params
from atlas.pipeline import records
from atlas.pipeline.runner import slide_entries
from atlas.slide.convention import PARAMS, SLIDE_MANIFEST, parse_manifest
from atlas.stages import STAGES, STITCHING, get_stage, run_jobs
from atlas.storage import JobView, file_entry
from localcloud.demo import HANDLERS, POWERTOOLS_LOCAL_ENV, LocalCloud, execution_status_event, load_handler


@pytest.fixture
def cloud(monkeypatch, sample_slide):
    """The deployed resources emulated in-process, with the sample slide uploaded and its run started."""
    use_fake_aws(monkeypatch, **POWERTOOLS_LOCAL_ENV)
    with mock_aws():
        local = LocalCloud.create("ops")
        for key, value in local.settings.to_env().items():
            monkeypatch.setenv(key, value)
        local.handlers = {name: load_handler(name) for name in HANDLERS}
        upload_slide(sample_slide, f"s3://{local.ingest_bucket}/")
        local.pump()
        yield local


def table(cloud: LocalCloud):
    return ops.catalog_table(cloud.settings.catalog_table)


def tell(cloud: LocalCloud, run_id: str, status: str, **details) -> dict:
    """Step Functions' status change of a run's execution, delivered to the status handler.

    moto does not run the state machine, so its executions never end by themselves: an execution
    that ends is stopped in the emulator (its status there becomes ABORTED, the closest it has).
    """
    sfn = boto3.client("stepfunctions")
    arn = cloud.settings.state_machine_arn.replace(":stateMachine:", ":execution:") + f":{run_id}"
    event = execution_status_event(sfn.describe_execution(executionArn=arn), status, **details)
    if status != "RUNNING":
        sfn.stop_execution(executionArn=arn, error=details.get("error", ""), cause=details.get("cause", ""))
    return cloud.invoke("status", event)


def finish_job(cloud: LocalCloud, tmp: Path, slide_id: str, run_id: str, stage_name: str, item: int | None = None,
               seconds: float = 600, instance: str = "c6i.2xlarge") -> dict:
    """What a finished stage job leaves in the run's work prefix: an output, then its completion record."""
    stage = get_stage(stage_name)
    job = stage.jobs()[-1] if item is None else stage.jobs()[item]
    out = tmp / run_id
    rel = f"qc/{stage_name}/job{'' if item is None else item}.txt"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_text(f"{stage_name} {item} of {run_id}\n")
    record = records.new_record(job, run_id=run_id, started=0.0, finished=seconds,
                                outputs=[file_entry(rel, out / rel)], instance_type=instance)
    s3, work = boto3.client("s3"), cloud.settings.work_bucket
    s3.upload_file(str(out / rel), work, f"{run_id}/{rel}")
    s3.put_object(Bucket=work, Key=f"{run_id}/{job.record}", Body=records.dumps(record))
    return record


def finish_stitching(cloud: LocalCloud, tmp: Path, slide_id: str, run_id: str, seconds: float = 600) -> list[dict]:
    """Every job of the stitching stages finished (items, then merges): their records."""
    return [finish_job(cloud, tmp, slide_id, run_id, job.stage.name, job.item, seconds)
            for job in run_jobs(STITCHING)]


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_status_follows_a_run_from_start_to_failure(cloud, sample_slide, tmp_path):
    slide_id = sample_slide.name
    started = ops.slide_status(slide_id, table=table(cloud))
    assert (started.status, started.execution_status, started.current_stage) == ("READY", "RUNNING", "illuminate")
    run_id = started.run_id
    assert started.work_uri == f"s3://{cloud.settings.work_bucket}/{run_id}/"
    assert [p.state for p in started.stages] == ["running"] + ["pending"] * (len(STAGES) - 1)

    tell(cloud, run_id, "RUNNING")
    stitching = finish_stitching(cloud, tmp_path, slide_id, run_id, seconds=600)
    for item in (0, 1):
        finish_job(cloud, tmp_path, slide_id, run_id, "segment", item, seconds=300, instance="g5.xlarge")
    running = ops.slide_status(slide_id, table=table(cloud))
    assert (running.status, running.current_stage) == ("RUNNING", "segment")
    stages = {p.stage: p for p in running.stages}
    assert (stages["export"].state, stages["segment"].state, stages["quantify"].state) == ("done", "running", "pending")
    assert all(stages[stage.name].state == "done" for stage in STITCHING)
    assert (stages["segment"].items_done, stages["segment"].items) == (2, 4)
    stitch_usd = sum(r["vcpu_seconds"] for r in stitching) / 3600 * ops.COMPUTE_PRICES.per_vcpu_hour("c6i.2xlarge")
    segment_usd = 2 * 300 * 4 / 3600 * ops.COMPUTE_PRICES.per_vcpu_hour("g5.xlarge")
    assert sum(stages[stage.name].cost_usd for stage in STITCHING) == pytest.approx(stitch_usd)
    assert running.cost_usd == pytest.approx(stitch_usd + segment_usd) and running.cost_complete

    shown = cli("status", slide_id)
    assert shown.exit_code == 0, shown.output
    assert "RUNNING" in shown.output and "current stage: segment" in shown.output and "2/4" in shown.output
    assert usd(stitch_usd + segment_usd) in shown.output
    every = cli("status")
    assert every.exit_code == 0 and slide_id in every.output and run_id in every.output

    cause = "stage job segment[2] failed (STAGE_FAILED): MemoryError"
    tell(cloud, run_id, "FAILED", error="segment failed: STAGE_FAILED", cause=cause)
    failed = ops.slide_status(slide_id, table=table(cloud))
    assert (failed.status, failed.execution_status) == ("FAILED", "ABORTED")
    assert failed.error == "segment failed: STAGE_FAILED" and failed.cause == cause
    assert failed.current_stage == "segment" and {p.stage: p.state for p in failed.stages}["segment"] == "failed"
    shown = cli("status", slide_id)
    assert "MemoryError" in shown.output and f"atlas rerun {slide_id} --from segment" in shown.output


def status_from_history(cloud, slide_id: str, sfn, arn: str, when: datetime, history: list[dict]):
    """``ops.slide_status`` of a running execution whose history (newest first) Step Functions is stubbed to give."""
    with Stubber(sfn) as stub:
        stub.add_response("describe_execution", {
            "executionArn": arn, "stateMachineArn": cloud.settings.state_machine_arn, "status": "RUNNING",
            "startDate": when, "input": "{}"})
        stub.add_response("get_execution_history", {"events": history},
                          {"executionArn": arn, "reverseOrder": True, "maxResults": 200})
        return ops.slide_status(slide_id, table=table(cloud), sfn=sfn)


def test_the_current_stage_comes_from_the_execution_history(cloud, sample_slide, tmp_path):
    slide_id = sample_slide.name
    run_id = ops.slide_status(slide_id, table=table(cloud)).run_id
    finish_stitching(cloud, tmp_path, slide_id, run_id)
    for item in range(4):
        finish_job(cloud, tmp_path, slide_id, run_id, "segment", item)
    sfn = boto3.client("stepfunctions")
    arn = ops.slide_status(slide_id, table=table(cloud)).execution_arn
    when = datetime(2025, 6, 1, tzinfo=UTC)
    history = [{"timestamp": when, "type": "TaskStateEntered", "id": 9, "previousEventId": 8,
                "stateEnteredEventDetails": {"name": "segment-merge", "input": "{}"}},
               {"timestamp": when, "type": "TaskStateExited", "id": 8, "previousEventId": 7,
                "stateExitedEventDetails": {"name": "segment", "output": "{}"}}]
    status = status_from_history(cloud, slide_id, sfn, arn, when, history)
    assert status.current_stage == "segment-merge"
    assert {p.stage: p.state for p in status.stages}["segment"] == "running"


def test_status_names_every_parallel_branch_running(cloud, sample_slide, tmp_path):
    """Export runs beside segment -> quantify -> render: with both branches running, status names both
    jobs, from the execution history (a state entered and not exited) or, without it, from the records."""
    slide_id = sample_slide.name
    run_id = ops.slide_status(slide_id, table=table(cloud)).run_id
    tell(cloud, run_id, "RUNNING")
    for job in run_jobs(STITCHING[:3]):  # up to the mosaic: export and segment may start
        finish_job(cloud, tmp_path, slide_id, run_id, job.stage.name, job.item)
    for item in range(2):
        finish_job(cloud, tmp_path, slide_id, run_id, "segment", item)
    from_records = ops.slide_status(slide_id, table=table(cloud))
    assert from_records.current_jobs == ("export", "segment") and from_records.current_stage == "export"
    assert {p.stage: p.state for p in from_records.stages}["export"] == "running"
    shown = cli("status", slide_id)
    assert shown.exit_code == 0 and "current stages: export, segment" in shown.output

    sfn = boto3.client("stepfunctions")
    arn = from_records.execution_arn
    when = datetime(2025, 6, 1, tzinfo=UTC)

    def event(kind: str, name: str, id_: int) -> dict:
        details = "stateEnteredEventDetails" if kind.endswith("Entered") else "stateExitedEventDetails"
        return {"timestamp": when, "type": kind, "id": id_, "previousEventId": id_ - 1, details: {"name": name}}
    history = [event("TaskStateEntered", "quantify", 12), event("TaskStateExited", "segment-merge", 11),
               event("TaskStateEntered", "segment-merge", 10), event("TaskStateExited", "segment", 9),
               event("TaskStateEntered", "segment", 8), event("TaskStateEntered", "export", 7),
               event("TaskStateExited", "mosaic-merge", 6)]
    status = status_from_history(cloud, slide_id, sfn, arn, when, history)
    assert status.current_jobs == ("export", "quantify")
    states = {p.stage: p.state for p in status.stages}
    assert (states["export"], states["quantify"], states["render"]) == ("running", "running", "pending")


def fail_at_segment(cloud, slide_id: str, tmp_path: Path) -> str:
    run_id = ops.slide_status(slide_id, table=table(cloud)).run_id
    tell(cloud, run_id, "RUNNING")
    finish_stitching(cloud, tmp_path, slide_id, run_id)
    finish_job(cloud, tmp_path, slide_id, run_id, "segment", 0)
    tell(cloud, run_id, "FAILED", error="segment failed: STAGE_FAILED", cause="out of memory")
    return run_id


def objects(prefix: str) -> dict[str, bytes]:
    s3, uri = boto3.client("s3"), S3Uri.parse(prefix)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.key)
    return {o["Key"][len(uri.key):]: s3.get_object(Bucket=uri.bucket, Key=o["Key"])["Body"].read()
            for page in pages for o in page.get("Contents", [])}


def test_rerun_from_a_stage_reuses_the_earlier_outputs_under_a_new_run_id(cloud, sample_slide, tmp_path):
    slide_id = sample_slide.name
    old = fail_at_segment(cloud, slide_id, tmp_path)
    old_work = f"s3://{cloud.settings.work_bucket}/{old}/"
    before = objects(old_work)

    shown = cli("rerun", slide_id, "--from", "segment")
    assert shown.exit_code == 0, shown.output
    item = catalog.from_dynamo(table(cloud).get_item(Key={"pk": catalog.slide_pk(slide_id), "sk": "SLIDE"})["Item"])
    new = item["run_id"]
    assert new == f"{old}-r2" and item["status"] == "READY" and "error" not in item
    assert new in shown.output and "reused from" in shown.output and "align" in shown.output
    run = catalog.from_dynamo(table(cloud).get_item(Key={"pk": catalog.slide_pk(slide_id), "sk": f"RUN#{new}"})["Item"])
    assert (run["rerun_of"], run["from_stage"], run["params_override"]) == (old, "segment", False)

    sfn = boto3.client("stepfunctions")
    execution = sfn.describe_execution(executionArn=item["execution_arn"])
    payload = json.loads(execution["input"])
    assert (execution["name"], payload["run_id"]) == (new, new)
    assert payload["work_uri"] == f"s3://{cloud.settings.work_bucket}/{new}/"
    assert payload["slide_uri"] == f"s3://{cloud.ingest_bucket}/{slide_id}/"

    assert objects(old_work) == before  # the earlier run is untouched
    copied = objects(payload["work_uri"])
    assert copied["qc/align/job.txt"] == before["qc/align/job.txt"]
    assert not any(k.startswith("qc/segment/") for k in copied)  # segment is redone, item 0 included
    record = json.loads(copied["qc/provenance/align.json"])
    assert (record["run_id"], record["reused_from"]) == (new, old)
    # the stage jobs of the new run find align and the export (listed before segment, though Step Functions
    # runs it beside segment) complete and skip them: a rerun from segment does not redo the OME-TIFF
    assert json.loads(copied["qc/provenance/export.json"])["reused_from"] == old
    for name in ("align", "export"):
        skipped = run_stage_job(name, slide_uri=payload["slide_uri"], work_uri=payload["work_uri"], run_id=new,
                                s3=boto3.client("s3"))
        assert skipped.skipped, name

    tell(cloud, new, "RUNNING")  # the status handler follows the new run
    status = ops.slide_status(slide_id, table=table(cloud))
    assert (status.status, status.run_id, status.current_stage) == ("RUNNING", new, "segment")
    assert {p.stage: p.state for p in status.stages}["align"] == "reused" and status.cost_usd == 0
    assert [r["run_id"] for r in status.runs] == [old, new]

    refused = cli("rerun", slide_id)
    assert isinstance(refused.exception, InvalidInput)
    assert "still RUNNING" in str(refused.exception) and "stop-execution" in str(refused.exception)


def test_rerun_with_new_params_runs_a_copy_of_the_slide(cloud, sample_slide, tmp_path):
    slide_id = sample_slide.name
    old = fail_at_segment(cloud, slide_id, tmp_path)
    params = tmp_path / "params.yml"
    params.write_text("segment:\n  expand_um: 3.0\n")
    shown = cli("rerun", slide_id, "--from", "segment", "--params", str(params))
    assert shown.exit_code == 0, shown.output
    status = ops.slide_status(slide_id, table=table(cloud))
    new = status.run_id
    assert new.endswith("-r2") and not new.startswith(old)  # another manifest: another hash
    payload = json.loads(boto3.client("stepfunctions").describe_execution(executionArn=status.execution_arn)["input"])
    copy = S3Uri.parse(payload["slide_uri"])
    assert payload["slide_uri"] == f"s3://{cloud.settings.work_bucket}/{ops.RERUN_PREFIX}/{new}/{slide_id}/"
    files = objects(payload["slide_uri"])
    assert parse_params(files[PARAMS].decode()).segment.expand_um == 3.0
    original = objects(f"s3://{cloud.ingest_bucket}/{slide_id}/")
    assert PARAMS not in original or original[PARAMS] != files[PARAMS]  # the lab's upload is unchanged
    listed = {e.path for e in parse_manifest(files[SLIDE_MANIFEST].decode())}
    assert listed == (set(original) - {SLIDE_MANIFEST}) | {PARAMS}
    # the stage jobs accept the copy: every file matches its manifest entry
    slide = S3Store(boto3.client("s3"), copy)
    entries = slide_entries(slide)
    check_raw_inputs(slide, get_stage("align").jobs()[0], entries)  # the raw files, copied server-side
    as_read = JobView(slide, entries, readable=lambda rel: True, writable=lambda rel: False)  # checked as read
    assert parse_params(as_read.read_text(PARAMS)).segment.expand_um == 3.0


def test_status_and_rerun_name_the_owner_of_the_run_buckets(cloud, sample_slide, tmp_path):
    """The account in the execution ARN deployed the pipeline and owns its buckets: each request of status
    and rerun to the slide's and the work bucket says so (ExpectedBucketOwner), server-side copies too."""
    slide_id = sample_slide.name
    fail_at_segment(cloud, slide_id, tmp_path)
    s3, sent = boto3.client("s3"), []
    s3.meta.events.register("before-parameter-build.s3", lambda params, **_: sent.append(dict(params)))
    status = ops.slide_status(slide_id, table=table(cloud), s3=s3)
    ops.rerun(slide_id, table=table(cloud), from_stage="segment", params_text="segment:\n  expand_um: 3.0\n", s3=s3)
    account = status.execution_arn.split(":")[4]
    assert {p["Bucket"] for p in sent} == {cloud.ingest_bucket, cloud.settings.work_bucket}
    assert {p.get("ExpectedBucketOwner") for p in sent} == {account}
    copies = [p for p in sent if "CopySource" in p]
    assert copies and {p.get("ExpectedSourceBucketOwner") for p in copies} == {account}


def test_rerun_refuses_what_cannot_work(cloud, sample_slide, tmp_path):
    slide_id = sample_slide.name
    fail_at_segment(cloud, slide_id, tmp_path)
    stitch_change = tmp_path / "stitch.yml"
    stitch_change.write_text("stitch:\n  maximum_shift_um: 50\n")
    cases = [
        (["--from", "segment", "--params", str(stitch_change)], "changes the stitch parameters, but --from segment "
         "reuses the illuminate outputs", "rerun --from illuminate"),
        (["--from", "quantify"], "segment[1] of run", "rerun --from segment"),
        (["--from", "stiching"], "unknown stage 'stiching'", "illuminate, align, mosaic, export, segment, quantify"),
    ]
    bad_params = tmp_path / "bad.yml"
    bad_params.write_text("segmnt:\n  channel: 0\n")
    cases.append((["--params", str(bad_params)], "unknown section 'segmnt'", str(bad_params)))
    for args, message, fix in cases:
        result = cli("rerun", slide_id, *args)
        assert isinstance(result.exception, InvalidInput), (args, result.output)
        text = str(result.exception)
        assert message in text and fix in text, text
    assert ops.slide_status(slide_id, table=table(cloud)).status == "FAILED"  # nothing was started
    assert len(boto3.client("stepfunctions").list_executions(
        stateMachineArn=cloud.settings.state_machine_arn)["executions"]) == 1


def test_a_rerun_whose_execution_cannot_start_leaves_the_slide_on_its_run(cloud, sample_slide, tmp_path):
    """StartExecution refused (throttled, no permission): the slide item goes back to the failed run and the
    new run's item is removed, so `atlas rerun` can simply be run again."""
    slide_id = sample_slide.name
    old = fail_at_segment(cloud, slide_id, tmp_path)
    before = catalog.from_dynamo(table(cloud).get_item(Key=catalog.slide_key(slide_id))["Item"])

    class Refusing:
        """Step Functions as the emulator has it, but StartExecution is refused."""

        def __init__(self):
            self.real = boto3.client("stepfunctions")

        def start_execution(self, **_):
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "StartExecution")

        def __getattr__(self, name):
            return getattr(self.real, name)

    with pytest.raises(ClientError, match="Rate exceeded"):
        ops.rerun(slide_id, table=table(cloud), from_stage="segment", sfn=Refusing())
    after = catalog.from_dynamo(table(cloud).get_item(Key=catalog.slide_key(slide_id))["Item"])
    assert after == before and after["run_id"] == old and after["status"] == "FAILED"
    runs = [r["run_id"] for r in catalog.slide_items(table(cloud), slide_id, catalog.RUN_SK_PREFIX)]
    assert runs == [old]
    started = cli("rerun", slide_id, "--from", "segment")  # and it works once StartExecution does
    assert started.exit_code == 0, started.output
    assert ops.slide_status(slide_id, table=table(cloud)).run_id == f"{old}-r2"


def test_a_slide_still_collecting_has_nothing_to_rerun(cloud):
    boto3.client("s3").put_object(Bucket=cloud.ingest_bucket, Key="half/markers.csv", Body=b"channel_number\n")
    cloud.pump()
    result = cli("rerun", "half")
    assert isinstance(result.exception, InvalidInput) and "COLLECTING" in str(result.exception)
    unknown = cli("rerun", "nope")
    assert "not in the catalog table" in str(unknown.exception)
    shown = cli("status", "half")
    assert shown.exit_code == 0 and "missing: manifest.json" in shown.output


def test_ops_commands_need_the_catalog_table(monkeypatch):
    monkeypatch.delenv(catalog.ENV_CATALOG_TABLE, raising=False)
    result = cli("status")
    assert isinstance(result.exception, InvalidInput)
    assert "--table" in str(result.exception) and "CatalogTableName" in str(result.exception)


def test_the_state_machine_is_found_from_an_execution():
    assert ops.state_machine_of("arn:aws:states:us-east-1:123456789012:execution:atlas-pipeline:S1-abc-r2") == \
        "arn:aws:states:us-east-1:123456789012:stateMachine:atlas-pipeline"
