"""Import a tile set described by a Fiji Grid/Collection ``TileConfiguration.txt`` as a slide.

The format (Fiji's Stitching plugin, "Positions from file")::

    # comments and blank lines are ignored
    dim = 2
    [multiseries = true]          optional: the middle field is then a series index in the file
    tile_0001.tif; ; (0.0, 0.0)   <file relative to the configuration's folder>; <series>; (x, y)
    tile_0002.tif; ; (460.0, 0.0)

``(x, y)`` is the tile's top-left corner in global pixels, x = column, y = row (image orientation).
The slide gets one cycle file with one OME series per listed tile, in listed order, at the stage
position ``(y, x) * pixel size`` (µm), and a markers.csv with one marker per channel.
"""
from __future__ import annotations

import hashlib
import math
import re
import shutil
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from atlas.errors import InvalidInput, Problem
from atlas.slide.convention import MARKERS, RAW, RAW_DTYPES, check_slide_id, parse_markers, write_manifest
from atlas.slide.ome import _UM_PER_UNIT as OME_UM_PER_UNIT
from atlas.slide.ome import write_cycle

CYCLE_FILE = f"{RAW}/cycle-01.ome.tif"
PIXEL_SIZE_RANGE_UM = (0.01, 50.0)           # outside: a default DPI, not a microscope calibration
_UM_PER_UNIT = {**OME_UM_PER_UNIT, "microns": 1.0}      # OME units and ImageJ's "micron"/"microns"
_UM_PER_RESOLUTION_UNIT = {2: 25400.0, 3: 10000.0}   # TIFF ResolutionUnit INCH, CENTIMETER
_KEY_VALUE = re.compile(r"^(dim|multiseries)\s*=\s*(.*)$", re.IGNORECASE)
_FIX_LINE = "write tile lines as `<file>; ; (x, y)` after a `dim = 2` line, as Fiji's Grid/Collection stitching does"


@dataclass(frozen=True)
class TileEntry:
    """One tile line of a tile configuration.

    Attributes
    ----------
    name : str
        File name as written, relative to the configuration's folder.
    series : int
        Series (image) index inside the file; 0 unless the configuration says ``multiseries = true``.
    x, y : float
        Top-left corner in global pixels (x = column, y = row).
    line : int
        1-based line number in the configuration.
    """

    name: str
    series: int
    x: float
    y: float
    line: int


@dataclass(frozen=True)
class TileLayout:
    """What the tile files hold, checked to be the same for all of them.

    Attributes
    ----------
    shape : (C, Y, X) tuple of int
    dtype : str
    pixel_size_um : float
        µm; from the files' calibration (OME PhysicalSizeX or TIFF resolution tags) unless given.
    """

    shape: tuple[int, int, int]
    dtype: str
    pixel_size_um: float


def _tile_line(line: str, number: int, multiseries: bool, file: str) -> TileEntry | Problem:
    """One ``file; series; (x, y)`` line of a tile configuration, or what is wrong with it."""
    fields = line.split(";")
    if len(fields) != 3:
        return Problem(file, f"line {number}: expected 3 ';'-separated fields (file; series; (x, y)), "
                       f"found {len(fields)}: {line!r}", _FIX_LINE)
    name, series_text, point = (f.strip() for f in fields)
    coordinates = point[1:-1].split(",") if point.startswith("(") and point.endswith(")") else []
    try:
        x, y = (float(c) for c in coordinates)
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError
    except ValueError:
        return Problem(file, f"line {number}: position {point!r} is not `(x, y)` with two finite numbers", _FIX_LINE)
    if not name:
        return Problem(file, f"line {number}: no file name: {line!r}", _FIX_LINE)
    if not multiseries:
        return TileEntry(name, 0, x, y, number)
    if not series_text.isdigit():
        return Problem(file, f"line {number}: `multiseries = true` needs a series number, got {series_text!r}",
                       "give the 0-based series index of the tile in its file")
    return TileEntry(name, int(series_text), x, y, number)


def _header_problem(key: str, value: str, number: int, file: str) -> Problem | None:
    if key == "dim" and value != "2":
        return Problem(file, f"line {number}: `dim = {value}`: only 2-D configurations (`dim = 2`) can be imported",
                       "export a 2-D tile set (one plane per tile, e.g. a max projection)")
    return None


def _duplicates(entries: list[TileEntry], file: str) -> list[Problem]:
    seen: dict[tuple[str, int], int] = {}
    problems = []
    for entry in entries:
        first = seen.setdefault((entry.name, entry.series), entry.line)
        if first != entry.line:
            problems.append(Problem(file, f"line {entry.line}: tile {entry.name!r} is already listed on line {first}",
                                    "list every tile once"))
    return problems


def parse_tile_configuration(text: str, file: str = "TileConfiguration.txt") -> list[TileEntry]:
    """Parse the text of a 2-D tile configuration.

    Raises
    ------
    InvalidInput
        With one problem per bad line (naming the line), a missing or non-2-D ``dim`` header,
        duplicate tiles, or no tiles at all.
    """
    problems: list[Problem] = []
    entries: list[TileEntry] = []
    dim, multiseries = None, False
    for number, raw in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if key_value := _KEY_VALUE.match(line):
            key, value = key_value.group(1).lower(), key_value.group(2).strip()
            if key == "dim":
                dim = value
            else:
                multiseries = value.lower() == "true"
            problems += [p for p in [_header_problem(key, value, number, file)] if p]
            continue
        if dim is None:
            problems.append(Problem(file, f"line {number}: tile line before the `dim = 2` header: {line!r}",
                                    "start the file with a `dim = 2` line"))
            dim = "missing"
        parsed = _tile_line(line, number, multiseries, file)
        (problems if isinstance(parsed, Problem) else entries).append(parsed)
    problems += _duplicates(entries, file)
    if not entries and not problems:
        problems.append(Problem(file, "lists no tiles", _FIX_LINE))
    if problems:
        raise InvalidInput(problems)
    return entries


def read_tile_configuration(path: Path) -> list[TileEntry]:
    """Read and parse a TileConfiguration.txt (UTF-8, or Latin-1 as older Windows Fiji writes it)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(Problem(str(path), f"cannot be read ({exc.strerror})",
                                   "give the path of the TileConfiguration.txt file")) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return parse_tile_configuration(text, path.name)


def _pixel_size_um(tif: tifffile.TiffFile, series: int) -> float | None:
    """Pixel size (µm) from OME PhysicalSizeX, else from XResolution + ResolutionUnit (or ImageJ's unit)."""
    if tif.is_ome:
        root = ET.fromstring(tif.ome_metadata)
        images = [e for e in root if e.tag.rsplit("}", 1)[-1] == "Image"]
        pixels = next((e for e in images[series] if e.tag.rsplit("}", 1)[-1] == "Pixels"), None) \
            if series < len(images) else None
        size = pixels.get("PhysicalSizeX") if pixels is not None else None
        return float(size) * _UM_PER_UNIT.get(pixels.get("PhysicalSizeXUnit", "µm"), float("nan")) if size else None
    page = tif.series[series].keyframe
    resolution, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if resolution is None or not resolution.value[0] or not resolution.value[1]:
        return None
    pixels_per_unit = resolution.value[0] / resolution.value[1]
    unit_code = int(unit.value) if unit is not None else 1
    if unit_code in _UM_PER_RESOLUTION_UNIT:
        return _UM_PER_RESOLUTION_UNIT[unit_code] / pixels_per_unit
    name = str((tif.imagej_metadata or {}).get("unit", "")).replace("\\u00B5", "µ").replace("\u03bc", "µ").strip()
    return _UM_PER_UNIT[name] / pixels_per_unit if name in _UM_PER_UNIT else None


def _planes_layout(series: tifffile.TiffPageSeries) -> tuple[tuple[int, int, int], str | None]:
    """(C, Y, X) of a tile series, or a reason why it is not a 2-D (multi-channel) image."""
    sizes = dict(zip(series.axes, series.shape, strict=True))
    extra = {a: n for a, n in sizes.items() if a not in "YXCS" and n > 1}
    if extra or (sizes.get("C", 1) > 1 and sizes.get("S", 1) > 1) or "Y" not in sizes or "X" not in sizes:
        return (0, 0, 0), f"has axes {series.axes} of shape {series.shape}"
    return (sizes.get("C", 1) * sizes.get("S", 1), sizes["Y"], sizes["X"]), None


def _read_planes(series: tifffile.TiffPageSeries) -> np.ndarray:
    """Pixels of a tile series as (C, Y, X) (channels or RGB samples first)."""
    data = series.asarray()
    axes = series.axes
    y, x = axes.index("Y"), axes.index("X")
    order = [i for i, a in enumerate(axes) if a not in "YX"] + [y, x]
    return np.transpose(data, order).reshape(-1, data.shape[y], data.shape[x])


def _inspect_tile(config: Path, entry: TileEntry,
                  pixel_size_um: float | None) -> tuple[tuple[int, int, int], str, float | None] | Problem:
    """((C, Y, X), dtype, pixel size) of one listed tile from its header, or what is wrong with it."""
    path = config.parent / entry.name
    where = f"line {entry.line}: tile {entry.name!r}"
    if not path.is_file():
        return Problem(config.name, f"{where} does not exist in {config.parent}",
                       "put the tile files next to the configuration, or correct the name")
    try:
        with tifffile.TiffFile(path) as tif:
            if entry.series >= len(tif.series):
                return Problem(config.name, f"{where} has {len(tif.series)} series, not series {entry.series}",
                               "correct the series number")
            series = tif.series[entry.series]
            shape, why_not = _planes_layout(series)
            size = pixel_size_um if pixel_size_um is not None else _pixel_size_um(tif, entry.series)
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, ET.ParseError) as exc:
        return Problem(config.name, f"{where} is not a readable TIFF ({exc})",
                       "export the tiles as TIFF (Fiji: File > Save As > Tiff)")
    if why_not:
        return Problem(config.name, f"{where} {why_not}; only 2-D tiles (with channels) can be imported",
                       "export one plane per tile, e.g. a maximum projection")
    return shape, str(series.dtype), size


def _pixel_size_problems(file: str, sizes: dict[float | None, list[TileEntry]]) -> list[Problem]:
    """The tiles must agree on one pixel size within a microscope's range."""
    size = next(iter(sizes))
    if len(sizes) > 1:
        return [Problem(file, "tiles disagree on pixel size: " + "; ".join(
            f"{_names(e)}: {'none' if s is None else f'{s:.6g} µm'}" for s, e in sizes.items()),
            "recalibrate the tiles, or pass --pixel-size")]
    if size is None:
        return [Problem(file, "the tiles carry no pixel size (no OME PhysicalSizeX, no TIFF resolution in a "
                        "length unit)", "pass --pixel-size in µm")]
    if not PIXEL_SIZE_RANGE_UM[0] <= size <= PIXEL_SIZE_RANGE_UM[1]:
        return [Problem(file, f"the tiles' calibration gives {size:.6g} µm per pixel, not a microscope "
                        "calibration (a default DPI?)", "pass --pixel-size in µm")]
    return []


def inspect_tiles(config: Path, entries: list[TileEntry], *, pixel_size_um: float | None = None) -> TileLayout:
    """Check that every listed tile exists, that all are 2-D images of one shape and dtype, and find the pixel size.

    Reads file headers only. ``pixel_size_um``, when given, is used instead of the tiles' calibration.
    Raises InvalidInput with every problem found.
    """
    config = Path(config)
    problems: list[Problem] = []
    layouts: dict[tuple, list[TileEntry]] = {}
    sizes: dict[float | None, list[TileEntry]] = {}
    for entry in entries:
        found = _inspect_tile(config, entry, pixel_size_um)
        if isinstance(found, Problem):
            problems.append(found)
            continue
        shape, dtype, size = found
        layouts.setdefault((shape, dtype), []).append(entry)
        sizes.setdefault(None if size is None else round(size, 9), []).append(entry)
    if not layouts:
        raise InvalidInput(problems)
    (shape, dtype), _ = max(layouts.items(), key=lambda item: len(item[1]))
    for (other_shape, other_dtype), odd in layouts.items():
        if (other_shape, other_dtype) != (shape, dtype):
            problems.append(Problem(config.name, f"{_names(odd)} are (C, Y, X) {other_shape} {other_dtype}, "
                                    f"unlike the other tiles, (C, Y, X) {shape} {dtype}",
                                    "all tiles must have the same size, channels and pixel type"))
    if dtype not in RAW_DTYPES:
        problems.append(Problem(config.name, f"tiles are {dtype}; the stitcher reads {' or '.join(RAW_DTYPES)} only",
                                "export the tiles as 16-bit unsigned TIFF"))
    problems += _pixel_size_problems(config.name, sizes)
    if problems:
        raise InvalidInput(problems)
    return TileLayout(shape, dtype, next(iter(sizes)))


def _names(entries: list[TileEntry], limit: int = 4) -> str:
    listed = ", ".join(f"{e.name} (line {e.line})" for e in entries[:limit])
    return f"tiles {listed}" + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def _destination_problems(slide_dir: Path, pixel_size_um: float | None) -> list[Problem]:
    """What is wrong with the import's target folder and --pixel-size, before any tile is read."""
    problems = check_slide_id(slide_dir.name)
    if slide_dir.exists() and (not slide_dir.is_dir() or any(slide_dir.iterdir())):
        problems.append(Problem(str(slide_dir), "already exists and is not empty",
                                "choose a new slide folder for -o; an import never overwrites"))
    if pixel_size_um is not None and not PIXEL_SIZE_RANGE_UM[0] <= pixel_size_um <= PIXEL_SIZE_RANGE_UM[1]:
        problems.append(Problem("--pixel-size", f"{pixel_size_um} µm is outside {PIXEL_SIZE_RANGE_UM} µm",
                                "give the size of one camera pixel in the specimen, in µm (e.g. 0.65)"))
    return problems


def _markers_csv(names: list[str], n_channels: int) -> str:
    """markers.csv of a one-cycle slide with these channel names (checked as a slide's markers.csv)."""
    if len(names) != n_channels:
        raise InvalidInput(Problem("--marker", f"the tiles have {n_channels} channel(s) but {len(names)} marker "
                                   f"name(s) were given", "give --marker once per channel, in channel order"))
    if unwritable := [n for n in names if set(n) & set(',"\r\n')]:
        raise InvalidInput(Problem("--marker", f"marker names {unwritable} contain a comma, quote or line break",
                                   "name markers with letters, digits, '_' and '-', e.g. CD45RO"))
    text = "channel_number,cycle_number,marker_name\n" + "".join(
        f"{i},1,{name}\n" for i, name in enumerate(names, start=1))
    parse_markers(text, "--marker")
    return text


def import_fiji(config: Path, slide_dir: Path, *, markers: list[str] | None = None,
                pixel_size_um: float | None = None,
                on_tile: Callable[[int, int], None] | None = None) -> Path:
    """Pack the tiles of a Fiji tile configuration into a new slide folder.

    Parameters
    ----------
    config : Path
        ``TileConfiguration.txt``; tile files are looked up in its folder.
    slide_dir : Path
        Slide folder to create; its name is the slide id. Must not exist (or be empty).
    markers : list of str, optional
        One marker name per tile channel; default ``["DNA_1"]`` for one-channel tiles.
    pixel_size_um : float, optional
        Pixel size; overrides the tiles' calibration, required when they have none.
    on_tile : callable(done, total), optional
        Called after each tile is read (progress).

    Returns
    -------
    Path
        The slide folder, complete with manifest.json (written last). Nothing is left behind on error.
    """
    config, slide_dir = Path(config), Path(slide_dir)
    if problems := _destination_problems(slide_dir, pixel_size_um):
        raise InvalidInput(problems)
    entries = read_tile_configuration(config)
    layout = inspect_tiles(config, entries, pixel_size_um=pixel_size_um)
    size = layout.pixel_size_um
    names = markers or (["DNA_1"] if layout.shape[0] == 1 else [])
    markers_csv = _markers_csv(names, layout.shape[0])
    positions_um = np.array([(e.y, e.x) for e in entries], float) * size
    slide_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=slide_dir.parent, prefix=f".{slide_dir.name}.") as tmp:
        # tiles go through a disk-backed array: memory stays at one tile whatever the tile count
        tiles = np.lib.format.open_memmap(Path(tmp) / "tiles.npy", mode="w+", dtype=layout.dtype,
                                          shape=(len(entries),) + layout.shape)
        digest = hashlib.sha256(repr((positions_um.tolist(), size, names)).encode())
        for i, entry in enumerate(entries):
            with tifffile.TiffFile(config.parent / entry.name) as tif:
                tiles[i] = _read_planes(tif.series[entry.series])
            digest.update(tiles[i].tobytes())
            if on_tile:
                on_tile(i + 1, len(entries))
        new_slide = Path(tmp) / slide_dir.name
        (new_slide / RAW).mkdir(parents=True)
        (new_slide / MARKERS).write_text(markers_csv)
        write_cycle(new_slide / CYCLE_FILE, tiles, positions_um, size, names,
                    uuid=f"urn:uuid:{uuid.UUID(digest.hexdigest()[:32], version=5)}")
        del tiles
        write_manifest(new_slide)
        if slide_dir.exists():
            slide_dir.rmdir()
        shutil.move(new_slide, slide_dir)
    return slide_dir
