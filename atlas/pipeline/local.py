"""The local runner: every job of the registry in order on a local slide folder, with resume.

The registry's order is a topological order of its stage graph (each stage is listed after the
stages it builds on, :mod:`atlas.stages`), so running the stages one after another in it honours
every dependency; stages the state machine runs side by side simply run in turn here.

The slide folder and the results folder are stores (:class:`atlas.storage.FolderStore`); each job
runs through the same contract as a Batch job (:mod:`atlas.pipeline.runner`): after the records of
the jobs it builds on, reading only its declared inputs, writing only its declared outputs, and
leaving its completion record last. A job whose record is intact for the same run id is skipped,
which is how ``atlas run`` resumes.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from atlas import layout
from atlas.errors import InvalidInput
from atlas.pipeline import records
from atlas.pipeline.runner import pending, run_job, stage_context
from atlas.slide.convention import SLIDE_MANIFEST, run_id_for
from atlas.slide.validate import validate_slide
from atlas.stages import STAGES, Job, Stage, StageContext
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


def run_pipeline(slide_dir: Path, out_dir: Path, *, run_id: str | None = None,
                 on_stage: Callable[[Stage, str], None] | None = None,
                 settings: Mapping[str, str] | None = None) -> Path:
    """Run every registry job locally; returns the path of the results ``manifest.json``.

    ``on_stage(stage, event)`` is called with event "start", "skip" or "done" (progress display);
    ``settings`` as for :func:`folder_context`.
    """
    ctx = make_context(slide_dir, out_dir, run_id, settings=settings)
    notify = on_stage or (lambda s, e: None)
    for stage in STAGES:
        notify(stage, "start")
        ran = [run_local_job(ctx, job) for job in stage.jobs()]
        notify(stage, "skip" if all(r is None for r in ran) else "done")
    return Path(out_dir) / layout.MANIFEST
