"""Exactly one run per complete slide, whatever the order and multiplicity of the S3 events.

Events are the real EventBridge shapes (tests/events/), objects live in moto's S3, the handlers are
the ones the CDK app deploys. The sample slide (atlas.slide.sample) stands for a lab's upload.
"""
from __future__ import annotations

import json
import random

import boto3
import pytest

from atlas.slide.convention import SLIDE_MANIFEST
from atlas.stages import SlideSize, execution_sizes


def start_execution_calls(cloud) -> list[dict]:
    """Record every StartExecution the trigger handler sends."""
    calls = []
    client = cloud.handlers["trigger"].function.aws.sfn
    client.meta.events.register("provide-client-params.sfn.StartExecution", lambda params, **_: calls.append(params))
    return calls


@pytest.mark.parametrize("idempotency, copies", [("on", 100), ("off", 10)])
def test_all_events_100_times_shuffled_start_exactly_one_run(cloud, ingest, sample_slide, monkeypatch,
                                                             idempotency, copies):
    # GIVEN the sample slide in S3 and every event of its upload, each delivered 100 times, shuffled;
    #       "off" takes powertools' idempotency away (and its cost: 10 copies) so that the
    #       conditional writes alone must hold
    if idempotency == "off":
        monkeypatch.setenv("POWERTOOLS_IDEMPOTENCY_DISABLED", "1")
    calls = start_execution_calls(cloud)
    events = ingest.put_folder(sample_slide)
    pending = [e for e in events for _ in range(copies)]
    rng = random.Random(9)
    # WHEN they are delivered in random order, the catalog's own events (twice each) joining the pool
    while pending:
        event = pending.pop(rng.randrange(len(pending)))
        ingest.deliver(event)
        for emitted in cloud.receive():
            pending.extend([emitted, emitted])
    # THEN exactly one execution was started, named after the run id, with the agreed input
    assert len(calls) == 1
    assert len(cloud.executions()) == 1
    record = cloud.slide_record("sample")
    assert record["status"] == "READY"
    assert calls[0]["name"] == record["run_id"]
    # the jobs' sizes come from the slide's catalogued OME metadata (sample: 3 x 3 tiles of 512 px, 2 cycles)
    sizes = execution_sizes(SlideSize(tiles=9, cycles=2, channels=6, tile_shape=(512, 512)))
    assert json.loads(calls[0]["input"]) == {
        "slide_id": "sample", "run_id": record["run_id"], "slide_uri": f"s3://{cloud.ingest_bucket}/sample/",
        "work_uri": f"s3://{cloud.settings.work_bucket}/{record['run_id']}/", "sizes": sizes}
    assert record["execution_arn"].endswith(f":{record['run_id']}")


def test_manifest_first_data_later_starts_when_the_last_file_arrives(cloud, ingest, sample_slide):
    # GIVEN an uploader that sends manifest.json first
    doc_files = sorted(p.relative_to(sample_slide).as_posix() for p in sample_slide.rglob("*")
                       if p.is_file() and p.name != SLIDE_MANIFEST)
    manifest_event = ingest.put_folder(sample_slide, only=())[-1]
    ingest.deliver(manifest_event)
    ingest.settle()
    record = cloud.slide_record("sample")
    assert record["status"] == "COLLECTING"
    assert sorted(m["path"] for m in record["missing"]) == doc_files
    # WHEN the data files arrive one by one
    for i, rel in enumerate(doc_files):
        ingest.deliver(ingest.put("sample", rel, (sample_slide / rel).read_bytes()))
        ingest.settle()
        # THEN no run until the last one, then exactly one
        assert len(cloud.executions()) == (1 if i == len(doc_files) - 1 else 0)
        if i < len(doc_files) - 1:
            assert [m["path"] for m in cloud.slide_record("sample")["missing"]] == doc_files[i + 1:]
    assert cloud.slide_record("sample")["status"] == "READY"


def test_half_an_upload_starts_nothing_and_says_what_is_missing(cloud, ingest, sample_slide):
    # GIVEN an upload that stopped after the first cycle file (manifest already there)
    ingest.upload_and_settle(sample_slide, only=("markers.csv", "raw/cycle-01.ome.tif"))
    # THEN nothing runs and the slide item names the missing file with its expected size
    assert cloud.executions() == []
    record = cloud.slide_record("sample")
    assert record["status"] == "COLLECTING"
    assert record["missing"] == [{"path": "raw/cycle-02.ome.tif", "why": "not arrived yet", "found_size": None,
                                  "expected_size": (sample_slide / "raw/cycle-02.ome.tif").stat().st_size}]
    assert (record["files_present"], record["files_expected"]) == (2, 3)


def test_no_manifest_yet_means_collecting(cloud, ingest, sample_slide):
    ingest.upload_and_settle(sample_slide, manifest=False)
    record = cloud.slide_record("sample")
    assert cloud.executions() == []
    assert record["status"] == "COLLECTING"
    assert [m["path"] for m in record["missing"]] == [SLIDE_MANIFEST]


def test_a_file_replaced_after_the_manifest_waits_for_the_right_content(cloud, ingest, sample_slide, slide_copy):
    # GIVEN the catalog holding a same-size but different markers.csv (a stale version)
    ingest.upload_and_settle(slide_copy, only=("raw/cycle-01.ome.tif", "raw/cycle-02.ome.tif"))
    text = (slide_copy / "markers.csv").read_text()
    ingest.deliver(ingest.put("sample", "markers.csv", text.replace("CD45", "CD99").encode()))
    ingest.settle()
    # THEN the sha256 the uploader recorded keeps the slide collecting
    record = cloud.slide_record("sample")
    assert record["status"] == "COLLECTING" and cloud.executions() == []
    assert "sha256" in record["missing"][0]["why"]
    # WHEN the right version arrives, the run starts
    ingest.deliver(ingest.put("sample", "markers.csv", text.encode()))
    ingest.settle()
    assert len(cloud.executions()) == 1


def test_new_manifest_version_starts_a_new_run_and_keeps_the_earlier_one(cloud, ingest, sample_slide, slide_copy):
    # GIVEN a first run that succeeded and published its results
    ingest.upload_and_settle(slide_copy)
    first = cloud.slide_record("sample")["run_id"]
    s3 = boto3.client("s3")
    s3.put_object(Bucket=cloud.settings.results_bucket, Key=f"sample/{first}/manifest.json", Body=b"{}")
    sfn = boto3.client("stepfunctions")
    execution = sfn.describe_execution(executionArn=cloud.executions()[0])
    from localcloud.demo import execution_status_event

    for status in ("RUNNING", "SUCCEEDED"):
        ingest.deliver(execution_status_event(execution, status))
    # WHEN the lab re-uploads with a changed params.yml (a new manifest)
    (slide_copy / "params.yml").write_text("segment:\n  expand_um: 3.0\n")
    ingest.upload_and_settle(slide_copy)
    # THEN a second run starts, the first run's record and results stay
    record = cloud.slide_record("sample")
    assert len(cloud.executions()) == 2
    assert record["status"] == "READY" and record["run_id"] != first
    assert cloud.slide_record("sample", f"RUN#{first}")["status"] == "SUCCEEDED"
    assert cloud.slide_record("sample", f"RUN#{record['run_id']}")["status"] == "READY"
    released = s3.get_object(Bucket=cloud.settings.results_bucket, Key=f"sample/{first}/manifest.json")
    assert released["Body"].read() == b"{}"
    # AND a late duplicate event of the first run does not touch the current slide state
    ingest.deliver(execution_status_event(execution, "SUCCEEDED"))
    assert cloud.slide_record("sample")["status"] == "READY"


def test_reuploading_the_identical_slide_starts_nothing_new(cloud, ingest, sample_slide):
    ingest.upload_and_settle(sample_slide)
    ingest.upload_and_settle(sample_slide)  # same bytes, new object versions and sequencers
    assert len(cloud.executions()) == 1
    assert cloud.slide_record("sample")["status"] == "READY"


def test_events_from_moto_s3_through_the_rules_start_the_run(cloud, sample_slide):
    # GIVEN the ingest bucket's own EventBridge notifications (as the demo uses them)
    boto3.client("s3").put_bucket_notification_configuration(
        Bucket=cloud.ingest_bucket, NotificationConfiguration={"EventBridgeConfiguration": {}})
    from atlas.aws.upload import upload_slide

    upload_slide(sample_slide, f"s3://{cloud.ingest_bucket}")
    started = []
    cloud.pump(on_execution=started.append, wait_s=0, idle_polls=1)
    assert len(started) == 1
    assert [r["outcome"] for n, _, r in cloud.delivered if n == "catalog"] == ["recorded"] * 4


def test_objects_outside_a_slide_prefix_are_ignored(cloud, ingest):
    event = ingest.event(*_put_root_object(cloud))
    assert ingest.deliver(event)["outcome"] == "ignored"
    assert cloud.receive() == []


def _put_root_object(cloud) -> tuple[str, str]:
    version = boto3.client("s3").put_object(Bucket=cloud.ingest_bucket, Key="README.txt", Body=b"x")["VersionId"]
    return "README.txt", version

