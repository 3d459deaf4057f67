"""benchmarks/scale.py --quick: the scale benchmark runs end to end and prints every goal.

A smoke test on tiny made slides (2x2 and 3x3 tiles of 256 px): the local runs, ``atlas demo --slide``
with each job as its own process, and the model. It asserts what is printed and that the per-job
figures are real measurements, never the timings or the goals' outcomes (the figures of tiny slides
mean nothing; docs/scale.md has a full run's).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from atlas.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
GOALS = ["local: peak RSS", "local: time per tile", "local: nuclei found vs truth",
         "cloud: largest job peak RSS", "cloud: segment runs as several items", "cloud: quantify runs as several items",
         "cloud: render runs as several items", "model: upload -> release", "model: Spot compute per slide",
         "model: largest job memory", "model: largest job scratch"]


def test_the_quick_scale_benchmark_prints_every_goal_with_its_figure(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--quick", "--work",
                           str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # 1. both local runs, each with its nuclei against the truth of its slide
    runs = re.findall(r"^ +(\d+) tiles: .* peak RSS +(\d+) MiB \(largest job (\d+)\); nuclei ([\d,]+) found / "
                      r"([\d,]+) true", output, re.M)
    assert [int(r[0]) for r in runs] == [4, 9], output
    # the run's processes together hold more than its largest job alone (the runner, its fork server)
    assert all(int(rss) > int(job) > 50 and int(true.replace(",", "")) > 0 for _, rss, job, _, true in runs)
    # 2. every registry stage ran in the emulated cloud as its own measured process
    jobs = re.findall(r"^  (\S+(?: merge)?) +([\d.]+) +([\d.]+) +(\d+) MiB", output, re.M)
    assert {re.sub(r"\[\d+\]| merge", "", job) for job, *_ in jobs} == {s.name for s in STAGES}, output
    assert all(float(cpu) > 0 and int(rss) > 50 for _, _, cpu, rss in jobs)
    # 3. the model has a row per stage's kind of job; every goal is printed with its figure and a verdict
    rows = re.findall(r"^  (\w+)( items| merge)? +\d+ +\d+ +[\d.]+ +[\d.]+ ", output, re.M)
    assert {s.name for s in STAGES} <= {stage for stage, _ in rows}, output
    assert {stage for stage, kind in rows if kind == " items"} == {s.name for s in STAGES if s.array_size}, output
    verdicts = dict(re.findall(r"^GOAL  (.+?) {2,}.+ (PASS|MISS)$", output, re.M))
    for name in GOALS:
        assert any(found.startswith(name) for found in verdicts), (name, output)
    # the work folder is the caller's: kept, with the demo's job list
    assert (tmp_path / "work" / "demo" / "s4" / "jobs.json").is_file()
    # ... and what was measured, from which the model is printed again
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--model-from",
                            str(tmp_path / "work" / "measured.json")], env=env, capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    assert again.returncode == 0 and "model: largest job memory" in again.stdout, again.stdout + again.stderr


def test_the_model_puts_quantifys_merge_at_its_measured_rate_per_cell_marker():
    """The merge's memory and CPU at the target come from the larger demo's figures plus the rates
    benchmarks/quantify_merge.py measured, whatever the 2x2 demo's merge showed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scale

    def merge_job(rss: float, cpu: float, tables: int) -> dict:
        job = {"stage": "quantify", "item": None, "merge": True, "cpu_seconds": cpu, "peak_rss_bytes": rss,
               "record": {"scratch_peak_bytes": 1, "outputs": [{"path": f"t{i}.csv"} for i in range(tables)]}}
        return scale.job_figures([job], "quantify", "merge")

    small, large = scale.Size(2, 2, 512, 3, 4), scale.Size(16, 16, 512, 3, 4)
    cells = scale.CELLS_PER_PIXEL * scale.TARGET.pixels
    for tiny_rss in (1e6, 4e8):   # the tiny demo's figure does not move the line
        fig = scale.kind_at_target(merge_job(tiny_rss, 2.0, 2), merge_job(5e8, 4.0, 2), (small, large),
                                   scale.TARGET, 1)
        held = cells * (scale.TARGET.channels + 10)
        at_large = scale.CELLS_PER_PIXEL * large.pixels * (large.channels + 10)
        assert fig["rss"] == pytest.approx(5e8 + scale.MERGE_BYTES_PER_CELL_MARKER * (held - at_large), rel=1e-12)
        assert fig["cpu"] == pytest.approx(4.0 + scale.MERGE_CPU_S_PER_CELL_MARKER * 2 * (held - at_large), rel=1e-12)
    assert 5e6 < cells < 7e6   # ~5.8 M cells per mask at the target
