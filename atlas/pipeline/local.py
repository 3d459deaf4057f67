"""The local runner: every job of the registry in order on a local slide folder, with resume.

Each finished job (a stage, an array item, a merge) leaves its completion record
(:mod:`atlas.pipeline.records`) in the results folder. A job whose record is intact for the same run
id is skipped, which is how ``atlas run`` resumes; the Batch job (:mod:`atlas.pipeline.job`) follows
the same contract on S3. Jobs run as the Batch jobs do: after the records of the jobs they build
on, writing only what the registry declares.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from atlas import layout
from atlas.errors import InvalidInput
from atlas.params import parse_params
from atlas.pipeline import records
from atlas.pipeline.contract import StageFailed, undeclared_outputs, upstream_incomplete
from atlas.science.overview.site import VIEWER_ENV, default_viewer_dir
from atlas.science.segmentation import EngineSettings
from atlas.slide.convention import MANIFEST, PARAMS, run_id_for
from atlas.slide.validate import validate_slide
from atlas.stages import STAGES, CompletionRecord, Job, Stage, StageContext, upstream_jobs


def read_record(out_dir: Path, job: Job) -> dict | None:
    """The completion record of ``job`` in a results folder, or None."""
    path = Path(out_dir) / job.record
    return records.loads(path.read_bytes()) if path.is_file() else None


def write_record(out_dir: Path, job: Job, record: Mapping) -> None:
    """Write ``job``'s completion record into a results folder, atomically."""
    path = Path(out_dir) / job.record
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(records.dumps(record))
    os.replace(tmp, path)


def output_sizes(out_dir: Path, record: Mapping) -> dict[str, int]:
    """Size on disk of every output a record lists (absent ones left out)."""
    paths = {out["path"]: Path(out_dir) / out["path"] for out in record["outputs"]}
    return {rel: path.stat().st_size for rel, path in paths.items() if path.is_file()}


def completed(out_dir: Path, job: Job, run_id: str) -> bool:
    """Is ``job``'s work in the results folder intact for run ``run_id`` (:func:`records.is_intact`)?"""
    record = read_record(out_dir, job)
    return record is not None and records.is_intact(record, run_id, output_sizes(out_dir, record))


def upstream_records(out_dir: Path, job: Job, run_id: str) -> dict[str, CompletionRecord]:
    """The records ``job`` builds on (:func:`atlas.stages.upstream_jobs`), by record path.

    Raises UpstreamIncomplete naming the jobs without an intact record of this run.
    """
    wanted = upstream_jobs(job)
    missing = [j for j in wanted if not completed(out_dir, j, run_id)]
    if missing:
        raise upstream_incomplete(job, missing, run_id, str(out_dir))
    return {j.record: records.upstream(j.record, (Path(out_dir) / j.record).read_bytes()) for j in wanted}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file below ``root``."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in Path(root).rglob("*") if p.is_file()}


def written_files(root: Path, before: Mapping[str, tuple[int, int]], known: Mapping[str, str]) -> list[str]:
    """Files below ``root`` that are new or changed since ``before`` (completion records aside).

    Parameters
    ----------
    root : Path
    before : dict of str to (int, int)
        :func:`snapshot` taken before the job ran.
    known : dict of str to str
        Relative path -> recorded sha256 of the earlier outputs already there (rewriting one with
        the same bytes is not a change).
    """
    changed = []
    for rel, stat in sorted(snapshot(root).items()):
        if rel.startswith(layout.PROVENANCE + "/"):
            continue
        if rel not in before or (stat != before[rel] and records.file_entry(root, rel)["sha256"] != known.get(rel)):
            changed.append(rel)
    return changed


def execute(ctx: StageContext, job: Job) -> list[dict]:
    """Run ``job`` on the results folder ``ctx.out_dir``; the outputs it wrote, as record entries.

    Raises
    ------
    InvalidInput
        From the stage: bad input, named file by file.
    StageFailed
        The stage raised anything else (chained).
    UndeclaredOutput
        The stage wrote outside what the registry declares for the job.
    """
    known = {out["path"]: out["sha256"] for record in ctx.records.values() for out in record.doc["outputs"]}
    before = snapshot(ctx.out_dir)
    try:
        ctx.run(job)
    except InvalidInput:
        raise
    except Exception as exc:
        raise StageFailed(f"{job.label} failed: {exc.__class__.__name__}: {exc}") from exc
    written = written_files(ctx.out_dir, before, known)
    undeclared = [rel for rel in written if not job.declared(rel)]
    if undeclared:
        raise undeclared_outputs(job, undeclared)
    return [records.file_entry(ctx.out_dir, rel) for rel in written]


def run_job(ctx: StageContext, job: Job) -> dict | None:
    """Run one job locally unless its work is already complete; returns its record (None: skipped)."""
    if completed(ctx.out_dir, job, ctx.run_id):
        return None
    upstream = upstream_records(ctx.out_dir, job, ctx.run_id)
    with tempfile.TemporaryDirectory(prefix=f"atlas-{job.stage.name}-") as scratch:
        job_ctx = ctx.for_job(job, scratch=Path(scratch), records=upstream)
        started = time.time()
        outputs = execute(job_ctx, job)
        record = records.new_record(job, run_id=ctx.run_id, started=started, finished=time.time(), outputs=outputs)
    write_record(ctx.out_dir, job, record)
    return record


def stage_context(slide_id: str, run_id: str, slide_dir: Path, out_dir: Path, *, settings: Mapping[str, str],
                  results_uri: str | None = None) -> StageContext:
    """The context a slide's jobs run in: params.yml parsed, engine and viewer resolved from ``settings``.

    The one place a context is made from a slide folder (local runner, Batch job, ``atlas stitch``).
    """
    params_file = Path(slide_dir) / PARAMS
    params = parse_params(params_file.read_text() if params_file.is_file() else None, PARAMS)
    return StageContext(slide_id=slide_id, run_id=run_id, slide_dir=Path(slide_dir), out_dir=Path(out_dir),
                        params=params, engine=EngineSettings.resolve(params.segment.engine, settings),
                        results_uri=results_uri,
                        viewer_dir=Path(settings.get(VIEWER_ENV) or default_viewer_dir()))


def make_context(slide_dir: Path, out_dir: Path, run_id: str | None = None, *,
                 settings: Mapping[str, str] | None = None) -> StageContext:
    """Validate a local slide and build the context its jobs run in (raises InvalidInput).

    ``settings`` (the entry point's environment: ``atlas run`` passes its own; default none) configures
    the segmentation weights and the overview viewer.
    """
    slide_dir, out_dir = Path(slide_dir), Path(out_dir)
    problems = validate_slide(slide_dir)
    if problems:
        raise InvalidInput(problems)
    run_id = run_id or run_id_for(slide_dir.name, (slide_dir / MANIFEST).read_bytes())
    out_dir.mkdir(parents=True, exist_ok=True)
    return stage_context(slide_dir.name, run_id, slide_dir, out_dir, settings=settings or {})


def run_pipeline(slide_dir: Path, out_dir: Path, *, run_id: str | None = None,
                 on_stage: Callable[[Stage, str], None] | None = None,
                 settings: Mapping[str, str] | None = None) -> Path:
    """Run every registry job locally; returns the path of the results ``manifest.json``.

    ``on_stage(stage, event)`` is called with event "start", "skip" or "done" (progress display);
    ``settings`` as for :func:`make_context`.
    """
    ctx = make_context(slide_dir, out_dir, run_id, settings=settings)
    notify = on_stage or (lambda s, e: None)
    for stage in STAGES:
        notify(stage, "start")
        ran = [run_job(ctx, job) for job in stage.jobs()]
        notify(stage, "skip" if all(r is None for r in ran) else "done")
    return Path(out_dir) / layout.MANIFEST
