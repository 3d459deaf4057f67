"""Operating the pipeline: where a slide is, what its run cost so far, and rerunning it.

Status comes from three places, each authoritative for one thing:

- the **catalog table** (:mod:`atlas.aws.catalog`): the slide's state (COLLECTING, READY, RUNNING,
  SUCCEEDED, FAILED, INVALID), its current run id, problems, missing files, error and cause, and
  one ``RUN#<run_id>`` item per run with the execution input (slide and work URIs);
- **Step Functions**: the execution's own status and the job state it is in (its history);
- the **completion records** of the run in the work bucket (``<work_uri>/qc/provenance/``): which
  stages and array items finished, their vCPU-seconds and instance types, hence the cost so far.

A rerun starts a new execution of the same slide under a new run id (``<slide_id>-<manifest
sha256[:12]>-r<N>``, :func:`atlas.slide.convention.run_id_for`), so the earlier run's work and its release
stay as they are. ``from_stage`` reuses the earlier stages' outputs: they are copied server-side
into the new run's work prefix with their completion records re-issued for the new run id (marked
``reused_from``), so those stage jobs find themselves complete and skip. A params or story override
is applied to a copy of the slide (``s3://<work>/reruns/<run_id>/<slide_id>/``, raw files copied
server-side; the lab's upload is never changed) whose manifest lists the new ``params.yml`` or
``story.yml``.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import boto3
from boto3.dynamodb.conditions import Attr
from botocore.exceptions import ClientError

from atlas import layout
from atlas.aws import catalog
from atlas.aws.catalog import Status
from atlas.aws.s3 import S3Uri, expect_bucket_owner, get_bytes, list_sizes, parallel_map, s3_client
from atlas.errors import InvalidInput, Problem
from atlas.params import parse_params
from atlas.pipeline import records as completion
from atlas.slide.convention import MARKERS, PARAMS, SLIDE_MANIFEST, parse_manifest, parse_markers, run_id_for
from atlas.slide.story import STORY, check_story, parse_story
from atlas.stages import STAGES, Stage, batch_jobs, dependencies, get_stage, run_jobs

RERUN_PREFIX = "reruns"      # work bucket: slide copies carrying an overridden params.yml
RERUNNABLE = catalog.ENDED


@dataclass(frozen=True)
class ComputePrices:
    """On-demand price of a vCPU-hour by instance type or family (USD, Linux, us-east-1).

    Batch runs several jobs on one instance; a job is charged its vCPUs' share of the instance for
    its run time (what the completion records' ``vcpu_seconds`` measure). Spot capacity, which the
    queues prefer, costs less: these are upper bounds.
    """

    as_of: str
    source: str
    vcpu_hour: Mapping[str, float]

    def per_vcpu_hour(self, instance_type: str) -> float | None:
        """Price for an instance type (exact, else its family); None when unknown."""
        if instance_type in self.vcpu_hour:
            return self.vcpu_hour[instance_type]
        return self.vcpu_hour.get(instance_type.split(".")[0])


# The one compute price table: instance price / vCPUs. CPU families scale linearly with size; GPU
# sizes do not (one GPU from xlarge to 4xlarge), so GPU types are listed by size.
COMPUTE_PRICES = ComputePrices(
    as_of="2025-06-01",
    source="https://aws.amazon.com/ec2/pricing/on-demand/ (Linux, US East (N. Virginia))",
    vcpu_hour={"c6i": 0.17 / 4, "m6i": 0.192 / 4, "r6i": 0.252 / 4,
               "g5.xlarge": 1.006 / 4, "g5.2xlarge": 1.212 / 8, "g5.4xlarge": 1.624 / 16,
               "g6.xlarge": 0.8048 / 4, "g6.2xlarge": 0.9776 / 8, "g6.4xlarge": 1.3232 / 16,
               "local": 0.0},  # the local executor (atlas demo): no AWS compute
)


# --- clients and tables -------------------------------------------------------------------------
def catalog_table(name: str | None):
    """The catalog table named ``name`` (the CLI takes it from --table or env ``CATALOG_TABLE``)."""
    if not name:
        raise InvalidInput(Problem("--table", "no catalog table given",
                                   f"pass --table NAME or set {catalog.ENV_CATALOG_TABLE} (the pipeline stack's "
                                   "CatalogTableName output)"))
    return boto3.resource("dynamodb").Table(name)


def _slide_item(table, slide_id: str) -> dict:
    item = table.get_item(Key=catalog.slide_key(slide_id), ConsistentRead=True).get("Item")
    if item is None:
        raise InvalidInput(Problem(slide_id, f"slide {slide_id!r} is not in the catalog table {table.name}",
                                   "check the slide id (`atlas status` lists the slides) and the table (--table)"))
    return item


def _run_items(table, slide_id: str) -> list[dict]:
    return catalog.slide_items(table, slide_id, catalog.RUN_SK_PREFIX)


def sfn_client(arn: str):
    """Step Functions client in the region of a state machine or execution ARN (the pipeline's region)."""
    return boto3.client("stepfunctions", region_name=arn.split(":")[3])


def state_machine_of(execution_arn: str) -> str:
    """``arn:aws:states:R:A:execution:MACHINE:NAME`` -> ``arn:aws:states:R:A:stateMachine:MACHINE``."""
    head, _, _name = execution_arn.rpartition(":")
    return head.replace(":execution:", ":stateMachine:", 1)


def own_run_buckets(s3, execution_arn: str, *places: S3Uri) -> None:
    """``ExpectedBucketOwner`` on the requests of ``s3`` to the buckets of ``places`` (a run's slide and
    work prefixes): they belong to the account that deployed the pipeline, the one its execution ARN names."""
    expect_bucket_owner(s3, execution_arn.split(":")[4], {place.bucket for place in places})


# --- status -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageProgress:
    """One registry stage of a run.

    Attributes
    ----------
    stage : str
    state : {"done", "reused", "running", "failed", "pending"}
        ``reused``: taken over from an earlier run by ``rerun --from``.
    items_done, items : int
        Finished array items and their number (0 and 0 for a plain stage).
    seconds, vcpu_seconds : float
        Wall time and vCPU-seconds of its finished jobs (items and merge summed).
    instance_types : tuple of str
    cost_usd : float or None
        On-demand estimate of its finished jobs (0 when reused); None if an instance type is unknown.
    """

    stage: str
    state: str
    items_done: int = 0
    items: int = 0
    seconds: float = 0.0
    vcpu_seconds: float = 0.0
    instance_types: tuple[str, ...] = ()
    cost_usd: float | None = 0.0


@dataclass(frozen=True)
class SlideStatus:
    """Everything ops need to know about one slide (see :func:`slide_status`).

    Attributes
    ----------
    status : str
        The catalog's slide state.
    execution_status : str or None
        Step Functions' status of the current run's execution (None before it started).
    current_stage : str or None
        The job the run is in (running) or stopped in (failed), e.g. ``segment-merge``; the first of
        ``current_jobs``.
    current_jobs : tuple of str
        Every job the run is in: one per parallel branch running (e.g. ``export`` and ``segment``).
    cost_usd : float
        Compute cost so far (on-demand estimate, reused stages not counted); ``cost_complete`` is
        False when some job ran on an instance type without a price.
    """

    slide_id: str
    status: str
    run_id: str | None
    execution_arn: str | None
    execution_status: str | None
    current_stage: str | None
    stages: list[StageProgress]
    error: str | None
    cause: str | None
    problems: list[dict]
    missing: list[dict]
    cost_usd: float
    cost_complete: bool
    work_uri: str | None
    results_uri: str | None
    overview_uri: str | None
    updated_at: str | None
    runs: list[dict] = field(default_factory=list)
    current_jobs: tuple[str, ...] = ()


def list_catalog_slides(table) -> list[dict]:
    """The slide item of every slide (plain JSON types), by slide id."""
    items, kwargs = [], {"FilterExpression": Attr("sk").eq(catalog.SLIDE_SK)}
    while True:
        page = table.scan(**kwargs)
        items += [catalog.from_dynamo(i) for i in page["Items"]]
        if "LastEvaluatedKey" not in page:
            break
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    return sorted(({"slide_id": catalog.slide_id_of(i["pk"]), **i} for i in items), key=lambda i: i["slide_id"])


def job_stage(state_name: str) -> Stage | None:
    """The registry stage a state machine state runs (``segment``, ``segment-merge``), else None."""
    return next((job.stage for job in batch_jobs() if job.name == state_name), None)


def current_jobs(sfn, execution_arn: str) -> list[str]:
    """The job states the execution is in (entered, not yet exited: one per parallel branch running),
    in registry order; when none is, the one it entered last (where it failed), from its history."""
    kwargs = {"executionArn": execution_arn, "reverseOrder": True, "maxResults": 200}
    exited, open_states, last = set(), set(), None
    while True:
        page = sfn.get_execution_history(**kwargs)
        for event in page["events"]:  # newest first: a state's exit comes before its entry
            if (name := (event.get("stateExitedEventDetails") or {}).get("name")) and job_stage(name):
                exited.add(name)
            if (name := (event.get("stateEnteredEventDetails") or {}).get("name")) and job_stage(name):
                last = last or name
                if name not in exited:
                    open_states.add(name)
        if not page.get("nextToken"):
            break
        kwargs["nextToken"] = page["nextToken"]
    return [job.name for job in batch_jobs() if job.name in open_states] or ([last] if last else [])


def completion_records(s3, work: S3Uri, run_id: str) -> dict[str, dict]:
    """This run's completion records in its work prefix: record path (``qc/provenance/...``) -> record."""
    records = work.prefix().join(layout.PROVENANCE).prefix()
    rels = [f"{layout.PROVENANCE}/{name}" for name in list_sizes(s3, records) if name.endswith(".json")]
    raws = parallel_map(lambda rel: get_bytes(s3, work.join(rel)), rels)
    docs = {rel: json.loads(raw) for rel, raw in zip(rels, raws, strict=True) if raw is not None}
    return {rel: doc for rel, doc in docs.items() if doc.get("run_id") == run_id}


def job_cost(record: Mapping, prices: ComputePrices = COMPUTE_PRICES) -> float | None:
    """On-demand cost of one finished job from its completion record (0 when reused); None if unpriced."""
    if record.get("reused_from"):
        return 0.0
    rate = prices.per_vcpu_hour(str(record.get("instance_type", "")))
    return None if rate is None else float(record.get("vcpu_seconds", 0.0)) / 3600 * rate


def stage_progress(records: Mapping[str, dict], *, execution_status: str | None,
                   current: Sequence[str] = ()) -> tuple[list[StageProgress], list[str]]:
    """Per-stage progress of a run from its completion records and its execution status.

    ``current`` are the job states from Step Functions when known; otherwise the stages without a
    complete record whose upstream stages are complete are taken as the ones running (one per
    parallel branch), or, for a failed run, the first of them as the one that failed.

    Returns
    -------
    stages : list of StageProgress
    current : list of str
        The jobs running or failed (none when the run has not started or has succeeded).
    """
    finished, complete, items_done = {}, set(), {}
    for stage in STAGES:
        *items, last = stage.jobs()
        jobs = [records.get(job.record) for job in (*items, last)]
        finished[stage.name] = [r for r in jobs if r is not None]
        items_done[stage.name] = sum(records.get(job.record) is not None for job in items)
        if last.record in records:
            complete.add(stage.name)
    current = list(current)
    if not current and execution_status and catalog.run_status(execution_status) in (Status.RUNNING,
                                                                                      Status.FAILED):
        ready = [s for s in STAGES if s.name not in complete and all(d.name in complete for d in dependencies(s))]
        current = [stage.jobs()[-1].name if stage.array_size and items_done[stage.name] == stage.array_size
                   else stage.name for stage in ready]
        current = current if execution_status == "RUNNING" else current[:1]
    running = {job_stage(name).name for name in current}
    stages = []
    for stage in STAGES:
        jobs = finished[stage.name]
        costs = [job_cost(r) for r in jobs]
        if stage.name in complete:
            state = "reused" if records[stage.jobs()[-1].record].get("reused_from") else "done"
        elif stage.name in running:
            state = "running" if execution_status == "RUNNING" else "failed"
        else:
            state = "pending"
        stages.append(StageProgress(
            stage.name, state, items_done[stage.name], stage.array_size, sum(float(r.get("seconds", 0)) for r in jobs),
            sum(float(r.get("vcpu_seconds", 0)) for r in jobs),
            tuple(sorted({str(r.get("instance_type")) for r in jobs})),
            None if None in costs else sum(costs)))
    if execution_status == "SUCCEEDED":
        current = []
    return stages, current


def slide_status(slide_id: str, *, table, sfn=None, s3=None) -> SlideStatus:
    """Where a slide is: catalog state, execution status, current stage, errors, run id, cost so far.

    Parameters
    ----------
    slide_id : str
    table : DynamoDB Table
        The catalog table (:func:`catalog_table`).
    sfn, s3 : boto3 clients, optional
    """
    s3 = s3 or s3_client()
    item = catalog.from_dynamo(_slide_item(table, slide_id))
    runs = sorted((catalog.from_dynamo(r) for r in _run_items(table, slide_id)), key=lambda r: r.get("started_at", ""))
    run_id = item.get("run_id")
    run = next((r for r in runs if r.get("run_id") == run_id), {})
    execution_arn = item.get("execution_arn") or run.get("execution_arn")
    execution_status, current = None, []
    work_uri = (run.get("input") or {}).get("work_uri")
    if execution_arn:
        sfn = sfn or sfn_client(execution_arn)
        described = sfn.describe_execution(executionArn=execution_arn)
        execution_status = described["status"]
        work_uri = work_uri or json.loads(described.get("input") or "{}").get("work_uri")
        current = current_jobs(sfn, execution_arn)
    if execution_arn and work_uri:
        own_run_buckets(s3, execution_arn, S3Uri.parse(work_uri))
    records = completion_records(s3, S3Uri.parse(work_uri), run_id) if work_uri and run_id else {}
    stages, current = stage_progress(records, execution_status=execution_status, current=current)
    costs = [job_cost(r) for r in records.values()]
    return SlideStatus(
        slide_id=slide_id, status=item.get("status", "?"), run_id=run_id, execution_arn=execution_arn,
        execution_status=execution_status, current_stage=current[0] if current else None, stages=stages,
        error=item.get("error"), cause=item.get("cause"), problems=item.get("problems") or [],
        missing=item.get("missing") or [], cost_usd=sum(c for c in costs if c is not None),
        cost_complete=None not in costs, work_uri=work_uri, results_uri=item.get("output_uri"), runs=runs,
        overview_uri=item.get("overview_uri"), updated_at=item.get("updated_at"), current_jobs=tuple(current))


# --- rerun --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rerun:
    """A started rerun.

    Attributes
    ----------
    run_id, previous_run_id : str
    execution_arn : str
    slide_uri, work_uri : str
        The new execution's input (``slide_uri`` is a copy of the slide when params or the story
        were overridden).
    reused : tuple of str
        Stages whose outputs were taken over from the previous run.
    params_override, story_override : bool
    """

    slide_id: str
    run_id: str
    previous_run_id: str
    execution_arn: str
    slide_uri: str
    work_uri: str
    reused: tuple[str, ...]
    params_override: bool
    story_override: bool = False


def _check_rerunnable(slide_id: str, item: Mapping, sfn) -> None:
    status, run_id, arn = item.get("status"), item.get("run_id"), item.get("execution_arn")
    if status in RERUNNABLE:
        return
    if status in (Status.READY, Status.RUNNING) and arn:
        described = sfn.describe_execution(executionArn=arn)
        if catalog.run_status(described["status"]) in catalog.ENDED:
            return  # the execution ended but its status event has not (yet) reached the catalog
        raise InvalidInput(Problem(slide_id, f"run {run_id} is still {described['status']}",
                                   f"wait for it to end (`atlas status {slide_id}`), or stop it: aws stepfunctions "
                                   f"stop-execution --execution-arn {arn}; then rerun"))
    fixes = {Status.INVALID: "fix the problems `atlas status` lists and upload the slide again (`atlas upload`): "
                             "the new manifest starts a new run by itself",
             Status.COLLECTING: "wait for the upload to finish: `atlas status` lists the files still missing"}
    raise InvalidInput(Problem(slide_id, f"slide is {status}: there is no run to rerun",
                               fixes.get(status, f"check `atlas status {slide_id}`")))


@dataclass(frozen=True)
class _Reuse:
    """Outputs (relative paths) and re-issued completion records taken over from the previous run."""

    outputs: tuple[str, ...]
    records: Mapping[str, dict]


def plan_reuse(s3, previous: S3Uri, *, previous_run: str, run_id: str, stages: list[Stage]) -> _Reuse:
    """What reusing ``stages`` (all items) of run ``previous_run`` copies; checks everything is complete.

    Raises InvalidInput naming the first job whose record or outputs are incomplete.
    """
    sizes = list_sizes(s3, previous)
    outputs: set[str] = set()
    records: dict[str, dict] = {}
    for job in run_jobs(stages):
        record = completion.loads(get_bytes(s3, previous.join(job.record)))
        if not completion.is_intact(record, previous_run, sizes):
            raise InvalidInput(Problem(str(previous.join(job.record)), f"{job.label} of run {previous_run} is not "
                                       "complete (no completion record for it, or its outputs are missing)",
                                       f"rerun --from {job.stage.name} or an earlier stage"))
        outputs.update(o["path"] for o in record["outputs"])
        records[job.record] = {**record, "run_id": run_id, "reused_from": previous_run}
    return _Reuse(tuple(sorted(outputs)), records)


def reuse(s3, plan: _Reuse, previous: S3Uri, target: S3Uri) -> None:
    """Copy the planned outputs server-side, then write their records (last, as the jobs do)."""
    parallel_map(lambda rel: s3.copy({"Bucket": previous.bucket, "Key": previous.join(rel).key},
                                     target.bucket, target.join(rel).key), plan.outputs)
    parallel_map(lambda kv: s3.put_object(Bucket=target.bucket, Key=target.join(kv[0]).key,
                                          Body=completion.dumps(kv[1]), ContentType="application/json"),
                 plan.records.items())


def with_files(manifest: Mapping, files: Mapping[str, bytes]) -> bytes:
    """A slide manifest (as ``atlas upload`` writes it) listing ``files`` (params.yml, story.yml) instead
    of the slide's own."""
    entries = [{"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
               for name, data in files.items()]
    kept = [f for f in manifest["files"] if f["path"] not in files]
    return json.dumps({**manifest, "files": sorted(kept + entries, key=lambda f: f["path"])}, indent=1).encode() + b"\n"


def copy_slide(s3, slide: S3Uri, target: S3Uri, manifest: bytes, files: Mapping[str, bytes]) -> None:
    """Copy a slide server-side to ``target`` with ``files`` in place of its own and ``manifest`` written last."""
    copied = [f["path"] for f in json.loads(manifest)["files"] if f["path"] not in files]
    parallel_map(lambda rel: s3.copy({"Bucket": slide.bucket, "Key": slide.join(rel).key}, target.bucket,
                                     target.join(rel).key), copied)
    for name, data in files.items():
        s3.put_object(Bucket=target.bucket, Key=target.join(name).key, Body=data)
    s3.put_object(Bucket=target.bucket, Key=target.join(SLIDE_MANIFEST).key, Body=manifest)


def rerun(slide_id: str, *, table, from_stage: str | None = None, params_text: str | None = None,
          params_file: str = PARAMS, story_text: str | None = None, story_file: str = STORY, s3=None,
          sfn=None) -> Rerun:
    """Start a new run of a slide's current run, under a new run id; the earlier run stays as it is.

    Parameters
    ----------
    slide_id : str
    table : DynamoDB Table
        The catalog table.
    from_stage : str, optional
        First stage to redo; the outputs of the stages listed before it in the registry are reused
        from the current run (they must be complete there): those it builds on, and those the state
        machine runs beside it (``--from segment`` reuses the OME-TIFF export; ``--from export``
        redoes it and everything after it).
    params_text : str, optional
        params.yml to use instead of the slide's (validated first). It may not change the
        parameters of a reused stage.
    params_file : str
        Name of that file in error messages.
    story_text : str, optional
        story.yml to use instead of the slide's (checked against its markers first); it changes
        the overview only, so it needs ``from_stage`` at render or earlier.
    story_file : str
        Name of that file in error messages.
    s3, sfn : boto3 clients, optional

    Raises
    ------
    InvalidInput
        The slide is not rerunnable (running, invalid, collecting), the stage is unknown, the
        params are invalid or change a reused stage, or a reused stage is incomplete. Nothing is
        started then.
    """
    s3 = s3 or s3_client()
    slide = _slide_item(table, slide_id)
    runs = {r["run_id"]: catalog.from_dynamo(r) for r in _run_items(table, slide_id)}
    previous_run = slide.get("run_id")
    previous = runs.get(previous_run, {})
    execution_arn = slide.get("execution_arn") or previous.get("execution_arn")
    sfn = sfn or (sfn_client(execution_arn) if execution_arn else None)
    _check_rerunnable(slide_id, slide, sfn)
    payload = previous.get("input") or json.loads(sfn.describe_execution(executionArn=execution_arn)["input"])
    slide_uri, work_uri = S3Uri.parse(payload["slide_uri"]).prefix(), S3Uri.parse(payload["work_uri"]).prefix()
    own_run_buckets(s3, execution_arn, slide_uri, work_uri)
    first = _first_stage(from_stage)
    reused = list(STAGES[:first])
    manifest = _slide_manifest(s3, slide_uri)
    params = _params_override(s3, slide_uri, manifest, params_text, params_file, reused, previous_run)
    story = _story_override(s3, slide_uri, manifest, story_text, story_file,
                            params_text if params is not None else None, reused)
    overrides = {name: data for name, data in ((PARAMS, params), (STORY, story)) if data is not None}
    # the run id hashes the manifest the run reads: the slide's, or its copy's listing the new files
    used = with_files(json.loads(manifest), overrides) if overrides else manifest
    run_id = _new_run_id(slide_id, used, runs)
    plan = plan_reuse(s3, work_uri, previous_run=previous_run, run_id=run_id, stages=reused)  # checks first
    if overrides:
        copy = S3Uri(work_uri.bucket, f"{RERUN_PREFIX}/{run_id}/{slide_id}/")
        copy_slide(s3, slide_uri, copy, used, overrides)
        slide_uri = copy
    new_payload = catalog.execution_input(slide_id=slide_id, run_id=run_id, slide_uri=str(slide_uri),
                                          work_bucket=work_uri.bucket, sizes=payload.get("sizes"))
    reuse(s3, plan, work_uri, S3Uri.parse(new_payload["work_uri"]))
    arn = _start(table, sfn, state_machine_of(execution_arn), slide, new_payload,
                 {"manifest_version": slide.get("manifest_version"), "rerun_of": previous_run,
                  "from_stage": STAGES[first].name, "params_override": params is not None,
                  "story_override": story is not None})
    return Rerun(slide_id, run_id, previous_run, arn, new_payload["slide_uri"], new_payload["work_uri"],
                 tuple(s.name for s in reused), params is not None, story is not None)


def _first_stage(from_stage: str | None) -> int:
    """Index in the registry of the first stage to redo (0: all)."""
    try:
        return [s.name for s in STAGES].index(get_stage(from_stage).name) if from_stage else 0
    except ValueError as exc:
        raise InvalidInput(Problem("--from", str(exc), "name one of the stages")) from exc


def _new_run_id(slide_id: str, manifest: bytes, taken: Mapping) -> str:
    """``<slide_id>-<sha256[:12]>-r<N>``, N from the number of runs on, the first not taken."""
    n = len(taken) + 1
    while (run_id := run_id_for(slide_id, manifest, suffix=f"r{n}")) in taken:
        n += 1
    return run_id


def _slide_manifest(s3, slide: S3Uri) -> bytes:
    """The manifest.json of the slide (or params copy) a run read; InvalidInput when it is gone."""
    manifest = get_bytes(s3, slide.join(SLIDE_MANIFEST))
    if manifest is None:
        expired = slide.key.startswith(RERUN_PREFIX + "/")
        raise InvalidInput(Problem(str(slide.join(SLIDE_MANIFEST)), "the slide this run read is gone"
                                   + (" (a params copy, expired with the work bucket's retention)" if expired else ""),
                                   "rerun with --params again" if expired
                                   else "upload the slide again (`atlas upload`)"))
    return manifest


def _params_override(s3, slide: S3Uri, manifest: bytes, params_text: str | None, params_file: str,
                     reused: list[Stage], previous_run: str) -> bytes | None:
    """The new params.yml when it differs from the slide's (None: no override); InvalidInput when it is
    invalid or changes the parameters of a reused stage."""
    if params_text is None:
        return None
    new = parse_params(params_text, file=params_file).to_dict()
    listed = any(e.path == PARAMS for e in parse_manifest(manifest.decode()))
    old = parse_params((get_bytes(s3, slide.join(PARAMS)) or b"").decode() if listed else None).to_dict()
    if changed := [s for s in reused if old.get(s.params) != new.get(s.params)]:
        sections = ", ".join(dict.fromkeys(s.params for s in changed))
        raise InvalidInput(Problem(params_file, f"changes the {sections} parameters, but --from "
                                                f"{STAGES[len(reused)].name} reuses the {changed[0].name} outputs of "
                                                f"run {previous_run}",
                                   f"rerun --from {changed[0].name} (or an earlier stage)"))
    return params_text.encode() if old != new else None


def _story_override(s3, slide: S3Uri, manifest: bytes, story_text: str | None, story_file: str,
                    params_text: str | None, reused: list[Stage]) -> bytes | None:
    """The new story.yml when it differs from the slide's (None: no override); InvalidInput when it does
    not fit the slide's markers (the image's extent is checked when rendering) or the rerun reuses
    the render outputs, so the story would not be rendered."""
    if story_text is None:
        return None
    listed = {e.path for e in parse_manifest(manifest.decode())}
    if STORY in listed and get_bytes(s3, slide.join(STORY)) == story_text.encode():
        return None
    story = parse_story(story_text, story_file)
    if params_text is None and PARAMS in listed:
        params_text = (get_bytes(s3, slide.join(PARAMS)) or b"").decode()
    markers_text = (get_bytes(s3, slide.join(MARKERS)) or b"").decode() if MARKERS in listed else ""
    if markers_text:
        markers = [m.marker_name for m in parse_markers(markers_text)]
        problems = check_story(story, markers=markers, per_group=parse_params(params_text).render.channels_per_group,
                               extent_um=None, file=story_file)
        if problems:
            raise InvalidInput(problems)
    if "render" in [s.name for s in reused]:
        raise InvalidInput(Problem(story_file, "changes the overview's story, but the rerun reuses the render "
                                               "outputs of the current run",
                                   "rerun --from render (or an earlier stage)"))
    return story_text.encode()


def _start(table, sfn, state_machine_arn: str, slide: Mapping, payload: Mapping[str, str],
           run_fields: Mapping) -> str:
    """Move the slide to the new run (if it is still on the one the rerun was planned from) and start it."""
    slide_id, run_id = payload["slide_id"], payload["run_id"]
    unchanged = Attr("run_id").eq(slide.get("run_id")) & Attr("status").eq(slide["status"])
    if not catalog.mark_ready(table, slide_id, run_id, unchanged):
        raise InvalidInput(Problem(slide_id, "the slide changed while the rerun was prepared (another rerun or a "
                                             "new upload)", f"check `atlas status {slide_id}` and try again"))
    try:
        return catalog.start_run(table, sfn, state_machine_arn, payload=payload, run_fields=run_fields)
    except Exception:
        if not _execution_exists(sfn, state_machine_arn, run_id):  # nothing started: back to the previous run
            table.put_item(Item=slide, ConditionExpression=Attr("run_id").eq(run_id))
            table.delete_item(Key=catalog.run_key(slide_id, run_id))
        raise


def _execution_exists(sfn, state_machine_arn: str, name: str) -> bool:
    arn = state_machine_arn.replace(":stateMachine:", ":execution:") + f":{name}"
    try:
        sfn.describe_execution(executionArn=arn)
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ExecutionDoesNotExist":
            return False
        raise
    return True
