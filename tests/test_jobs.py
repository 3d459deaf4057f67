"""The stage job contract end to end: ``atlas stage`` processes against S3 emulated on localhost.

The sample slide is uploaded to an emulated ingest bucket; every registry stage then runs as its own
process (as Batch would run it), reading and writing only S3, and the publish job releases the run
to an emulated results bucket. The same run is interrupted (a job SIGKILLed after part of its outputs
reached S3) and resumed; its release must be byte-identical.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import signal
import subprocess
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
import tifffile
from moto.s3.models import S3Backend
from typer.testing import CliRunner

from atlas import layout
from atlas.aws.catalog import SHA256_METADATA
from atlas.aws.job import ARRAY_INDEX_ENV, instance_type, run_stage_job
from atlas.aws.release import LATEST
from atlas.cli import app
from atlas.errors import InvalidInput
from atlas.pipeline.contract import ExitCode, JobError, Misconfigured, UpstreamIncomplete
from atlas.slide.convention import SLIDE_MANIFEST, run_id_for, sha256_file, write_manifest
from atlas.slide.ome import read_cycle_metadata
from atlas.stages import STAGES, JobSizes, SlideSize, execution_sizes, get_stage, items_in, run_jobs, upstream_jobs
from localcloud.demo import local_aws_env, moto_server
from localcloud.executor import StageJobFailed, execute_run, stage_command

OVERVIEW_PAGE = f"{layout.OVERVIEW}/index.html"
MOTO_ACCOUNT = "123456789012"  # the account owning what the emulator creates
KILLED_STAGE = "quantify"  # a stage in the middle: the rerun must skip what came before it and redo it
EXPORT_VCPUS = 3  # not the registry's: the job's record and thread pools follow what the run gives it


@pytest.fixture(scope="module")
def aws():
    """S3 emulated on localhost (moto server in this process) and the environment the jobs get."""
    with moto_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        env = local_aws_env(endpoint) | {"AWS_EC2_METADATA_DISABLED": "true"}
        mp.delenv("AWS_PROFILE", raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        yield env, boto3.client("s3")


def expected_steps(stages=STAGES, sizes=None) -> list[tuple[str, int | None, bool]]:
    """(stage, array item, merge) of every job of a run, in order (arrays as ``sizes`` say: the
    execution input's; default the registry's)."""
    return [(job.stage.name, job.item, job.merge) for job in run_jobs(stages, sizes)]


def new_bucket(s3, name: str) -> str:
    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    return bucket


def upload_slide(s3, slide_dir: Path, bucket: str) -> str:
    """Upload a slide folder as ``atlas upload`` does: each file with its sha256 as object metadata,
    manifest.json last. Returns the slide URI."""
    files = sorted(p for p in slide_dir.rglob("*") if p.is_file() and p.name != SLIDE_MANIFEST)
    for path in files + [slide_dir / SLIDE_MANIFEST]:
        s3.upload_file(str(path), bucket, f"{slide_dir.name}/{path.relative_to(slide_dir).as_posix()}",
                       ExtraArgs={"Metadata": {SHA256_METADATA: sha256_file(path)}})
    return f"s3://{bucket}/{slide_dir.name}/"


def objects(s3, bucket: str, prefix: str = "") -> dict[str, bytes]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix):]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for page in pages for o in page.get("Contents", [])}


DATA_SCRIPT = re.compile(rb'<script id="atlas-data" type="application/json">(.*?)</script>', re.DOTALL)


def overview_data(page: bytes) -> dict:
    """The data inlined in an overview's index.html."""
    return json.loads(DATA_SCRIPT.search(page).group(1))  # JSON reads the page's escaped "<\\/" as "</"


def without_data(page: bytes) -> bytes:
    return DATA_SCRIPT.sub(b"", page)


def data_files(release: dict[str, bytes]) -> dict[str, bytes]:
    """A release without what records when it ran (completion records, the manifest's provenance)."""
    return {k: v for k, v in release.items() if not k.startswith(layout.PROVENANCE + "/") and k != layout.MANIFEST}


@pytest.fixture(scope="module")
def run(aws, sample_slide):
    """One uninterrupted run of the sample slide through every stage job, released to a results bucket."""
    env, s3 = aws
    ingest, work, results = (new_bucket(s3, n) for n in ("ingest", "work", "results"))
    slide_uri = upload_slide(s3, sample_slide, ingest)
    run_id = run_id_for(sample_slide.name, (sample_slide / SLIDE_MANIFEST).read_bytes())
    # the sizes the trigger sends for this slide, the export given other vCPUs than the registry's
    cycles = [read_cycle_metadata(p) for p in sorted((sample_slide / "raw").iterdir())]
    sizes = execution_sizes(SlideSize.of_cycles(cycles))
    sizes["export"]["vcpus"] = EXPORT_VCPUS
    steps = execute_run(slide_uri, f"s3://{work}/{run_id}/", run_id, env={**env, "ATLAS_RESULTS_BUCKET": results},
                        sizes=sizes)
    return {"slide_uri": slide_uri, "work": work, "results": results, "run_id": run_id, "steps": steps,
            "slide_id": sample_slide.name, "env": env, "sizes": sizes}


def test_every_stage_runs_as_a_job_and_the_run_is_released(aws, run, sample_run, sample_slide):
    _, s3 = aws
    assert [(s.stage, s.item, s.merge) for s in run["steps"]] == expected_steps(sizes=run["sizes"])
    # each job was given its sizes from the execution input, as SubmitJob overrides them
    assert all(step.sizes == JobSizes(**run["sizes"][f"{step.stage}-merge" if step.merge else step.stage])
               for step in run["steps"])

    prefix = f"{run['slide_id']}/{run['run_id']}/"
    release = objects(s3, run["results"], prefix)
    manifest = json.loads(release[layout.MANIFEST])
    assert manifest["run_id"] == run["run_id"]
    # every file the manifest lists is released with exactly its recorded bytes, and nothing else is
    assert sorted(release) == sorted([f["path"] for f in manifest["files"]] + [layout.MANIFEST])
    for entry in manifest["files"]:
        assert len(release[entry["path"]]) == entry["size"]
        assert hashlib.sha256(release[entry["path"]]).hexdigest() == entry["sha256"], entry["path"]
    levels = {entry["level"] for entry in manifest["files"]}
    assert {2, 3, 4, 5} <= levels
    latest = json.loads(s3.get_object(Bucket=run["results"], Key=f"{run['slide_id']}/{LATEST}")["Body"].read())
    assert latest["run_id"] == run["run_id"] and latest["manifest"] == f"s3://{run['results']}/{prefix}{layout.MANIFEST}"

    # cost: every stage (and array item) recorded vCPU-seconds and where it ran
    records = {k: json.loads(v) for k, v in objects(s3, run["work"], f"{run['run_id']}/{layout.PROVENANCE}/").items()}
    assert sorted(records) == sorted(f"{name}.json" if item is None else f"{name}.{item}.json"
                                     for name, item, _ in expected_steps(sizes=run["sizes"]))
    for name, record in records.items():
        assert record["run_id"] == run["run_id"] and record["instance_type"] == "local", name
        merged = get_stage(record["stage"]).array_size and record["item"] is None
        assert record["vcpus"] == run["sizes"][record["stage"] + ("-merge" if merged else "")]["vcpus"], name
        assert record["vcpu_seconds"] == pytest.approx(record["seconds"] * record["vcpus"], abs=0.01)
        assert record["peak_rss_bytes"] > 50 << 20 and record["scratch_peak_bytes"] >= 0, name
        assert record["s3_bytes_written"] >= sum(o["size"] for o in record["outputs"]), name
        # every job writes something, but illuminate when the slide's params leave illumination off
        assert record["outputs"] or (record["stage"] == "illuminate"
                                     and not manifest["params"]["stitch"]["illumination"])
    assert {s["stage"] for s in manifest["stages"]} == {s.name for s in STAGES if s.name != "publish"}

    # no job downloads a whole input image: they read byte ranges and chunks where the data lies
    raw = sum(p.stat().st_size for p in (sample_slide / "raw").iterdir())
    registered = next(f["size"] for f in manifest["files"] if f["path"] == layout.registration_tiff(run["slide_id"]))
    released = sum(f["size"] for f in manifest["files"])
    items = [r for r in records.values() if r["stage"] == "segment" and r["item"] is not None]
    assert all(0 < r["s3_bytes_read"] < registered for r in items)  # its share of one channel's chunks
    publish = [r for r in records.values() if r["stage"] == "publish"]
    assert len(publish) == run["sizes"]["publish"]["items"] + 1  # items copied their shares, the merge released
    assert all(r["s3_bytes_read"] < released / 100 for r in publish)  # the manifest comes from the records
    # the OME-TIFF streams to its place (a multipart upload): scratch holds one channel's compressed
    # pyramid (its IFDs come before its tiles), never the whole file
    with tifffile.TiffFile(io.BytesIO(release[layout.registration_tiff(run["slide_id"])])) as tif:
        channels = tif.series[0].shape[0]
    assert channels >= 4 and 0 < records["export.json"]["scratch_peak_bytes"] <= 2 * registered / channels
    assert sum(r["s3_bytes_read"] for r in records.values()) <= 3 * (raw + released)

    # the cloud path gives the same results as the local runner on the same slide
    local = {p.relative_to(sample_run).as_posix(): p.read_bytes() for p in sample_run.rglob("*")
             if p.is_file() and not p.relative_to(sample_run).as_posix().startswith("tmp/")}
    assert sorted(data_files(release)) == sorted(data_files(local))
    assert [k for k, v in data_files(release).items() if local[k] != v and k != OVERVIEW_PAGE] == []
    # ... except that the published overview links its data files to their released copies
    cloud_page, local_page = overview_data(release[OVERVIEW_PAGE]), overview_data(local[OVERVIEW_PAGE])
    links = [entry.pop("uri") for entry in cloud_page["panel"]["data"]]
    assert links == [f"s3://{run['results']}/{prefix}{entry['path']}" for entry in cloud_page["panel"]["data"]]
    assert all(entry.pop("uri") is None for entry in local_page["panel"]["data"])
    assert cloud_page == local_page
    assert without_data(release[OVERVIEW_PAGE]) == without_data(local[OVERVIEW_PAGE])
    assert {e["path"] for e in cloud_page["panel"]["data"]} >= {layout.registration_zarr(run["slide_id"]),
                                                                layout.registration_tiff(run["slide_id"])}


def test_a_completed_job_skips_itself(aws, run):
    _, s3 = aws
    before = objects(s3, run["work"])
    result = run_stage_job("publish", slide_uri=run["slide_uri"], work_uri=f"s3://{run['work']}/{run['run_id']}/",
                           run_id=run["run_id"], merge=True, items=run["sizes"]["publish"]["items"], s3=s3)
    assert result.skipped and result.record["stage"] == "publish"
    assert objects(s3, run["work"]) == before


@contextmanager
def hold_uploads_after_first(bucket: str, prefix: str, admit: int = 1):
    """Let the first ``admit`` PutObjects under ``bucket/prefix`` through, then hold every later one.

    Patches the emulated S3 backend (the moto server runs in this process). Holding the requests
    freezes the job with part of its outputs in S3, so it can be killed at that point every time.
    """
    state = {"admitted": 0, "stored": []}
    lock, blocked, release = threading.Lock(), threading.Event(), threading.Event()
    original = S3Backend.put_object

    def put_object(self, bucket_name, key_name, *args, **kwargs):
        if bucket_name != bucket or not key_name.startswith(prefix):
            return original(self, bucket_name, key_name, *args, **kwargs)
        with lock:
            first = state["admitted"] < admit
            state["admitted"] += 1
        if not first:
            blocked.set()
            release.wait(120)
            raise ConnectionError("the job was killed")
        key = original(self, bucket_name, key_name, *args, **kwargs)
        state["stored"].append(key_name)
        return key

    S3Backend.put_object = put_object
    try:
        yield state, blocked
    finally:
        release.set()
        S3Backend.put_object = original


def test_a_job_killed_mid_upload_resumes_to_a_byte_identical_release(aws, run, sample_slide):
    env, s3 = aws
    # a second work prefix for the same run, released to the same place (the overview links to it)
    work, results = new_bucket(s3, "work"), run["results"]
    run_id, slide_uri = run["run_id"], run["slide_uri"]
    prefix = f"{run['slide_id']}/{run_id}/"
    uninterrupted = objects(s3, results, prefix)
    work_uri = f"s3://{work}/{run_id}/"
    job_env = {**os.environ, **env, "ATLAS_RESULTS_BUCKET": results}
    names = [s.name for s in STAGES]
    # the run got as far as KILLED_STAGE: the earlier jobs' outputs and records, as the first run left them
    source = f"{run_id}/"
    done = [f"{layout.PROVENANCE}/{name}.json" if item is None else f"{layout.PROVENANCE}/{name}.{item}.json"
            for name, item, _ in expected_steps(STAGES[:names.index(KILLED_STAGE)], run["sizes"])]
    records = [json.loads(s3.get_object(Bucket=run["work"], Key=source + rel)["Body"].read()) for rel in done]
    for rel in done + [out["path"] for record in records for out in record["outputs"]]:
        s3.copy({"Bucket": run["work"], "Key": source + rel}, work, source + rel)

    # ... then the instance running KILLED_STAGE vanished after the first of its outputs reached S3
    with hold_uploads_after_first(work, f"{run_id}/") as (state, blocked):
        proc = subprocess.Popen(stage_command(sized_jobs(run, KILLED_STAGE)[0], slide_uri=slide_uri,
                                              work_uri=work_uri, run_id=run_id),
                                env={**job_env, ARRAY_INDEX_ENV: "0"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            assert blocked.wait(300), f"{KILLED_STAGE} never uploaded a second output"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = objects(s3, work, f"{run_id}/")
    assert state["stored"] and all(not k.startswith(f"{run_id}/{layout.PROVENANCE}/") for k in state["stored"])
    assert f"{layout.PROVENANCE}/{KILLED_STAGE}.json" not in partial  # no completion record: the stage is not done

    # Batch retries: completed jobs skip themselves, the killed one redoes its work, the run completes
    steps = execute_run(slide_uri, work_uri, run_id, env={**env, "ATLAS_RESULTS_BUCKET": results}, sizes=run["sizes"])
    skipped = [(s.stage, s.item, s.merge) for s in steps if "already complete" in s.output]
    assert skipped == expected_steps(STAGES[:names.index(KILLED_STAGE)], run["sizes"])

    resumed = objects(s3, results, prefix)
    assert sorted(resumed) == sorted(uninterrupted)
    assert data_files(resumed) == data_files(uninterrupted)
    listed = [[f for f in json.loads(release[layout.MANIFEST])["files"]
               if not f["path"].startswith(layout.PROVENANCE + "/")]
              for release in (resumed, uninterrupted)]
    assert listed[0] == listed[1]


def sized_jobs(run: dict, name: str):
    """The jobs of stage ``name`` in the uninterrupted run (its arrays as the run's sizes said)."""
    stage = get_stage(name)
    return stage.jobs(items_in(run["sizes"], stage))


def copy_upstream(s3, run: dict, work: str, job) -> None:
    """Copy what ``job`` builds on (the records of the jobs before it and their outputs) from the
    uninterrupted run's work prefix to ``work``."""
    source = f"{run['run_id']}/"
    counts = {stage.name: items_in(run["sizes"], stage) for stage in STAGES}
    for earlier in upstream_jobs(job, counts):
        record = json.loads(s3.get_object(Bucket=run["work"], Key=source + earlier.record)["Body"].read())
        for rel in [earlier.record] + [out["path"] for out in record["outputs"]]:
            s3.copy({"Bucket": run["work"], "Key": source + rel}, work, source + rel)


def kill_item_when(blocked, item, env: dict, run: dict, work_uri: str, never: str) -> None:
    """Run array item ``item`` as its own process and SIGKILL it (a Spot reclaim) once ``blocked`` is set."""
    proc = subprocess.Popen(stage_command(item, slide_uri=run["slide_uri"], work_uri=work_uri, run_id=run["run_id"]),
                            env={**os.environ, **env, "AWS_BATCH_JOB_ARRAY_INDEX": str(item.item)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert blocked.wait(300), never
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_array_item_is_redone_to_the_same_outputs(aws, run):
    """Batch retries an array child whose Spot instance went away mid-way: the retry finds no record,
    redoes the item, and records exactly the outputs of an uninterrupted item."""
    env, s3 = aws
    work, run_id = new_bucket(s3, "work"), run["run_id"]
    source = f"{run_id}/"
    item = sized_jobs(run, "segment")[1]
    copy_upstream(s3, run, work, item)
    uninterrupted = json.loads(s3.get_object(Bucket=run["work"], Key=source + item.record)["Body"].read())
    work_uri = f"s3://{work}/{run_id}/"
    last = len(uninterrupted["outputs"]) - 1
    with hold_uploads_after_first(work, f"{run_id}/{item.stage.item_dir}/", admit=last) as (_, blocked):
        kill_item_when(blocked, item, env, run, work_uri, "the item never reached its last output")
    assert item.record[len(layout.PROVENANCE) + 1:] not in objects(s3, work, f"{run_id}/{layout.PROVENANCE}/")
    retried = run_stage_job("segment", slide_uri=run["slide_uri"], work_uri=work_uri, run_id=run_id,
                            array_index=item.item, items=item.count, s3=s3)
    assert not retried.skipped and retried.record["outputs"] == uninterrupted["outputs"]


@pytest.mark.parametrize("stage", ["mosaic", "render"])
def test_a_killed_item_resumes_from_its_last_written_chunk_row(aws, run, stage):
    """A Spot reclaim in the middle of a long item: the retry skips every chunk row (mosaic: of the
    zarr's levels; render: of the overview's tiles) whose journal object the killed attempt left,
    redoes the rest, and records exactly the outputs of an uninterrupted item."""
    env, s3 = aws
    work, run_id = new_bucket(s3, "work"), run["run_id"]
    item = sized_jobs(run, stage)[0]
    copy_upstream(s3, run, work, item)
    uninterrupted = json.loads(s3.get_object(Bucket=run["work"], Key=f"{run_id}/{item.record}")["Body"].read())
    journal = f"{run_id}/{item.stage.item_dir}/{item.item}/"
    rows = sum(out["path"].startswith(journal[len(run_id) + 1:]) for out in uninterrupted["outputs"])
    assert rows >= 3  # chunk rows of its channel's pyramid levels, tile rows of its layers' levels: 2 kept, 1+ redone
    work_uri = f"s3://{work}/{run_id}/"
    with hold_uploads_after_first(work, journal, admit=2) as (_, blocked):
        kill_item_when(blocked, item, env, run, work_uri, "the item never finished two chunk rows")
    assert len(objects(s3, work, journal)) == 2 and item.record not in objects(s3, work, f"{run_id}/")
    retried = run_stage_job(stage, slide_uri=run["slide_uri"], work_uri=work_uri, run_id=run_id,
                            array_index=item.item, items=item.count, s3=s3)
    assert not retried.skipped and retried.record["outputs"] == uninterrupted["outputs"]
    # the two finished rows were taken over unread and not written again
    assert retried.record["s3_bytes_written"] < uninterrupted["s3_bytes_written"]


def test_a_corrupted_input_fails_naming_the_file_and_publishes_nothing(aws, slide_copy):
    env, s3 = aws
    run_id = run_id_for(slide_copy.name, (slide_copy / SLIDE_MANIFEST).read_bytes())
    ingest, work, results = (new_bucket(s3, n) for n in ("ingest", "work", "results"))
    slide_uri = upload_slide(s3, slide_copy, ingest)
    cycle = max((slide_copy / "raw").iterdir())  # the last cycle
    data = bytearray(cycle.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the checksum can tell
    key = f"{slide_copy.name}/raw/{cycle.name}"
    s3.put_object(Bucket=ingest, Key=key, Body=bytes(data))

    with pytest.raises(StageJobFailed) as failed:
        execute_run(slide_uri, f"s3://{work}/{run_id}/", run_id, env={**env, "ATLAS_RESULTS_BUCKET": results})
    assert failed.value.step == "illuminate[0]" and failed.value.exit_code == ExitCode.INVALID_INPUT
    assert f"raw/{cycle.name}" in str(failed.value) and "sha256" in str(failed.value)
    assert "manifest.json" in str(failed.value)
    assert objects(s3, work) == {} and objects(s3, results) == {}


def publish_again(s3, run, slide_dir: Path, settings: dict, job_s3=None) -> dict:
    """The run's publishing job once more (with ``job_s3``, default ``s3``), for ``slide_dir`` as uploaded to
    a new ingest bucket, from a copy of the run's work without its publish record; returns the new buckets."""
    buckets = {n: new_bucket(s3, n) for n in ("ingest", "work", "results", "site")}
    source = f"{run['run_id']}/"
    for key, body in objects(s3, run["work"], source).items():
        if not key.startswith(f"{layout.PROVENANCE}/publish"):
            s3.put_object(Bucket=buckets["work"], Key=source + key, Body=body)
    slide_uri = upload_slide(s3, slide_dir, buckets["ingest"])
    *items, merged = sized_jobs(run, "publish")
    for job in [*items, merged]:
        run_stage_job("publish", slide_uri=slide_uri, work_uri=f"s3://{buckets['work']}/{source}", run_id=run["run_id"],
                      array_index=job.item, merge=job.merge, items=job.count, s3=job_s3 or s3,
                      settings={**os.environ, **settings, "ATLAS_RESULTS_BUCKET": buckets["results"],
                                "ATLAS_OVERVIEW_BUCKET": buckets["site"]})
    return buckets


@pytest.mark.parametrize("public", [True, False])
def test_the_publishing_job_keeps_a_private_overview_off_the_site(aws, run, slide_copy, public):
    """params.yml ``overview: {public: false}``: the overview is released in the results bucket only; the
    site gets the portal (rewritten on every release) but not the slide's pages. Public is the default."""
    _, s3 = aws
    if not public:
        (slide_copy / "params.yml").write_text("overview:\n  public: false\n")
        write_manifest(slide_copy)
    buckets = publish_again(s3, run, slide_copy, {})
    prefix = f"{run['slide_id']}/{run['run_id']}/"
    assert OVERVIEW_PAGE in objects(s3, buckets["results"], prefix)
    on_site = objects(s3, buckets["site"], prefix)
    assert ("index.html" in on_site) is public and (on_site == {}) is not public
    assert "index.html" in objects(s3, buckets["site"])  # the portal


def test_the_jobs_requests_name_the_owner_of_every_bucket_they_use(aws, run, sample_slide):
    """ATLAS_BUCKET_OWNER (the stack's account): ExpectedBucketOwner on each of the job's requests to the
    slide's, work, results and site buckets; S3 refuses a request whose bucket another account owns."""
    _, s3 = aws
    job_s3, sent = boto3.client("s3"), []  # the job adds its hook to the client it is given
    job_s3.meta.events.register("before-send.s3", lambda request, **_: sent.append(
        (urlsplit(request.url).path.split("/")[1], request.headers.get("x-amz-expected-bucket-owner"))))
    buckets = publish_again(s3, run, sample_slide, {"ATLAS_BUCKET_OWNER": MOTO_ACCOUNT}, job_s3=job_s3)
    assert {bucket for bucket, _ in sent} == set(buckets.values())  # path-style URLs: /<bucket>/<key>
    assert {owner for _, owner in sent} == {MOTO_ACCOUNT.encode()}
    with pytest.raises(Misconfigured, match="ATLAS_BUCKET_OWNER: 'atlas' is not an AWS account id"):
        run_stage_job("publish", slide_uri="s3://ingest/S1/", work_uri="s3://work/S1-r/", run_id="S1-r", merge=True,
                      s3=boto3.client("s3"), settings={"ATLAS_BUCKET_OWNER": "atlas"})


def test_a_stage_needs_its_upstream_records(aws):
    _, s3 = aws
    work = new_bucket(s3, "work")
    with pytest.raises(UpstreamIncomplete, match=re.escape(
            "needs illuminate[0], illuminate[1], illuminate merge, align, mosaic[0], mosaic[1], mosaic merge, "
            "segment[0], segment[1], segment[2], segment[3], segment merge to be complete first")):  # not export
        run_stage_job("quantify", slide_uri="s3://ingest/S1/", work_uri=f"s3://{work}/S1-r/", run_id="S1-r",
                      array_index=0, s3=s3)
    assert objects(s3, work) == {}


def test_a_changed_upstream_output_is_caught(aws, run):
    _, s3 = aws
    work = new_bucket(s3, "work")
    source = f"{run['run_id']}/"
    for key, body in objects(s3, run["work"], source).items():
        if not key.startswith((f"{layout.PROVENANCE}/render", f"{layout.PROVENANCE}/publish", "overview/")):
            s3.put_object(Bucket=work, Key=source + key, Body=body)
    quantified = json.loads(s3.get_object(Bucket=run["work"], Key=source + get_stage("quantify").jobs()[-1].record)
                            ["Body"].read())
    tampered = quantified["outputs"][0]["path"]  # the quantify merge's, which render builds on
    s3.put_object(Bucket=work, Key=source + tampered, Body=b"not the table")
    with pytest.raises(JobError, match=tampered) as caught:
        run_stage_job("render", slide_uri=run["slide_uri"], work_uri=f"s3://{work}/{source}",
                      run_id=run["run_id"], array_index=0, s3=s3)
    assert caught.value.exit_code == ExitCode.CORRUPT_WORK
    assert "quantify.json" in str(caught.value)  # says which record to delete to redo the stage


def test_missing_manifest_is_invalid_input(aws):
    _, s3 = aws
    ingest, work = new_bucket(s3, "ingest"), new_bucket(s3, "work")
    with pytest.raises(InvalidInput, match="manifest.json: missing"):
        run_stage_job("illuminate", slide_uri=f"s3://{ingest}/sample/", work_uri=f"s3://{work}/r/", run_id="r",
                      array_index=0, s3=s3)


def test_publish_without_a_results_bucket_is_misconfigured(aws, monkeypatch):
    _, s3 = aws
    monkeypatch.delenv("ATLAS_RESULTS_BUCKET", raising=False)
    work = new_bucket(s3, "work")
    with pytest.raises(Misconfigured, match="ATLAS_RESULTS_BUCKET"):
        run_stage_job("publish", slide_uri="s3://ingest/S1/", work_uri=f"s3://{work}/S1-r/", run_id="S1-r",
                      merge=True, s3=s3)


@pytest.mark.parametrize("args, message", [
    (["segment"], "is an array stage"),
    (["segment", "--array-index", "9"], "outside 0..3"),
    (["segment", "--array-index", "1", "--merge"], "either an array index or merge"),
    (["align", "--merge"], "not an array stage"),
    (["nosuch"], "unknown stage 'nosuch'"),
])
def test_bad_job_arguments_are_usage_errors(monkeypatch, args, message):
    monkeypatch.delenv("AWS_BATCH_JOB_ARRAY_INDEX", raising=False)
    result = CliRunner().invoke(app, ["stage", *args, "--slide-uri", "s3://ingest/S1/", "--work-uri",
                                      "s3://work/S1-r/", "--run-id", "S1-r"])
    assert result.exit_code == ExitCode.USAGE
    assert message in result.output


def test_instance_type_comes_from_instance_metadata(monkeypatch):
    monkeypatch.delenv("AWS_BATCH_JOB_ID", raising=False)
    monkeypatch.delenv("ECS_CONTAINER_METADATA_URI_V4", raising=False)
    assert instance_type() == "local"

    seen = []

    class IMDS(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            self._reply(b"token-1" if self.path == "/latest/api/token" else None)

        def do_GET(self):
            seen.append(self.headers.get("X-aws-ec2-metadata-token"))
            self._reply(b"c6i.2xlarge" if self.path == "/latest/meta-data/instance-type" else None)

        def _reply(self, body):
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), IMDS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_BATCH_JOB_ID", "job-1")
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert instance_type() == "c6i.2xlarge" and seen == ["token-1"]
    finally:
        server.shutdown()
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert instance_type(timeout_s=0.2) == "unknown"
