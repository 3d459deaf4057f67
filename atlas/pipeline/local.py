"""The local runner: every job of the registry in order on a local slide folder, with resume.

The registry's order is a topological order of its stage graph (each stage is listed after the
stages it builds on, :mod:`atlas.stages`), so running the stages one after another in it honours
every dependency; stages the state machine runs side by side simply run in turn here.

The slide folder and the results folder are stores (:class:`atlas.storage.FolderStore`); each job
runs through the same contract as a Batch job (:mod:`atlas.pipeline.runner`): after the records of
the jobs it builds on, reading only its declared inputs, writing only its declared outputs, and
leaving its completion record last. A job whose record is intact for the same run id is skipped,
which is how ``atlas run`` resumes.

Each job runs in a process of its own, as on Batch, forked from a server process that has loaded
this module once (``forkserver``, so a job starts in milliseconds): what a job held goes back to
the system when it ends, so a job's memory is its own whatever ran before it (in one process,
glibc and the libraries keep what earlier jobs freed and the peak grows with the slide), and a job
that dies (killed for memory, a crash in native code) fails the run naming it, not the runner.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from atlas import layout
from atlas.errors import InvalidInput
from atlas.pipeline import records
from atlas.pipeline.contract import StageFailed
from atlas.pipeline.runner import pending, run_job, stage_context
from atlas.slide.convention import SLIDE_MANIFEST, run_id_for
from atlas.slide.validate import validate_slide
from atlas.stages import STAGES, Job, Stage, StageContext, get_stage
from atlas.storage import FolderStore, IoCounter


def folder_context(slide_dir: Path, out_dir: Path, *, run_id: str, settings: Mapping[str, str] | None = None
                   ) -> StageContext:
    """The context of a run of a local slide folder into a local results folder (one byte counter).

    ``settings``: the entry point's environment (``atlas run`` passes its own; default none), for
    the segmentation weights and the overview viewer.
    """
    counter = IoCounter()
    slide_dir = Path(slide_dir)
    return stage_context(FolderStore(slide_dir, counter=counter), FolderStore(out_dir, counter=counter),
                         slide_id=slide_dir.name, run_id=run_id, settings=settings or {})


def make_context(slide_dir: Path, out_dir: Path, run_id: str | None = None, *,
                 settings: Mapping[str, str] | None = None) -> StageContext:
    """Validate a local slide (every file against manifest.json, sha256 included) and build the
    context its jobs run in (raises InvalidInput).

    ``settings`` as for :func:`folder_context`.
    """
    slide_dir, out_dir = Path(slide_dir), Path(out_dir)
    problems = validate_slide(slide_dir)
    if problems:
        raise InvalidInput(problems)
    run_id = run_id or run_id_for(slide_dir.name, (slide_dir / SLIDE_MANIFEST).read_bytes())
    out_dir.mkdir(parents=True, exist_ok=True)
    return folder_context(slide_dir, out_dir, run_id=run_id, settings=settings)


def run_local_job(ctx: StageContext, job: Job) -> dict | None:
    """Run one job into the results folder unless it is complete; its record (None: skipped)."""
    upstream = pending(ctx.work, job, ctx.run_id)
    if upstream is None:
        return None
    record = run_job(ctx, job, upstream)
    records.write_record(ctx.work, job, record)
    return record


def run_job_alone(slide_dir: Path, out_dir: Path, run_id: str, settings: Mapping[str, str], stage: str,
                  index: int) -> dict | None:
    """:func:`run_local_job` for job ``index`` of ``stage`` (its ``jobs()``) in a context of its own:
    what the runner calls in a job's process."""
    ctx = folder_context(slide_dir, out_dir, run_id=run_id, settings=settings)
    return run_local_job(ctx, get_stage(stage).jobs()[index])


def job_processes() -> ProcessPoolExecutor:
    """An executor that runs each job it is given in a new process forked from a server that has
    loaded this module."""
    forkserver = multiprocessing.get_context("forkserver")
    forkserver.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(max_workers=1, mp_context=forkserver, max_tasks_per_child=1)


def run_pipeline(slide_dir: Path, out_dir: Path, *, run_id: str | None = None,
                 on_stage: Callable[[Stage, str], None] | None = None,
                 settings: Mapping[str, str] | None = None) -> Path:
    """Run every registry job locally, each in a process of its own; returns the path of the
    results ``manifest.json``.

    ``on_stage(stage, event)`` is called with event "start", "skip" or "done" (progress display);
    ``settings`` as for :func:`folder_context`.

    Raises
    ------
    InvalidInput, JobError
        As the job raised them in its process; StageFailed naming the job when its process died.
    """
    ctx = make_context(slide_dir, out_dir, run_id, settings=settings)
    notify = on_stage or (lambda s, e: None)
    run = (Path(slide_dir), Path(out_dir), ctx.run_id, dict(settings or {}))  # what every job's process is given
    with job_processes() as jobs:
        for stage in STAGES:
            notify(stage, "start")
            ran = []
            for index, job in enumerate(stage.jobs()):
                started = jobs.submit(run_job_alone, *run, stage.name, index)
                try:
                    ran.append(started.result())
                except BrokenProcessPool as exc:
                    raise StageFailed(f"{job.label}: its process ended without finishing (killed for memory, "
                                      f"or a crash in native code); rerun `atlas run` to retry from it") from exc
            notify(stage, "skip" if all(r is None for r in ran) else "done")
    return Path(out_dir) / layout.MANIFEST
