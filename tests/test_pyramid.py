"""Level 2/3 writers (atlas.science.pyramid): pyramidal OME-TIFF and OME-Zarr, on real brain tiles."""
from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from atlas.science.pyramid import (
    downsample,
    level_shapes,
    ome_tiff_description,
    write_ome_tiff_pyramid,
    write_ome_zarr,
    write_zarr_labels,
)
from atlas.slide.palette import channel_colors, ome_color
from tests.ome_checks import validate_ome_tiff, validate_ome_zarr

BRAIN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "stitching" / "basicpy_wsi_brain"
PIXEL_UM = 2.5833


@pytest.fixture(scope="module")
def brain_image() -> np.ndarray:
    """(3, 1024, 1536) uint16: a 2 x 3 block of real tissue tiles per channel (no overlap removed;
    pixel content is what matters here), three different blocks as three channels."""
    if not BRAIN.is_dir():
        pytest.skip(f"real data not found at {BRAIN}")
    def block(first):
        t = [tifffile.imread(BRAIN / f"C3-BrainSection{first + i:04d}.tif") for i in range(6)]
        return np.block([t[0:3], t[3:6]])
    return np.stack([block(12), block(20), block(29)])


def test_level_shapes_halve_until_one_tile():
    assert level_shapes((1000, 1000), 1024) == [(1000, 1000)]
    assert level_shapes((4238, 2879), 1024) == [(4238, 2879), (2119, 1440), (1060, 720), (530, 360)]


def test_downsample_mean_replicates_odd_edge_and_labels_take_every_second_pixel():
    plane = np.array([[0, 2, 10], [4, 6, 20], [8, 9, 30]], dtype=np.uint16)
    # 2x2 means (rounded half to even), odd last row/column averaged with itself
    assert downsample(plane).tolist() == [[3, 15], [8, 30]]
    labels = np.array([[1, 1, 7], [2, 2, 7], [5, 5, 9]], dtype=np.uint32)
    out = downsample(labels, labels=True)
    assert out.dtype == np.uint32 and out.tolist() == [[1, 7], [5, 9]]


def test_ome_tiff_is_tiled_compressed_subifd_pyramid_with_names_and_pixel_size(tmp_path, brain_image):
    path = tmp_path / "img.ome.tif"
    names = ["DNA_1", "CD45", "Ki67"]
    write_ome_tiff_pyramid(path, brain_image, channel_names=names, pixel_size_um=PIXEL_UM, tile_size=256)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.is_bigtiff and len(tif.series) == 1
        series = tif.series[0]
        assert series.axes == "CYX" and series.shape == brain_image.shape
        assert [lvl.shape[1:] for lvl in series.levels] == level_shapes(brain_image.shape[1:], 256)
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert len(page.subifds) == 3          # pyramid in SubIFDs, not in extra series
        np.testing.assert_array_equal(series.levels[0].asarray(), brain_image)
        level1 = series.levels[1].asarray()
        for c in range(3):
            np.testing.assert_array_equal(level1[c], downsample(brain_image[c]))
        ome = tif.ome_metadata
    pixels = _ome_pixels(ome)
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(PIXEL_UM)
    assert float(pixels.get("PhysicalSizeY")) == pytest.approx(PIXEL_UM)
    assert pixels.get("PhysicalSizeXUnit") == "µm"
    assert [c.get("Name") for c in pixels if c.tag.endswith("Channel")] == names


def test_ome_tiff_validates_is_named_after_the_slide_with_palette_colours_and_no_dates(tmp_path, brain_image):
    path = tmp_path / "S1.ome.tif"
    names = ["DNA_1", "CD45", "Ki67"]
    write_ome_tiff_pyramid(path, brain_image, channel_names=names, pixel_size_um=PIXEL_UM, tile_size=256)
    ome = validate_ome_tiff(path)             # OME 2016-06 XSD; no DateTime in any IFD, no AcquisitionDate
    (image,) = ome.images
    assert image.name == "S1"                 # QuPath shows "S1.ome.tif - S1", not "- Image0"
    channels = image.pixels.channels
    assert [c.name for c in channels] == names
    colors = channel_colors(names)
    assert colors == ["ffffff", "ff0000", "00ff00"]
    assert [c.color.as_rgb_tuple(alpha=False) for c in channels] == [
        tuple(int(h[i:i + 2], 16) for i in (0, 2, 4)) for h in colors]
    assert ome_color("ffffff") == -1 and ome_color("ff0000") == -16776961 and ome_color("00ff00") == 16711935


def test_ome_zarr_validates_as_ngff_04_with_recommended_fields_and_the_tiffs_colours(tmp_path, brain_image):
    names = ["DNA_1", "CD45", "Ki67"]
    path = tmp_path / "S1.ome.zarr"
    write_ome_zarr(path, brain_image, channel_names=names, pixel_size_um=PIXEL_UM, tile_size=256)
    write_zarr_labels(path, "cell", (brain_image[0] // 1000).astype(np.uint32))
    image, labels = validate_ome_zarr(path)   # ome-zarr-models: NGFF 0.4 image, labels group, label image
    (ms,) = image.attributes.multiscales
    assert (ms.name, ms.type) == ("S1", "mean") and ms.metadata["method"] == "atlas.science.pyramid.downsample"
    omero = image.attributes.omero
    assert omero.name == "S1"
    assert [c.color.lower() for c in omero.channels] == channel_colors(names)
    (label_ms,) = labels["cell"].attributes.multiscales
    assert (label_ms.name, label_ms.type) == ("cell", "nearest")
    assert labels["cell"].attributes.image_label.source.image == "../../"


def _ome_pixels(xml: str):
    import xml.etree.ElementTree as ET
    root = ET.fromstring(xml)
    return next(e for e in root.iter() if e.tag.endswith("Pixels"))


def test_label_image_pyramid_uses_nearest_neighbour(tmp_path, brain_image):
    # Real-data-derived labels: connected regions of bright tissue get ids > 65535 to exercise uint32.
    from skimage.measure import label
    labels = label(brain_image[0] > np.percentile(brain_image[0], 90)).astype(np.uint32)
    labels[labels > 0] += 70000
    path = tmp_path / "cell.ome.tif"
    write_ome_tiff_pyramid(path, labels, channel_names=["cell"], pixel_size_um=PIXEL_UM, tile_size=256,
                           labels=True)
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert levels[0].dtype == np.uint32
        np.testing.assert_array_equal(levels[0].asarray().reshape(labels.shape), labels)
        for k, level in enumerate(levels):
            data = level.asarray().reshape(level.shape[-2:])
            np.testing.assert_array_equal(data, labels[::2 ** k, ::2 ** k])
            assert set(np.unique(data)) <= set(np.unique(labels))   # no averaged ids


def test_ome_zarr_ngff04_multiscales_omero_and_labels(tmp_path, brain_image):
    path = tmp_path / "S1.ome.zarr"
    names = ["DNA_1", "CD45", "Ki67"]
    levels = write_ome_zarr(path, brain_image, channel_names=names, pixel_size_um=PIXEL_UM, tile_size=256)
    attrs = json.loads((path / ".zattrs").read_text())
    (ms,) = attrs["multiscales"]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert ms["axes"][1]["unit"] == "micrometer"
    shapes = level_shapes(brain_image.shape[1:], 256)
    assert len(ms["datasets"]) == len(shapes) == len(levels)
    for k, ds in enumerate(ms["datasets"]):
        (scale,) = ds["coordinateTransformations"]
        assert scale["scale"] == pytest.approx([1.0, PIXEL_UM * 2 ** k, PIXEL_UM * 2 ** k])
        zarray = json.loads((path / ds["path"] / ".zarray").read_text())   # zarr v2 on disk
        assert zarray["zarr_format"] == 2 and zarray["dimension_separator"] == "/"
        assert tuple(zarray["shape"]) == (3, *shapes[k])
    channels = attrs["omero"]["channels"]
    assert [c["label"] for c in channels] == names
    for c, ch in enumerate(channels):
        assert len(ch["color"]) == 6 and int(ch["color"], 16) >= 0
        w = ch["window"]
        assert (w["min"], w["max"]) == (0, 65535)
        assert brain_image[c].min() <= w["start"] < w["end"] <= brain_image[c].max()
    root = zarr.open_group(path, mode="r")
    np.testing.assert_array_equal(root["0"][:], brain_image)
    np.testing.assert_array_equal(root["1"][1], downsample(brain_image[1]))

    cells = (brain_image[0] // 1000).astype(np.uint32)
    write_zarr_labels(path, "cell", cells)
    write_zarr_labels(path, "nuclei", cells[np.newaxis])
    write_zarr_labels(path, "cell", cells + 1)          # replacing keeps one entry
    assert json.loads((path / "labels" / ".zattrs").read_text()) == {"labels": ["nuclei", "cell"]}
    label_attrs = json.loads((path / "labels" / "cell" / ".zattrs").read_text())
    assert label_attrs["image-label"]["source"] == {"image": "../../"}
    assert len(label_attrs["multiscales"][0]["datasets"]) == len(shapes)
    for k in range(len(shapes)):
        np.testing.assert_array_equal(root[f"labels/cell/{k}"][0], (cells + 1)[::2 ** k, ::2 ** k])
    with pytest.raises(ValueError, match="do not match"):
        write_zarr_labels(path, "bad", cells[:-1])


def test_any_array_like_gives_identical_bytes_and_zarr_levels_can_be_reused(tmp_path, brain_image):
    kw = {"channel_names": ["a", "b", "c"], "pixel_size_um": PIXEL_UM, "tile_size": 256}
    mm = np.lib.format.open_memmap(tmp_path / "mm.npy", mode="w+", dtype=brain_image.dtype, shape=brain_image.shape)
    mm[:] = brain_image
    levels = write_ome_zarr(tmp_path / "x.ome.zarr", brain_image, **kw)
    sources = {"numpy": (brain_image, {}), "numpy-again": (brain_image, {}), "memmap": (mm, {}),
               "zarr": (levels[0], {}), "zarr-levels": (levels[0], {"subresolutions": levels[1:]})}
    written = {}
    for name, (image, extra) in sources.items():
        (tmp_path / name).mkdir()
        path = tmp_path / name / "S1.ome.tif"      # same file name: the OME UUID derives from it
        write_ome_tiff_pyramid(path, image, **kw, **extra)
        written[name] = path.read_bytes()
        assert not list(path.parent.glob(".pyramid-*")), "temporary level store left behind"
    assert all(data == written["numpy"] for data in written.values())


def _tifffile_reference(path: Path, image: np.ndarray, names: list[str], tile_size: int) -> None:
    """The same pyramid written by tifffile's own TiffWriter (seeking back into the file), for comparison."""
    levels = [image]
    while max(levels[-1].shape[1:]) > tile_size:
        levels.append(np.stack([downsample(plane) for plane in levels[-1]]))
    per_cm = 1e4 / PIXEL_UM
    metadata = {"axes": "CYX", "UUID": None, "Name": "S1", "Creator": "tissue-atlas",
                "Channel": {"Name": names, "Color": [ome_color(c) for c in channel_colors(names)]},
                "PhysicalSizeX": PIXEL_UM, "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": PIXEL_UM, "PhysicalSizeYUnit": "µm"}
    metadata["UUID"] = re.search(r'UUID="([^"]+)"', ome_tiff_description(path, image.shape, image.dtype,
                                                                          channel_names=names,
                                                                          pixel_size_um=PIXEL_UM)).group(1)
    options = {"tile": (tile_size, tile_size), "photometric": "minisblack", "compression": "adobe_deflate",
               "predictor": True, "resolutionunit": "CENTIMETER", "datetime": False}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, resolution=(per_cm, per_cm), metadata=metadata, **options)
        for k, level in enumerate(levels[1:], start=1):
            tif.write(level, subfiletype=1, resolution=(per_cm / 2 ** k, per_cm / 2 ** k), metadata=None, **options)


def _tile_bytes(tif: tifffile.TiffFile, page) -> list[bytes]:
    """The encoded bytes of every tile of a page, as stored."""
    tiles = []
    for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
        tif.filehandle.seek(offset)
        tiles.append(tif.filehandle.read(count))
    return tiles


def test_streamed_ome_tiff_holds_what_tifffiles_own_writer_writes(tmp_path, brain_image):
    # interchange: the same OME-XML, the same pages and tags, pixel-identical levels, and every tile
    # encoded to the same bytes as tifffile's writer gives (only the file layout differs)
    names = ["DNA_1", "CD45", "Ki67"]
    ours, theirs = tmp_path / "ours" / "S1.ome.tif", tmp_path / "theirs" / "S1.ome.tif"
    ours.parent.mkdir(), theirs.parent.mkdir()
    write_ome_tiff_pyramid(ours, brain_image, channel_names=names, pixel_size_um=PIXEL_UM, tile_size=256)
    _tifffile_reference(theirs, brain_image, names, 256)
    with tifffile.TiffFile(ours) as a, tifffile.TiffFile(theirs) as b:
        assert a.ome_metadata == b.ome_metadata and len(a.pages) == len(b.pages) == 3
        for level_a, level_b in zip(a.series[0].levels, b.series[0].levels, strict=True):
            np.testing.assert_array_equal(level_a.asarray(), level_b.asarray())
            for page_a, page_b in zip(level_a.pages, level_b.pages, strict=True):
                page_a, page_b = page_a.aspage(), page_b.aspage()
                tags = {t.name: t.value for t in page_a.tags.values()}
                assert tags.keys() - {"Software"} == {t.name for t in page_b.tags.values()} - {"Software"}
                for name in ("ImageWidth", "ImageLength", "Compression", "Predictor", "XResolution", "NewSubfileType"):
                    assert tags.get(name) == (page_b.tags[name].value if name in page_b.tags else None), name
                assert _tile_bytes(a, page_a) == _tile_bytes(b, page_b)


class _AppendOnly:
    """A sink that can only append (as an S3 multipart upload), noting the scratch folder's peak size."""

    def __init__(self, scratch: Path):
        self.scratch, self.data, self.peak_scratch = scratch, bytearray(), 0

    def write(self, data) -> int:
        self.data += data
        self.peak_scratch = max(self.peak_scratch, sum(p.stat().st_size for p in self.scratch.rglob("*")
                                                       if p.is_file()))
        return len(data)


@pytest.mark.parametrize("copies", [1, 3])
def test_ome_tiff_streams_front_to_back_with_one_channels_scratch(tmp_path, brain_image, copies):
    # 3 or 9 channels: the file streams to an append-only sink, the same bytes as the local file,
    # and scratch holds one channel's compressed tiles at a time, however many channels there are
    image = np.concatenate([brain_image] * copies)
    names = [f"c{i}" for i in range(image.shape[0])]
    levels = write_ome_zarr(tmp_path / "S1.ome.zarr", image, channel_names=names, pixel_size_um=PIXEL_UM,
                            tile_size=256)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    sink = _AppendOnly(scratch)
    kw = {"channel_names": names, "pixel_size_um": PIXEL_UM, "tile_size": 256, "subresolutions": levels[1:]}
    size = write_ome_tiff_pyramid("registration/S1.ome.tif", levels[0], **kw, sink=sink, scratch=scratch, workers=2)
    write_ome_tiff_pyramid(tmp_path / "S1.ome.tif", levels[0], **kw)
    assert bytes(sink.data) == (tmp_path / "S1.ome.tif").read_bytes() and size == len(sink.data)
    assert list(scratch.iterdir()) == []
    channel_bytes = size / image.shape[0]
    assert 0.5 * channel_bytes < sink.peak_scratch < 1.5 * channel_bytes  # one channel's pyramid, never more
    with tifffile.TiffFile(tmp_path / "S1.ome.tif") as tif:
        for level, stored in zip(levels, tif.series[0].levels, strict=True):
            np.testing.assert_array_equal(stored.asarray(), level[:])


def test_memory_is_bounded_by_tiles_not_the_image(tmp_path, brain_image):
    # A 128 MiB image on disk (memmap of real tiles repeated) written with 512 px tiles: numpy
    # allocations (traced by tracemalloc) stay within a few 512 px tiles, far below the image.
    shape = (2, 8192, 4096)
    mm = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint16, shape=shape)
    for c in range(2):
        mm[c] = np.tile(brain_image[c], (8, 3))[:, :4096]
    mm.flush()
    image = np.load(tmp_path / "big.npy", mmap_mode="r")
    tracemalloc.start()
    try:
        write_ome_tiff_pyramid(tmp_path / "big.ome.tif", image, channel_names=["a", "b"],
                               pixel_size_um=PIXEL_UM, tile_size=512)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    image_bytes, tile_bytes = int(np.prod(shape)) * 2, 512 * 512 * 2
    assert peak < 64 * tile_bytes, f"peak {peak / 2**20:.1f} MiB for a {image_bytes / 2**20:.0f} MiB image"
    with tifffile.TiffFile(tmp_path / "big.ome.tif") as tif:
        np.testing.assert_array_equal(tif.series[0].asarray()[1, ::97, ::89], image[1, ::97, ::89])
