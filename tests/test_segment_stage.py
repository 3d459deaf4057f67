"""The segment stage (array items + merge) and ``atlas segment`` on files made from the DSB2018 image.

The "registered image" here is the real DSB2018 picture as the DNA channel of a two-channel
pyramidal OME-TIFF + OME-Zarr (the second channel is the image inverted, a stand-in marker), so
the stage's file handling is tested against ground truth without running the stitch stage.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image
from typer.testing import CliRunner

from atlas import layout
from atlas.cli import app
from atlas.errors import InvalidInput
from atlas.params import Params, SegmentParams
from atlas.science.pyramid import write_ome_tiff_pyramid, write_ome_zarr
from atlas.science.segmentation import make_engine
from atlas.science.segmentation.metrics import match_instances
from atlas.science.segmentation.tiling import segment_image
from atlas.stages import Job, StageContext, get_stage
from atlas.stages import segment as stage
from atlas.storage import FolderStore
from tests.test_segment import F1_FLOOR

SLIDE = "S1"
PIXEL_SIZE_UM = 0.65
CHANNELS = ["DNA_1", "CD3"]


@pytest.fixture(scope="module")
def registered(dsb, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    image = np.stack([dsb[0], dsb[0].max() - dsb[0]])
    tif = out / layout.registration_tiff(SLIDE)
    tif.parent.mkdir(parents=True)
    write_ome_tiff_pyramid(tif, image, channel_names=CHANNELS, pixel_size_um=PIXEL_SIZE_UM, tile_size=256)
    write_ome_zarr(out / layout.registration_zarr(SLIDE), image, channel_names=CHANNELS,
                   pixel_size_um=PIXEL_SIZE_UM, tile_size=256)
    return out


SEGMENT = get_stage("segment")


def run_job(out: Path, job: Job, scratch: Path, **segment) -> None:
    """Run one job of the segment stage on the results folder ``out`` (the classical engine)."""
    ctx = StageContext(SLIDE, "run1", FolderStore(out), FolderStore(out), Params(segment=SegmentParams(**segment)))
    ctx.for_job(job, scratch=scratch).run(job)


def test_stage_items_and_merge_write_level3_masks(registered, dsb, tmp_path):
    params = {"channel": "DNA_1", "tile_size": 128, "overlap": 48, "expand_um": 2.0}
    *items, merge = SEGMENT.jobs()
    written = []
    for job in items:
        before = set((registered / SEGMENT.item_dir).glob("tile-*.tif"))
        run_job(registered, job, tmp_path, **params)
        written.append(len(set((registered / SEGMENT.item_dir).glob("tile-*.tif")) - before))
    assert written == [4, 4, 4, 4]        # 16 tiles, shared evenly
    run_job(registered, merge, tmp_path, **params)

    nuclei = tifffile.imread(registered / layout.mask_path(SLIDE, "classical", "nuclei"))
    cells = tifffile.imread(registered / layout.mask_path(SLIDE, "classical", "cell"))
    assert nuclei.dtype == cells.dtype == np.uint32 and nuclei.shape == dsb[0].shape
    # the stage's tiles give exactly what one in-memory pass gives
    assert np.array_equal(nuclei, segment_image(dsb[0], make_engine("classical"), pixel_size_um=PIXEL_SIZE_UM,
                                                tile_size=128, overlap=48))
    assert match_instances(dsb[1], nuclei).f1 >= F1_FLOOR["classical"]
    assert np.array_equal(cells[nuclei > 0], nuclei[nuclei > 0]) and cells.max() == nuclei.max()
    assert (cells > 0).sum() > (nuclei > 0).sum()
    with tifffile.TiffFile(registered / layout.mask_path(SLIDE, "classical", "nuclei")) as tif:
        assert tif.is_ome and tif.series[0].pages[0].is_tiled

    root = zarr.open_group(registered / layout.registration_zarr(SLIDE), mode="r")
    assert list(root["labels"].attrs["labels"]) == ["nuclei", "cell"]
    assert np.array_equal(root["labels/cell/0"][0], cells)

    summary = json.loads((registered / stage.QC_DIR / "summary.json").read_text())
    assert summary["nuclei"] == nuclei.max() and summary["channel"] == "DNA_1" and summary["engine"] == "classical"
    for png in ("overlay.png", "overlay-detail.png"):
        assert Image.open(registered / stage.QC_DIR / png).mode == "RGB"


def test_merge_refuses_missing_tiles(registered, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "registration").symlink_to(registered / "registration")
    *items, merge = SEGMENT.jobs()
    run_job(out, items[0], tmp_path, channel="DNA_1", tile_size=200)
    with pytest.raises(InvalidInput, match="7 of 9 tiles are missing \\(e.g. tile 0\\)"):
        run_job(out, merge, tmp_path, channel="DNA_1", tile_size=200)


def test_stage_names_the_channels_when_the_marker_is_unknown(registered, tmp_path):
    with pytest.raises(InvalidInput, match="no channel named 'DAPI'; channels are 0=DNA_1, 1=CD3"):
        run_job(registered, SEGMENT.jobs()[0], tmp_path, channel="DAPI")


def test_cli_segments_a_plain_tiff_and_writes_cells(shared_data, dsb, tmp_path):
    image = shared_data / "segmentation" / "stardist_dsb2018" / "img2d.tif"
    weights = shared_data / "models" / "unet2d_nuclei_broad" / "weights.onnx"
    result = CliRunner().invoke(app, ["segment", str(image), "-o", str(tmp_path / "nuclei.ome.tif"),
                                      "--engine", "unet", "--weights", str(weights),
                                      "--cell-out", str(tmp_path / "cell.ome.tif")])
    assert result.exit_code == 0, result.output
    nuclei = tifffile.imread(tmp_path / "nuclei.ome.tif")
    cells = tifffile.imread(tmp_path / "cell.ome.tif")
    assert nuclei.dtype == np.uint32 and match_instances(dsb[1], nuclei).f1 >= F1_FLOOR["unet"]
    assert np.array_equal(cells[nuclei > 0], nuclei[nuclei > 0])
    assert "no pixel size" in result.output


def test_cli_picks_a_channel_of_an_ome_tiff_by_name(registered, dsb, tmp_path):
    image = registered / layout.registration_tiff(SLIDE)
    result = CliRunner().invoke(app, ["segment", str(image), "-o", str(tmp_path / "n.ome.tif"),
                                      "--engine", "classical", "--channel", "DNA_1"])
    assert result.exit_code == 0, result.output
    assert match_instances(dsb[1], tifffile.imread(tmp_path / "n.ome.tif")).f1 >= F1_FLOOR["classical"]
    with tifffile.TiffFile(tmp_path / "n.ome.tif") as tif:
        assert tif.ome_metadata and 'PhysicalSizeX="0.65"' in tif.ome_metadata


@pytest.mark.parametrize("make, message", [
    (lambda path: tifffile.imwrite(path, np.zeros((3, 64, 64), np.uint16), photometric="minisblack",
                                    metadata={"axes": "ZYX"}),
     "is not a 2-D image: axes ZYX"),
    (lambda path: tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric="rgb"),
     "is not a 2-D image: axes YXS"),
    (lambda path: path.write_bytes(b"not a tiff"), "cannot be read as TIFF"),
])
def test_cli_explains_bad_images(tmp_path, make, message):
    path = tmp_path / "bad.tif"
    make(path)
    with pytest.raises(InvalidInput, match=message):
        CliRunner().invoke(app, ["segment", str(path), "-o", str(tmp_path / "n.tif"), "--engine", "classical"],
                           catch_exceptions=False)


def test_cli_lists_channels_for_an_unknown_marker(registered, tmp_path):
    image = registered / layout.registration_tiff(SLIDE)
    with pytest.raises(InvalidInput, match="channels are 0=DNA_1, 1=CD3"):
        CliRunner().invoke(app, ["segment", str(image), "-o", str(tmp_path / "n.tif"), "--channel", "DAPI"],
                           catch_exceptions=False)
