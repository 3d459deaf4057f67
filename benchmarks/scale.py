"""Whole slides at scale (issue 15): measured on made slides here, modelled for the target on Batch.

Usage::

    .venv/bin/python benchmarks/scale.py [--quick] [--work DIR] [--spot-usd-per-vcpu-hour 0.02]

1. **Local** (``atlas run``, one process): made slides of 256 and 1,024 tiles (512 px, 3 cycles x 4
   channels, ``atlas sample``); per slide the wall and CPU time per tile, the peak RSS, nuclei found
   against the truth; the ratios of the larger slide to the smaller (goals: RSS <= 1.10x, time per
   tile <= 1.15x, nuclei within 10 % of the truth).
2. **Emulated cloud** (``atlas demo --slide``, each job its own process): the 256-tile slide; per job
   its peak RSS (the process's VmHWM), scratch and bytes read/written (its completion record), and
   all reads against the bytes of the raw slide + the release (goals: no job over 2 GiB RSS or 1 GiB
   scratch, reads <= 3x, segment, quantify and render each run as several items).
3. **Model** of the target (1,000 tiles x 40 channels x 2048² px, 10 cycles) on Batch from the rates
   of step 2; the formulas are in docs/scale.md (goals: <= 1 h from upload to release, <= $1 of Spot
   compute, every job <= 16 GiB RAM and <= 50 GB scratch).

Every goal is printed with its figure and PASS or MISS. ``--quick`` runs tiny slides (2x2 and 3x3
tiles of 256 px, 2 cycles x 2 channels) to check that everything runs and prints; its figures mean
nothing. The full run prints the load it ran under; its emulated-cloud step is slow on moto, which
reads a whole object for each ranged GET (docs/scale.md).
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
from atlas.stages import STAGES, dependencies  # noqa: E402
from localcloud.executor import run_process  # noqa: E402

GIB, MIB = 2 ** 30, 2 ** 20
# The model's constants (docs/scale.md says where they come from).
SPOT_USD_PER_VCPU_HOUR = 0.02   # c6i/m6i Spot in us-east-1, about a third of on-demand (~$0.02 per vCPU-hour)
JOB_START_S = 90.0              # a Batch job from SUBMITTED to RUNNING: Spot host up (or reused), image cached
EVENTS_TO_RUN_S = 10.0          # S3 event -> catalog -> trigger -> StartExecution
QUEUE_MAX_VCPUS = 256           # infra.config.AtlasConfig.cpu_max_vcpus: the compute environment's cap
ONE_CHANNEL_STAGES = ("segment",)  # stages that read one channel (the DNA stain), whatever the slide's channels


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


def local_run(slide: Path, truth: Path, out: Path, size: Size) -> dict:
    """``atlas run`` on a slide folder in its own process: time, CPU, peak RSS, nuclei vs truth."""
    ran, wall = atlas("run", str(slide), "-o", str(out))
    figures = {"tiles": size.tiles, "wall_s": wall, "cpu_s": ran.cpu_seconds, "rss": ran.peak_rss_bytes,
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


def save(work: Path, runs: list[dict], jobs: list[dict], raw: int, release: int) -> None:
    """What was measured so far, to ``work/measured.json``."""
    (work / "measured.json").write_text(json.dumps({"local": runs, "jobs": jobs, "raw_bytes": raw,
                                                    "release_bytes": release}, indent=1))


def local_line(r: dict) -> str:
    return (f"  {r['tiles']:5d} tiles: {r['wall_s']:7.1f} s wall = {1e3 * r['wall_s'] / r['tiles']:6.0f} ms/tile, "
            f"{r['cpu_s']:7.1f} s CPU = {1e3 * r['cpu_s'] / r['tiles']:6.0f} ms/tile; peak RSS "
            f"{r['rss'] / MIB:6.0f} MiB; nuclei {r['nuclei']:,} found / {r['truth']:,} true "
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


def data_ratio(stage: str, measured: Size, target: Size) -> float:
    """How much more data the stage handles at the target: pixels per channel x channels it reads."""
    channels = 1.0 if stage in ONE_CHANNEL_STAGES else target.channels / measured.channels
    return target.pixels / measured.pixels * channels


def held_ratio(job: dict, items_m: int, items_t: int, measured: Size, target: Size) -> float:
    """How much more a job holds at once at the target (memory above the interpreter, scratch).

    An array item holds its share of the stage's data; a plain job or a merge streams a band of
    tile rows across the slide (a few rows of tiles, all the channels it reads); publish only lists.
    """
    stage = job["stage"]
    if stage == "publish":
        return 1.0
    channels = 1.0 if stage in ONE_CHANNEL_STAGES else target.channels / measured.channels
    if job["item"] is not None:
        return data_ratio(stage, measured, target) * items_m / max(items_t, 1)
    return target.cols * target.tile ** 2 / (measured.cols * measured.tile ** 2) * channels


def model(jobs: list[dict], measured: Size, target: Size, usd_per_vcpu_hour: float) -> list[str]:
    """The target on Batch from the measured jobs (docs/scale.md, "The model")."""
    # what every job costs whatever its data (the interpreter, the libraries): the smallest job's figures
    base, base_cpu = min(j["peak_rss_bytes"] for j in jobs), min(j["cpu_seconds"] for j in jobs)
    print(f"  measured {measured.label()}; target {target.label()}: data x{data_ratio('', measured, target):.0f} "
          f"(one-channel stages x{data_ratio(ONE_CHANNEL_STAGES[0], measured, target):.0f})")
    print(f"  {'stage':<10} {'items':>6} {'vCPU':>4} {'work vCPU-h':>11} {'latency min':>11} "
          f"{'job RSS':>10} {'job scratch':>11}")
    vcpu_s, rss_max, scratch_max = 0.0, 0.0, 0.0
    finish: dict[str, float] = {}  # when each stage ends: after the stages it builds on (parallel branches overlap)
    for stage in STAGES:
        finish[stage.name] = max((finish[d.name] for d in dependencies(stage)), default=EVENTS_TO_RUN_S)
        done = [j for j in jobs if j["stage"] == stage.name]
        if not done:
            continue
        items_m = sum(1 for j in done if j["item"] is not None)
        items_t, vcpus = stage_sizes(stage, target)
        ratio = data_ratio(stage.name, measured, target)
        items_work = sum(j["cpu_seconds"] - base_cpu for j in done if j["item"] is not None) * ratio
        item_work = base_cpu + items_work / max(items_t, 1)
        other_work = sum(base_cpu + (j["cpu_seconds"] - base_cpu) * ratio  # plain job or merge
                         for j in done if j["item"] is None)
        waves = math.ceil(items_t * vcpus / QUEUE_MAX_VCPUS) if items_t else 0
        item_wall = item_work / vcpus
        other_wall = other_work / vcpus
        stage_latency = (JOB_START_S + waves * item_wall if items_t else 0) + JOB_START_S + other_wall
        finish[stage.name] += stage_latency
        vcpu_s += vcpus * (items_t * (JOB_START_S + item_wall) + JOB_START_S + other_wall)
        rss = max(base + (j["peak_rss_bytes"] - base) * held_ratio(j, items_m, items_t, measured, target) for j in done)
        scratch = max((j["record"].get("scratch_peak_bytes") or 0) * held_ratio(j, items_m, items_t, measured, target)
                      for j in done)
        rss_max, scratch_max = max(rss_max, rss), max(scratch_max, scratch)
        print(f"  {stage.name:<10} {items_t:6d} {vcpus:4d} {(item_work * items_t + other_work) / 3600:11.1f} "
              f"{stage_latency / 60:11.1f} {fmt_bytes(rss):>10} {fmt_bytes(scratch):>11}")
    latency = max(finish.values())
    cost = vcpu_s / 3600 * usd_per_vcpu_hour
    print(f"  billed {vcpu_s / 3600:.1f} vCPU-h at ${usd_per_vcpu_hour}/vCPU-h Spot")
    return [goal("model: upload -> release (critical path)", f"{latency / 60:.0f} min", "<= 60 min", latency <= 3600),
            goal("model: Spot compute per slide", f"${cost:.2f} ({vcpu_s / 3600:.0f} vCPU-h)", "<= $1", cost <= 1),
            goal("model: largest job memory", fmt_bytes(rss_max).strip(), "<= 16 GiB", rss_max <= 16 * GIB),
            goal("model: largest job scratch", f"{scratch_max / 1e9:.1f} GB", "<= 50 GB", scratch_max <= 50e9)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny slides: a smoke test, figures meaningless")
    parser.add_argument("--work", type=Path, help="folder for slides and results, kept with the figures in "
                        "measured.json (default: a temporary one, removed); ~25 GB at full size")
    parser.add_argument("--spot-usd-per-vcpu-hour", type=float, default=SPOT_USD_PER_VCPU_HOUR)
    args = parser.parse_args()
    if args.quick:
        sizes, overlap = (Size(2, 2, 256, 2, 2), Size(3, 3, 256, 2, 2)), 0.15
    else:
        sizes, overlap = (Size(16, 16, 512, 3, 4), Size(32, 32, 512, 3, 4)), 0.1
    work = args.work or Path(tempfile.mkdtemp(prefix="scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"scale benchmark{' (--quick: figures meaningless)' if args.quick else ''}: {len(os.sched_getaffinity(0))} "
          f"CPUs, load {os.getloadavg()[0]:.1f} at start", flush=True)
    try:
        small, large = sizes
        print("1. local pipeline (atlas run, one process)", flush=True)
        slide, truth = make_slide(work / "slides", small, overlap)
        runs = [local_run(slide, truth, work / "local" / slide.name, small)]
        print(local_line(runs[0]), flush=True)
        # the demo's figures are per job (its memory, bytes, CPU time), not wall times: it runs while the
        # larger slide is made (untimed), then the larger slide's local run has the machine to itself
        with ThreadPoolExecutor(1) as pool:
            demo = pool.submit(demo_run, slide, work / "demo")
            large_slide, large_truth = make_slide(work / "slides", large, overlap)
            jobs, raw, release = demo.result()
        save(work, runs, jobs, raw, release)
        print(f"2. emulated cloud (atlas demo --slide, one process per job): {small.label()}", flush=True)
        goals = report_demo(jobs, raw, release)
        print("3. model of the target on Batch, from the jobs of step 2 (docs/scale.md)", flush=True)
        goals += model(jobs, small, TARGET, args.spot_usd_per_vcpu_hour)
        print("1. local pipeline, the larger slide", flush=True)
        runs.append(local_run(large_slide, large_truth, work / "local" / large_slide.name, large))
        save(work, runs, jobs, raw, release)
        print(local_line(runs[1]), flush=True)
        goals = report_local(runs) + goals
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(goals))
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min, load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
