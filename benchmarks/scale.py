"""Whole slides at scale (issue 15): measured on made slides here, modelled for the target on Batch.

Usage::

    .venv/bin/python benchmarks/scale.py [--quick] [--work DIR] [--spot-usd-per-vcpu-hour 0.02]
    .venv/bin/python benchmarks/scale.py --model-from WORK/measured.json

1. **Local** (``atlas run``, each job a process of its own as on Batch): made slides of 256 and
   1,024 tiles (512 px, 3 cycles x 4 channels, ``atlas sample``); per slide the wall and CPU time
   per tile, the peak RSS of the run (its processes together: the runner, its fork server and the
   job running, each one's own peak summed; :func:`localcloud.executor.peak_rss`) and of its largest
   job, nuclei found against the truth; the ratios of the larger slide to the smaller (goals: RSS
   <= 1.10x, time per tile <= 1.15x, nuclei within 10 % of the truth).
2. **Emulated cloud** (``atlas demo --slide``, each job its own process): the 256-tile slide; per job
   its peak RSS (the process's VmHWM), scratch and bytes read/written (its completion record), and
   all reads against the bytes of the raw slide + the release (goals: no job over 2 GiB RSS or 1 GiB
   scratch, reads <= 3x, segment, quantify and render each run as several items). The demo also runs
   on a tiny slide (2x2 tiles), the model's second point.
3. **Model** of the target (1,000 tiles x 40 channels x 2048² px, 10 cycles) on Batch: each kind of
   job's figures on the line through its two demos' figures (docs/scale.md; goals: <= 1 h from upload
   to release, <= $1 of Spot compute, every job <= 16 GiB RAM and <= 50 GB scratch).
   Align's latency is Amdahl's over its vCPUs, not ``w/v``: its serial share (the job's own thread,
   the threads that assemble each cycle's thumbnail or sample cycle 1's error threshold) is
   measured here, in this process, on two more made slides (:data:`ALIGN_SPLIT_GRIDS`), and put on
   its line to the target like every other figure.
   ``--model-from WORK/measured.json`` prints the model again from a run's measurements.

Every goal is printed with its figure and PASS or MISS. ``--quick`` runs tiny slides (2x2 and 3x3
tiles of 256 px, 2 cycles x 2 channels) to check that everything runs and prints; its figures mean
nothing. The full run prints the load it ran under.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atlas import layout  # noqa: E402
from atlas.params import StitchParams  # noqa: E402
from atlas.stages import STAGES, dependencies  # noqa: E402
from atlas.stages.quantify import PART_PIXELS  # noqa: E402
from localcloud.executor import run_process  # noqa: E402

GIB, MIB = 2 ** 30, 2 ** 20
# The model's constants (docs/scale.md says where they come from).
SPOT_USD_PER_VCPU_HOUR = 0.02   # c6i/m6i Spot in us-east-1, about a third of on-demand (~$0.02 per vCPU-hour)
JOB_START_S = 90.0              # a Batch job from SUBMITTED to RUNNING: Spot host up (or reused), image cached
EVENTS_TO_RUN_S = 10.0          # S3 event -> catalog -> trigger -> StartExecution
QUEUE_MAX_VCPUS = 256           # infra.config.AtlasConfig.cpu_max_vcpus: the compute environment's cap
ALIGN_SPLIT_GRIDS = ((6, 6), (12, 12))   # tile grids of the slides align's serial share is measured on
# Cells per pixel of a channel on the made slides (their density is fixed by design): the 256-tile
# slide's nuclei found, 92,938 of 256 x 512² px. The target's tables are modelled at this density.
CELLS_PER_PIXEL = 92_938 / (256 * 512 ** 2)
# Quantify's merge, measured by benchmarks/quantify_merge.py (the stage's merge on synthetic tables of
# 0.25-2 M cells x 40 markers; least squares over the sizes): bytes of peak RSS per cell-marker of one
# table (cell x column: markers, CellID, morphology; one table held at a time) and CPU seconds per
# cell-marker of every table. The demos cannot give these: the 2x2 slide's merge holds nothing but imports.
MERGE_BYTES_PER_CELL_MARKER = 28.6
MERGE_CPU_S_PER_CELL_MARKER = 0.30e-6


@dataclass(frozen=True)
class Size:
    """A slide's size: tile grid, tile side (px), cycles, channels per cycle."""

    rows: int
    cols: int
    tile: int
    cycles: int
    per_cycle: int

    @property
    def tiles(self) -> int:
        return self.rows * self.cols

    @property
    def channels(self) -> int:
        return self.cycles * self.per_cycle

    @property
    def pixels(self) -> int:
        """Pixels per channel over all tiles."""
        return self.tiles * self.tile ** 2

    def label(self) -> str:
        return (f"{self.tiles:,} tiles ({self.rows}x{self.cols}) of {self.tile} px, {self.cycles} cycles x "
                f"{self.per_cycle} channels")


TARGET = Size(rows=25, cols=40, tile=2048, cycles=10, per_cycle=4)


def atlas(*args: str):
    """Run ``python -m atlas ARGS`` to its end (:func:`localcloud.executor.run_process`); SystemExit if it fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    start = time.perf_counter()
    ran = run_process([sys.executable, "-m", "atlas", *args], env)
    if ran.returncode != 0:
        raise SystemExit(f"atlas {' '.join(args)} failed ({ran.returncode}):\n{ran.output[-4000:]}")
    return ran, time.perf_counter() - start


def make_slide(work: Path, size: Size, overlap: float) -> tuple[Path, Path]:
    slide_id = f"s{size.tiles}"
    atlas("sample", str(work), "--slide-id", slide_id, "--rows", str(size.rows), "--cols", str(size.cols),
          "--tile-size", str(size.tile), "--overlap", str(overlap), "--cycles", str(size.cycles),
          "--channels", str(size.per_cycle))
    return work / slide_id, work / f"{slide_id}.truth"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def truth_nuclei(truth: Path) -> int:
    with open(truth / "nuclei.csv") as f:
        return sum(1 for _ in f) - 1


def found_nuclei(results: Path) -> int:
    return int(json.loads((results / layout.QC / "segment" / "summary.json").read_text())["nuclei"])


def job_records(results: Path) -> list[dict]:
    """The completion records of a results folder (``qc/provenance/*.json``)."""
    return [json.loads(p.read_text()) for p in sorted((results / layout.PROVENANCE).glob("*.json"))]


def local_run(slide: Path, truth: Path, out: Path, size: Size) -> dict:
    """``atlas run`` on a slide folder (each job its own process): time, CPU (the runner's own and
    every job's, from their records: the jobs are children of its fork server, not waited for by
    it), peak RSS of its processes together and of its largest job, nuclei vs truth."""
    ran, wall = atlas("run", str(slide), "-o", str(out))
    jobs = job_records(out)
    figures = {"tiles": size.tiles, "wall_s": wall, "cpu_s": ran.cpu_seconds + sum(j["cpu_seconds"] for j in jobs),
               "rss": ran.peak_rss_bytes, "job_rss": max(j["peak_rss_bytes"] for j in jobs),
               "nuclei": found_nuclei(out), "truth": truth_nuclei(truth)}
    shutil.rmtree(out, ignore_errors=True)
    return figures


def demo_run(slide: Path, out: Path) -> tuple[list[dict], int, int]:
    """``atlas demo --slide``: the jobs (jobs.json joined with their completion records), raw and release bytes."""
    atlas("demo", "--slide", str(slide), "-o", str(out))
    (results,) = (out / "results" / slide.name).iterdir()
    jobs = json.loads((out / "jobs.json").read_text())
    for job in jobs:
        job["record"] = job["record"] or {}
    return jobs, folder_bytes(slide), folder_bytes(results)


def goal(name: str, figure: str, limit: str, ok: bool) -> str:
    return f"GOAL  {name:<44} {figure:>22}  (goal {limit:<10}) {'PASS' if ok else 'MISS'}"


def save(work: Path, runs: list[dict], demo: list[tuple[Size, list[dict]]], raw: int, release: int,
         split: list[tuple[Size, dict]]) -> None:
    """What was measured so far, to ``work/measured.json`` (``--model-from`` reads it)."""
    (work / "measured.json").write_text(json.dumps({"local": runs, "demo": [(vars(size), jobs) for size, jobs in demo],
                                                    "raw_bytes": raw, "release_bytes": release,
                                                    "align_split": [(vars(size), f) for size, f in split]}, indent=1))


def align_split_of(slide: Path, out: Path, vcpus: int = 2) -> dict:
    """The align job on ``slide`` in this process with ``vcpus`` threads: its CPU seconds (``cpu``)
    and the part of them on one thread after another (``serial``), timed per thread: this thread's
    (``main``: the job's own work), then the longer of the two one-thread steps that run beside cycle
    1's tile pairs (ASHLAR's thumbnail of cycle 1, ``make_thumbnail``, and its error-threshold
    sampling, ``compute_threshold``; :func:`atlas.science.stitch.prepare_edges`), then a later
    cycle's thumbnail and coarse offset (``layer``: each cycle's in a thread of its own, before its
    tiles spread over the threads; the longest of each)."""
    from ashlar import reg

    from atlas.params import Params
    from atlas.stages import STITCHING, StageContext, run_jobs
    from atlas.storage import FolderStore

    steps: dict[tuple[type, str], list[float]] = {}
    timed = [(reg.EdgeAligner, "make_thumbnail"), (reg.EdgeAligner, "compute_threshold"),
             (reg.LayerAligner, "make_thumbnail"), (reg.LayerAligner, "coarse_align")]
    originals = {key: getattr(*key) for key in timed}

    def timing(key):
        def step(self):
            start = time.thread_time()
            try:
                return originals[key](self)
            finally:
                steps.setdefault(key, []).append(time.thread_time() - start)
        return step

    ctx = StageContext(slide_id=slide.name, run_id="split", slide=FolderStore(slide), work=FolderStore(out),
                       params=Params())
    job = next(j for j in run_jobs(STITCHING) if j.stage.name == "align")
    try:
        for key in timed:
            setattr(*key, timing(key))
        thread, cpu = time.thread_time(), time.process_time()
        ctx.for_job(job, scratch=out, vcpus=vcpus).run(job)
        thread, cpu = time.thread_time() - thread, time.process_time() - cpu
    finally:
        for key, original in originals.items():
            setattr(*key, original)
    shutil.rmtree(out, ignore_errors=True)
    figures = {"cpu": cpu, "main": thread, "make_thumbnail": sum(steps.get(timed[0], [])),
               "compute_threshold": sum(steps.get(timed[1], [])),
               "layer": sum(max(steps.get(key, [0.0])) for key in timed[2:])}
    figures["serial"] = (figures["main"] + max(figures["make_thumbnail"], figures["compute_threshold"])
                         + figures["layer"])
    return figures


def align_split(work: Path, like: Size, overlap: float,
                grids: tuple[tuple[int, int], ...] = ALIGN_SPLIT_GRIDS) -> list[tuple[Size, dict]]:
    """Align's serial and total CPU seconds on made slides of ``grids`` tiles (tile size and cycles
    as ``like``; one channel per cycle: align reads only the DNA stain)."""
    split = []
    for rows, cols in grids:
        size = Size(rows, cols, like.tile, like.cycles, 1)
        slide, _ = make_slide(work / "split", size, overlap)
        split.append((size, align_split_of(slide, work / "split" / "out")))
    return split


def serial_share(split: list[tuple[Size, dict]], target: Size) -> float:
    """Align's serial share of its CPU at ``target``. Its one-thread seconds (:func:`align_split_of`):
    the job's own thread, plus the longer of cycle 1's thumbnail and its threshold sampling, plus a
    later cycle's thumbnail and offset; the thread and the thumbnails on the lines through the
    measured seconds against a cycle's pixels (the thumbnails read every tile of theirs), the
    threshold sampling (a fixed number of strips as long as a tile and as wide as the overlap)
    scaled by the tile's area. Its CPU seconds on the line through the measured ones against the
    pixels of every cycle (:func:`measure`'s "work")."""
    (low, a), (high, b) = split

    def line(key: str) -> float:
        return extrapolate(target.pixels, (low.pixels, a.get(key, 0.0)), (high.pixels, b.get(key, 0.0)))

    threshold = max(a.get("compute_threshold", 0.0), b.get("compute_threshold", 0.0)) * (target.tile / high.tile) ** 2
    serial = line("main") + max(line("make_thumbnail"), threshold) + line("layer")
    cpu = extrapolate(target.pixels * target.cycles, (low.pixels * low.cycles, a["cpu"]),
                      (high.pixels * high.cycles, b["cpu"]))
    return min(1.0, serial / cpu)


def local_line(r: dict) -> str:
    return (f"  {r['tiles']:5d} tiles: {r['wall_s']:7.1f} s wall = {1e3 * r['wall_s'] / r['tiles']:6.0f} ms/tile, "
            f"{r['cpu_s']:7.1f} s CPU = {1e3 * r['cpu_s'] / r['tiles']:6.0f} ms/tile; peak RSS "
            f"{r['rss'] / MIB:6.0f} MiB (largest job {r['job_rss'] / MIB:.0f}); "
            f"nuclei {r['nuclei']:,} found / {r['truth']:,} true "
            f"({100 * (r['nuclei'] / r['truth'] - 1):+.1f} %)")


def report_local(runs: list[dict]) -> list[str]:
    small, large = runs
    rss = large["rss"] / small["rss"]
    wall = (large["wall_s"] / large["tiles"]) / (small["wall_s"] / small["tiles"])
    cpu = (large["cpu_s"] / large["tiles"]) / (small["cpu_s"] / small["tiles"])
    worst = max(abs(r["nuclei"] / r["truth"] - 1) for r in runs)
    print(f"  ratios {large['tiles']} / {small['tiles']} tiles: peak RSS x{rss:.2f}, wall time per tile x{wall:.2f}, "
          f"CPU time per tile x{cpu:.2f}")
    return [goal(f"local: peak RSS {large['tiles']} / {small['tiles']} tiles", f"x{rss:.2f}", "<= 1.10", rss <= 1.10),
            goal(f"local: time per tile {large['tiles']} / {small['tiles']} tiles", f"x{wall:.2f} (CPU x{cpu:.2f})",
                 "<= 1.15", wall <= 1.15),
            goal("local: nuclei found vs truth (worst slide)", f"{100 * worst:.1f} % off", "<= 10 %", worst <= 0.10)]


def fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:8.0f} MiB" if n < 10 * GIB else f"{n / GIB:8.1f} GiB"


def report_demo(jobs: list[dict], raw: int, release: int) -> list[str]:
    print(f"  {'job':<18} {'wall s':>7} {'CPU s':>7} {'peak RSS':>12} {'scratch':>12} {'read':>12} {'written':>12}")
    for job in jobs:
        rec = job["record"]
        print(f"  {job['job']:<18} {job['seconds']:7.1f} {job['cpu_seconds']:7.1f} {fmt_bytes(job['peak_rss_bytes'])} "
              f"{fmt_bytes(rec.get('scratch_peak_bytes'))} {fmt_bytes(rec.get('s3_bytes_read'))} "
              f"{fmt_bytes(rec.get('s3_bytes_written'))}")
    rss = max(j["peak_rss_bytes"] for j in jobs)
    scratch = [j["record"].get("scratch_peak_bytes") for j in jobs]
    reads = [j["record"].get("s3_bytes_read") for j in jobs]
    items = {s: sum(1 for j in jobs if j["stage"] == s and j["item"] is not None)
             for s in ("segment", "quantify", "render")}
    print(f"  raw slide {fmt_bytes(raw).strip()}, release {fmt_bytes(release).strip()}; all jobs read "
          f"{fmt_bytes(sum(r or 0 for r in reads)).strip()}" + ("" if None not in reads else
                                                                 " (some jobs' records carry no byte counts)"))
    lines = [goal("cloud: largest job peak RSS", fmt_bytes(rss).strip(), "<= 2 GiB", rss <= 2 * GIB)]
    if None in scratch or None in reads:
        lines.append(goal("cloud: scratch and bytes read recorded by every job", "missing", "all jobs", False))
    else:
        ratio = sum(reads) / (raw + release)
        lines += [goal("cloud: largest job scratch", fmt_bytes(max(scratch)).strip(), "<= 1 GiB", max(scratch) <= GIB),
                  goal("cloud: bytes read / (raw slide + release)", f"x{ratio:.2f}", "<= 3", ratio <= 3)]
    lines += [goal(f"cloud: {stage} runs as several items", f"{n} items", ">= 2", n >= 2) for stage, n in items.items()]
    return lines


def stage_sizes(stage, size: Size) -> tuple[int, int]:
    """(items, vCPUs) of ``stage``'s jobs for a slide of ``size``: the registry's sizing where it has one."""
    sizing = getattr(stage, "sizing", None)
    if sizing is None:
        return stage.array_size, stage.vcpus
    from atlas.stages import SlideSize

    sized = stage.sizes(SlideSize(tiles=size.tiles, cycles=size.cycles, channels=size.channels,
                                  tile_shape=(size.tile, size.tile)))
    return sized.items, sized.vcpus


# What a job holds at once grows with one measure of the slide, by design (each stage's docstring):
# "tile": a tile or a fixed block at a time; "band": a band of tile rows across the slide, every
# channel it reads; "channel-band": such a band of one channel (a mosaic item's channel, a render
# item's layer, align's cache of first-cycle rows); "part": a quantify item's part and the strip of one channel
# it is measured from (a chunk row), PART_PIXELS together, at least a chunk row each; "share":
# its share of the stage's data; "data": something per cell or object of the whole slide (tables, the
# run's list of results: publish's jobs); "cells": one cell table of the whole slide, cells x columns
# (its CPU: every table's); "none": nothing that grows. The key is the stage, or "<stage> merge" for a merge.
HOLDS = {"illuminate": "tile", "illuminate merge": "none", "align": "channel-band", "mosaic": "channel-band",
         "mosaic merge": "none", "export": "tile", "segment": "tile", "segment merge": "tile",
         "quantify": "part", "quantify merge": "cells", "render": "channel-band", "render merge": "data",
         "publish": "data", "publish merge": "data"}
# Figures of a kind of job modelled at the rate measured by a benchmark of its own, from the larger
# demo's figure, instead of on the line through the two demos: figure -> per unit of its measure.
MEASURED_RATES = {"quantify merge": {"rss": MERGE_BYTES_PER_CELL_MARKER, "cpu": MERGE_CPU_S_PER_CELL_MARKER}}
# ... where a job's scratch grows with another measure than its memory: "plane", one channel's pixels
# (export buffers one channel's compressed pyramid before it goes to its place; segment's merge keeps
# the label images, compressed, in scratch).
SCRATCH_HOLDS = {"export": "plane", "segment merge": "plane"}


def channels_read(stage: str, size: Size, what: str = "work") -> int:
    """Channels a stage's jobs read: the DNA stain (segment), the alignment channel of each cycle
    (align), else all of them -- quantify reads them all but holds the masks and one at a time."""
    if stage == "quantify" and what != "work":
        return 1
    return {"segment": 1, "align": size.cycles}.get(stage, size.channels)


def measure(job: dict, size: Size, items: int, what: str) -> float:
    """The measure of ``size`` that a job's figure grows with: ``what`` "work" (its CPU: its share
    of the stage's pixels x channels), "held" (its memory: :data:`HOLDS`) or "scratch"
    (:data:`SCRATCH_HOLDS`, else as its memory)."""
    data = size.pixels * channels_read(job["stage"], size)
    share = data / max(items, 1) if job["item"] is not None else data
    kind = job_kind(job)
    # one table's cell-markers: whole-slide cells x (markers + CellID + 9 morphology columns)
    table = size.pixels * CELLS_PER_PIXEL * (size.channels + 10)
    if what == "work":
        tables = sum(1 for out in job["record"].get("outputs", ()) if out["path"].endswith(".csv")) or 1
        return table * tables if HOLDS[kind] == "cells" else share
    holds = SCRATCH_HOLDS.get(kind, HOLDS[kind]) if what == "scratch" else HOLDS[kind]
    # a chunk row of one channel of the registered image (its chunks: the Level 2 pyramid's tiles)
    chunk_row = size.cols * size.tile * min(StitchParams().tile_size, size.rows * size.tile)
    return {"tile": size.tile ** 2 * channels_read(job["stage"], size, what), "plane": size.pixels,
            "band": size.cols * size.tile ** 2 * channels_read(job["stage"], size, what),
            "channel-band": size.cols * size.tile ** 2,
            "part": min(size.pixels, max(PART_PIXELS - chunk_row, chunk_row)) + chunk_row,
            "share": share, "data": data, "cells": table, "none": 1.0}[holds]


def job_kind(job: dict) -> str:
    """The key of :data:`HOLDS`: the stage, or "<stage> merge"."""
    return job["stage"] + (" merge" if job["merge"] else "")


def extrapolate(x: float, low: tuple[float, float], high: tuple[float, float]) -> float:
    """y at x on the line through the measured points (x, y) ``low`` and ``high``; never decreasing
    (a figure that shrank between the two slides is taken as constant: noise, not a rate)."""
    (x0, y0), (x1, y1) = low, high
    rate = max(0.0, (y1 - y0) / (x1 - x0)) if x1 > x0 else 0.0
    return max(y0, y1) + rate * (x - x1)


def job_figures(jobs: list[dict], stage: str, kind: str) -> dict | None:
    """A stage's measured figures of one kind of job (the items, the merge, the plain job): mean CPU
    seconds, largest peak RSS and scratch, the number of items; None where the run had none."""
    done = [j for j in jobs if j["stage"] == stage and ("item" if j["item"] is not None else
                                                         "merge" if j["merge"] else "plain") == kind]
    if not done:
        return None
    return {"cpu": sum(j["cpu_seconds"] for j in done) / len(done), "rss": max(j["peak_rss_bytes"] for j in done),
            "scratch": max(j["record"].get("scratch_peak_bytes") or 0 for j in done), "job": done[0],
            "items": sum(1 for j in jobs if j["stage"] == stage and j["item"] is not None)}


def point(fig: dict, size: Size, what: str, figure: str) -> tuple[float, float]:
    """(measure, figure) of one kind of job measured on a slide of ``size`` (:func:`job_figures`)."""
    return measure(fig["job"], size, fig["items"], what), fig[figure]


def kind_at_target(low: dict, high: dict, runs: tuple[Size, Size], target: Size, items: int) -> dict:
    """One kind of job of a stage at the target: CPU seconds, peak RSS and scratch, each on the line
    through its figures on the two measured slides (``runs``: their sizes, smaller first)."""
    at = {what: measure(high["job"], target, items, what) for what in ("work", "held", "scratch")}
    rates = MEASURED_RATES.get(job_kind(high["job"]), {})

    def figure_at(figure: str, what: str) -> float:
        x, y = point(high, runs[1], what, figure)
        if figure in rates:   # the larger demo's figure + the measured rate (:data:`MEASURED_RATES`)
            return y + rates[figure] * max(0.0, at[what] - x)
        return extrapolate(at[what], point(low, runs[0], what, figure), (x, y))

    return {figure: figure_at(figure, what) for figure, what in (("cpu", "work"), ("rss", "held"),
                                                                 ("scratch", "scratch"))}


def model(runs: list[tuple[Size, list[dict]]], target: Size, usd_per_vcpu_hour: float,
          split: list[tuple[Size, dict]] | None = None) -> list[str]:
    """The target on Batch from the jobs measured on two slides (docs/scale.md, "The model"), and
    align's serial share from ``split`` (:func:`align_split`; measured now when not given)."""
    (small, small_jobs), (measured, jobs) = runs
    if split is None:
        with tempfile.TemporaryDirectory(prefix="scale-split-") as tmp:
            split = align_split(Path(tmp), measured, 0.1)
    print(f"  measured {small.label()} and {measured.label()}; target {target.label()}: data "
          f"x{target.pixels * target.channels / (measured.pixels * measured.channels):.0f} of the larger")
    serial = {"align": serial_share(split, target)}
    print("  align's serial share of its CPU: " + ", ".join(f"{100 * f['serial'] / f['cpu']:.1f} % of {f['cpu']:.1f} s "
                                                            f"at {size.tiles} tiles" for size, f in split)
          + f" -> {100 * serial['align']:.1f} % at the target")
    print(f"  {'jobs':<16} {'count':>6} {'vCPU':>4} {'work vCPU-h':>11} {'wall min':>9} {'job RSS':>10} "
          f"{'job scratch':>11}")
    finish, vcpu_s, rss_max, scratch_max = {}, 0.0, 0.0, 0.0
    for stage in STAGES:
        items_t, vcpus = stage_sizes(stage, target)
        latency = 0.0
        for kind in ("item", "merge", "plain"):
            low, high = job_figures(small_jobs, stage.name, kind), job_figures(jobs, stage.name, kind)
            if high is None:
                continue
            fig = kind_at_target(low or high, high, (small, measured), target, items_t)
            count = items_t if kind == "item" else 1
            share = serial.get(stage.name, 0.0)   # Amdahl: the serial share runs on one vCPU
            wall = JOB_START_S + math.ceil(count * vcpus / QUEUE_MAX_VCPUS) * fig["cpu"] * (share + (1 - share) / vcpus)
            latency += wall
            vcpu_s += count * vcpus * (JOB_START_S + fig["cpu"] / vcpus)
            rss_max, scratch_max = max(rss_max, fig["rss"]), max(scratch_max, fig["scratch"])
            label = stage.name + {"item": " items", "merge": " merge", "plain": ""}[kind]
            print(f"  {label:<16} {count:6d} {vcpus:4d} "
                  f"{count * fig['cpu'] / 3600:11.2f} {wall / 60:9.1f} {fmt_bytes(fig['rss']):>10} "
                  f"{fmt_bytes(fig['scratch']):>11}")
        finish[stage.name] = max((finish[d.name] for d in dependencies(stage)), default=EVENTS_TO_RUN_S) + latency
    path = max(finish.values())
    cost = vcpu_s / 3600 * usd_per_vcpu_hour
    print(f"  critical path {path / 60:.0f} min (stages in parallel where the registry's graph allows); billed "
          f"{vcpu_s / 3600:.1f} vCPU-h at ${usd_per_vcpu_hour}/vCPU-h Spot")
    return [goal("model: upload -> release (critical path)", f"{path / 60:.0f} min", "<= 60 min", path <= 3600),
            goal("model: Spot compute per slide", f"${cost:.2f} ({vcpu_s / 3600:.0f} vCPU-h)", "<= $1", cost <= 1),
            goal("model: largest job memory", fmt_bytes(rss_max).strip(), "<= 16 GiB", rss_max <= 16 * GIB),
            goal("model: largest job scratch", f"{scratch_max / 1e9:.1f} GB", "<= 50 GB", scratch_max <= 50e9)]


def demo_runs(slides: list[tuple[Path, Size]], work: Path) -> tuple[list[tuple[Size, list[dict]]], int, int]:
    """The demo on each slide, smaller first (the same slide twice is run once): (size, jobs) of each,
    and the raw and release bytes of the larger."""
    runs, done = [], {}
    for slide, size in slides:
        if slide not in done:
            done[slide] = demo_run(slide, work / "demo" / slide.name)
        runs.append((size, done[slide][0]))
    return runs, done[slides[-1][0]][1], done[slides[-1][0]][2]


def measure_and_model(work: Path, sizes: tuple[Size, Size, Size], overlap: float, usd: float,
                      grids: tuple[tuple[int, int], ...] = ALIGN_SPLIT_GRIDS) -> list[str]:
    """Steps 1-3 (module docstring); what was measured is kept in ``work/measured.json``."""
    tiny, small, large = sizes
    print("1. local pipeline (atlas run, each job its own process)", flush=True)
    slide, truth = make_slide(work / "slides", small, overlap)
    runs = [local_run(slide, truth, work / "local" / slide.name, small)]
    print(local_line(runs[0]), flush=True)
    # the demos' figures are per job (memory, bytes, CPU time), not wall times: they run while the
    # larger slide is made (untimed), then the larger slide's local run has the machine to itself
    with ThreadPoolExecutor(1) as pool:
        tiny_slide = slide if tiny == small else make_slide(work / "slides", tiny, overlap)[0]
        demos = pool.submit(demo_runs, [(tiny_slide, tiny), (slide, small)], work)
        large_slide, large_truth = make_slide(work / "slides", large, overlap)
        # CPU seconds per thread, not wall times: measured beside the demos
        split = align_split(work, small, overlap, grids)
        demo, raw, release = demos.result()
    save(work, runs, demo, raw, release, split)
    print(f"2. emulated cloud (atlas demo --slide, one process per job): {small.label()}", flush=True)
    goals = report_demo(demo[-1][1], raw, release)
    print(f"3. model of the target on Batch, from the jobs of step 2 and of the demo on {tiny.label()} "
          "(docs/scale.md)", flush=True)
    goals += model(demo, TARGET, usd, split)
    print("1. local pipeline, the larger slide", flush=True)
    runs.append(local_run(large_slide, large_truth, work / "local" / large_slide.name, large))
    save(work, runs, demo, raw, release, split)
    print(local_line(runs[1]), flush=True)
    return report_local(runs) + goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny slides: a smoke test, figures meaningless")
    parser.add_argument("--work", type=Path, help="folder for slides and results, kept with the figures in "
                        "measured.json (default: a temporary one, removed); ~25 GB at full size")
    parser.add_argument("--spot-usd-per-vcpu-hour", type=float, default=SPOT_USD_PER_VCPU_HOUR)
    parser.add_argument("--model-from", type=Path, metavar="MEASURED_JSON",
                        help="print the model again from a full run's measured.json (no run)")
    args = parser.parse_args()
    if args.model_from:
        saved = json.loads(args.model_from.read_text())
        demo = [(Size(**size), jobs) for size, jobs in saved["demo"]]
        split = [(Size(**size), f) for size, f in saved["align_split"]] if "align_split" in saved else None
        print("\n".join(model(demo, TARGET, args.spot_usd_per_vcpu_hour, split)))
        return
    if args.quick:  # the demo runs once, on the smaller slide (no second point for the model's lines)
        sizes, overlap = (Size(2, 2, 256, 2, 2), Size(2, 2, 256, 2, 2), Size(3, 3, 256, 2, 2)), 0.15
        grids = ((2, 2), (3, 3))
    else:
        sizes, overlap = (Size(2, 2, 512, 3, 4), Size(16, 16, 512, 3, 4), Size(32, 32, 512, 3, 4)), 0.1
        grids = ALIGN_SPLIT_GRIDS
    work = args.work or Path(tempfile.mkdtemp(prefix="scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"scale benchmark{' (--quick: figures meaningless)' if args.quick else ''}: {len(os.sched_getaffinity(0))} "
          f"CPUs, load {os.getloadavg()[0]:.1f} at start", flush=True)
    try:
        goals = measure_and_model(work, sizes, overlap, args.spot_usd_per_vcpu_hour, grids)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(goals))
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min, load {os.getloadavg()[0]:.1f} at the end")

if __name__ == "__main__":
    main()
