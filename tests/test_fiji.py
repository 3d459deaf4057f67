"""``atlas import fiji``: real tiles of ../shared/data/stitching/basicpy_wsi_brain/ into the slide convention.

The malformed-input cases use tiny TIFFs written to tmp_path: the real data is a well-formed tile set,
so broken configurations, missing or odd tiles can only be shown with made files.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from atlas.cli import app
from atlas.errors import InvalidInput
from atlas.slide.convention import read_markers
from atlas.slide.fiji import import_fiji, parse_tile_configuration, read_tile_configuration
from atlas.slide.ome import read_cycle_metadata, read_tile
from atlas.slide.validate import validate_slide

BRAIN_PIXEL_SIZE_UM = 1 / 0.3871          # XResolution 0.3871 px/µm (see the data's README)


@pytest.fixture(scope="module")
def brain(shared_data):
    return shared_data / "stitching" / "basicpy_wsi_brain"


def _problems(excinfo) -> str:
    return "\n".join(str(p) for p in excinfo.value.problems)


def test_imports_the_54_listed_brain_tiles(brain, tmp_path):
    config = brain / "TileConfiguration.txt"
    slide = import_fiji(config, tmp_path / "brain")
    assert validate_slide(slide) == []
    assert [(m.cycle_number, m.marker_name) for m in read_markers(slide / "markers.csv")] == [(1, "DNA_1")]
    cycle = slide / "raw" / "cycle-01.ome.tif"
    meta = read_cycle_metadata(cycle)
    assert (meta.n_tiles, meta.tile_shape, meta.n_channels, meta.dtype) == (54, (512, 512), 1, "uint16")
    assert meta.pixel_size_um == pytest.approx(BRAIN_PIXEL_SIZE_UM, rel=1e-9)
    entries = read_tile_configuration(config)
    assert len(entries) == 54 and entries[0].name == "C3-BrainSection0009.tif"
    expected_um = np.array([(e.y, e.x) for e in entries]) * BRAIN_PIXEL_SIZE_UM
    np.testing.assert_allclose(meta.positions_um, expected_um, atol=1e-6)
    assert meta.positions_um[:, 0].max() == pytest.approx(2300 * BRAIN_PIXEL_SIZE_UM)   # 6 rows of 460 px steps
    for i, entry in enumerate(entries):
        np.testing.assert_array_equal(read_tile(cycle, i)[0], tifffile.imread(brain / entry.name))
    # importing the same tiles again gives the same bytes (so the same manifest and run id)
    again = import_fiji(config, tmp_path / "again" / "brain")
    assert hashlib.sha256(cycle.read_bytes()).digest() == hashlib.sha256(
        (again / "raw" / "cycle-01.ome.tif").read_bytes()).digest()


def test_cli_imports_registered_positions_with_given_marker_and_pixel_size(brain, tmp_path):
    result = CliRunner().invoke(app, ["import", "fiji", str(brain / "TileConfiguration.registered.txt"),
                                      "-o", str(tmp_path / "brain_reg"), "--marker", "C3", "--pixel-size", "2.5"])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "brain_reg") in result.output
    meta = read_cycle_metadata(tmp_path / "brain_reg" / "raw" / "cycle-01.ome.tif")
    assert meta.channel_names == ("C3",) and meta.pixel_size_um == 2.5
    entries = read_tile_configuration(brain / "TileConfiguration.registered.txt")
    np.testing.assert_allclose(meta.positions_um, np.array([(e.y, e.x) for e in entries]) * 2.5, atol=1e-6)
    outlier = [i for i, e in enumerate(entries) if e.name == "C3-BrainSection0001.tif"][0]
    assert meta.positions_um[outlier, 1] / 2.5 == pytest.approx(3680 - 222.0, abs=0.5)   # kept as Fiji wrote it


def test_malformed_lines_are_all_reported_with_their_line():
    text = "\n".join([
        "# a comment",
        "a.tif; ; (0, 0)",            # 2: before the header
        "dim = 2",
        "b.tif; (1, 2)",               # 4: two fields
        "c.tif; ; (1; 2)",             # 5: not (x, y)  (a ';' inside makes 4 fields)
        "d.tif; ; (1, two)",           # 6: not a number
        "e.tif; ; (1, 2, 3)",          # 7: three coordinates
        "; ; (1, 2)",                  # 8: no file
        "f.tif; ; (5, 6)",
        "f.tif; ; (7, 8)",             # 10: duplicate
    ])
    with pytest.raises(InvalidInput) as excinfo:
        parse_tile_configuration(text, "Tiles.txt")
    problems = excinfo.value.problems
    assert all(p.file == "Tiles.txt" and p.fix for p in problems)
    lines = sorted(int(p.message.split(":")[0].removeprefix("line ")) for p in problems)
    assert lines == [2, 4, 5, 6, 7, 8, 10]
    with pytest.raises(InvalidInput, match="only 2-D"):
        parse_tile_configuration("dim = 3\na.tif; ; (0, 0, 0)\n")
    with pytest.raises(InvalidInput, match="lists no tiles"):
        parse_tile_configuration("# nothing\ndim = 2\n")
    entries = parse_tile_configuration("\ufeffdim=2\r\n\r\n x y.tif ;  ; ( -1.5 , 2e3 ) \r\n")
    assert [(e.name, e.series, e.x, e.y, e.line) for e in entries] == [("x y.tif", 0, -1.5, 2000.0, 3)]


def _tile(path, shape=(64, 64), dtype=np.uint16, **kwargs):
    data = (np.arange(np.prod(shape)) % 4000).astype(dtype).reshape(shape)
    tifffile.imwrite(path, data, **kwargs)
    return data


def _config(folder, names, name="TileConfiguration.txt"):
    path = folder / name
    path.write_text("dim = 2\n" + "".join(f"{n}; ; ({40 * i}, 0)\n" for i, n in enumerate(names)))
    return path


def test_missing_and_mismatched_tiles_are_named_and_nothing_is_written(tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    micron = {"resolution": (2.0, 2.0), "imagej": True, "metadata": {"unit": "um"}}
    _tile(tiles / "t1.tif", **micron)
    _tile(tiles / "t2.tif", shape=(64, 32), **micron)
    _tile(tiles / "t3.tif", **micron)
    config = _config(tiles, ["t1.tif", "t2.tif", "t3.tif", "gone.tif", "lost.tif"])
    with pytest.raises(InvalidInput) as excinfo:
        import_fiji(config, tmp_path / "out" / "slide")
    text = _problems(excinfo)
    assert "line 5: tile 'gone.tif' does not exist" in text and "line 6: tile 'lost.tif' does not exist" in text
    assert "t2.tif (line 3)" in text and "(1, 64, 32)" in text and "t1.tif (line 2)" not in text
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_pixel_size_comes_from_calibration_or_option(tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for name in ("a.tif", "b.tif"):
        _tile(tiles / name)                                 # no resolution tags
    config = _config(tiles, ["a.tif", "b.tif"])
    with pytest.raises(InvalidInput, match="--pixel-size"):
        import_fiji(config, tmp_path / "s1")
    meta = read_cycle_metadata(import_fiji(config, tmp_path / "s2", pixel_size_um=0.325) / "raw" / "cycle-01.ome.tif")
    assert meta.pixel_size_um == 0.325
    np.testing.assert_allclose(meta.positions_um, [[0, 0], [0, 40 * 0.325]])

    for name in ("a.tif", "b.tif"):                         # a scanner's default 72 dpi is not a calibration
        _tile(tiles / name, resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(InvalidInput, match="not a microscope calibration"):
        import_fiji(config, tmp_path / "s3")
    for name in ("a.tif", "b.tif"):                         # 20,000 px/cm = 0.5 µm
        _tile(tiles / name, resolution=(20000, 20000), resolutionunit="CENTIMETER")
    meta = read_cycle_metadata(import_fiji(config, tmp_path / "s4") / "raw" / "cycle-01.ome.tif")
    assert meta.pixel_size_um == pytest.approx(0.5)
    _tile(tiles / "b.tif", resolution=(10000, 10000), resolutionunit="CENTIMETER")
    with pytest.raises(InvalidInput, match="disagree on pixel size"):
        import_fiji(config, tmp_path / "s5")
    assert read_cycle_metadata(import_fiji(config, tmp_path / "s6", pixel_size_um=0.4) / "raw" / "cycle-01.ome.tif"
                               ).pixel_size_um == 0.4


def test_multichannel_tiles_need_one_marker_per_channel(tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    data = [_tile(tiles / f"{i}.tif", shape=(2, 32, 48), imagej=True, metadata={"axes": "CYX", "unit": "um"},
                  resolution=(1.5, 1.5)) for i in range(2)]
    config = _config(tiles, ["0.tif", "1.tif"])
    with pytest.raises(InvalidInput, match="2 channel"):
        import_fiji(config, tmp_path / "s1")
    with pytest.raises(InvalidInput, match="duplicate"):
        import_fiji(config, tmp_path / "s2", markers=["DNA_1", "DNA_1"])
    with pytest.raises(InvalidInput, match="comma"):
        import_fiji(config, tmp_path / "s2", markers=["DNA_1", "CD45,RO"])
    slide = import_fiji(config, tmp_path / "s3", markers=["DNA_1", "CD45"])
    assert [m.marker_name for m in read_markers(slide / "markers.csv")] == ["DNA_1", "CD45"]
    np.testing.assert_array_equal(read_tile(slide / "raw" / "cycle-01.ome.tif", 1), data[1])
    assert validate_slide(slide) == []


def test_unsupported_tiles_and_occupied_output_are_refused(tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    _tile(tiles / "f.tif", dtype=np.float32)
    _tile(tiles / "z.tif", shape=(3, 16, 16), photometric="minisblack", metadata={"axes": "ZYX"})
    (tiles / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(InvalidInput) as excinfo:
        import_fiji(_config(tiles, ["f.tif"]), tmp_path / "a", pixel_size_um=1.0)
    assert "float32" in _problems(excinfo)
    with pytest.raises(InvalidInput) as excinfo:
        import_fiji(_config(tiles, ["z.tif", "junk.tif"]), tmp_path / "b", pixel_size_um=1.0)
    assert "line 2: tile 'z.tif' has axes ZYX" in _problems(excinfo)
    assert "line 3: tile 'junk.tif' is not a readable TIFF" in _problems(excinfo)

    _tile(tiles / "ok.tif")
    occupied = tmp_path / "lab_slide"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("precious")
    with pytest.raises(InvalidInput, match="already exists"):
        import_fiji(_config(tiles, ["ok.tif"]), occupied, pixel_size_um=1.0)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    with pytest.raises(InvalidInput, match="slide id"):
        import_fiji(_config(tiles, ["ok.tif"]), tmp_path / "bad name", pixel_size_um=1.0)


def test_multiseries_configuration_picks_the_series(tmp_path):
    stack = (np.arange(3 * 16 * 16) % 251).astype(np.uint8).reshape(3, 16, 16)
    with tifffile.TiffWriter(tmp_path / "scan.ome.tif", ome=True) as tif:
        for plane in stack:
            tif.write(plane, metadata={"axes": "YX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65})
    config = tmp_path / "TileConfiguration.txt"
    config.write_text("dim = 2\nmultiseries = true\nscan.ome.tif; 2; (0, 0)\nscan.ome.tif; 0; (12, 3)\n")
    slide = import_fiji(config, tmp_path / "scan")
    cycle = slide / "raw" / "cycle-01.ome.tif"
    np.testing.assert_array_equal(read_tile(cycle, 0)[0], stack[2])
    np.testing.assert_array_equal(read_tile(cycle, 1)[0], stack[0])
    meta = read_cycle_metadata(cycle)
    assert meta.pixel_size_um == 0.65 and meta.dtype == "uint8"
    np.testing.assert_allclose(meta.positions_um, [[0, 0], [3 * 0.65, 12 * 0.65]])
