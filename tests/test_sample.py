"""The made sample slide: a valid slide, reproducible to the byte, and its truth agrees with its pixels;
made tile by tile, it equals the specimen rendered whole, and its memory does not grow with its size.

Synthetic on purpose: this is the product's own demo/CI slide, and only a made slide has exact truth
(true positions, labels and per-cell means) to check stitching, segmentation and quantification against.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage
from skimage.registration import phase_cross_correlation
from typer.testing import CliRunner

from atlas.cli import app
from atlas.errors import InvalidInput
from atlas.slide.cell_shapes import render_labels
from atlas.slide.convention import SLIDE_MANIFEST, parse_manifest, read_markers
from atlas.slide.ome import read_cycle_metadata, read_tile
from atlas.slide.sample import (
    CAMERA_OFFSET,
    PIXEL_SIZE_UM,
    SampleDesign,
    _sample_tile,
    _tile_window,
    geometry,
    make_sample,
    markers,
)
from atlas.slide.specimen import (
    _SHAPES,
    PLACEMENT_BLOCK_PX,
    REACH_PX,
    Patch,
    Specimen,
    _greedy,
    marker_panel,
)
from atlas.slide.validate import validate_slide

SMALL = {"grid": (2, 2), "tile_size": 128, "overlap": 0.3}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def truth(sample_dirs):
    truth_dir = sample_dirs[1]
    return {"doc": json.loads((truth_dir / "truth.json").read_text()),
            "positions": pd.read_csv(truth_dir / "tile_positions.csv"),
            "nuclei": tifffile.imread(truth_dir / "nuclei.tif"),
            "cells": tifffile.imread(truth_dir / "cell.tif"),
            "cell_means": pd.read_csv(truth_dir / "cell.csv"),
            "nuclei_means": pd.read_csv(truth_dir / "nuclei.csv"),
            "types": pd.read_csv(truth_dir / "cell_types.csv"),
            "flat": tifffile.imread(truth_dir / "flatfield.tif")}


def _cycle_path(slide: Path, truth, cycle: int) -> Path:
    return slide / truth["doc"]["cycles"][cycle - 1]["file"]


def _mosaic_position(truth, cycle: int, tile: int) -> np.ndarray:
    p = truth["positions"]
    row = p[(p.cycle == cycle) & (p.tile == tile)]
    return row[["mosaic_y_px", "mosaic_x_px"]].to_numpy()[0]


def test_slide_is_valid_and_truth_stays_outside(sample_dirs):
    slide, truth_dir = sample_dirs
    assert validate_slide(slide) == []
    assert truth_dir.parent == slide.parent and truth_dir.name == f"{slide.name}.truth"
    listed = {e.path for e in parse_manifest((slide / SLIDE_MANIFEST).read_text())}
    assert listed == {"markers.csv", "raw/cycle-01.ome.tif", "raw/cycle-02.ome.tif"}
    assert [(m.cycle_number, m.marker_name) for m in read_markers(slide / "markers.csv")] == [
        (1, "DNA_1"), (1, "CD45"), (1, "panCK"), (2, "DNA_2"), (2, "CD3"), (2, "aSMA")]
    assert not list(slide.parent.glob(".*")), "no temporary folder left behind"


def test_cycle_metadata_holds_nominal_stage_grid(sample_dirs, truth):
    slide, _ = sample_dirs
    positions = truth["positions"]
    for cycle, names in ((1, ("DNA_1", "CD45", "panCK")), (2, ("DNA_2", "CD3", "aSMA"))):
        meta = read_cycle_metadata(_cycle_path(slide, truth, cycle))
        assert (meta.n_tiles, meta.tile_shape, meta.n_channels, meta.dtype) == (9, (512, 512), 3, "uint16")
        assert meta.channel_names == names and meta.pixel_size_um == pytest.approx(PIXEL_SIZE_UM)
        rows = positions[positions.cycle == cycle].sort_values("tile")
        np.testing.assert_allclose(meta.positions_um, rows[["stage_y_um", "stage_x_um"]], atol=1e-3)
        steps = np.diff(np.unique(meta.positions_um[:, 1]))
        np.testing.assert_allclose(steps, 461 * PIXEL_SIZE_UM)           # 512 px tiles, ~10 % overlap
        offsets = rows[["true_y_um", "true_x_um"]].to_numpy() - meta.positions_um
        jitter = offsets - offsets.mean(axis=0)
        assert 0.3 < np.abs(jitter).max() <= 2 * truth["doc"]["jitter_max_um"], "true positions carry jitter"
    first, shift = np.array(truth["doc"]["cycle_shifts_um"])
    assert np.all(first == 0) and 8 <= np.hypot(*shift) <= 16 and not np.allclose(shift, np.round(shift))


def test_same_seed_gives_identical_bytes_whatever_the_workers(sample_dirs, tmp_path):
    slide, truth_dir = make_sample(tmp_path, workers=1)        # the fixture's used every CPU
    for made, reference in ((slide, sample_dirs[0]), (truth_dir, sample_dirs[1])):
        new, old = _files(made), _files(reference)
        assert new.keys() == old.keys()
        assert [name for name in new if new[name] != old[name]] == []


def test_other_seed_gives_other_tissue(tmp_path):
    a, b = (make_sample(tmp_path / str(seed), seed=seed, **SMALL) for seed in (1, 2))
    tiles = [read_tile(slide / "raw/cycle-01.ome.tif", 0) for slide, _ in (a, b)]
    nuclei = tifffile.imread(a[1] / "nuclei.tif")
    assert nuclei.max() > 5 and not np.array_equal(*tiles)
    shifts = [json.loads((truth / "truth.json").read_text())["cycle_shifts_um"][1] for _, truth in (a, b)]
    assert not np.allclose(*shifts)


def test_tiles_sit_at_true_positions(sample_dirs, truth):
    """The DNA tile registers onto the truth nuclei at the truth position, to a tenth of a pixel."""
    slide, _ = sample_dirs
    nuclei = ndimage.gaussian_filter((truth["nuclei"] > 0).astype(float), 1.0)
    flat = truth["flat"]
    for cycle in (1, 2):
        for tile in (0, 4, 8):
            position = _mosaic_position(truth, cycle, tile)
            top = np.round(position).astype(int)
            # the part of the tile inside the frame (cycle 2 is shifted partly out of it)
            low, high = np.maximum(top, 0), np.minimum(top + 512, nuclei.shape)
            crop = nuclei[low[0]:high[0], low[1]:high[1]]
            dna = (read_tile(_cycle_path(slide, truth, cycle), tile)[0] - CAMERA_OFFSET) / flat
            dna = dna[low[0] - top[0]:high[0] - top[0], low[1] - top[1]:high[1] - top[1]]
            found, _, _ = phase_cross_correlation(crop, dna, upsample_factor=20, normalization=None)
            np.testing.assert_allclose(found, position - np.round(position), atol=0.15)


def test_cycle_misregistration_is_the_truth(sample_dirs, truth):
    slide, _ = sample_dirs
    for tile in range(9):
        dna1 = read_tile(_cycle_path(slide, truth, 1), tile)[0].astype(float)
        dna2 = read_tile(_cycle_path(slide, truth, 2), tile)[0].astype(float)
        # plain cross-correlation: at this noise, phase correlation's whitening scatters by ~0.15 px
        found, _, _ = phase_cross_correlation(dna1, dna2, upsample_factor=20, normalization=None)
        expected = _mosaic_position(truth, 2, tile) - _mosaic_position(truth, 1, tile)
        np.testing.assert_allclose(found, expected, atol=0.15)


def test_tile_cell_means_match_true_means(sample_dirs, truth):
    """Flat-field-corrected tile pixels averaged over the true cells give the true means (noise aside)."""
    slide, _ = sample_dirs
    means = truth["cell_means"].set_index("CellID")
    names = markers()
    flat = truth["flat"]
    for cycle in (1, 2):
        position = np.round(_mosaic_position(truth, cycle, 4)).astype(int)     # centre tile: fully in the frame
        cells = truth["cells"][position[0]:position[0] + 512, position[1]:position[1] + 512]
        tile = read_tile(_cycle_path(slide, truth, cycle), 4).astype(float)
        inner = np.unique(cells[20:-20, 20:-20])
        whole = np.setdiff1d(inner, np.unique(np.r_[cells[:20].ravel(), cells[-20:].ravel(),
                                                    cells[:, :20].ravel(), cells[:, -20:].ravel()]))
        whole = whole[whole > 0]
        assert len(whole) > 200
        for c, channel in enumerate(tile):
            corrected = (channel - CAMERA_OFFSET) / flat + CAMERA_OFFSET
            measured = ndimage.mean(corrected, cells, whole)
            true = means.loc[whole, names[3 * (cycle - 1) + c]].to_numpy()
            relative = np.abs(measured / true - 1)
            assert np.median(relative) < 0.01 and np.corrcoef(measured, true)[0, 1] > 0.99, names[3 * (cycle - 1) + c]


def test_truth_labels_look_like_tissue(truth):
    nuclei, cells = truth["nuclei"], truth["cells"]
    assert nuclei.dtype == np.uint32 and cells.dtype == np.uint32
    assert nuclei.shape == tuple(truth["doc"]["mosaic_frame"]["shape_px"])
    n = int(nuclei.max())
    assert n == truth["doc"]["n_cells"] and np.array_equal(np.unique(nuclei), np.arange(n + 1))
    assert np.array_equal(cells[nuclei > 0], nuclei[nuclei > 0]), "each cell holds its own nucleus"
    assert set(np.unique(cells)) <= set(range(n + 1))
    table = truth["nuclei_means"]
    inside = table[(table.X_centroid > 30) & (table.Y_centroid > 30)
                   & (table.X_centroid < nuclei.shape[1] - 30) & (table.Y_centroid < nuclei.shape[0] - 30)]
    diameter_um = 2 * np.sqrt(inside.Area / np.pi) * PIXEL_SIZE_UM
    assert 7 < np.median(diameter_um) < 11 and np.percentile(diameter_um, 95) < 14
    # some nuclei touch: 4-neighbour pixel pairs with two different nucleus labels
    touching = set()
    for a, b in ((nuclei[:, :-1], nuclei[:, 1:]), (nuclei[:-1], nuclei[1:])):
        pairs = (a != b) & (a > 0) & (b > 0)
        touching |= set(zip(a[pairs].tolist(), b[pairs].tolist(), strict=True))
    assert 0.01 * n < len(touching) < 0.5 * n
    assert 0.15 < (nuclei > 0).mean() < 0.5, "tissue with nuclei, stroma and empty lumen"


def test_truth_tables_follow_mcquant_and_cell_types_express_their_markers(truth):
    for table, labels in ((truth["cell_means"], truth["cells"]), (truth["nuclei_means"], truth["nuclei"])):
        assert list(table.columns) == ["CellID", *markers(), "X_centroid", "Y_centroid", "Area"]
        assert table.CellID.tolist() == list(range(1, truth["doc"]["n_cells"] + 1))
        np.testing.assert_array_equal(table.Area, np.bincount(labels.ravel())[1:])
        ys, xs = ndimage.center_of_mass(np.ones_like(labels), labels, [1, 2])[1]
        assert (table.Y_centroid[1], table.X_centroid[1]) == pytest.approx((ys, xs), abs=1e-3)
    cells = truth["cell_means"].merge(truth["types"], on="CellID")
    assert set(cells.cell_type) == {"epithelial", "t_cell", "immune_other", "stromal", "other"}
    median = cells.groupby("cell_type").median(numeric_only=True)
    for marker, positive in (("panCK", ["epithelial"]), ("CD45", ["t_cell", "immune_other"]),
                             ("CD3", ["t_cell"]), ("aSMA", ["stromal"])):
        negative = median.drop(index=positive)[marker].max()
        assert median.loc[positive, marker].min() > 2 * negative, marker


def test_tiles_show_vignetting(sample_dirs, truth):
    slide, _ = sample_dirs
    flat = truth["flat"]
    assert flat.max() == pytest.approx(1, abs=1e-3) and 0.6 < flat.min() < 0.75
    stack = np.stack([read_tile(_cycle_path(slide, truth, 1), t)[0] for t in range(9)]).astype(float)
    median = np.median(stack, axis=0)        # tissue averages out across tiles, the illumination does not
    corner, centre = np.median(median[:64, :64]), np.median(median[224:288, 224:288])
    assert corner < 0.9 * centre


def test_pixels_follow_the_camera_model(sample_dirs, truth):
    """Tile pixels = offset + flat x the specimen's signal at the tile's true position + noise whose
    variance is shot noise (= the signal in e-, gain 1) plus read noise."""
    slide, _ = sample_dirs
    design = SampleDesign()
    geom = geometry(design)
    specimen = Specimen(0, [m for cycle in marker_panel(2, 3) for m in cycle])
    t = 4
    window = _tile_window(geom, design, t)
    patch = Patch(specimen, window)
    read_noise = truth["doc"]["camera"]["read_noise_adu"]
    for cycle in (1, 2):
        tile = read_tile(_cycle_path(slide, truth, cycle), t).astype(float)
        for c in range(3):
            signal = patch.signal(3 * (cycle - 1) + c)
            expected = truth["flat"] * _sample_tile(signal, geom.tile_px[cycle - 1, t] - window[:2], 512)
            residual = tile[c] - CAMERA_OFFSET - expected
            assert abs(residual.mean()) < 0.3
            z = residual / np.sqrt(expected + read_noise ** 2)
            assert z.std() == pytest.approx(1, abs=0.02) and abs(np.mean(z ** 3)) < 0.1


def test_cli_makes_replaces_and_refuses_foreign_folders(tmp_path):
    runner = CliRunner()
    args = ["sample", str(tmp_path), "--rows", "2", "--cols", "2", "--tile-size", "128", "--overlap", "0.3"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert str((tmp_path / "sample").resolve()) in first.output
    before = _files(tmp_path / "sample")
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and _files(tmp_path / "sample") == before

    (tmp_path / "lab" / "raw").mkdir(parents=True)
    (tmp_path / "lab" / "raw" / "cycle.ome.tif").write_bytes(b"precious")
    refused = runner.invoke(app, [*args, "--slide-id", "lab"])
    assert isinstance(refused.exception, InvalidInput) and "not a sample" in str(refused.exception)
    assert (tmp_path / "lab" / "raw" / "cycle.ome.tif").read_bytes() == b"precious"

    with pytest.raises(InvalidInput) as bad:
        make_sample(tmp_path, slide_id="bad id", overlap=0.01)
    assert {p.file for p in bad.value.problems} == {"bad id", "--overlap"}

    with pytest.raises(InvalidInput) as bad:
        make_sample(tmp_path, grid=(0, 65), tile_size=32, cycles=21, channels=0, seed=-1)
    assert {p.file for p in bad.value.problems} == {"--rows", "--cols", "--tile-size", "--cycles", "--channels",
                                                    "--seed", "--overlap"}
    assert all(p.fix for p in bad.value.problems)
    refused = runner.invoke(app, ["sample", str(tmp_path / "x"), "--cycles", "0"])
    assert isinstance(refused.exception, InvalidInput) and "--cycles" in str(refused.exception)


# ---- a slide of several cycles x 4 channels, small enough to render whole

SMALL_DESIGN = SampleDesign(seed=5, rows=2, cols=3, tile_size=192, overlap=0.25, cycles=3, channels=4)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = SMALL_DESIGN
    slide, truth_dir = make_sample(tmp_path_factory.mktemp("small"), seed=d.seed, grid=(d.rows, d.cols),
                                   tile_size=d.tile_size, overlap=d.overlap, cycles=d.cycles, channels=d.channels)
    return slide, truth_dir


def test_cycles_and_channels_make_a_valid_panel(small):
    slide, truth_dir = small
    assert validate_slide(slide) == []
    names = markers(3, 4)
    assert names == ["DNA_1", "CD45", "panCK", "CD3", "DNA_2", "aSMA", "CD20", "Ki67",
                     "DNA_3", "CD31", "Vimentin", "ECad"]
    assert [(m.cycle_number, m.marker_name) for m in read_markers(slide / "markers.csv")] == [
        (1 + i // 4, name) for i, name in enumerate(names)]
    for k in range(3):
        meta = read_cycle_metadata(slide / f"raw/cycle-{k + 1:02d}.ome.tif")
        assert (meta.n_tiles, meta.n_channels, meta.tile_shape) == (6, 4, (192, 192))
        assert meta.channel_names == tuple(names[4 * k:4 * k + 4])
    doc = json.loads((truth_dir / "truth.json").read_text())
    shifts = np.hypot(*np.array(doc["cycle_shifts_um"]).T)
    assert shifts[0] == 0 and np.all((shifts[1:] >= 8) & (shifts[1:] <= 16))
    assert list(pd.read_csv(truth_dir / "cell.csv").columns) == ["CellID", *names, "X_centroid", "Y_centroid", "Area"]
    # past the stain list the names repeat, numbered
    long = [m.name for cycle in marker_panel(20, 8) for m in cycle]
    assert len(set(long)) == len(long) == 160 and "CD45_2" in long and long[0] == "DNA_1" and long[8] == "DNA_2"


def test_made_tile_by_tile_equals_the_specimen_rendered_whole(small):
    """Labels and per-cell means written tile by tile (each tile owns a rectangle of the frame) are the
    ones of the whole frame rendered at once: no seams, no cell counted twice or cut at a rectangle edge."""
    _, truth_dir = small
    geom = geometry(SMALL_DESIGN)
    specimen = Specimen(SMALL_DESIGN.seed, [m for cycle in marker_panel(3, 4) for m in cycle])
    whole = Patch(specimen, (0, 0, *geom.frame_shape))
    inner = (slice(2 * REACH_PX + 8, geom.frame_shape[0] - 2 * REACH_PX - 8),
             slice(2 * REACH_PX + 8, geom.frame_shape[1] - 2 * REACH_PX - 8))   # away from the frame's cut edges
    offset = np.array(whole.label_window[:2])
    for name, labels in (("nuclei", whole.nuclei), ("cell", whole.bodies)):
        made = tifffile.imread(truth_dir / f"{name}.tif")
        rendered = labels[-offset[0]:, -offset[1]:][:made.shape[0], :made.shape[1]]
        pairs = np.unique(np.stack([made[inner].ravel(), rendered[inner].ravel()]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1], name    # one-to-one
        assert np.all((pairs[0] == 0) == (pairs[1] == 0))
    # true means of the cells whole inside the inner part
    made = tifffile.imread(truth_dir / "cell.tif")
    edge = np.unique(np.r_[made[:inner[0].start].ravel(), made[inner[0].stop:].ravel(),
                           made[:, :inner[1].start].ravel(), made[:, inner[1].stop:].ravel()])
    ids = np.setdiff1d(np.unique(made), np.r_[0, edge])
    assert len(ids) > 100
    means = pd.read_csv(truth_dir / "cell.csv").set_index("CellID").loc[ids]
    for c, name in enumerate(markers(3, 4)):
        signal = whole.signal(c)[:made.shape[0], :made.shape[1]] + CAMERA_OFFSET
        np.testing.assert_allclose(ndimage.mean(signal, made, ids), means[name], rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(means.Area, np.bincount(made.ravel())[ids])


def test_cell_types_express_their_markers(small):
    _, truth_dir = small
    cells = pd.read_csv(truth_dir / "cell.csv").merge(pd.read_csv(truth_dir / "cell_types.csv"), on="CellID")
    counts = cells.cell_type.value_counts()
    median = cells.groupby("cell_type").median(numeric_only=True)
    panel = {m.name: m for cycle in marker_panel(3, 4) for m in cycle}
    checked = 0
    for name, marker in panel.items():
        positive = [t for t in marker.expression if t in counts and counts[t] >= 10]
        if marker.pattern == "dna" or not positive:
            continue
        negative = median.drop(index=list(marker.expression), errors="ignore")[name]
        assert median.loc[positive, name].min() > 1.5 * negative.max(), name
        checked += 1
    assert checked >= 6


def test_cells_never_collide_across_placement_blocks():
    specimen = Specimen(3, [m for cycle in marker_panel(1, 1) for m in cycle])
    size = 4 * PLACEMENT_BLOCK_PX
    cells = specimen.cells_near((0, 0, size, size))
    y, x, r, packing = cells["y"], cells["x"], cells["radius"], cells["packing"]
    d = np.hypot(y[:, None] - y, x[:, None] - x)
    np.fill_diagonal(d, np.inf)
    assert np.all(d >= np.minimum.outer(packing, packing) * np.add.outer(r, r))
    # every cell's drawing box stays within REACH_PX of its centre
    largest = _SHAPES[:, 0] / PIXEL_SIZE_UM * (1 + 3 * _SHAPES[:, 2]) + _SHAPES[:, 3] / PIXEL_SIZE_UM
    assert np.ceil(largest.max() * 1.15) + 1 <= REACH_PX
    nuclei, bodies, _ = render_labels(cells, (0, 0, size, size))
    assert len(np.unique(nuclei)) > 0.7 * len(y)


def test_rounds_of_sequential_addition_equal_the_one_by_one_loop():
    rng = np.random.default_rng(0)
    n = 300
    pairs = np.unique(np.sort(rng.integers(0, n, (2000, 2)), axis=1), axis=0)
    i, j = pairs[pairs[:, 0] < pairs[:, 1]].T
    accepted = np.zeros(n, bool)
    for k in range(n):
        accepted[k] = not accepted[i[j == k]].any()
    assert np.array_equal(_greedy(i, j, n), accepted)


# VmHWM: the peak resident memory of this process image (ru_maxrss would keep the forking parent's peak)
_PEAK_RSS = """
import re, sys
from pathlib import Path
from atlas.slide.sample import make_sample
make_sample(sys.argv[1], grid=(int(sys.argv[2]), int(sys.argv[2])), tile_size=128, overlap=0.3, cycles=4, channels=4,
            workers=1)
print(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
"""


def test_peak_memory_does_not_grow_with_the_slide(tmp_path):
    """A 12 x 12 slide (1.3 MP x 16 channels: ~80 MB as whole float32 images) peaks at no more
    memory than a 2 x 2 one: the slide is made tile by tile (in one process here; each worker of a
    pool holds one tile's working set the same way)."""
    peak = {}
    for side in (2, 12):
        done = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(tmp_path / str(side)), str(side)],
                              capture_output=True, text=True, check=True)
        peak[side] = int(done.stdout.split()[-1]) * 1024
    frame = tifffile.TiffFile(tmp_path / "12" / "sample.truth" / "nuclei.tif").pages[0].shape
    assert frame[0] * frame[1] * 16 * 4 > 0.3 * peak[2]        # the whole slide would show
    assert peak[12] <= 1.1 * peak[2], peak
