"""The stage job contract: one job of a run (stage, array item or merge) as a Batch job, on S3, Spot-safe.

A job (``atlas stage NAME ...`` in the CPU or GPU image) runs its stage where the data lies: the
slide in the ingest bucket and the run's results layout in the work prefix are S3 stores
(:class:`atlas.aws.store.S3Store`) in the stage's context; nothing is staged to local disk. It
does, in order (the steps shared with the local runner are :mod:`atlas.pipeline.runner`'s):

1. **Skip** when its completion record (:mod:`atlas.pipeline.records`) for this run id is in the
   work prefix and intact (every output it lists is there at its recorded size): a Spot retry
   resumes where the interrupted attempt stopped instead of redoing finished work.
2. **Check upstream**: the records of every job it builds on must be there, else exit 3 before
   anything else is read.
3. **Check the slide files it reads by byte range** (the raw cycles, for stitch) against
   ``manifest.json``: present at their size, and with its sha256 as S3 vouches for it (the
   object's SHA256 checksum, or the uploader's ``x-amz-meta-sha256`` the catalog compared), else by
   hashing the object once as it streams (:func:`check_raw_inputs`). Small slide files and earlier
   outputs are checked as they are read whole (:class:`atlas.storage.JobView`).
4. **Run** the stage function on the stores, writing chunk by chunk to the work prefix; each
   object's size and sha256 is recorded as it is written.
   The publishing stage's jobs get a publisher in their context (:class:`atlas.aws.release.S3Publisher`):
   its items copy their shares of the results to the results bucket, its merge makes the release
   visible (:mod:`atlas.stages.publish`).
5. **Record**: write the completion record LAST (outputs, vCPU-seconds, instance type, peak RSS,
   scratch, S3 bytes), so a record's presence means its outputs are complete.

Outputs are deterministic, so an attempt killed mid-way leaves objects that the next attempt
overwrites with identical bytes; nothing downstream trusts an output without a record.

``localcloud.executor`` runs every registry job this way as ``atlas stage`` processes, in order:
the local stand-in for Step Functions + Batch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from atlas.aws.release import OVERVIEW_BUCKET_ENV, RESULTS_BUCKET_ENV, S3Publisher, release_prefix
from atlas.aws.s3 import BUCKET_OWNER_ENV, S3Uri, expect_bucket_owner, parallel_map, s3_client
from atlas.aws.store import S3Store, counted
from atlas.errors import InvalidInput, Problem
from atlas.pipeline import records
from atlas.pipeline.contract import BadJobArguments, Misconfigured
from atlas.pipeline.runner import reads_slide, run_job, stage_context, upstream_of
from atlas.slide.convention import RAW
from atlas.slide.validate import REUPLOAD
from atlas.stages import MAX_ARRAY_SIZE, Job, StageContext, get_stage

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


def check_raw_inputs(slide: S3Store, job: Job, entries: Mapping[str, dict]) -> None:
    """The slide files ``job`` reads by byte range are the ones ``manifest.json`` lists (``entries``).

    Each must be present at the manifest's size, and have its sha256: as S3 vouches for it without
    a read (:meth:`S3Store.vouched_sha256`), else by hashing the object once as it streams.

    Raises
    ------
    InvalidInput
        Naming every file that is missing or differs, with the fix.
    """
    wanted = [e for rel, e in entries.items() if rel.startswith(RAW + "/") and reads_slide(job, rel)]

    def check(entry: dict) -> Problem | None:
        where = slide.prefix.join(entry["path"])
        size = slide.size(entry["path"])
        if size is None:
            return Problem(entry["path"], f"listed in manifest.json but missing at {where}", REUPLOAD)
        if size != entry["size"]:
            return Problem(entry["path"], f"has {size} bytes at {where} but manifest.json says {entry['size']}",
                           REUPLOAD)
        digest = slide.vouched_sha256(entry["path"]) or _streamed_sha256(slide, entry["path"])
        if digest != entry["sha256"]:
            return Problem(entry["path"], f"sha256 of {where} is {digest} but manifest.json says {entry['sha256']} "
                                          "(the file changed or was corrupted after the manifest was written)",
                           REUPLOAD)
        return None

    problems = [p for p in parallel_map(check, wanted) if p is not None]
    if problems:
        raise InvalidInput(problems)


def _streamed_sha256(store: S3Store, rel: str) -> str:
    digest = hashlib.sha256()
    with store.open(rel) as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def job_of(stage_name: str, array_index: int | None, merge: bool, items: int | None = None) -> Job:
    """The registry job ``atlas stage`` was asked to run; BadJobArguments says what is wrong.

    ``items`` is the size of an array stage's array in this run (default: the registry's).
    """
    try:
        stage = get_stage(stage_name)
    except ValueError as exc:
        raise BadJobArguments(str(exc)) from exc
    if not stage.array_size:
        if array_index is not None or merge or items is not None:
            raise BadJobArguments(f"stage {stage.name!r} is not an array stage: give neither an array index, "
                                  "items nor merge")
        return stage.jobs()[0]
    if items is not None and not 1 <= items <= MAX_ARRAY_SIZE:
        raise BadJobArguments(f"stage {stage.name!r}: {items} items; an array has 1..{MAX_ARRAY_SIZE}")
    *jobs, merged = stage.jobs(items)
    if merge:
        if array_index is not None:
            raise BadJobArguments(f"stage {stage.name!r}: give either an array index or merge, not both")
        return merged
    if array_index is None:
        raise BadJobArguments(f"stage {stage.name!r} is an array stage: give an array index "
                              f"(--array-index or env {ARRAY_INDEX_ENV}) or merge")
    if not 0 <= array_index < len(jobs):
        raise BadJobArguments(f"stage {stage.name!r}: array index {array_index} is outside 0..{len(jobs) - 1}")
    return jobs[array_index]


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


def publisher(s3, place: JobPlace, ctx: StageContext, settings: Mapping[str, str]) -> S3Publisher:
    """Where the publishing stage's jobs release the run: the results bucket, and the public site
    unless the slide's params.yml says ``overview.public: false`` (the portal at the site's root is
    rewritten either way: an earlier public release of the slide leaves it)."""
    return S3Publisher(s3, place.work, place.slide.name, place.run_id, settings[RESULTS_BUCKET_ENV],
                       settings.get(OVERVIEW_BUCKET_ENV) or None, ctx.params.overview.public)


def own_buckets(s3, place: JobPlace, settings: Mapping[str, str]) -> None:
    """``ExpectedBucketOwner`` on every request of ``s3`` to the run's buckets (the slide's, the work,
    results and site buckets; the job's stores and the release use that client) when the settings
    name their owner (``ATLAS_BUCKET_OWNER``: the CDK app sets the deploying account on every job
    definition)."""
    owner = settings.get(BUCKET_OWNER_ENV)
    if not owner:
        return
    buckets = {place.slide.bucket, place.work.bucket} | {settings[k] for k in (RESULTS_BUCKET_ENV, OVERVIEW_BUCKET_ENV)
                                                         if settings.get(k)}
    try:
        expect_bucket_owner(s3, owner, buckets)
    except ValueError as exc:
        raise Misconfigured(f"env {BUCKET_OWNER_ENV}: {exc} -- fix: set it to the account owning the buckets "
                            "in the job definition (the CDK app does)") from exc


def run_stage_job(stage_name: str, *, slide_uri: str, work_uri: str, run_id: str, array_index: int | None = None,
                  merge: bool = False, items: int | None = None, vcpus: int | None = None, s3: Any = None,
                  scratch: Path | str | None = None, settings: Mapping[str, str] | None = None) -> JobResult:
    """Run one stage (or array item, or merge) of run ``run_id`` on S3; see the module doc.

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
    items : int, optional
        Items of the array in this run (from the execution input, sized by the slide:
        :func:`atlas.stages.run_sizes`); default the registry's ``array_size``.
    vcpus : int, optional
        The vCPUs Batch gave the job in this run (the execution input's sizes, which SubmitJob also
        applies); its thread pools and its record's ``vcpus`` follow them. Default the registry's.
    s3 : botocore S3 client, optional
        Default :func:`s3_client` (honours ``AWS_ENDPOINT_URL``). Its bytes are counted into the record.
    scratch : path, optional
        Local folder for the job's scratch files (default env ``ATLAS_SCRATCH``, else the system
        temp dir); the job's own subfolder is removed at the end.
    settings : mapping, optional
        The job's settings (default: this process's environment): ``ATLAS_RESULTS_BUCKET``,
        ``ATLAS_OVERVIEW_BUCKET``, ``ATLAS_BUCKET_OWNER`` (:func:`own_buckets`), the segmentation
        weights, the viewer folder.

    Raises
    ------
    InvalidInput
        A slide file is missing or differs from manifest.json (nothing is run or published).
    JobError
        :class:`BadJobArguments`, :class:`UpstreamIncomplete`, :class:`CorruptWork`, :class:`StageFailed`,
        :class:`UndeclaredOutput`, :class:`Misconfigured`; ``exit_code`` is the :class:`ExitCode` of
        ``atlas stage``.
    """
    job = job_of(stage_name, array_index, merge, items)
    if vcpus is not None and vcpus < 1:
        raise BadJobArguments(f"--vcpus {vcpus}: a job has at least one vCPU")
    place = JobPlace.parse(slide_uri, work_uri, run_id)
    settings = os.environ if settings is None else settings
    s3 = s3 or s3_client()
    own_buckets(s3, place, settings)
    counter = counted(s3)
    slide, work = S3Store(s3, place.slide, counter=counter), S3Store(s3, place.work, counter=counter)
    existing = records.finished_record(work, job, run_id)
    if existing is not None:
        log.info("%s: already complete for run %s, skipped", job.label, run_id)
        return JobResult(job.stage.name, job.item, True, existing)
    if job.stage.publishes and not settings.get(RESULTS_BUCKET_ENV):
        raise Misconfigured(f"the {job.stage.name} job needs env {RESULTS_BUCKET_ENV} (the results bucket's name) "
                            "-- fix: set it in the job definition (the CDK app does)")
    upstream = upstream_of(work, job, run_id)  # fails before anything else is read
    results_bucket = settings.get(RESULTS_BUCKET_ENV)
    ctx = stage_context(slide, work, slide_id=place.slide.name, run_id=run_id, settings=settings,
                        results_uri=str(release_prefix(results_bucket, place.slide.name, run_id)) if results_bucket
                        else None)
    if job.stage.publishes:
        ctx = replace(ctx, publisher=publisher(s3, place, ctx, settings))
    record = run_job(ctx, job, upstream, instance_type=instance_type(), vcpus=vcpus,
                     verify_slide=partial(check_raw_inputs, slide),
                     scratch_root=Path(scratch or settings.get(SCRATCH_ENV) or tempfile.gettempdir()))
    log.info("%s: ran in %.1f s, %d outputs, %d bytes read, %d written", job.label, record["seconds"],
             len(record["outputs"]), record["s3_bytes_read"], record["s3_bytes_written"])
    records.write_record(work, job, record)
    log.info("%s: completion record written to %s", job.label, place.work.join(job.record))
    return JobResult(job.stage.name, job.item, False, record)
