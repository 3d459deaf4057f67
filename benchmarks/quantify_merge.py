"""Benchmark: quantify's merge (issue 15) on growing tables: peak RSS and CPU per cell-marker.

Synthetic band parts stand for a big slide's tables (the model's target has ~5.8 M cells per mask x
40 markers; the made slides here have ~0.1 M): ``N`` cells x ``--markers`` marker columns + CellID +
the 9 morphology columns, all float64 as :func:`atlas.science.quantification.quantify` makes them
(CellID int64), split into ``--bands`` bands whose CellIDs overlap their neighbours' ranges (the
merge has to sort them). They are written where quantify's items put theirs (``work/quantify/<engine>/
<item>.cell.parquet`` and ``band.json``) beside a registered image of the slide's shape (zarr
metadata only: the merge reads its shape) and an empty mask file; markers.csv lists the markers.

For each size the stage's own merge (:func:`atlas.stages.quantify.merge`: parts -> one table ->
CSV, Parquet, .h5ad, QC summary) runs in its own process, which reports its peak RSS (``VmHWM``),
its RSS after imports and its CPU seconds. Printed per size: peak RSS, the merge's growth (peak -
after imports) as a multiple of one table in float64 (cells x columns x 8 B), and between sizes the
bytes and CPU microseconds per cell-marker (cell x column) added: the rates ``benchmarks/scale.py``
models the target's merge with. Ratios, not times, are what to compare across machines.

    .venv/bin/python benchmarks/quantify_merge.py [--cells 250000 500000 1000000 2000000] [--markers 40]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLIDE, ENGINE, MASK = "S1", "synthetic", "cell"
CELLS_PER_PIXEL = 93_000 / (256 * 512 ** 2)   # nuclei found on the 256-tile made slide (docs/scale.md)


def write_parts(root: Path, cells: int, markers: int, bands: int, seed: int = 0) -> int:
    """The band parts of a ``cells`` x ``markers`` table under ``root/work``; returns its columns."""
    import pandas as pd
    import zarr

    from atlas import layout
    from atlas.science.quantification import MORPHOLOGY_COLUMNS, table_columns

    rng = np.random.default_rng(seed)
    names = [f"M{i:02d}" for i in range(markers)]
    (root / "slide").mkdir(parents=True, exist_ok=True)
    (root / "slide" / "markers.csv").write_text("channel_number,cycle_number,marker_name\n" + "".join(
        f"{i + 1},{i // 4 + 1},{n}\n" for i, n in enumerate(names)))
    work = root / "work"
    side = int(np.sqrt(cells / CELLS_PER_PIXEL))
    zarr.open_group(work / layout.registration_zarr(SLIDE), mode="w", zarr_format=2).create_array(
        "0", shape=(markers, side, side), chunks=(1, 1024, 1024), dtype="uint16")
    for mask in ("cell", "nuclei"):
        (work / layout.mask_path(SLIDE, ENGINE, mask)).parent.mkdir(parents=True, exist_ok=True)
        (work / layout.mask_path(SLIDE, ENGINE, mask)).write_bytes(b"")
    ids = np.arange(1, cells + 1)
    order = np.argsort(ids + rng.normal(0, cells / bands / 20, cells))   # neighbours' ranges overlap
    item_dir = work / layout.WORK / "quantify" / ENGINE
    item_dir.mkdir(parents=True, exist_ok=True)
    for index, rows in enumerate(np.array_split(order, bands)):
        n = rows.size
        columns = {"CellID": ids[rows], **{m: rng.lognormal(5, 1.5, n) for m in names},
                   **{c: rng.uniform(0, 1e4, n) for c in MORPHOLOGY_COLUMNS}}
        columns["Area"] = rng.integers(20, 400, n).astype(np.float64)
        part = pd.DataFrame(columns)[table_columns(names)]
        part.to_parquet(item_dir / f"{index:05d}.{MASK}.parquet", index=False)
        (item_dir / f"{index:05d}.band.json").write_text(json.dumps(
            {"foreground": {MASK: int(part["Area"].sum())}}) + "\n")
    return len(table_columns(names))


def child(root: Path, bands: int) -> None:
    """Run the stage's merge on ``root``; print its figures as JSON."""
    import anndata  # noqa: F401  (imported before the baseline: every job imports them)
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    from atlas.params import Params, QuantifyParams
    from atlas.stages import STAGES, Job, StageContext
    from atlas.stages.quantify import merge
    from atlas.storage import FolderStore

    stage = next(s for s in STAGES if s.name == "quantify")
    ctx = StageContext(SLIDE, f"{SLIDE}-run", FolderStore(root / "slide"), FolderStore(root / "work"),
                       Params(quantify=QuantifyParams(masks=(MASK,))), scratch=root / "scratch", vcpus=2,
                       job=Job(stage, merge=True, count=bands))
    (root / "scratch").mkdir(exist_ok=True)
    base = rss("VmRSS")
    cpu = time.process_time()
    merge(ctx)
    print(json.dumps({"base": base, "peak": rss("VmHWM"), "cpu": time.process_time() - cpu}))


def rss(field: str) -> int:
    """This process's ``field`` (VmRSS, VmHWM) of /proc/self/status, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[250_000, 500_000, 1_000_000, 2_000_000])
    parser.add_argument("--markers", type=int, default=40)
    parser.add_argument("--bands", type=int, default=8)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.bands)
        return
    print(f"quantify merge: synthetic tables of {args.markers} markers in {args.bands} bands; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"  {'cells':>10} {'table f64':>10} {'peak RSS':>10} {'growth':>10} {'x table':>8} {'CPU s':>7}")
    rows = []
    for cells in args.cells:
        with tempfile.TemporaryDirectory(prefix="quantify-merge-") as tmp:
            columns = write_parts(Path(tmp), cells, args.markers, args.bands)
            ran = subprocess.run([sys.executable, __file__, "--child", tmp, "--bands", str(args.bands)],
                                 capture_output=True, text=True, check=True)
        got = json.loads(ran.stdout.strip().splitlines()[-1])
        table = cells * columns * 8
        growth = got["peak"] - got["base"]
        rows.append((cells * columns, got["peak"], got["cpu"]))
        print(f"  {cells:10,d} {table / 2 ** 20:6.0f} MiB {got['peak'] / 2 ** 20:6.0f} MiB "
              f"{growth / 2 ** 20:6.0f} MiB {growth / table:7.2f}x {got['cpu']:7.1f}", flush=True)
    for (v0, p0, c0), (v1, p1, c1) in pairwise(rows):
        print(f"  {v0:,} -> {v1:,} cell-markers: {(p1 - p0) / (v1 - v0):.1f} B and "
              f"{1e6 * (c1 - c0) / (v1 - v0):.2f} CPU us per cell-marker added")
    if len(rows) > 1:
        values, peaks, cpus = (np.array(column, float) for column in zip(*rows, strict=True))
        print(f"  least-squares over all sizes: {np.polyfit(values, peaks, 1)[0]:.1f} B and "
              f"{1e6 * np.polyfit(values, cpus, 1)[0]:.2f} CPU us per cell-marker (benchmarks/scale.py's "
              "MERGE_BYTES_PER_CELL_MARKER, MERGE_CPU_S_PER_CELL_MARKER)")
    print(f"  load {os.getloadavg()[0]:.1f} at the end; peak RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
