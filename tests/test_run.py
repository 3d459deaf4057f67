"""``atlas run`` end to end: on the made sample (checked against its truth) and on real tiles.

The real run uses the 54 positioned brain tiles of ``../shared/data/stitching/basicpy_wsi_brain``
packed with ``atlas import fiji``; the sample run checks stitching, segmentation and
quantification against the sample's ground truth.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from typer.testing import CliRunner

from atlas import layout
from atlas.cli import app
from atlas.errors import InvalidInput
from atlas.params import Params
from atlas.pipeline.contract import CorruptWork, StageFailed, UndeclaredOutput, UpstreamIncomplete
from atlas.pipeline.local import make_context, run_local_job, run_pipeline
from atlas.pipeline.runner import execute, job_context
from atlas.slide.convention import read_markers, sha256_file, write_manifest
from atlas.stages import STAGES, CompletionRecord, StageContext, get_stage
from atlas.storage import FolderStore
from localcloud.executor import descendants

MCQUANT_MORPHOLOGY = ["X_centroid", "Y_centroid", "Area", "MajorAxisLength", "MinorAxisLength",
                      "Eccentricity", "Solidity", "Extent", "Orientation"]


def check_results(out: Path, slide_dir: Path) -> dict:
    """Assert what every run must give; returns the manifest."""
    slide_id = slide_dir.name
    names = [m.marker_name for m in read_markers(slide_dir / "markers.csv")]
    manifest = json.loads((out / layout.MANIFEST).read_text())
    assert manifest["slide_id"] == slide_id and manifest["run_id"].startswith(slide_id + "-")
    assert {"python", "ashlar", "tifffile", "zarr"} <= set(manifest["software"])
    assert manifest["params"]["stitch"]["align_channel"] == 0
    stages = [s["stage"] for s in manifest["stages"] if s["item"] is None]
    assert stages[:7] == ["illuminate", "align", "mosaic", "export", "segment", "quantify", "render"]
    files = {f["path"]: f for f in manifest["files"]}
    for path, entry in files.items():
        assert (out / path).stat().st_size == entry["size"], path
        assert sha256_file(out / path) == entry["sha256"], path
        assert entry["level"] == layout.level_of(path)

    # Level 2: pyramidal OME-TIFF with channel names, and the same image as OME-Zarr
    reg = layout.registration_tiff(slide_id)
    assert files[reg]["level"] == 2
    with tifffile.TiffFile(out / reg) as tif:
        series = tif.series[0]
        image = series.asarray()
        image = image[np.newaxis] if series.axes == "YX" else image  # a one-channel image squeezes C
        assert series.axes.endswith("YX") and image.shape[0] == len(names)
        assert len(series.levels) > 1
        ome_names = [c.get("Name") for c in ET.fromstring(tif.ome_metadata).iter() if c.tag.endswith("}Channel")]
        assert ome_names == names
    zgroup = zarr.open_group(out / layout.registration_zarr(slide_id), mode="r")
    assert [c["label"] for c in zgroup.attrs["omero"]["channels"]] == names
    np.testing.assert_array_equal(zgroup["0"][:], image)

    # Level 3: nuclei and cell labels with matching ids
    seg = sorted((out / layout.SEGMENTATION).iterdir())
    assert len(seg) == 1 and seg[0].name.endswith("-" + slide_id)
    engine = seg[0].name.split("-")[0]
    nuclei = tifffile.imread(out / layout.mask_path(slide_id, engine, "nuclei"))
    cell = tifffile.imread(out / layout.mask_path(slide_id, engine, "cell"))
    assert nuclei.dtype == cell.dtype == np.uint32 and nuclei.shape == cell.shape == image.shape[1:]
    inside = nuclei > 0
    assert np.array_equal(cell[inside], nuclei[inside])
    assert files[layout.mask_path(slide_id, engine, "cell")]["level"] == 3

    # Level 4: MCQuant columns, one row per cell
    table = pd.read_csv(out / layout.table_path(slide_id, engine, "cell"))
    assert list(table.columns) == ["CellID", *names, *MCQUANT_MORPHOLOGY]
    assert sorted(table["CellID"]) == sorted(set(np.unique(cell)) - {0})
    assert files[layout.table_path(slide_id, engine, "cell")]["level"] == 4

    # Level 5 overview and QC
    assert (out / layout.OVERVIEW / "index.html").is_file()
    exhibit = json.loads((out / layout.OVERVIEW / "exhibit.json").read_text())
    assert [name for group in exhibit["Groups"] for name in group["Channels"]] == names
    assert any(p.startswith("qc/stitch/") for p in files)
    return {"manifest": manifest, "image": image, "nuclei": nuclei, "cell": cell, "table": table, "engine": engine}


def match_labels(pred: np.ndarray, true: np.ndarray) -> dict[int, tuple[int, float]]:
    """For each true label, the predicted label with the largest overlap and their IoU."""
    both = (pred > 0) & (true > 0)
    pairs, counts = np.unique(np.stack([true[both], pred[both]]), axis=1, return_counts=True)
    true_area = np.bincount(true.ravel())
    pred_area = np.bincount(pred.ravel())
    best: dict[int, tuple[int, float]] = {}
    for (t, p), n in zip(pairs.T, counts, strict=True):
        iou = n / (true_area[t] + pred_area[p] - n)
        if iou > best.get(t, (0, 0.0))[1]:
            best[int(t)] = (int(p), float(iou))
    return best


def test_sample_run_matches_truth(sample_run, sample_dirs):
    slide_dir, truth_dir = sample_dirs
    got = check_results(sample_run, slide_dir)
    truth = json.loads((truth_dir / "truth.json").read_text())

    # stitching + registration: every tile of both cycles within 1 px of its true position
    placed = pd.read_csv(sample_run / "qc/stitch/tiles.csv")
    true_pos = pd.read_csv(truth_dir / "tile_positions.csv")
    joined = placed.merge(true_pos, on=["cycle", "tile"])
    assert len(joined) == 2 * 9
    err = np.hypot(joined["y_px"] - joined["mosaic_y_px"], joined["x_px"] - joined["mosaic_x_px"])
    assert err.max() < 1.0, joined[["cycle", "tile", "y_px", "mosaic_y_px", "x_px", "mosaic_x_px"]]

    # segmentation: most true nuclei found as one predicted nucleus (IoU >= 0.5)
    true_nuclei = tifffile.imread(truth_dir / "nuclei.tif")
    h = min(true_nuclei.shape[0], got["nuclei"].shape[0])
    w = min(true_nuclei.shape[1], got["nuclei"].shape[1])
    matches = match_labels(got["nuclei"][:h, :w], true_nuclei[:h, :w])
    found = sum(iou >= 0.5 for _, iou in matches.values())
    n_true = truth["n_cells"]
    assert found / n_true > 0.7, (found, n_true)

    # quantification: measured means of matched cells track the true means. Nuclear stains are
    # compared on the nuclei table, the other markers on the cell table. Without illumination
    # correction the tiles keep their vignetting (down to 0.68 in the corners), and cycle 2 is
    # placed to the nearest pixel, so the floors are correlations, not equalities.
    pairs = [(t, p) for t, (p, iou) in matches.items() if iou >= 0.5]
    for mask, markers, floor in (("nuclei", ["DNA_1", "DNA_2"], 0.8),
                                 ("cell", ["CD45", "panCK", "CD3", "aSMA"], 0.9)):
        measured = pd.read_csv(sample_run / layout.table_path(slide_dir.name, got["engine"], mask)).set_index("CellID")
        expected = pd.read_csv(truth_dir / f"{mask}.csv").set_index("CellID")
        measured = measured.loc[[p for _, p in pairs]]
        expected = expected.loc[[t for t, _ in pairs]]
        for marker in markers:
            r = np.corrcoef(measured[marker].to_numpy(), expected[marker].to_numpy())[0, 1]
            assert r > floor, (mask, marker, r)


def test_rerun_resumes_without_redoing_work(sample_run, sample_slide):
    before = {p: p.stat().st_mtime_ns for p in sample_run.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["run", str(sample_slide), "-o", str(sample_run)])
    assert result.exit_code == 0, result.output
    assert result.output.count("already complete") == len(STAGES)
    assert "overview:" in result.output
    after = {p: p.stat().st_mtime_ns for p in sample_run.rglob("*") if p.is_file()}
    assert after == before


def test_run_refuses_an_invalid_slide_and_keeps_it(slide_copy, tmp_path):
    (slide_copy / "markers.csv").write_text("junk\n")
    before = sorted((p.name, p.stat().st_size) for p in slide_copy.rglob("*"))
    result = CliRunner().invoke(app, ["run", str(slide_copy), "-o", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "markers.csv" in str(result.exception) + result.output
    assert sorted((p.name, p.stat().st_size) for p in slide_copy.rglob("*")) == before


def records_of(out: Path, stage: str) -> list[Path]:
    """The completion records of ``stage`` in a results folder (every job's with ``stage=""``)."""
    return sorted((out / layout.PROVENANCE).glob(f"{stage}*.json"))


def test_a_jobs_bad_input_reaches_the_caller_with_its_problems(slide_copy, tmp_path):
    """Each job runs in a process of its own: what it finds wrong crosses back as the same
    InvalidInput, problem by problem, and the failed stage records nothing."""
    (slide_copy / "params.yml").write_text("segment:\n  channel: NOPE\n")
    write_manifest(slide_copy)
    with pytest.raises(InvalidInput) as raised:
        run_pipeline(slide_copy, tmp_path / "out")
    (problem,) = raised.value.problems
    assert "no channel named 'NOPE'" in problem.message and "marker name" in problem.fix
    assert records_of(tmp_path / "out", "segment") == []   # nothing recorded for the failed stage


def test_run_reports_a_failed_job_in_one_line_with_its_exit_code(sample_slide, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise StageFailed("mosaic[1]: its process ended without finishing; rerun `atlas run` to retry from it")

    monkeypatch.setattr("atlas.cli.run.run_pipeline", fails)
    result = CliRunner().invoke(app, ["run", str(sample_slide), "-o", str(tmp_path / "out")])
    assert result.exit_code == 5
    assert "error: mosaic[1]: its process ended without finishing" in result.output


def test_a_job_whose_process_dies_fails_the_run_naming_it_and_a_rerun_finishes(sample_slide, tmp_path):
    """A job killed as the kernel kills a process out of memory (SIGKILL) fails the run with the
    job's name and the fix; the jobs before it keep their records and a rerun runs from it."""
    out = tmp_path / "out"
    killed: list[int] = []

    def fork_server(pid: int) -> bool:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing.forkserver" in f.read()

    def kill_first_job() -> None:   # a job is a child of the runner's fork server (other tests leave other processes)
        while not killed:
            jobs = []
            with contextlib.suppress(OSError):
                jobs = [job for server in descendants(os.getpid()) if fork_server(server)
                        for job in descendants(server)]
            if jobs:
                os.kill(jobs[0], signal.SIGKILL)
                killed.append(jobs[0])
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_job, daemon=True)
    killer.start()
    with pytest.raises(StageFailed, match=r"its process ended without finishing .*rerun `atlas run`"):
        run_pipeline(sample_slide, out)
    killer.join(timeout=5)
    assert killed
    done = len(records_of(out, ""))
    run_pipeline(sample_slide, out)
    assert len(records_of(out, "")) == sum(len(s.jobs()) for s in STAGES) > done
    assert (out / layout.MANIFEST).is_file()


@pytest.mark.timeout(900)
def test_run_on_imported_real_brain_tiles(shared_data, tmp_path):
    config = shared_data / "stitching/basicpy_wsi_brain/TileConfiguration.txt"
    slide = tmp_path / "brain"
    result = CliRunner().invoke(app, ["import", "fiji", str(config), "-o", str(slide)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    run_pipeline(slide, out)
    got = check_results(out, slide)
    # the 54 tiles of about 460 px pitch on a 9 x 6 grid give a mosaic of about 4200 x 2900 px
    assert 2800 < got["image"].shape[1] < 3000 and 4100 < got["image"].shape[2] < 4300
    assert len(got["table"]) > 100


def test_jobs_read_and_write_only_what_the_registry_declares(tmp_path, monkeypatch):
    """The registry is enforced where jobs run: a stray write or read fails the job, naming the
    path and the fix; a changed earlier output is caught when it is read; written outputs are
    recorded with the size and sha256 of the bytes written."""
    slide = tmp_path / "S1"
    slide.mkdir()
    (slide / "markers.csv").write_text("channel_number,cycle_number,marker_name\n1,1,DNA\n")
    write_manifest(slide)
    out = tmp_path / "out"
    (out / "overview").mkdir(parents=True)
    (out / "overview" / "index.html").write_text("<html>")
    (out / "qc" / "stitch").mkdir(parents=True)
    (out / "qc" / "stitch" / "summary.json").write_text("{}")
    earlier = {"stage": "render", "item": None, "run_id": "r",
               "outputs": [{"path": "overview/index.html", "size": 6, "sha256": hashlib.sha256(b"<html>").hexdigest()},
                           {"path": "qc/stitch/summary.json", "size": 2, "sha256": "0" * 64}]}
    upstream = {"qc/provenance/render.json": CompletionRecord(earlier, {"path": "qc/provenance/render.json"})}
    base = StageContext("S1", "r", FolderStore(slide), FolderStore(out), Params())
    quantify, segment_item = get_stage("quantify").jobs()[-1], get_stage("segment").jobs()[1]  # quantify's merge

    def runs(stage_function):
        def run(ctx, *args):
            stage_function(ctx)
        return run

    def attempt(job, stage_function):
        function = "run_item" if job.item is not None else "merge" if job.merge else "run"
        monkeypatch.setattr(job.stage.module, function, runs(stage_function))
        return execute(job_context(base, job, upstream, tmp_path), job)

    with pytest.raises(UndeclaredOutput, match="quantify merge wrote registration/S1.txt, outside its declared "):
        attempt(quantify, lambda ctx: ctx.work.write_text("registration/S1.txt", "x"))
    # an array item may write only below its stage's item folder, not the stage's final outputs
    with pytest.raises(UndeclaredOutput, match=r"segment\[1\] wrote segmentation/x-S1/cell.ome.tif"):
        attempt(segment_item, lambda ctx: ctx.work.write_bytes("segmentation/x-S1/cell.ome.tif", b"x"))
    # an earlier output that is not a declared input cannot be read; one that changed is caught
    with pytest.raises(UndeclaredOutput, match="quantify merge read overview/index.html, outside its declared inputs"):
        attempt(quantify, lambda ctx: ctx.work.read_bytes("overview/index.html"))
    with pytest.raises(CorruptWork, match="qc/stitch/summary.json: output of stage render .* has sha256"):
        attempt(get_stage("render").jobs()[0], lambda ctx: ctx.work.read_bytes("qc/stitch/summary.json"))
    # declared outputs are recorded with the size and sha256 of what was written, nothing else
    (entry,) = attempt(quantify, lambda ctx: ctx.work.write_text("quantification/S1--x_cell.csv", "CellID\n"))
    assert entry == {"path": "quantification/S1--x_cell.csv", "size": 7,
                     "sha256": hashlib.sha256(b"CellID\n").hexdigest()}


def test_a_job_needs_the_records_of_the_jobs_before_it(sample_slide, tmp_path):
    ctx = make_context(sample_slide, tmp_path)
    with pytest.raises(UpstreamIncomplete, match=r"render\[0\] of run .* needs illuminate\[0\], illuminate\[1\], "
                                                 r"illuminate merge, align, mosaic\[0\]"):
        run_local_job(ctx, get_stage("render").jobs()[0])
