"""Stage ``publish``: the HTAN metadata tables, then the results manifest, written last.

Locally this is the end of the run. In the cloud the job wrapper then copies the run's outputs
to the requester-pays results bucket with this manifest last (:mod:`atlas.aws.release`).
"""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from atlas import layout
from atlas.pipeline.local import PROVENANCE, file_record
from atlas.slide.convention import MANIFEST, MARKERS, RAW, parse_manifest, read_markers
from atlas.slide.htan import metadata_tables
from atlas.stages import STAGES, StageContext

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


def result_files(out_dir: Path) -> list[str]:
    """Every file of the results layout below ``out_dir`` (scratch and the manifest itself excluded)."""
    out_dir = Path(out_dir)
    return sorted(p.relative_to(out_dir).as_posix() for top in layout.LEVELS if (out_dir / top).is_dir()
                  for p in (out_dir / top).rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


def build_manifest(ctx: StageContext) -> dict:
    """The results manifest: run id, software, parameters, per-stage cost, each file's level/size/sha256."""
    stages = []
    provenance = Path(ctx.out_dir) / PROVENANCE
    for record_path in sorted(provenance.glob("*.json")):
        record = json.loads(record_path.read_text())
        if record.get("run_id") == ctx.run_id:
            stages.append({k: record[k]
                           for k in ("stage", "item", "seconds", "vcpus", "vcpu_seconds", "instance_type")})
    order = [s.name for s in STAGES]
    stages.sort(key=lambda r: (order.index(r["stage"]), -1 if r["item"] is None else r["item"]))
    files = []
    for rel in result_files(ctx.out_dir):
        files.append({**file_record(ctx.out_dir, rel), "level": layout.level_of(rel),
                      "component": layout.component_of(rel)})
    return {"slide_id": ctx.slide_id, "run_id": ctx.run_id, "software": software_versions(),
            "params": ctx.params.to_dict(), "stages": stages, "files": files}


def write_htan_tables(ctx: StageContext) -> None:
    """``metadata/htan-<Component>.csv`` of the release (:mod:`atlas.slide.htan`)."""
    slide_dir = Path(ctx.slide_dir)
    raw = [f"{ctx.slide_id}/{e.path}" for e in parse_manifest((slide_dir / MANIFEST).read_text())
           if e.path.startswith(f"{RAW}/")]
    tables = metadata_tables(Path(ctx.out_dir), ctx.slide_id, read_markers(slide_dir / MARKERS), raw,
                             software_versions())
    for component, table in tables.items():
        target = Path(ctx.out_dir) / layout.htan_table(component)
        target.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(target, index=False)


def run(ctx: StageContext) -> None:
    """Write the HTAN metadata tables, then ``manifest.json`` at the root of the results layout (atomically)."""
    write_htan_tables(ctx)
    path = Path(ctx.out_dir) / layout.MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(build_manifest(ctx), indent=1) + "\n")
    tmp.replace(path)
