"""Stitch stage vs the ``ashlar`` command line: wall time and peak RSS on the same real tiles.

Usage::

    .venv/bin/python benchmarks/stitch.py [--repeats 3] [--large]

Cases (slides built in a temporary folder from ``../shared/data`` read in place):

* ``brain``: the 54 positioned BaSiCPy WSI_brain tiles (512 x 512 uint16, 1 channel, 1 cycle) at
  their nominal positions, as in ``tests/test_stitch.py``.
* ``large`` (``--large``): the same tiles laid out 2 x 2 times (216 tiles, a ~5.8k x 8.5k canvas)
  and turned into 2 cycles x 4 channels (channel c = tile // (c + 1) + 100 c; cycle 2 with stage
  positions moved by (+7.7, -5.2) µm so it must really be registered).

Then, in this process (after the children, so their peak RSS is theirs): the first cycle's edge
alignment (ASHLAR's ``EdgeAligner``: error threshold and every neighbouring pair registered) on the
``large`` layout's 216 tiles held in memory, serial (1 worker, ASHLAR's own loop) against threaded
(one worker per CPU, ``atlas.science.stitch.prepare_edges``), alternately; medians of wall and CPU
time, the speed-up, and whether the results are identical (they must be).

Each tool runs as its own child process, alternately, ``--repeats`` times; wall time and peak RSS
(``ru_maxrss`` from ``os.wait4`` of that child; this parent stays small because a child's
``ru_maxrss`` starts at its parent's peak) are reported as medians, then the ratios
ASHLAR / ours for throughput (higher is better for us) and ours / ASHLAR for peak RSS (lower is
better). Ours writes more: the OME-TIFF, the OME-Zarr and QC; ASHLAR writes its OME-TIFF only.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.realdata import data_root  # noqa: E402  (../shared/data, or fetched)

BRAIN = data_root() / "stitching" / "basicpy_wsi_brain"
VENV_BIN = Path(sys.executable).parent

OUR_STAGE = """
import sys
from pathlib import Path
from atlas.params import Params
from atlas.stages import STITCHING, StageContext, run_jobs
from atlas.storage import FolderStore
slide, out = Path(sys.argv[1]), Path(sys.argv[2])
ctx = StageContext(slide_id=slide.name, run_id="bench", slide=FolderStore(slide), work=FolderStore(out),
                   params=Params())
for job in run_jobs(STITCHING):
    ctx.for_job(job, scratch=out).run(job)
"""


def brain_tiles() -> tuple[np.ndarray, np.ndarray, float]:
    """(tiles (54, Y, X) uint16, nominal top-left (y, x) in µm, pixel size µm)."""
    positions = {}
    for line in (BRAIN / "TileConfiguration.txt").read_text().splitlines():
        m = re.match(r"\s*C3-BrainSection(\d+)\.tif\s*;\s*;\s*\(\s*([-\d.eE+]+)\s*,\s*([-\d.eE+]+)\s*\)", line)
        if m:
            positions[m.group(1)] = (float(m.group(3)), float(m.group(2)))
    ids = sorted(positions)
    tiles = np.stack([tifffile.imread(BRAIN / f"C3-BrainSection{i}.tif") for i in ids])
    with tifffile.TiffFile(BRAIN / f"C3-BrainSection{ids[0]}.tif") as tif:
        num, den = tif.pages[0].tags["XResolution"].value
    pixel_size = den / num
    return tiles, np.array([positions[i] for i in ids]) * pixel_size, pixel_size


def make_slide(root: Path, name: str, *, replicate: int, channels: int, cycles: int) -> Path:
    from atlas.slide.ome import write_cycle
    tiles, positions, pixel_size = brain_tiles()
    extent = positions.max(axis=0) + np.array(tiles.shape[1:]) * pixel_size * 0.9
    grid_tiles, grid_positions = [], []
    for gy in range(replicate):
        for gx in range(replicate):
            grid_tiles.append(tiles)
            grid_positions.append(positions + extent * [gy, gx])
    tiles, positions = np.concatenate(grid_tiles), np.concatenate(grid_positions)
    stack = np.stack([tiles // (c + 1) + 100 * c for c in range(channels)], axis=1).astype(np.uint16)
    slide = root / name
    (slide / "raw").mkdir(parents=True)
    rows = ["channel_number,cycle_number,marker_name"]
    for k in range(cycles):
        names = [f"c{k + 1}_{c}" for c in range(channels)]
        moved = positions + (np.array([7.7, -5.2]) if k else 0.0)
        write_cycle(slide / "raw" / f"cycle{k + 1}.ome.tif", stack, moved, pixel_size, names)
        rows += [f"{len(rows) + i},{k + 1},{n}" for i, n in enumerate(names)]
    (slide / "markers.csv").write_text("\n".join(rows) + "\n")
    return slide


def measure(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    with tempfile.TemporaryFile() as log:    # a file, not a pipe: a full pipe would block the child
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            log.seek(0)
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {log.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def bench(slide: Path, work: Path, repeats: int) -> None:
    cycles = sorted(str(p) for p in (slide / "raw").glob("*.ome.tif"))
    tools = {
        "ours": lambda i: [sys.executable, "-c", OUR_STAGE, str(slide), str(work / f"ours-{i}")],
        "ashlar": lambda i: [str(VENV_BIN / "ashlar"), *cycles, "-m", "30", "-o", str(work / f"ashlar-{i}.ome.tif")],
    }
    results = {name: [] for name in tools}
    for i in range(repeats):
        for name, cmd in tools.items():
            results[name].append(measure(cmd(i), work))
    med = {name: (statistics.median(w for w, _ in r), statistics.median(m for _, m in r))
           for name, r in results.items()}
    with tifffile.TiffFile(work / "ashlar-0.ome.tif") as tif:
        shape = tif.series[0].shape
    print(f"\n== {slide.name}: {len(cycles)} cycle(s), image {shape}, {repeats} run(s) each, medians")
    for name, (wall, rss) in med.items():
        print(f"  {name:7s} wall {wall:7.2f} s   peak RSS {rss:7.0f} MiB")
    print(f"  throughput ours/ashlar = {med['ashlar'][0] / med['ours'][0]:.2f}x (goal >= 0.9)")
    print(f"  peak RSS   ours/ashlar = {med['ours'][1] / med['ashlar'][1]:.2f}x (goal <= 1.0)")


def bench_edges(repeats: int) -> None:
    """Serial vs threaded edge alignment of one cycle on the same in-memory tiles (module docstring)."""
    from atlas.science.stitch import TileSet, align_cycles
    tiles, positions, pixel_size = brain_tiles()
    extent = positions.max(axis=0) + np.array(tiles.shape[1:]) * pixel_size * 0.9
    grid = [(gy, gx) for gy in range(2) for gx in range(2)]
    cycle = TileSet.from_array(np.concatenate([tiles] * len(grid))[:, None],
                               np.concatenate([positions + extent * g for g in grid]), pixel_size)
    threads = len(os.sched_getaffinity(0))
    times = {1: [], threads: []}
    results = {}
    for _ in range(repeats):
        for workers in times:
            wall, cpu = time.perf_counter(), time.process_time()
            (results[workers],) = align_cycles([cycle], workers=workers)
            times[workers].append((time.perf_counter() - wall, time.process_time() - cpu))
    med = {w: (statistics.median(t for t, _ in r), statistics.median(c for _, c in r)) for w, r in times.items()}
    a, b = results.values()
    same = (np.array_equal(a.positions, b.positions) and np.array_equal(a.errors, b.errors) and a.edges == b.edges)
    print(f"\n== edge alignment of one cycle, {cycle.metadata.num_images} tiles in memory, {repeats} run(s) each, "
          f"medians; load {os.getloadavg()[0]:.1f}")
    for workers, (wall, cpu) in med.items():
        print(f"  {workers} worker(s): wall {wall:6.2f} s   CPU {cpu:6.2f} s")
    print(f"  speed-up serial/threaded = {med[1][0] / med[threads][0]:.2f}x on {threads} CPUs; "
          f"results identical: {same}")


CASES = {"brain": {"replicate": 1, "channels": 1, "cycles": 1}, "large": {"replicate": 2, "channels": 4, "cycles": 2}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large", action="store_true", help="also run the 216-tile, 2-cycle x 4-channel case")
    parser.add_argument("--make-slide", nargs=2, metavar=("ROOT", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_slide:
        root, name = args.make_slide
        make_slide(Path(root), name, **CASES[name])
        return
    with tempfile.TemporaryDirectory(prefix="bench-stitch-") as tmp:
        root = Path(tmp)
        for name in ["brain", "large"] if args.large else ["brain"]:
            # Build the slide in a child: Linux carries a parent's peak RSS into children it
            # spawns (ru_maxrss survives fork + exec), so this process must stay small.
            subprocess.run([sys.executable, __file__, "--make-slide", str(root), name], check=True)
            work = root / f"{name}-work"
            work.mkdir()
            bench(root / name, work, args.repeats)
    bench_edges(args.repeats)


if __name__ == "__main__":
    main()
