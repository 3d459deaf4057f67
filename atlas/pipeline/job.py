"""The stage job contract: one stage of one run as a Batch job, S3 in and S3 out, Spot-safe.

A job (``atlas stage NAME ...`` in the CPU or GPU image) does, in order:

1. **Skip** when the completion record of this stage (or array item) for this run id is already in the
   work prefix with every output it lists present at its recorded size: a Spot retry resumes where
   the interrupted attempt stopped instead of redoing finished work.
2. **Stage inputs** to local scratch (instance storage, not S3 mounts), once every earlier stage's
   completion record is there (else fail before downloading anything): the slide's metadata files and
   the raw files the registry says the stage reads, each checked against the size and sha256 in the
   slide's ``manifest.json`` (a mismatch is bad input: :class:`~atlas.errors.InvalidInput` naming the
   file); then earlier stages' outputs, each checked against its completion record.
3. **Run** the stage function from :mod:`atlas.stages` on the local copies.
4. **Upload** every file the stage created or changed under ``<work_uri>/<same relative path>``, then
   write the completion record (size + sha256 of each output, vCPU-seconds, instance type) LAST, so a
   record's presence means its outputs are complete. The ``publish`` job also releases the run to the
   results bucket (:mod:`atlas.aws.release`) before its record.

Outputs are deterministic, so an attempt killed mid-upload leaves objects that the next attempt
overwrites with identical bytes; nothing downstream trusts an output without a record.

:mod:`localcloud.executor` runs every registry stage this way as ``atlas stage`` processes, in order:
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
from enum import IntEnum
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import ClientError

from atlas.aws.release import OVERVIEW_BUCKET_ENV, RESULTS_BUCKET_ENV, ReleaseError, release_run
from atlas.aws.s3 import S3Uri, get_bytes, is_missing, list_sizes, parallel_map, s3_client
from atlas.errors import InvalidInput, Problem
from atlas.params import parse_params
from atlas.pipeline.local import PROVENANCE, completion_path, write_completion
from atlas.slide.convention import MANIFEST, PARAMS, RAW, parse_manifest, sha256_file
from atlas.slide.validate import REUPLOAD
from atlas.stages import STAGES, Stage, StageContext, get_stage

log = logging.getLogger(__name__)

SCRATCH_ENV = "ATLAS_SCRATCH"
ARRAY_INDEX_ENV = "AWS_BATCH_JOB_ARRAY_INDEX"
IMDS_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"  # botocore's name for the IMDS endpoint
RAW_PREFIX = "raw:"


class ExitCode(IntEnum):
    """Exit status of ``atlas stage``; Batch retry strategies can match on these.

    Only ``STORAGE_ERROR`` is worth an automatic retry (throttling, network); the others need a
    person: fix the upload (``INVALID_INPUT``), run the missing stage (``UPSTREAM_INCOMPLETE``),
    redo the stage whose outputs changed (``CORRUPT_WORK``), fix the code or resources
    (``STAGE_FAILED``) or the job definition (``MISCONFIGURED``).
    """

    OK = 0
    INVALID_INPUT = 1
    USAGE = 2  # click's own code for bad command-line arguments
    UPSTREAM_INCOMPLETE = 3
    CORRUPT_WORK = 4
    STAGE_FAILED = 5
    STORAGE_ERROR = 6
    MISCONFIGURED = 7


class JobError(Exception):
    """A stage job that cannot go on; ``exit_code`` says which kind of failure it is."""

    exit_code = ExitCode.STAGE_FAILED


class UpstreamIncomplete(JobError):
    """An earlier stage (or array item) of this run has no complete completion record."""

    exit_code = ExitCode.UPSTREAM_INCOMPLETE


class CorruptWork(JobError):
    """An earlier stage's output in the work prefix does not match its completion record."""

    exit_code = ExitCode.CORRUPT_WORK


class StageFailed(JobError):
    """The stage function itself raised (its traceback is chained)."""

    exit_code = ExitCode.STAGE_FAILED


class BadJobArguments(JobError, ValueError):
    """The stage name, array index / merge or a URI given to the job is not valid."""

    exit_code = ExitCode.USAGE


class Misconfigured(JobError):
    """The job's environment lacks a setting it needs."""

    exit_code = ExitCode.MISCONFIGURED


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


def _matches(rel: str, pattern: str) -> bool:
    """Glob match as :meth:`pathlib.Path.glob` + "a matching folder counts file by file" does."""
    parts, pats = PurePosixPath(rel).parts, PurePosixPath(pattern).parts
    return len(parts) >= len(pats) and all(fnmatchcase(p, q) for p, q in zip(parts, pats, strict=False))


def _record_rel(stage: Stage, item: int | None) -> str:
    return completion_path(Path("."), stage, item).as_posix()


@dataclass(frozen=True)
class UpstreamRecord:
    """A completion record a job builds on, with its bytes as stored (they are released as they are)."""

    stage: Stage
    item: int | None
    doc: dict
    raw: bytes


def _record_intact(record: dict | None, run_id: str, sizes: Mapping[str, int]) -> bool:
    """A completion record of this run whose outputs all exist in the work prefix at their sizes."""
    return (record is not None and record.get("run_id") == run_id
            and all(sizes.get(out["path"]) == out["size"] for out in record["outputs"]))


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
    raw_patterns = [p[len(RAW_PREFIX):] for p in stage.inputs if p.startswith(RAW_PREFIX)]
    wanted = [e for e in entries
              if not e.path.startswith(RAW + "/") or any(_matches(e.path, p) for p in raw_patterns)]
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


def upstream_records(s3, work: S3Uri, stage: Stage, run_id: str, merge: bool) -> list[UpstreamRecord]:
    """Completion records a job builds on: every earlier stage (and its items), plus, for a merge,
    the items of this stage. Raises UpstreamIncomplete naming what is missing."""
    index = [s.name for s in STAGES].index(stage.name)
    wanted: list[tuple[Stage, int | None]] = []
    for earlier in STAGES[:index]:
        wanted.append((earlier, None))
        wanted.extend((earlier, i) for i in range(earlier.array_size))
    if merge:
        wanted.extend((stage, i) for i in range(stage.array_size))
    raws = parallel_map(lambda si: get_bytes(s3, work.join(_record_rel(*si))), wanted)
    records = [json.loads(raw) if raw is not None else None for raw in raws]
    missing = [f"{s.name}" + ("" if i is None else f" item {i}")
               for (s, i), r in zip(wanted, records, strict=True) if r is None or r.get("run_id") != run_id]
    if missing:
        raise UpstreamIncomplete(f"stage {stage.name} of run {run_id} needs {', '.join(missing)} to be complete "
                                 f"first: no completion record for this run under {work}")
    return [UpstreamRecord(s, i, r, raw) for (s, i), r, raw in zip(wanted, records, raws, strict=True)]


def stage_work(s3, work: S3Uri, out_dir: Path, stage: Stage, records: list[UpstreamRecord]) -> dict[str, str]:
    """Download earlier outputs this job needs into ``out_dir``, verified against their records.

    ``records`` are the completion records the job builds on (:func:`upstream_records`); all of them
    are staged (the run's provenance). Outputs staged are those of earlier stages matching this
    stage's input patterns, and for a merge all of its items' outputs.

    Returns
    -------
    dict of str to str
        Relative path -> sha256 of every staged file.

    Raises
    ------
    CorruptWork
    """
    patterns = [p for p in stage.inputs if not p.startswith(RAW_PREFIX)]
    wanted: dict[str, dict] = {}
    staged: dict[str, str] = {}
    for upstream in records:
        earlier, item, record = upstream.stage, upstream.item, upstream.doc
        rel = _record_rel(earlier, item)
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(upstream.raw)
        staged[rel] = sha256_file(path)
        own_items = earlier is stage and item is not None
        if item is None or own_items:
            for out in record["outputs"]:
                if own_items or any(_matches(out["path"], p) for p in patterns):
                    wanted[out["path"]] = {**out, "stage": earlier.name}

    def fetch(out: dict) -> None:
        source, target = work.join(out["path"]), out_dir / out["path"]
        try:
            _download(s3, source, target)
        except ClientError as exc:
            if is_missing(exc):
                raise CorruptWork(f"{out['path']}: output of stage {out['stage']} is listed in its completion "
                                  f"record but missing at {source}; delete "
                                  f"{work.join(_record_rel(get_stage(out['stage']), None))} and rerun the run "
                                  "to redo that stage") from exc
            raise
        size, digest = target.stat().st_size, sha256_file(target)
        if (size, digest) != (out["size"], out["sha256"]):
            raise CorruptWork(f"{out['path']}: output of stage {out['stage']} at {source} has {size} bytes, sha256 "
                              f"{digest}, but its completion record says {out['size']} bytes, sha256 {out['sha256']}; "
                              f"delete {work.join(_record_rel(get_stage(out['stage']), None))} and rerun the run "
                              "to redo that stage")

    parallel_map(fetch, wanted.values())
    staged.update({rel: out["sha256"] for rel, out in wanted.items()})
    return staged


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def changed_files(root: Path, before: Mapping[str, tuple[int, int]], known: Mapping[str, str]) -> list[str]:
    """Files below ``root`` that are new or whose content changed since ``before`` was taken.

    Parameters
    ----------
    root : Path
    before : dict of str to (int, int)
        Relative path -> (size, mtime_ns) before the stage ran.
    known : dict of str to str
        Relative path -> sha256 of the files staged before the stage ran (a rewrite with the
        same bytes is not a change).
    """
    changed = []
    for rel, stat in sorted(_snapshot(root).items()):
        if rel.startswith(PROVENANCE + "/"):
            continue
        if rel not in before or (stat != before[rel] and sha256_file(root / rel) != known.get(rel)):
            changed.append(rel)
    return changed


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


def _check_item(stage: Stage, array_index: int | None, merge: bool) -> int | None:
    if not stage.array_size:
        if array_index is not None or merge:
            raise BadJobArguments(f"stage {stage.name!r} is not an array stage: give neither an array index nor merge")
        return None
    if merge:
        if array_index is not None:
            raise BadJobArguments(f"stage {stage.name!r}: give either an array index or merge, not both")
        return None
    if array_index is None:
        raise BadJobArguments(f"stage {stage.name!r} is an array stage: give an array index "
                         f"(--array-index or env {ARRAY_INDEX_ENV}) or merge")
    if not 0 <= array_index < stage.array_size:
        raise BadJobArguments(f"stage {stage.name!r}: array index {array_index} is outside 0..{stage.array_size - 1}")
    return array_index


def run_stage_job(stage_name: str, *, slide_uri: str, work_uri: str, run_id: str, array_index: int | None = None,
                  merge: bool = False, s3: Any = None, scratch: Path | str | None = None) -> JobResult:
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
        Default :func:`atlas.aws.s3.s3_client` (honours ``AWS_ENDPOINT_URL``).
    scratch : path, optional
        Local folder for the staged copies (default env ``ATLAS_SCRATCH``, else the system temp dir);
        the job's own subfolder is removed at the end.

    Raises
    ------
    InvalidInput
        A slide file is missing or differs from manifest.json (nothing is run or published).
    JobError
        :class:`BadJobArguments`, :class:`UpstreamIncomplete`, :class:`CorruptWork`, :class:`StageFailed`,
        :class:`Misconfigured`; ``exit_code`` is the :class:`ExitCode` of ``atlas stage``.
    """
    try:
        stage = get_stage(stage_name)
        slide, work = S3Uri.parse(slide_uri).prefix(), S3Uri.parse(work_uri).prefix()
    except ValueError as exc:
        raise BadJobArguments(str(exc)) from exc
    item = _check_item(stage, array_index, merge)
    s3 = s3 or s3_client()
    what = stage.name + ("" if item is None else f"[{item}]") + (" merge" if merge else "")

    record_uri = work.join(_record_rel(stage, item))
    raw = get_bytes(s3, record_uri)
    existing = json.loads(raw) if raw is not None else None
    if existing is not None and _record_intact(existing, run_id, list_sizes(s3, work)):
        log.info("%s: already complete for run %s (%s), skipped", what, run_id, record_uri)
        return JobResult(stage.name, item, True, existing)
    results_bucket = os.environ.get(RESULTS_BUCKET_ENV)
    if stage.name == "publish" and not results_bucket:
        raise Misconfigured(f"the publish job needs env {RESULTS_BUCKET_ENV} (the results bucket's name)")

    root = Path(tempfile.mkdtemp(prefix=f"atlas-{stage.name}-", dir=scratch or os.environ.get(SCRATCH_ENV) or None))
    try:
        slide_dir, out_dir = root / "slide" / slide.name, root / "out"
        out_dir.mkdir(parents=True)
        t0 = time.time()
        records = upstream_records(s3, work, stage, run_id, merge)  # fail fast, before any download
        staged_slide = stage_slide(s3, slide, slide_dir, stage)
        staged = stage_work(s3, work, out_dir, stage, records)
        log.info("%s: staged %d slide files and %d work files in %.1f s", what, len(staged_slide), len(staged),
                 time.time() - t0)
        params_file = slide_dir / PARAMS
        params = parse_params(params_file.read_text() if params_file.is_file() else None)
        ctx = StageContext(slide_id=slide.name, run_id=run_id, slide_dir=slide_dir, out_dir=out_dir, params=params)

        before = _snapshot(out_dir)
        started = time.time()
        try:
            stage.execute(ctx, item=item, merge=merge)
        except InvalidInput:
            raise
        except Exception as exc:
            raise StageFailed(f"{what} failed: {exc.__class__.__name__}: {exc}") from exc
        finished = time.time()
        outputs = changed_files(out_dir, before, staged)
        log.info("%s: ran in %.1f s, %d output files", what, finished - started, len(outputs))

        parallel_map(lambda rel: s3.upload_file(str(out_dir / rel), work.bucket, work.join(rel).key), outputs)
        record = write_completion(ctx, stage, started=started, finished=finished, item=item, outputs=outputs,
                                  instance_type=instance_type())
        if stage.name == "publish":
            try:
                # overview.public: false in params.yml keeps the overview off the public site
                site = (os.environ.get(OVERVIEW_BUCKET_ENV) or None) if params.overview.public else None
                release_run(s3, out_dir, work=work, slide_id=slide.name, run_id=run_id, results_bucket=results_bucket,
                            overview_bucket=site)
            except ReleaseError as exc:
                raise CorruptWork(str(exc)) from exc
        s3.upload_file(str(out_dir / _record_rel(stage, item)), record_uri.bucket, record_uri.key)
        log.info("%s: completion record written to %s", what, record_uri)
        return JobResult(stage.name, item, False, record)
    finally:
        shutil.rmtree(root, ignore_errors=True)
