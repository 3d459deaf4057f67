"""The stage job contract: one job of a run (stage, array item or merge) as a Batch job, S3 in and S3 out, Spot-safe.

A job (``atlas stage NAME ...`` in the CPU or GPU image) does, in order:

1. **Skip** when its completion record (:mod:`atlas.pipeline.records`) for this run id is in the
   work prefix and intact (every output it lists is there at its recorded size): a Spot retry
   resumes where the interrupted attempt stopped instead of redoing finished work.
2. **Stage inputs** to local scratch once the records of every job it builds on are there (else
   fail before downloading anything): the slide's metadata files and the raw files the registry
   says the stage reads, each checked against the size and sha256 in the slide's ``manifest.json``
   (a mismatch is bad input: :class:`~atlas.errors.InvalidInput` naming the file); then the earlier
   outputs its stage's input patterns name, each checked against the sha256 its record holds.
3. **Run** the stage function from :mod:`atlas.stages` on the local copies, as the local runner does
   (:func:`atlas.pipeline.local.execute`: writing outside the declared outputs fails the job).
4. **Upload** every file the stage wrote under ``<work_uri>/<same relative path>``, then write the
   completion record (size + sha256 of each output, vCPU-seconds, instance type) LAST, so a
   record's presence means its outputs are complete. The publishing job releases the run to the
   results bucket (:mod:`atlas.aws.release`) before its record.

Outputs are deterministic, so an attempt killed mid-upload leaves objects that the next attempt
overwrites with identical bytes; nothing downstream trusts an output without a record.

``localcloud.executor`` runs every registry job this way as ``atlas stage`` processes, in order:
the local stand-in for Step Functions + Batch.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from atlas.aws.release import OVERVIEW_BUCKET_ENV, RESULTS_BUCKET_ENV, ReleaseError, release_prefix, release_run
from atlas.aws.s3 import S3Uri, get_bytes, is_missing, list_sizes, parallel_map, s3_client
from atlas.errors import InvalidInput, Problem
from atlas.pipeline import records
from atlas.pipeline.contract import (
    BadJobArguments,
    CorruptWork,
    Misconfigured,
    corrupt_output,
    upstream_incomplete,
)
from atlas.pipeline.local import execute, stage_context
from atlas.slide.convention import MANIFEST, RAW, parse_manifest, sha256_file
from atlas.slide.validate import REUPLOAD
from atlas.stages import CompletionRecord, Job, Stage, StageContext, get_stage, matches, upstream_jobs

log = logging.getLogger(__name__)

SCRATCH_ENV = "ATLAS_SCRATCH"
ARRAY_INDEX_ENV = "AWS_BATCH_JOB_ARRAY_INDEX"
IMDS_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"  # botocore's name for the IMDS endpoint


@dataclass(frozen=True)
class JobResult:
    """What one stage job did.

    Attributes
    ----------
    stage : str
    item : int or None
        Array item index; None for a plain stage or a merge.
    skipped : bool
        True when the completion record was already complete (nothing was run or uploaded).
    record : dict
        The completion record (the existing one when skipped).
    """

    stage: str
    item: int | None
    skipped: bool
    record: dict


def _download(s3, source: S3Uri, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    s3.download_file(source.bucket, source.key, str(target))


def stage_slide(s3, slide: S3Uri, slide_dir: Path, stage: Stage) -> list[str]:
    """Download what ``stage`` needs of the slide into ``slide_dir``, verified against manifest.json.

    Always the slide's small files (markers.csv, params.yml, ...); raw image files only where the
    stage's ``raw:`` input patterns name them.

    Returns
    -------
    list of str
        Slide-relative paths staged (manifest.json included).

    Raises
    ------
    InvalidInput
        Naming every file that is missing or whose size or sha256 differs from manifest.json.
    """
    manifest_uri = slide.join(MANIFEST)
    manifest_bytes = get_bytes(s3, manifest_uri)
    if manifest_bytes is None:
        raise InvalidInput(Problem(MANIFEST, f"missing at {manifest_uri}",
                                   "upload the slide with `atlas upload`, which writes manifest.json last"))
    entries = parse_manifest(manifest_bytes.decode("utf-8"))
    wanted = [e for e in entries
              if not e.path.startswith(RAW + "/") or any(matches(e.path, p) for p in stage.raw_inputs())]
    slide_dir.mkdir(parents=True, exist_ok=True)
    (slide_dir / MANIFEST).write_bytes(manifest_bytes)

    def fetch(entry) -> Problem | None:
        source, target = slide.join(entry.path), slide_dir / entry.path
        try:
            _download(s3, source, target)
        except ClientError as exc:
            if is_missing(exc):
                return Problem(entry.path, f"listed in manifest.json but missing at {source}", REUPLOAD)
            raise
        size, digest = target.stat().st_size, sha256_file(target)
        if size != entry.size:
            return Problem(entry.path, f"the staged copy from {source} has {size} bytes but manifest.json "
                                       f"says {entry.size}", REUPLOAD)
        if digest != entry.sha256:
            return Problem(entry.path, f"sha256 of the staged copy from {source} is {digest} but manifest.json "
                                       f"says {entry.sha256} (the file changed or was corrupted after the "
                                       "manifest was written)", REUPLOAD)
        return None

    problems = [p for p in parallel_map(fetch, wanted) if p is not None]
    if problems:
        raise InvalidInput(problems)
    return [MANIFEST] + [e.path for e in wanted]


def upstream_records(s3, work: S3Uri, job: Job, run_id: str) -> dict[str, CompletionRecord]:
    """The completion records ``job`` builds on (:func:`atlas.stages.upstream_jobs`), by record path.

    Raises UpstreamIncomplete naming the jobs without a record of this run.
    """
    wanted = upstream_jobs(job)
    raws = parallel_map(lambda j: get_bytes(s3, work.join(j.record)), wanted)
    found = {j.record: records.upstream(j.record, raw) for j, raw in zip(wanted, raws, strict=True) if raw is not None}
    missing = records.missing_jobs(wanted, {rel: r.doc for rel, r in found.items()}, run_id)
    if missing:
        raise upstream_incomplete(job, missing, run_id, str(work))
    return found


def stage_work(s3, work: S3Uri, out_dir: Path, job: Job, upstream: Mapping[str, CompletionRecord]) -> dict[str, str]:
    """Download the earlier outputs ``job`` reads into ``out_dir``, each checked against its record.

    What a job reads: earlier stages' outputs matching its stage's input patterns, and for a merge
    every output of its items.

    Returns
    -------
    dict of str to str
        Relative path -> sha256 of every staged file.

    Raises
    ------
    CorruptWork
        Naming the output that is missing or differs from its record, and the record to delete.
    """
    wanted: dict[str, dict] = {}
    for rel, record in upstream.items():
        own_item = record.doc["stage"] == job.stage.name
        for out in record.doc["outputs"]:
            if own_item or job.stage.reads(out["path"]):
                wanted[out["path"]] = {**out, "record": rel, "stage": record.doc["stage"]}

    def fetch(out: dict) -> None:
        source, target = work.join(out["path"]), out_dir / out["path"]
        stage_record = work.join(get_stage(out["stage"]).jobs()[-1].record)
        try:
            _download(s3, source, target)
        except ClientError as exc:
            if is_missing(exc):
                raise corrupt_output(out["path"], out["stage"], "is listed in its completion record but missing",
                                     str(source), str(stage_record)) from exc
            raise
        why = records.check_bytes(target.read_bytes(), out)
        if why:
            raise corrupt_output(out["path"], out["stage"], why, str(source), str(stage_record))

    parallel_map(fetch, wanted.values())
    return {rel: out["sha256"] for rel, out in wanted.items()}


def instance_type(timeout_s: float = 1.0) -> str:
    """EC2 instance type of the host this job runs on.

    "local" outside AWS Batch / ECS; on AWS the instance metadata service (IMDSv2, then v1) answers;
    "fargate" on Fargate; "unknown" when no metadata is reachable (e.g. an IMDSv2 hop limit of 1
    seen from a bridged container).
    """
    if "AWS_BATCH_JOB_ID" not in os.environ and "ECS_CONTAINER_METADATA_URI_V4" not in os.environ:
        return "local"
    imds = os.environ.get(IMDS_ENDPOINT_ENV, "http://169.254.169.254").rstrip("/")
    headers: dict[str, str] = {}
    try:
        request = urllib.request.Request(f"{imds}/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            headers["X-aws-ec2-metadata-token"] = response.read().decode()
    except OSError:
        pass  # IMDSv1 may still answer
    try:
        request = urllib.request.Request(f"{imds}/latest/meta-data/instance-type", headers=headers)
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read().decode().strip()
    except OSError:
        pass
    task_uri = os.environ.get("ECS_CONTAINER_METADATA_URI_V4")
    if task_uri:
        try:
            with urllib.request.urlopen(f"{task_uri}/task", timeout=timeout_s) as response:
                if json.loads(response.read()).get("LaunchType") == "FARGATE":
                    return "fargate"
        except (OSError, ValueError):
            pass
    return "unknown"


def job_of(stage_name: str, array_index: int | None, merge: bool) -> Job:
    """The registry job ``atlas stage`` was asked to run; BadJobArguments says what is wrong."""
    try:
        stage = get_stage(stage_name)
    except ValueError as exc:
        raise BadJobArguments(str(exc)) from exc
    if not stage.array_size:
        if array_index is not None or merge:
            raise BadJobArguments(f"stage {stage.name!r} is not an array stage: give neither an array index nor merge")
        return stage.jobs()[0]
    if merge:
        if array_index is not None:
            raise BadJobArguments(f"stage {stage.name!r}: give either an array index or merge, not both")
        return stage.jobs()[-1]
    if array_index is None:
        raise BadJobArguments(f"stage {stage.name!r} is an array stage: give an array index "
                              f"(--array-index or env {ARRAY_INDEX_ENV}) or merge")
    items = stage.jobs()[:-1]
    if not 0 <= array_index < len(items):
        raise BadJobArguments(f"stage {stage.name!r}: array index {array_index} is outside 0..{len(items) - 1}")
    return items[array_index]


@dataclass(frozen=True)
class JobPlace:
    """Where a job's run lives: the slide as uploaded, the run's work prefix, the run id."""

    slide: S3Uri
    work: S3Uri
    run_id: str

    @classmethod
    def parse(cls, slide_uri: str, work_uri: str, run_id: str) -> JobPlace:
        try:
            return cls(S3Uri.parse(slide_uri).prefix(), S3Uri.parse(work_uri).prefix(), run_id)
        except ValueError as exc:
            raise BadJobArguments(str(exc)) from exc


def finished_record(s3, place: JobPlace, job: Job) -> dict | None:
    """``job``'s completion record when its work in the work prefix is intact (:func:`records.is_intact`)."""
    record = records.loads(get_bytes(s3, place.work.join(job.record)))
    if record is None or not records.is_intact(record, place.run_id, list_sizes(s3, place.work)):
        return None
    return record


def prepare(s3, place: JobPlace, job: Job, root: Path, settings: Mapping[str, str]) -> StageContext:
    """Check upstream records, stage inputs below ``root`` and return the context the job runs in."""
    t0 = time.time()
    upstream = upstream_records(s3, place.work, job, place.run_id)  # fail fast, before any download
    slide_dir, out_dir = root / "slide" / place.slide.name, root / "out"
    out_dir.mkdir(parents=True)
    staged_slide = stage_slide(s3, place.slide, slide_dir, job.stage)
    staged = stage_work(s3, place.work, out_dir, job, upstream)
    log.info("%s: staged %d slide files and %d work files in %.1f s", job.label, len(staged_slide), len(staged),
             time.time() - t0)
    results_bucket = settings.get(RESULTS_BUCKET_ENV)
    results = str(release_prefix(results_bucket, place.slide.name, place.run_id)) if results_bucket else None
    ctx = stage_context(place.slide.name, place.run_id, slide_dir, out_dir, settings=settings, results_uri=results)
    scratch = root / "scratch"
    scratch.mkdir()
    return ctx.for_job(job, scratch=scratch, records=upstream)


def publish(s3, place: JobPlace, ctx: StageContext, settings: Mapping[str, str]) -> None:
    """Release the run (publishing stage only), before its completion record is written.

    The overview goes to the public site too unless the slide's params.yml says ``overview.public: false``;
    the portal at the site's root is rewritten either way (an earlier public release of the slide leaves it).
    """
    try:
        release_run(s3, ctx.out_dir, work=place.work, slide_id=place.slide.name, run_id=place.run_id,
                    results_bucket=settings[RESULTS_BUCKET_ENV],
                    overview_bucket=settings.get(OVERVIEW_BUCKET_ENV) or None, public=ctx.params.overview.public)
    except ReleaseError as exc:
        raise CorruptWork(str(exc)) from exc


def run_stage_job(stage_name: str, *, slide_uri: str, work_uri: str, run_id: str, array_index: int | None = None,
                  merge: bool = False, s3: Any = None, scratch: Path | str | None = None,
                  settings: Mapping[str, str] | None = None) -> JobResult:
    """Run one stage (or array item, or merge) of run ``run_id`` from S3 to S3; see the module doc.

    Parameters
    ----------
    stage_name : str
        A stage of :data:`atlas.stages.STAGES`.
    slide_uri : str
        ``s3://<ingest>/<slide_id>/``: the slide as uploaded, manifest.json included.
    work_uri : str
        ``s3://<work>/<run_id>/``: this run's results layout, built up stage by stage.
    run_id : str
    array_index : int, optional
        Item of an array stage (0 .. array_size - 1).
    merge : bool
        Run the merge step of an array stage.
    s3 : botocore S3 client, optional
        Default :func:`s3_client` (honours ``AWS_ENDPOINT_URL``).
    scratch : path, optional
        Local folder for the staged copies (default env ``ATLAS_SCRATCH``, else the system temp dir);
        the job's own subfolder is removed at the end.
    settings : mapping, optional
        The job's settings (default: this process's environment): ``ATLAS_RESULTS_BUCKET``,
        ``ATLAS_OVERVIEW_BUCKET``, the segmentation weights, the viewer folder.

    Raises
    ------
    InvalidInput
        A slide file is missing or differs from manifest.json (nothing is run or published).
    JobError
        :class:`BadJobArguments`, :class:`UpstreamIncomplete`, :class:`CorruptWork`, :class:`StageFailed`,
        :class:`UndeclaredOutput`, :class:`Misconfigured`; ``exit_code`` is the :class:`ExitCode` of
        ``atlas stage``.
    """
    job = job_of(stage_name, array_index, merge)
    place = JobPlace.parse(slide_uri, work_uri, run_id)
    settings = os.environ if settings is None else settings
    s3 = s3 or s3_client()
    existing = finished_record(s3, place, job)
    if existing is not None:
        log.info("%s: already complete for run %s, skipped", job.label, run_id)
        return JobResult(job.stage.name, job.item, True, existing)
    if job.stage.publishes and not settings.get(RESULTS_BUCKET_ENV):
        raise Misconfigured(f"the {job.stage.name} job needs env {RESULTS_BUCKET_ENV} (the results bucket's name) "
                            "-- fix: set it in the job definition (the CDK app does)")
    root = Path(tempfile.mkdtemp(prefix=f"atlas-{job.stage.name}-", dir=scratch or settings.get(SCRATCH_ENV) or None))
    try:
        ctx = prepare(s3, place, job, root, settings)
        started = time.time()
        outputs = execute(ctx, job)
        finished = time.time()
        log.info("%s: ran in %.1f s, %d output files", job.label, finished - started, len(outputs))
        parallel_map(lambda out: s3.upload_file(str(ctx.out_dir / out["path"]), place.work.bucket,
                                                place.work.join(out["path"]).key), outputs)
        record = records.new_record(job, run_id=run_id, started=started, finished=finished, outputs=outputs,
                                    instance_type=instance_type())
        if job.stage.publishes:
            publish(s3, place, ctx, settings)
        record_uri = place.work.join(job.record)
        s3.put_object(Bucket=record_uri.bucket, Key=record_uri.key, Body=records.dumps(record),
                      ContentType="application/json")
        log.info("%s: completion record written to %s", job.label, record_uri)
        return JobResult(job.stage.name, job.item, False, record)
    finally:
        shutil.rmtree(root, ignore_errors=True)
