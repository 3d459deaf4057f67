"""The made sample slide: a valid slide, reproducible to the byte, and its truth agrees with its pixels.

Synthetic on purpose: this is the product's own demo/CI slide, and only a made slide has exact truth
(true positions, labels and per-cell means) to check stitching, segmentation and quantification against.
"""
from __future__ import annotations

import json
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
from atlas.slide.convention import MANIFEST, parse_manifest, read_markers
from atlas.slide.ome import read_cycle_metadata, read_tile
from atlas.slide.sample import CAMERA_OFFSET, PIXEL_SIZE_UM, make_sample, markers, simulate
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
    listed = {e.path for e in parse_manifest((slide / MANIFEST).read_text())}
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
    shift = np.array(truth["doc"]["cycle2_shift_um"])
    assert 8 <= np.hypot(*shift) <= 16 and not np.allclose(shift, np.round(shift))


def test_same_seed_gives_identical_bytes(sample_dirs, tmp_path):
    slide, truth_dir = make_sample(tmp_path)
    for made, reference in ((slide, sample_dirs[0]), (truth_dir, sample_dirs[1])):
        new, old = _files(made), _files(reference)
        assert new.keys() == old.keys()
        assert [name for name in new if new[name] != old[name]] == []


def test_other_seed_gives_other_tissue():
    a, b = simulate(seed=1, **SMALL), simulate(seed=2, **SMALL)
    assert a.nuclei.max() > 5 and not np.array_equal(a.tiles[0], b.tiles[0])
    assert not np.allclose(a.cycle_shift_um, b.cycle_shift_um)


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
        found, _, _ = phase_cross_correlation(dna1, dna2, upsample_factor=20)
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


def test_tiles_show_vignetting_and_noise(sample_dirs, truth):
    slide, _ = sample_dirs
    flat = truth["flat"]
    assert flat.max() == pytest.approx(1, abs=1e-3) and 0.6 < flat.min() < 0.75
    stack = np.stack([read_tile(_cycle_path(slide, truth, 1), t)[0] for t in range(9)]).astype(float)
    median = np.median(stack, axis=0)        # tissue averages out across tiles, the illumination does not
    corner, centre = np.median(median[:64, :64]), np.median(median[224:288, 224:288])
    assert corner < 0.9 * centre
    # away from nuclei the DNA channel is smooth background: neighbour differences are pure noise, whose
    # variance is shot noise (= signal above the camera offset, gain 1) plus read noise
    position = np.round(_mosaic_position(truth, 1, 4)).astype(int)
    nuclei = truth["nuclei"][position[0]:position[0] + 512, position[1]:position[1] + 512]
    far = ~ndimage.binary_dilation(nuclei > 0, iterations=6)
    far = far[:, 1:] & far[:, :-1]
    tile = stack[4]
    noise_variance = np.var((tile[:, 1:] - tile[:, :-1])[far]) / 2
    expected = np.mean(tile[:, 1:][far]) - CAMERA_OFFSET + truth["doc"]["camera"]["read_noise_adu"] ** 2
    assert far.sum() > 10_000 and noise_variance == pytest.approx(expected, rel=0.2)


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
