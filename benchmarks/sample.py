"""Making sample slides of growing size (``atlas sample``): time per tile and peak memory.

Usage::

    .venv/bin/python benchmarks/sample.py [--sides 8 16 32] [--tile-size 512] [--cycles 3] [--channels 4]
                                          [--workers N]

Each slide (``side x side`` tiles) is made by its own child process in a temporary folder (deleted
after). Per slide: wall time, CPU time of the maker and its workers, wall and CPU time per tile, peak
resident memory of the main process (VmHWM) and of the largest worker, the slide's size on disk,
and the ratios to the first (reference) slide of this run: time per tile and peak memory should
stay flat as the slide grows (the maker streams tile by tile). The defaults are the scale
benchmark's slides: 256 and 1,024 tiles of 512 px, 3 cycles x 4 channels, with 64 tiles as reference.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAKE = """
import re, resource, sys
from pathlib import Path
from atlas.slide.sample import make_sample
side, size, cycles, channels, workers = (int(v) for v in sys.argv[2:7])
make_sample(Path(sys.argv[1]), grid=(side, side), tile_size=size, cycles=cycles, channels=channels,
            workers=workers or None)
main = int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(main, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def make(side: int, args: argparse.Namespace) -> dict:
    """Make one slide in a child process; its figures."""
    folder = Path(tempfile.mkdtemp(prefix="sample-bench-"))
    try:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", MAKE, str(folder), str(side), str(args.tile_size),
                                  str(args.cycles), str(args.channels), str(args.workers)],
                                 stdout=subprocess.PIPE, text=True)
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        if status:
            raise SystemExit(f"making the {side} x {side} slide failed (status {status})")
        main_kb, worker_kb = (int(v) for v in out.split()[-2:])
        disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    tiles = side * side
    return {"tiles": tiles, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "main_mib": main_kb / 1024,
            "worker_mib": worker_kb / 1024, "disk_gb": disk / 1e9, "wall_ms_per_tile": 1e3 * wall / tiles,
            "cpu_ms_per_tile": 1e3 * (usage.ru_utime + usage.ru_stime) / tiles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: one per available CPU)")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"sample slides of {args.tile_size} px tiles, {args.cycles} cycles x {args.channels} channels; "
          f"{len(os.sched_getaffinity(0))} CPUs, load {load:.1f}")
    reference = None
    for side in args.sides:
        r = make(side, args)
        reference = reference or r
        print(f"{r['tiles']:5d} tiles: {r['wall_s']:7.1f} s wall ({r['wall_ms_per_tile']:5.0f} ms/tile, "
              f"x{r['wall_ms_per_tile'] / reference['wall_ms_per_tile']:.2f}), {r['cpu_s']:7.1f} s CPU "
              f"({r['cpu_ms_per_tile']:5.0f} ms/tile, x{r['cpu_ms_per_tile'] / reference['cpu_ms_per_tile']:.2f}); "
              f"peak RSS main {r['main_mib']:4.0f} MiB (x{r['main_mib'] / reference['main_mib']:.2f}), "
              f"largest worker {r['worker_mib']:4.0f} MiB (x{r['worker_mib'] / max(reference['worker_mib'], 1):.2f}); "
              f"{r['disk_gb']:.2f} GB written", flush=True)


if __name__ == "__main__":
    main()
