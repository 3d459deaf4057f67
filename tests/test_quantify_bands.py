"""Quantification by row bands == one band, exactly, on the real steinbock IMC ROIs (float32 images,
whose sums depend on the order of additions: the strictest case) and their DeepCell / ilastik masks.
Synthetic masks stand only for what the real ones lack: a cell taller than the margins, and a label
in scattered pieces (which the bands cannot own exactly and the merge must catch)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from atlas.science.bands import (
    BandsDisagree,
    band_masks,
    band_rows,
    merge_bands,
    quantify_band,
    quantify_band_in_parts,
)
from atlas.science.quantification import quantify

STEINBOCK = "quantification/steinbock_imc"
ROIS = ("20210305_NE_mockData1_002", "20210305_NE_mockData2_001", "20210305_NE_mockData3_003")
PANEL = ["Ag107", "Cytokeratin 5", "Laminin", "YBX1", "H3K27Ac"]


def roi(shared_data, name: str):
    d = shared_data / STEINBOCK
    return (tifffile.imread(d / "img" / f"{name}.tiff"),
            {m: tifffile.imread(d / f"masks_{m}" / f"{name}.tiff") for m in ("deepcell", "ilastik")})


def by_bands(image, masks, count: int, margin: int, markers=PANEL) -> dict[str, pd.DataFrame]:
    parts, foreground = {m: [] for m in masks}, dict.fromkeys(masks, 0)
    for band in band_rows(image.shape[-2], count):
        tables, read = quantify_band(image, masks, markers, band, margin=margin)
        for m, table in tables.items():
            parts[m].append(table)
            foreground[m] += read.foreground[m]
    return {m: merge_bands(parts[m], foreground[m]) for m in masks}


def test_band_rows_cover_the_image_in_chunks():
    assert band_rows(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert band_rows(100, 3, chunk=16) == [(0, 32), (32, 64), (64, 100)]
    assert band_rows(20, 4, chunk=16) == [(0, 0), (0, 16), (16, 16), (16, 20)]  # more bands than chunks: some empty
    with pytest.raises(ValueError):
        band_rows(10, 0)


@pytest.mark.parametrize("name", ROIS)
@pytest.mark.parametrize(("count", "margin"), [(2, 256), (5, 8), (13, 2)])
def test_bands_equal_one_band_byte_for_byte(shared_data, name, count, margin):
    image, masks = roi(shared_data, name)
    whole = quantify(image, masks, PANEL)
    banded = by_bands(image, masks, count, margin)
    for m in masks:
        pd.testing.assert_frame_equal(banded[m], whole[m], check_exact=True)
        assert banded[m].to_csv(index=False) == whole[m].to_csv(index=False)


@pytest.mark.parametrize("name", ROIS)
def test_a_band_measured_in_parts_is_the_band_measured_whole(shared_data, name):
    """An item measures its band a few chunk rows at a time (bounded memory): the same rows, byte for
    byte, and the same foreground, whatever the parts' size."""
    image, masks = roi(shared_data, name)
    band = band_rows(image.shape[-2], 2, chunk=16)[1]
    whole, read = quantify_band(image, masks, PANEL, band)
    width = image.shape[-1]
    for rows in (16, 64):  # parts of one and of three chunk rows (beside a strip of one)
        parts, part_read = quantify_band_in_parts(image, masks, PANEL, band, max_pixels=rows * width, chunk=16,
                                                  rows=16)
        assert part_read.foreground == read.foreground and part_read.rows[0] == read.rows[0]
        for m in masks:
            ordered = parts[m].sort_values("CellID", kind="stable", ignore_index=True)
            assert len(parts[m]) == len(whole[m])
            pd.testing.assert_frame_equal(ordered, whole[m].sort_values("CellID", kind="stable",
                                                                        ignore_index=True), check_exact=True)


def test_cells_on_band_edges_are_measured_once_by_the_band_they_begin_in(shared_data):
    image, masks = roi(shared_data, ROIS[0])
    mask = masks["deepcell"]
    bands = band_rows(mask.shape[0], 4)
    first_row = {int(v): int(np.flatnonzero((mask == v).any(axis=1))[0]) for v in np.unique(mask[mask > 0])}
    crossing = 0
    for band in bands:
        read = band_masks({"cell": mask}, band, margin=4)
        owned = set(np.unique(read.masks["cell"]).tolist()) - {0}
        assert owned == {v for v, r in first_row.items() if band[0] <= r < band[1]}
        crossing += sum(1 for v in owned if (mask[band[1]:] == v).any())
        assert read.read[0] == max(band[0] - 4, 0) and read.rows[0] == band[0]
        assert read.rows[1] - band[1] < 40  # the image: the band and the overhang of the cells crossing its end
    assert crossing > 0, "the real mask has cells across band edges"
    assert np.array_equal(mask, roi(shared_data, ROIS[0])[1]["deepcell"]), "the caller's mask is left as it was"


def test_a_cell_taller_than_the_margin_is_read_whole():
    """A 60-row tall cell (a long fibre-like label) starting just above a band edge, margin 4."""
    mask = np.zeros((100, 20), np.uint32)
    mask[30:90, 5:8] = 7
    mask[10:14, 10:14] = 3
    image = np.arange(2000, dtype=np.float32).reshape(1, 100, 20) / 7
    read = band_masks({"m": mask}, (0, 40), margin=4)
    assert read.read == (0, 100) and read.rows == (0, 90) and (read.masks["m"] == 7).sum() == 180
    whole = quantify(image, {"m": mask}, ["a"])["m"]
    pd.testing.assert_frame_equal(by_bands(image, {"m": mask}, 3, margin=4, markers=["a"])["m"], whole,
                                  check_exact=True)


def test_a_label_in_scattered_pieces_is_caught():
    """Label 5 in two pieces 80 rows apart: with margin 4 both bands claim it."""
    mask = np.zeros((100, 20), np.uint32)
    mask[5:9, 2:6] = 5
    mask[85:89, 2:6] = 5
    image = np.ones((1, 100, 20), np.float32)
    with pytest.raises(BandsDisagree, match="two bands"):
        by_bands(image, {"m": mask}, 2, margin=4, markers=["a"])


@pytest.mark.parametrize("name", ROIS[:2])
def test_a_16_bit_image_summed_in_column_blocks_gives_the_same_table(shared_data, name, monkeypatch):
    """Each strip of a 16-bit image summed in column blocks of whole chunks (so that an item of a wide
    slide holds no more than of a narrow one) gives the table of full rows, bit for bit, and means equal
    to ``scipy.ndimage.mean``. The real ROI's counts are scaled to uint16 (they stand for a microscope's
    16-bit image); a float image keeps full rows (its sums depend on the order of additions)."""
    from scipy import ndimage

    from atlas.science import quantification

    image, masks = roi(shared_data, name)
    counts = np.round(image[:len(PANEL)] * 100).clip(0, 65535).astype(np.uint16)
    chunked = zarr.array(counts, chunks=(1, 16, 16))
    monkeypatch.setattr(quantification, "STRIP_PIXELS", 16 * 16)   # blocks of one chunk column
    blocks = quantification.column_blocks(chunked, counts.shape[-1], 16)
    assert len(blocks) >= 4 and blocks[0] == (0, 16) and blocks[-1][1] == counts.shape[-1]
    assert quantification.column_blocks(zarr.array(image, chunks=(1, 16, 16)), image.shape[-1], 16) == [
        (0, image.shape[-1])]
    whole = quantify(chunked, masks, PANEL, rows=16)
    by_blocks = quantify(chunked, masks, PANEL, rows=16, by_columns=True)
    for m, mask in masks.items():
        pd.testing.assert_frame_equal(by_blocks[m], whole[m], check_exact=True)
        labels = by_blocks[m]["CellID"].to_numpy()
        assert np.array_equal(by_blocks[m][PANEL[1]].to_numpy(), ndimage.mean(counts[1], mask, labels))
