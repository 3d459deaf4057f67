"""Stage ``publish``: the results manifest, written last.

Locally this is the end of the run. In the cloud the job wrapper then copies the run's outputs
to the requester-pays results bucket with this manifest last (:mod:`atlas.aws.release`). The
manifest comes from the completion records the job is given (``ctx.records``): each file's size
and sha256 as its writer recorded them, so publishing reads no output back.
"""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import PurePosixPath

from atlas import layout
from atlas.stages import STAGES, CompletionRecord, StageContext

SOFTWARE = ("tissue-atlas", "ashlar", "numpy", "scipy", "scikit-image", "tifffile", "zarr", "onnxruntime",
            "pandas", "anndata")


def software_versions() -> dict[str, str]:
    """Versions of the packages that shape the results (absent ones are left out)."""
    versions = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _run_records(ctx: StageContext) -> list[CompletionRecord]:
    """The completion records of this run the job was given, in the order their jobs ran."""
    order = {stage.name: k for k, stage in enumerate(STAGES)}
    return sorted((r for r in ctx.records.values() if r.doc.get("run_id") == ctx.run_id),
                  key=lambda r: (order[r.doc["stage"]], -1 if r.doc["item"] is None else r.doc["item"]))


def run_outputs(ctx: StageContext) -> list[dict]:
    """Every file of the run's results layout as its writer recorded it (``{"path", "size", "sha256"}``):
    the outputs listed by the completion records of this run (a later writer of a path wins) and
    the records themselves; the array items' work files are not results."""
    records = _run_records(ctx)
    files = {out["path"]: out for record in records for out in record.doc["outputs"]}
    files.update({record.entry["path"]: record.entry for record in records})
    return [{k: f[k] for k in ("path", "size", "sha256")} for rel, f in sorted(files.items())
            if PurePosixPath(rel).parts[0] in layout.LEVELS]


def build_manifest(ctx: StageContext) -> dict:
    """The results manifest: run id, software, parameters, per-stage cost, each file's size/sha256, MITI
    level and HTAN component.

    Built from the completion records alone: no output is read back to hash it.
    """
    stages = [{k: r.doc[k] for k in ("stage", "item", "seconds", "vcpus", "vcpu_seconds", "instance_type")}
              for r in _run_records(ctx)]
    files = [{**entry, "level": layout.level_of(entry["path"]), "component": layout.component_of(entry["path"])}
             for entry in run_outputs(ctx)]
    return {"slide_id": ctx.slide_id, "run_id": ctx.run_id, "software": software_versions(),
            "params": ctx.params.to_dict(), "stages": stages, "files": files}


def run(ctx: StageContext) -> None:
    """Write ``manifest.json`` at the root of the results layout."""
    ctx.work.write_text(layout.MANIFEST, json.dumps(build_manifest(ctx), indent=1) + "\n")
