"""Quantification: MCQuant's table, exact against scipy.ndimage.mean, steinbock and regionprops.

Real data: the steinbock IMC ROIs in ``../shared/data/quantification/steinbock_imc`` (float32
images, DeepCell and ilastik cell masks, steinbock's own per-cell intensities and regionprops).
Synthetic masks appear only for cases the real masks lack; each test says what they stand for.
"""
from __future__ import annotations

import functools
import io
import json
import shutil
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage
from skimage.draw import ellipse, line, polygon
from skimage.measure import regionprops_table
from typer.testing import CliRunner

from atlas import layout
from atlas.cli import app
from atlas.errors import InvalidInput
from atlas.params import Params
from atlas.science import quantification
from atlas.science.imageio import TiffRows
from atlas.science.pyramid import write_ome_tiff_pyramid, write_ome_zarr
from atlas.science.quantification import (
    MORPHOLOGY_COLUMNS,
    marker_columns,
    quantify,
    table_columns,
)
from atlas.slide.convention import read_markers
from atlas.stages import StageContext, get_stage
from atlas.stages import quantify as quantify_stage
from atlas.stages.quantify import quantify_files, write_csv
from atlas.storage import FolderStore

STEINBOCK = "quantification/steinbock_imc"
ROIS = ("20210305_NE_mockData1_002", "20210305_NE_mockData2_001", "20210305_NE_mockData3_003")
MASK_SETS = ("deepcell", "ilastik")
PANEL = ["Ag107", "Cytokeratin 5", "Laminin", "YBX1", "H3K27Ac"]  # panel.csv `name`, image channel order
REGIONPROPS = {"centroid-1": "X_centroid", "centroid-0": "Y_centroid", "area": "Area",
               "axis_major_length": "MajorAxisLength", "axis_minor_length": "MinorAxisLength",
               "eccentricity": "Eccentricity", "solidity": "Solidity", "extent": "Extent",
               "orientation": "Orientation"}
PROPERTIES = ("label", "centroid", "area", "axis_major_length", "axis_minor_length", "eccentricity",
              "solidity", "extent", "orientation")


def steinbock(shared_data: Path, roi: str, mask_set: str) -> tuple[np.ndarray, np.ndarray]:
    d = shared_data / STEINBOCK
    return tifffile.imread(d / "img" / f"{roi}.tiff"), tifffile.imread(d / f"masks_{mask_set}" / f"{roi}.tiff")


def assert_matches_regionprops(table: pd.DataFrame, mask: np.ndarray, *, minor_atol: float = 1e-9) -> None:
    ref = regionprops_table(mask, properties=PROPERTIES)
    np.testing.assert_array_equal(table["CellID"], ref["label"])
    for prop, column in REGIONPROPS.items():
        exact = column in ("X_centroid", "Y_centroid", "Area", "Solidity", "Extent")
        atol = minor_atol if column == "MinorAxisLength" else 1e-9
        if exact:  # integer sums over pixels: no rounding to differ in
            np.testing.assert_array_equal(table[column], ref[prop], err_msg=column)
        elif column == "Orientation":  # an axis: +pi/2 and -pi/2 are the same (skimage's rounding picks one)
            turn = np.remainder(table[column].to_numpy() - ref[prop] + np.pi / 2, np.pi) - np.pi / 2
            np.testing.assert_allclose(turn, 0, atol=1e-9, err_msg=column)
        else:
            np.testing.assert_allclose(table[column], ref[prop], rtol=1e-9, atol=atol, err_msg=column)


@pytest.mark.parametrize("mask_set", MASK_SETS)
@pytest.mark.parametrize("roi", ROIS)
@pytest.mark.parametrize("rows", [None, 1, 7])
def test_means_bit_identical_to_ndimage_and_steinbock(shared_data, roi, mask_set, rows):
    image, mask = steinbock(shared_data, roi, mask_set)
    table = quantify(image, {"cell": mask}, PANEL, rows=rows)["cell"]
    ids = np.unique(mask[mask > 0])
    np.testing.assert_array_equal(table["CellID"], ids)
    for c, name in enumerate(PANEL):
        np.testing.assert_array_equal(table[name].to_numpy(), ndimage.mean(image[c], labels=mask, index=ids))
    ref = pd.read_csv(shared_data / STEINBOCK / f"intensities_{mask_set}" / f"{roi}.csv")
    np.testing.assert_array_equal(table["CellID"], ref["Object"])
    np.testing.assert_allclose(table[PANEL].to_numpy(), ref[PANEL].to_numpy(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("mask_set", MASK_SETS)
@pytest.mark.parametrize("roi", ROIS)
def test_morphology_matches_regionprops_and_steinbock(shared_data, roi, mask_set, monkeypatch):
    image, mask = steinbock(shared_data, roi, mask_set)
    # batches of a few runs: cells split over batches the way a whole slide's are
    monkeypatch.setattr(quantification, "morphology_from_runs",
                        functools.partial(quantification.morphology_from_runs, batch_runs=13))
    table = quantify(image, {"cell": mask}, PANEL, rows=5)["cell"]
    assert_matches_regionprops(table, mask)
    ref = pd.read_csv(shared_data / STEINBOCK / f"regionprops_{mask_set}" / f"{roi}.csv")
    for theirs, ours in (("area", "Area"), ("centroid-0", "Y_centroid"), ("centroid-1", "X_centroid"),
                         ("axis_major_length", "MajorAxisLength"), ("axis_minor_length", "MinorAxisLength"),
                         ("eccentricity", "Eccentricity")):
        np.testing.assert_allclose(table[ours], ref[theirs], rtol=1e-9, atol=1e-12, err_msg=ours)


def test_morphology_of_awkward_labels_matches_regionprops():
    """Synthetic: the shapes real segmentations also produce but the ROIs lack -- 1-px lines,
    single pixels, labels in several pieces and with holes, overlapping ellipses and polygons,
    label values far from consecutive, and one label wider than 8192 px (the int64 hull path)."""
    rng = np.random.default_rng(7)
    for trial in range(12):
        h, w = rng.integers(30, 160, 2)
        mask = np.zeros((h, w), np.uint32)
        for k in range(1, 50):
            kind = k % 5
            if kind == 0:
                rr, cc = line(rng.integers(0, h), rng.integers(0, w), rng.integers(0, h), rng.integers(0, w))
            elif kind == 1:
                rr, cc = polygon(rng.integers(0, h, 6), rng.integers(0, w, 6), (h, w))
            elif kind == 2:
                rr, cc = ellipse(rng.integers(0, h), rng.integers(0, w), rng.integers(1, 20), rng.integers(1, 20),
                                 (h, w), rotation=rng.random() * np.pi)
            elif kind == 3:
                rr, cc = rng.integers(0, h, 1), rng.integers(0, w, 1)
            else:  # scattered fragments of one label
                n = rng.integers(2, 30)
                rr, cc = rng.integers(0, h, n), rng.integers(0, w, n)
            mask[rr, cc] = k * 1_000_003 if trial % 2 else k
        mask[rng.random(mask.shape) < 0.05] = 0  # holes
        table = quantify(np.zeros((1, h, w), np.uint16), {"m": mask}, ["x"], rows=int(rng.integers(1, 20)))["m"]
        # skimage's eigenvalue rounding leaves up to ~2e-6 on the minor axis of straight lines (0 exactly)
        assert_matches_regionprops(table, mask, minor_atol=1e-5)
    wide = np.zeros((5, 9000), np.uint16)
    wide[2, 10:8990] = 1
    wide[1:4, 100:140] = 2
    wide[0, 8000:8500:3] = 3
    assert_matches_regionprops(quantify(np.zeros((5, 9000)), {"m": wide}, ["x"])["m"], wide, minor_atol=1e-5)


def test_strip_order_preserved_where_float_rounding_depends_on_it():
    """Synthetic float64 image whose sums depend on the order of additions (values spanning 1e-8
    to 1e8): per-strip partial sums would differ in the last bits; ours must not."""
    rng = np.random.default_rng(3)
    image = (10.0 ** rng.uniform(-8, 8, (1, 64, 64))) * rng.choice([-1, 1], (1, 64, 64))
    mask = np.ones((64, 64), np.int32)
    mask[:, 40:] = 2
    ids = np.array([1, 2])
    reference = ndimage.mean(image[0], labels=mask, index=ids)
    strip_sums = sum(ndimage.sum(image[0, r:r + 8], labels=mask[r:r + 8], index=ids) for r in range(0, 64, 8))
    assert not np.array_equal(strip_sums / [64 * 40, 64 * 24], reference), "the case must be order-sensitive"
    table = quantify(image, {"m": mask}, ["v"], rows=8)["m"]
    np.testing.assert_array_equal(table["v"].to_numpy(), reference)


def test_columns_follow_mcquant():
    assert marker_columns(["DNA", "CD3", "DNA", "CD45", "DNA"]) == ["DNA_1", "CD3", "DNA_2", "CD45", "DNA_3"]
    assert MORPHOLOGY_COLUMNS == ("X_centroid", "Y_centroid", "Area", "MajorAxisLength", "MinorAxisLength",
                                  "Eccentricity", "Solidity", "Extent", "Orientation")
    assert table_columns(["B", "A"]) == ["CellID", "B", "A", *MORPHOLOGY_COLUMNS]


@pytest.mark.parametrize("roi", ROIS)
def test_csv_is_byte_for_byte_what_pandas_writes_for_mcquant(shared_data, roi, tmp_path):
    image, mask = steinbock(shared_data, roi, "deepcell")
    table = quantify(image, {"cell": mask}, ["DNA, 1", 'CK "5"', *PANEL[2:]])["cell"]   # quoting in the header
    table.to_csv(tmp_path / "pandas.csv", index=False)
    write_csv(table, tmp_path / "ours.csv")
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()


def test_csv_float_text_matches_pandas_at_every_magnitude(tmp_path):
    """Synthetic: float64 values over the whole range (1e-320..1e308, both signs), the edges where
    Python's and Arrow's notations change, zeros, NaN, inf, whole numbers; they stand for what a
    float image's means or degenerate shapes can hold."""
    rng = np.random.default_rng(0)
    values = 10.0 ** rng.uniform(-320, 308, 200_000) * rng.choice([1, -1], 200_000)
    edges = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-4, np.nextafter(1e-4, 0), 1e10, np.nextafter(1e10, 0),
             5e-324, np.finfo(np.float64).max, 0.1, 1 / 3, 2.0 ** 53, 2.0 ** 53 + 2, 1e16, 9999999999999998.0]
    values[:len(edges)] = edges
    table = pd.DataFrame({"CellID": np.arange(values.size), "x": values,
                          "whole": np.round(rng.normal(0, 1, values.size) * 10.0 ** rng.integers(0, 18, values.size))})
    table.to_csv(tmp_path / "pandas.csv", index=False)
    write_csv(table, tmp_path / "ours.csv")
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()


@pytest.mark.parametrize("rows", [1, 7, 55])
def test_tables_written_in_row_batches_equal_the_whole_table_written_at_once(shared_data, tmp_path, monkeypatch,
                                                                           rows):
    """CSV and Parquet are converted BATCH_ROWS rows at a time (a merge's memory is one batch of text,
    not the whole table's): batch edges anywhere give the CSV pandas writes and the Parquet table and
    schema of ``to_parquet``, one row group per batch."""
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    image, mask = steinbock(shared_data, ROIS[1], "deepcell")
    table = quantify(image, {"cell": mask}, PANEL)["cell"]   # 55 cells
    monkeypatch.setattr(quantify_stage, "BATCH_ROWS", rows)
    written, arrow_write = [], pa_csv.write_csv
    monkeypatch.setattr(pa_csv, "write_csv",
                        lambda text, *args: written.append(text.num_rows) or arrow_write(text, *args))
    write_csv(table, tmp_path / "ours.csv")
    assert max(written) <= rows and sum(written) == len(table)   # the text of one batch at a time
    table.to_csv(tmp_path / "pandas.csv", index=False)
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()
    quantify_stage.TABLE_WRITERS[".parquet"](table, tmp_path / "ours.parquet", {})
    table.to_parquet(tmp_path / "pandas.parquet", index=False)
    ours = pq.ParquetFile(tmp_path / "ours.parquet")
    assert ours.schema_arrow.equals(pq.read_schema(tmp_path / "pandas.parquet"), check_metadata=True)
    assert ours.metadata.num_row_groups == -(-len(table) // rows)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ours.parquet"), table)
    empty = table.iloc[:0]   # no cells: the header, and a Parquet file of the table's columns and types
    write_csv(empty, tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_text() == empty.to_csv(index=False)
    quantify_stage.TABLE_WRITERS[".parquet"](empty, tmp_path / "empty.parquet", {})
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "empty.parquet"), empty)


def test_empty_mask_gives_header_only_table(tmp_path):
    image = np.ones((2, 20, 30), np.uint16)
    table = quantify(image, {"cell": np.zeros((20, 30), np.uint32)}, ["A", "B"])["cell"]
    assert list(table.columns) == table_columns(["A", "B"]) and len(table) == 0


def write_tiff(path: Path, array: np.ndarray, names: list[str], labels: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_ome_tiff_pyramid(path, array, channel_names=names, pixel_size_um=1.0, tile_size=16, labels=labels)
    return path


def test_bad_inputs_name_the_file(shared_data, tmp_path):
    image, mask = steinbock(shared_data, ROIS[1], "deepcell")
    img = write_tiff(tmp_path / "img.ome.tif", image, PANEL)
    other = write_tiff(tmp_path / "other.ome.tif", steinbock(shared_data, ROIS[0], "deepcell")[1][None], ["cell"],
                       labels=True)
    with pytest.raises(InvalidInput) as err:
        quantify_files(img, {"cell": other}, PANEL[:3], [False] * 3, markers_path=Path("markers.csv"))
    text = str(err.value)
    assert "other.ome.tif" in text and "shape (51, 64)" in text and "markers.csv: lists 3 markers" in text
    floats = write_tiff(tmp_path / "float.ome.tif", mask[None].astype(np.float32), ["cell"])
    with pytest.raises(InvalidInput, match="float.ome.tif.*not integer labels"):
        quantify_files(img, {"cell": floats}, PANEL, [False] * 5)
    negative = write_tiff(tmp_path / "neg.ome.tif", -mask[None].astype(np.int32), ["cell"], labels=True)
    with pytest.raises(InvalidInput, match="neg.ome.tif.*negative labels"):
        quantify_files(img, {"cell": negative}, PANEL, [False] * 5)
    (tmp_path / "junk.tif").write_text("not a tiff")
    with pytest.raises(InvalidInput, match="junk.tif: cannot be read as TIFF"):
        quantify_files(tmp_path / "junk.tif", {"cell": other}, PANEL, [False] * 5)


@pytest.mark.parametrize("layout_kwargs", [
    {"tile": (16, 32)},                                                     # tiles, edge tiles padded
    {"rowsperstrip": 7, "compression": "zlib", "predictor": True},          # strips, compressed
    {"tile": (32, 32), "compression": "lzw", "byteorder": ">"},             # big-endian, LZW
], ids=["tiles", "zlib-strips", "big-endian-lzw"])
def test_tiff_rows_read_exactly_the_rows_tifffile_reads(shared_data, tmp_path, layout_kwargs):
    """TiffRows (the quantify reader) against tifffile.imread on the real float32 ROI in several
    TIFF layouts, rows cut across tiles and strips; also through a file object that returns short
    reads, as ranged reads of a store's object may."""
    image = steinbock(shared_data, ROIS[1], "deepcell")[0]
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, image, photometric="minisblack", metadata={"axes": "CYX"}, **layout_kwargs)

    class ShortReads(io.RawIOBase):
        def __init__(self, data: bytes):
            self.data, self.at = data, 0
        def readable(self): return True
        def seekable(self): return True
        def seek(self, offset, whence=0):
            self.at = offset if whence == 0 else (self.at + offset if whence == 1 else len(self.data) + offset)
            return self.at
        def tell(self): return self.at
        def readinto(self, buffer):
            chunk = self.data[self.at:self.at + min(len(buffer), 1000)]
            buffer[:len(chunk)] = chunk
            self.at += len(chunk)
            return len(chunk)

    for source in (path, ShortReads(path.read_bytes())):
        with tifffile.TiffFile(source) as tif:
            rows = TiffRows(tif, tif.series[0])
            assert rows.shape == image.shape and rows.dtype == image.dtype
            for c, (a, b) in [(0, (0, 51)), (4, (5, 40)), (2, (33, 34)), (1, (49, 200)), (3, (20, 20))]:
                np.testing.assert_array_equal(rows[c, a:b], image[c, a:b])
            with pytest.raises(IndexError, match="row slice"):
                rows[0, ::2]
    with tifffile.TiffFile(path, mode="r+") as tif:   # a segment never written (offset 0) reads as 0
        tag = tif.pages[1].tags["TileOffsets" if "tile" in layout_kwargs else "StripOffsets"]
        tag.overwrite((*tag.value[:2], 0, *tag.value[3:]))
    with tifffile.TiffFile(path) as tif:
        expected = tif.asarray()
        assert (expected[1] == 0).sum() > (image[1] == 0).sum()
        np.testing.assert_array_equal(TiffRows(tif, tif.series[0])[1, :], expected[1])


def test_quantify_files_reads_pyramids_masks_with_a_plane_axis_and_volumetric_tiles(shared_data, tmp_path):
    """The pipeline's own pyramidal OME-TIFFs (sub-IFDs, 16-px tiles, mask as (1, Y, X)) give the
    tables of the arrays themselves; so does an image in one volumetric-tiled page (SGI ImageDepth),
    which TiffRows does not read (zarr does)."""
    image, mask = steinbock(shared_data, ROIS[2], "ilastik")
    expected = quantify(image, {"cell": mask}, PANEL)["cell"]
    img = write_tiff(tmp_path / "img.ome.tif", image, PANEL)
    cell = write_tiff(tmp_path / "cell.ome.tif", mask[None], ["cell"], labels=True)
    volume = tmp_path / "volume.tif"
    tifffile.imwrite(volume, image, tile=(1, 16, 16), volumetric=True)
    with tifffile.TiffFile(img) as tif, tifffile.TiffFile(volume) as vol:
        assert len(tif.series[0].levels) > 1  # a pyramid: level 0 is what is read
        assert TiffRows.is_planar(tif.series[0]) and not TiffRows.is_planar(vol.series[0])
    for source in (img, volume):
        tables, shape = quantify_files(source, {"cell": cell}, PANEL, [False] * 5)
        assert shape == image.shape
        pd.testing.assert_frame_equal(tables["cell"], expected)


def run(ctx: StageContext, bands: int = 3) -> None:
    """The quantify stage as the runner runs it: its items (row bands), then the merge."""
    for job in get_stage("quantify").jobs(bands):
        ctx.for_job(job, scratch=ctx.work.root).run(job)


@pytest.fixture
def stage_run(shared_data, tmp_path):
    """A results folder as the stages before quantify leave it, made of the real ROI: the image as
    registration/, the DeepCell mask as cell.ome.tif and the ilastik one as nuclei.ome.tif (two real
    segmentations of the same image), written with the pipeline's own pyramid writer in 16-px tiles."""
    image, cell = steinbock(shared_data, ROIS[1], "deepcell")
    nuclei = steinbock(shared_data, ROIS[1], "ilastik")[1]
    slide_dir, out = tmp_path / "S1", tmp_path / "out"
    slide_dir.mkdir()
    rows = "\n".join(f"{i + 1},1,{n},{'TRUE' if n == 'Laminin' else ''}" for i, n in enumerate(PANEL))
    (slide_dir / "markers.csv").write_text(f"channel_number,cycle_number,marker_name,remove\n{rows}\n")
    write_ome_zarr(out / layout.registration_zarr("S1"), image, channel_names=PANEL, pixel_size_um=1.0, tile_size=16)
    write_tiff(out / layout.mask_path("S1", "deepcell", "cell"), cell[None], ["cell"], labels=True)
    write_tiff(out / layout.mask_path("S1", "deepcell", "nuclei"), nuclei[None], ["nuclei"], labels=True)
    ctx = StageContext("S1", "S1-run", FolderStore(slide_dir), FolderStore(out), Params())
    return ctx, image, {"cell": cell, "nuclei": nuclei}


def test_stage_writes_exact_tables_in_three_formats(stage_run):
    ctx, image, masks = stage_run
    run(ctx)
    kept = [n for n in PANEL if n != "Laminin"]
    for name, mask in masks.items():
        csv = ctx.work.root / layout.table_path("S1", "deepcell", name)
        table = pd.read_csv(csv, float_precision="round_trip")  # pandas' default parser is off by an ulp
        assert list(table.columns) == table_columns(kept)
        ids = np.unique(mask[mask > 0])
        for name_ in kept:
            np.testing.assert_array_equal(table[name_], ndimage.mean(image[PANEL.index(name_)], mask, ids))
        assert_matches_regionprops(table, mask)
        pd.testing.assert_frame_equal(pd.read_parquet(csv.with_suffix(".parquet")), table)
        adata = anndata.read_h5ad(csv.with_suffix(".h5ad"))   # scimap's layout: tests/test_anndata_scimap.py
        assert list(adata.var_names) == kept and list(adata.obs.columns) == [*MORPHOLOGY_COLUMNS, "CellID", "imageid"]
        np.testing.assert_array_equal(adata.raw.X, table[kept].to_numpy())
        np.testing.assert_array_equal(adata.X, np.log1p(table[kept].to_numpy()))
        np.testing.assert_array_equal(adata.obs["CellID"], table["CellID"])
        assert list(adata.obs_names[:2]) == ["S1_1", "S1_2"] and set(adata.obs["imageid"]) == {"S1"}
        np.testing.assert_array_equal(adata.obsm["spatial"], table[["X_centroid", "Y_centroid"]].to_numpy())
        assert adata.uns["engine"] == "deepcell" and adata.uns["mask"] == name
    summary = json.loads((ctx.work.root / "qc/quantify/summary.json").read_text())
    assert summary["tables"]["S1--deepcell_cell.csv"]["cells"] == len(np.unique(masks["cell"])) - 1
    first = {p.name: p.read_bytes() for p in (ctx.work.root / layout.QUANTIFICATION).iterdir()}
    for bands in (3, 1, 7):
        shutil.rmtree(ctx.work.root / layout.QUANTIFICATION)
        shutil.rmtree(ctx.work.root / layout.WORK)
        run(ctx, bands)
        assert {p.name: p.read_bytes() for p in (ctx.work.root / layout.QUANTIFICATION).iterdir()} == first, \
            f"outputs must be byte-identical on a rerun, by {bands} bands as by 3"


def test_stage_without_segmentation_says_what_to_do(stage_run):
    ctx, _, _ = stage_run
    shutil.rmtree(ctx.work.root / layout.SEGMENTATION)
    with pytest.raises(InvalidInput, match="no segmentation of slide S1 -- fix: run the segment stage first"):
        run(ctx)


def test_cli_reads_mcquant_marker_files_and_names_tables_like_mcquant(shared_data, tmp_path):
    image, mask = steinbock(shared_data, ROIS[2], "ilastik")
    img = write_tiff(tmp_path / "roi3.ome.tif", image, PANEL)
    cell = write_tiff(tmp_path / "cell.ome.tif", mask[None], ["cell"], labels=True)
    empty = write_tiff(tmp_path / "nuclei.ome.tif", np.zeros_like(mask)[None], ["nuclei"], labels=True)
    names = ["DNA", "CK5", "DNA", "YBX1", "H3K27Ac"]  # repeated names, headerless: MCQuant's old format
    (tmp_path / "names.csv").write_text("\n".join(names) + "\n")
    result = CliRunner().invoke(app, ["quantify", "--image", str(img), "--mask", str(cell), "--mask", str(empty),
                                      "--markers", str(tmp_path / "names.csv"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "roi3_cell.csv", float_precision="round_trip")
    assert list(table.columns) == table_columns(names)
    assert table.columns[1:6].tolist() == ["DNA_1", "CK5", "DNA_2", "YBX1", "H3K27Ac"]
    np.testing.assert_array_equal(table["DNA_2"], ndimage.mean(image[2], mask, np.unique(mask[mask > 0])))
    header_only = (tmp_path / "out" / "roi3_nuclei.csv").read_text()
    assert header_only == ",".join(table_columns(names)) + "\n"
    assert len(pd.read_parquet(tmp_path / "out" / "roi3_nuclei.parquet")) == 0
    assert anndata.read_h5ad(tmp_path / "out" / "roi3_nuclei.h5ad").shape == (0, 3)   # scimap leaves DNA out of X
    result = CliRunner().invoke(app, ["quantify", "--image", str(img), "--mask", str(cell), "--engine", "ilastik",
                                      "--markers", str(tmp_path / "names.csv"), "-o", str(tmp_path / "out2")])
    assert result.exit_code == 0 and (tmp_path / "out2" / "roi3--ilastik_cell.csv").is_file(), result.output
    (tmp_path / "three.csv").write_text("marker_name\nA\nB\nC\n")
    result = CliRunner().invoke(app, ["quantify", "--image", str(img), "--mask", str(cell),
                                      "--markers", str(tmp_path / "three.csv"), "-o", str(tmp_path / "out3")])
    assert result.exit_code != 0 and isinstance(result.exception, InvalidInput)
    assert "lists 3 markers but roi3.ome.tif has 5 channels" in str(result.exception)


def test_tables_of_a_pipeline_run_match_the_references(sample_slide, request):
    """End to end: the tables ``atlas run`` made of the sample slide are exact too."""
    pytest.importorskip("atlas.stages.segment", reason="the segment stage has not landed yet")
    sample_run = request.getfixturevalue("sample_run")
    slide = sample_slide.name
    channels = [i for i, m in enumerate(read_markers(sample_slide / "markers.csv")) if not m.remove]
    image = tifffile.imread(sample_run / layout.registration_tiff(slide), level=0)
    image = image[None] if image.ndim == 2 else image
    tables = sorted((sample_run / layout.QUANTIFICATION).glob(f"{slide}--*_*.csv"))
    assert tables, "the run made no quantification tables"
    for csv in tables:
        engine, mask_name = csv.stem.split("--", 1)[1].rsplit("_", 1)
        mask = tifffile.imread(sample_run / layout.mask_path(slide, engine, mask_name), level=0)
        table = pd.read_csv(csv, float_precision="round_trip")
        ids = np.unique(mask[mask > 0])
        markers = [c for c in table.columns if c != "CellID" and c not in MORPHOLOGY_COLUMNS]
        for c, name in zip(channels, markers, strict=True):
            np.testing.assert_array_equal(table[name], ndimage.mean(image[c], mask, ids))
        assert_matches_regionprops(table, mask)
