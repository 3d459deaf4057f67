"""The local runner: every registry stage in order on a local slide folder, with resume.

Each finished stage (or array item) leaves a completion record ``qc/provenance/<stage>[.<item>].json``
listing its outputs with size and sha256. A stage whose record is complete for the same run id is
skipped, which is how both ``atlas run`` and a Spot-interrupted Batch job resume.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from atlas import layout
from atlas.errors import InvalidInput
from atlas.params import parse_params
from atlas.slide.convention import MANIFEST, PARAMS, run_id_for, sha256_file
from atlas.slide.validate import validate_slide
from atlas.stages import STAGES, Stage, StageContext

PROVENANCE = "qc/provenance"


def completion_path(out_dir: Path, stage: Stage, item: int | None = None) -> Path:
    """Where the completion record of ``stage`` (or of one of its array items) lives."""
    suffix = "" if item is None else f".{item}"
    return Path(out_dir) / PROVENANCE / f"{stage.name}{suffix}.json"


def stage_outputs(out_dir: Path, stage: Stage) -> list[str]:
    """Files under ``out_dir`` matching the stage's output patterns (folders count file by file)."""
    out_dir = Path(out_dir)
    found: set[Path] = set()
    for pattern in stage.outputs:
        for match in out_dir.glob(pattern):
            found.update([match] if match.is_file() else (p for p in match.rglob("*") if p.is_file()))
    return sorted(p.relative_to(out_dir).as_posix() for p in found
                  if not p.relative_to(out_dir).as_posix().startswith(PROVENANCE + "/"))


def file_record(root: Path, rel: str) -> dict:
    """``{"path", "size", "sha256"}`` of a file below ``root``."""
    path = Path(root) / rel
    return {"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)}


def write_completion(ctx: StageContext, stage: Stage, *, started: float, finished: float,
                     item: int | None = None, outputs: list[str] | None = None,
                     instance_type: str = "local") -> dict:
    """Record that ``stage`` (or array item ``item``) finished, listing its outputs; written atomically.

    ``outputs`` defaults to every file matching the stage's output patterns. ``vcpu_seconds`` is
    what Batch bills: the job's vCPUs times its wall time.
    """
    rels = stage_outputs(ctx.out_dir, stage) if outputs is None else sorted(outputs)
    seconds = round(finished - started, 3)
    record = {"stage": stage.name, "item": item, "run_id": ctx.run_id, "started": started, "finished": finished,
              "seconds": seconds, "vcpus": stage.vcpus, "vcpu_seconds": round(seconds * stage.vcpus, 3),
              "instance_type": instance_type, "outputs": [file_record(ctx.out_dir, r) for r in rels]}
    path = completion_path(ctx.out_dir, stage, item)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return record


def completed(ctx: StageContext, stage: Stage, item: int | None = None) -> bool:
    """True when the stage's record exists for this run id and every listed output is intact."""
    path = completion_path(ctx.out_dir, stage, item)
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    if record.get("run_id") != ctx.run_id:
        return False
    for out in record["outputs"]:
        target = Path(ctx.out_dir) / out["path"]
        if not target.is_file() or target.stat().st_size != out["size"] or sha256_file(target) != out["sha256"]:
            return False
    return True


def run_stage(ctx: StageContext, stage: Stage, *, item: int | None = None, merge: bool = False) -> dict | None:
    """Run one stage (or one array item, or the merge of an array stage) unless already complete.

    Returns the completion record written, or None when the work was already complete.
    """
    record_item = item if not merge else None
    if completed(ctx, stage, record_item):
        return None
    started = time.time()
    stage.execute(ctx, item=item, merge=merge)
    outputs = None
    if item is not None and not merge:
        # an array item's outputs are its share of the scratch area, not the stage's final outputs
        scratch = Path(ctx.out_dir) / "tmp" / stage.name
        outputs = sorted(p.relative_to(ctx.out_dir).as_posix() for p in scratch.rglob("*") if p.is_file()) \
            if scratch.is_dir() else []
    return write_completion(ctx, stage, started=started, finished=time.time(), item=record_item, outputs=outputs)


def make_context(slide_dir: Path, out_dir: Path, run_id: str | None = None) -> StageContext:
    """Validate a local slide and build the context its stages run in (raises InvalidInput)."""
    slide_dir, out_dir = Path(slide_dir), Path(out_dir)
    problems = validate_slide(slide_dir)
    if problems:
        raise InvalidInput(problems)
    params_file = slide_dir / PARAMS
    params = parse_params(params_file.read_text() if params_file.is_file() else None)
    run_id = run_id or run_id_for(slide_dir.name, (slide_dir / MANIFEST).read_bytes())
    out_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(slide_id=slide_dir.name, run_id=run_id, slide_dir=slide_dir, out_dir=out_dir, params=params)


def run_pipeline(slide_dir: Path, out_dir: Path, *, run_id: str | None = None,
                 on_stage: Callable[[Stage, str], None] | None = None) -> Path:
    """Run every registry stage locally; returns the path of the results ``manifest.json``.

    ``on_stage(stage, event)`` is called with event "start", "skip" or "done" (progress display).
    """
    ctx = make_context(slide_dir, out_dir, run_id)
    for stage in STAGES:
        notify = on_stage or (lambda s, e: None)
        notify(stage, "start")
        if stage.array_size:
            ran = [run_stage(ctx, stage, item=i) for i in range(stage.array_size)]
            ran.append(run_stage(ctx, stage, merge=True))
        else:
            ran = [run_stage(ctx, stage)]
        notify(stage, "skip" if all(r is None for r in ran) else "done")
    return Path(out_dir) / layout.MANIFEST
