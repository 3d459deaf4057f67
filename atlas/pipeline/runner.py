"""One job of a run against a slide store and a work store: the contract the local runner and the Batch job share.

:func:`run_job` does, for one registry job (a stage, an array item, a merge):

1. **skip** when its completion record is intact in the work store, else **check upstream**: the
   records of every job it builds on must be intact, else
   :class:`~atlas.pipeline.contract.UpstreamIncomplete` naming them, before anything else is read
   (:func:`pending`);
2. **check the slide** files it reads by byte range, where the caller asks (the Batch job);
3. **run** the stage function with stores that enforce the registry (:class:`atlas.storage.JobView`):
   it reads only its declared inputs, each whole object checked against its writer's sha256 (the
   slide's files against ``manifest.json``, earlier outputs against their records), and writes only
   its declared outputs, each one's size and sha256 recorded as it is written;
4. **measure** it (:class:`atlas.pipeline.usage.JobUsage`) and return its completion record
   (:func:`run_job`).

The caller stores the record last (:func:`records.write_record`); the Batch job releases the run
before that when the stage publishes. :mod:`atlas.pipeline.local` calls this with folder stores,
:mod:`atlas.aws.job` (the Batch job) with S3 stores.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from atlas import layout
from atlas.errors import InvalidInput, Problem
from atlas.params import parse_params
from atlas.pipeline import records
from atlas.pipeline.contract import (
    StageFailed,
    corrupt_output,
    undeclared_outputs,
    upstream_incomplete,
)
from atlas.pipeline.usage import JobUsage
from atlas.science.overview.site import VIEWER_ENV, default_viewer_dir
from atlas.science.segmentation import EngineSettings
from atlas.slide.convention import PARAMS, SLIDE_MANIFEST, parse_manifest
from atlas.stages import STAGES, CompletionRecord, Job, StageContext, matches
from atlas.storage import IntegrityError, JobView, MissingObject, Store, UndeclaredAccess

# What every stage may read of the slide besides its raw: inputs (the slide's small files).
SLIDE_METADATA = ("markers.csv", PARAMS)


def stage_context(slide: Store, work: Store, *, slide_id: str, run_id: str, settings: Mapping[str, str],
                  results_uri: str | None = None) -> StageContext:
    """The context a slide's jobs run in: params.yml parsed, engine and viewer resolved from ``settings``.

    The one place a context is made (local runner, Batch job, ``atlas stitch``); :func:`run_job`
    narrows it for each job.
    """
    try:
        text = slide.read_text(PARAMS)
    except MissingObject:
        text = None
    params = parse_params(text, PARAMS)
    return StageContext(slide_id=slide_id, run_id=run_id, slide=slide, work=work, params=params,
                        engine=EngineSettings.resolve(params.segment.engine, settings), results_uri=results_uri,
                        viewer_dir=Path(settings.get(VIEWER_ENV) or default_viewer_dir()))


def slide_entries(slide: Store) -> dict[str, dict]:
    """path -> ``{"path", "size", "sha256"}`` of the slide's files, from its ``manifest.json``.

    Raises InvalidInput when there is no manifest.
    """
    try:
        text = slide.read_text(SLIDE_MANIFEST)
    except MissingObject as exc:
        raise InvalidInput(Problem(SLIDE_MANIFEST, f"missing at {slide.uri}",
                                   "upload the slide with `atlas upload`, which writes manifest.json last")) from exc
    return {e.path: {"path": e.path, "size": e.size, "sha256": e.sha256} for e in parse_manifest(text)}


def reads_slide(job: Job, rel: str) -> bool:
    """May ``job`` read the slide file ``rel``? (its stage's ``raw:`` inputs, and the slide's metadata)"""
    return rel in SLIDE_METADATA or any(matches(rel, p) for p in job.stage.raw_inputs())


def reads_work(job: Job, rel: str) -> bool:
    """May ``job`` read the earlier output ``rel``? (its stage's inputs; a merge: its items' outputs)"""
    return job.stage.reads(rel) or (job.merge and matches(rel, job.stage.item_dir))


def upstream_of(work: Store, job: Job, run_id: str) -> dict[str, CompletionRecord]:
    """The intact records of run ``run_id`` that ``job`` builds on, by record path.

    Raises
    ------
    UpstreamIncomplete
        Naming the jobs it builds on that have no record of this run.
    CorruptWork
        An output such a record lists is absent or has another size, naming it and the record.
    """
    found, missing, changed = records.upstream_records(work, job, run_id)
    if missing:
        raise upstream_incomplete(job, missing, run_id, work.uri)
    for path, record in changed.items():
        raise corrupt_output(path, record.doc["stage"], "is missing or not at the size its completion record says",
                             work.uri, record.entry["path"])
    return found


def pending(work: Store, job: Job, run_id: str) -> dict[str, CompletionRecord] | None:
    """What ``job`` builds on (:func:`upstream_of`), or None when its own work is already complete."""
    if records.finished_record(work, job, run_id) is not None:
        return None
    return upstream_of(work, job, run_id)


def job_context(ctx: StageContext, job: Job, upstream: Mapping[str, CompletionRecord], scratch: Path,
                vcpus: int | None = None) -> StageContext:
    """``ctx`` narrowed to ``job``: registry-enforcing views of its stores, its records, scratch and
    vCPUs (``vcpus``: what the run gave it; default the registry's)."""
    order = {stage.name: k for k, stage in enumerate(STAGES)}
    ordered = sorted(upstream.values(), key=lambda r: (order[r.doc["stage"]], r.doc["item"] is None))
    known = records.recorded_outputs(ordered)
    slide = JobView(ctx.slide, slide_entries(ctx.slide), readable=lambda rel: reads_slide(job, rel),
                    writable=lambda rel: False, inputs=job.stage.raw_inputs())
    declared = job.stage.writes(job)
    work = JobView(ctx.work, known, readable=lambda rel: reads_work(job, rel), writable=job.declared,
                   inputs=job.stage.inputs, outputs=declared, scratch=scratch)
    return replace(ctx.for_job(job, scratch=scratch, records=upstream, vcpus=vcpus), slide=slide, work=work)


def execute(ctx: StageContext, job: Job) -> list[dict]:
    """Run ``job``'s stage function in ``ctx`` (from :func:`job_context`); the outputs it wrote.

    Raises
    ------
    InvalidInput
        From the stage: bad input, named file by file.
    UndeclaredOutput
        The stage wrote (or read) outside what the registry declares for the job.
    CorruptWork
        An earlier output the stage read is not what its record says.
    StageFailed
        The stage raised anything else (chained).
    """
    try:
        ctx.run(job)
    except InvalidInput:
        raise
    except UndeclaredAccess as exc:
        raise undeclared_outputs(job, [exc.path], action=exc.action) from exc
    except IntegrityError as exc:
        known = ctx.work.known.get(exc.path, {}) if isinstance(ctx.work, JobView) else {}
        raise corrupt_output(exc.path, known.get("stage", "?"), exc.why, exc.where,
                             known.get("record", layout.PROVENANCE)) from exc
    except Exception as exc:
        raise StageFailed(f"{job.label} failed: {exc.__class__.__name__}: {exc}") from exc
    return list(ctx.work.written.values())


def run_job(ctx: StageContext, job: Job, upstream: Mapping[str, CompletionRecord], *, instance_type: str = "local",
            scratch_root: Path | None = None, vcpus: int | None = None,
            verify_slide: Callable[[Job, Mapping[str, dict]], None] | None = None) -> dict:
    """Run ``job`` (its upstream records from :func:`pending`); returns its record, for the caller to store last.

    Parameters
    ----------
    ctx : StageContext
        From :func:`stage_context`, over the run's slide and work stores.
    job : Job
    upstream : mapping
        The records it builds on (:func:`pending`).
    instance_type : str
        Where it runs, for the record.
    scratch_root : Path, optional
        Where the job's scratch folder is made (removed at the end); default the system's.
    vcpus : int, optional
        The vCPUs the job got (the Batch job: this run's sizes); its thread pools and its record's
        ``vcpus`` follow them. Default the registry's.
    verify_slide : callable, optional
        ``verify_slide(job, entries)`` checks the slide files the job reads by byte range against
        their manifest entries (path -> entry) before the stage runs (the Batch job; the local
        runner validates the whole slide once instead).
    """
    scratch = Path(tempfile.mkdtemp(prefix=f"atlas-{job.stage.name}-", dir=scratch_root))
    try:
        job_ctx = job_context(ctx, job, upstream, scratch, vcpus)
        if verify_slide is not None:
            verify_slide(job, job_ctx.slide.known)
        started = time.time()
        with JobUsage(scratch, ctx.work.counter) as usage:
            outputs = execute(job_ctx, job)
        return records.new_record(job, run_id=ctx.run_id, started=started, finished=time.time(), outputs=outputs,
                                  instance_type=instance_type, usage=usage.figures, vcpus=job_ctx.vcpus)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
