"""Raw cycle files: one OME-TIFF per cycle, one OME Image (series) per tile, with stage positions.

Positions are stored the way microscopes (and ASHLAR's Bio-Formats reader) expect them: the stage
Y axis points *up*, so ``PositionY = -row_um``. In memory we use image orientation throughout:
``positions_um[i] = (y, x)`` of tile ``i``'s top-left corner, y growing downwards, in µm.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile

_UM_PER_UNIT = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "m": 1e6, "cm": 1e4}


@dataclass(frozen=True)
class CycleMetadata:
    """What the OME-XML of a cycle file says, read without touching pixel data.

    Attributes
    ----------
    n_tiles : int
    tile_shape : tuple of int
        (height, width) in pixels, the same for all tiles.
    n_channels : int
    dtype : str
    channel_names : tuple of str
    pixel_size_um : float or None
        PhysicalSizeX in µm (None when absent).
    positions_um : (n_tiles, 2) float ndarray or None
        Top-left corner (y, x) of each tile in µm, image orientation; None when any tile lacks one.
    tiles_without_position : tuple of int
        Indices of the tiles without a stage position (empty when unknown, as in catalog records).
    """

    n_tiles: int
    tile_shape: tuple[int, int]
    n_channels: int
    dtype: str
    channel_names: tuple[str, ...]
    pixel_size_um: float | None
    positions_um: np.ndarray | None
    tiles_without_position: tuple[int, ...] = ()


class CycleWriter:
    """Write one cycle as a multi-series OME-TIFF tile by tile (one series per tile), so a cycle of
    any size passes through memory one tile at a time.

    Parameters
    ----------
    path : Path
        Output ``.ome.tif``.
    positions_um : (n_tiles, 2) float ndarray
        Top-left (y, x) of each tile in µm, image orientation; :meth:`write` takes the tiles in this order.
    pixel_size_um : float
        Physical pixel size (square pixels).
    channel_names : list of str
        One name per channel.
    compression : str or None
        TIFF compression of every tile.
    uuid : str, optional
        OME UUID of the file; pass one derived from the content for byte-reproducible files
        (default: a random one, as tifffile does).
    acquired : datetime, optional
        Acquisition time, written as microscopes write it: OME ``AcquisitionDate`` of every
        image and TIFF ``DateTime`` of every IFD (released images never carry it on).
    """

    def __init__(self, path: Path, positions_um: np.ndarray, pixel_size_um: float, channel_names: list[str], *,
                 compression: str | None = "zlib", uuid: str | None = None, acquired: datetime | None = None):
        self.positions_um = np.asarray(positions_um, dtype=float)
        self.pixel_size_um, self.channel_names = pixel_size_um, list(channel_names)
        self.compression, self.uuid, self.acquired = compression, uuid, acquired
        self.written = 0
        self._tif = tifffile.TiffWriter(path, bigtiff=True, ome=True)

    def write(self, tile: np.ndarray) -> None:
        """Append the next tile, (C, Y, X) uint8 or uint16."""
        i, n_channels = self.written, len(self.channel_names)
        if tile.ndim != 3 or tile.shape[0] != n_channels or i >= len(self.positions_um):
            raise ValueError(f"tile {i} must be (C, Y, X) with one name per channel and one position per tile; "
                             f"got shape {tile.shape}, {len(self.positions_um)} positions, {n_channels} names")
        y, x = self.positions_um[i]
        dated = {"AcquisitionDate": self.acquired.isoformat(timespec="seconds")} if self.acquired else {}
        self._tif.write(tile, compression=self.compression, datetime=self.acquired or False, metadata={
            "axes": "CYX", "Name": f"tile-{i}", **({"UUID": self.uuid} if self.uuid and i == 0 else {}), **dated,
            "PhysicalSizeX": self.pixel_size_um, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": self.pixel_size_um, "PhysicalSizeYUnit": "µm",
            "Channel": {"Name": self.channel_names},
            "Plane": {"PositionX": [float(x)] * n_channels, "PositionXUnit": ["µm"] * n_channels,
                      "PositionY": [-float(y)] * n_channels, "PositionYUnit": ["µm"] * n_channels},
        })
        self.written += 1

    def close(self) -> None:
        """Finish the file; every position must have had its tile."""
        self._tif.close()
        if self.written != len(self.positions_um):
            raise ValueError(f"{self.written} tiles written for {len(self.positions_um)} positions")

    def __enter__(self) -> CycleWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._tif.close()


def write_cycle(path: Path, tiles: np.ndarray, positions_um: np.ndarray, pixel_size_um: float,
                channel_names: list[str], *, compression: str | None = "zlib", uuid: str | None = None,
                acquired: datetime | None = None) -> None:
    """Write one cycle as a multi-series OME-TIFF (see :class:`CycleWriter` to write tile by tile).

    Parameters
    ----------
    path : Path
        Output ``.ome.tif``.
    tiles : (n_tiles, C, Y, X) uint8 or uint16 ndarray
    positions_um : (n_tiles, 2) float ndarray
        Top-left (y, x) of each tile in µm, image orientation.
    pixel_size_um, channel_names, compression, uuid, acquired
        See :class:`CycleWriter`.
    """
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or len(channel_names) != tiles.shape[1] or len(positions_um) != len(tiles):
        raise ValueError(f"tiles must be (n_tiles, C, Y, X) with one position per tile and one name per channel; "
                         f"got shape {tiles.shape}, {len(positions_um)} positions, {len(channel_names)} names")
    with CycleWriter(path, positions_um, pixel_size_um, channel_names, compression=compression, uuid=uuid,
                     acquired=acquired) as writer:
        for tile in tiles:
            writer.write(tile)


def parse_ome_xml(xml: str) -> CycleMetadata:
    """Tile layout of a cycle from its OME-XML (see :class:`CycleMetadata`)."""
    root = ET.fromstring(xml)
    ns = {"ome": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {"ome": ""}
    q = (lambda tag: f"ome:{tag}") if ns["ome"] else (lambda tag: tag)
    images = root.findall(q("Image"), ns)
    if not images:
        raise ValueError("OME-XML has no Image elements")
    shapes, positions = set(), []
    for image in images:
        pixels = image.find(q("Pixels"), ns)
        shapes.add((int(pixels.get("SizeY")), int(pixels.get("SizeX")), int(pixels.get("SizeC", 1)),
                    pixels.get("Type")))
        plane = pixels.find(q("Plane"), ns)
        if plane is None or plane.get("PositionX") is None or plane.get("PositionY") is None:
            positions.append(None)
            continue
        scale = [_UM_PER_UNIT.get(plane.get(f"Position{a}Unit", "µm"), 1.0) for a in "YX"]
        positions.append((-float(plane.get("PositionY")) * scale[0], float(plane.get("PositionX")) * scale[1]))
    if len(shapes) != 1:
        raise ValueError(f"tiles differ in size, channels or dtype: {sorted(shapes)}")
    (height, width, n_channels, dtype), = shapes
    first = images[0].find(q("Pixels"), ns)
    size = first.get("PhysicalSizeX")
    pixel_size = float(size) * _UM_PER_UNIT.get(first.get("PhysicalSizeXUnit", "µm"), 1.0) if size else None
    names = tuple(c.get("Name") or f"Channel {i}" for i, c in enumerate(first.findall(q("Channel"), ns)))
    return CycleMetadata(
        n_tiles=len(images), tile_shape=(height, width), n_channels=n_channels, dtype=dtype,
        channel_names=names, pixel_size_um=pixel_size,
        positions_um=None if any(p is None for p in positions) else np.array(positions, dtype=float),
        tiles_without_position=tuple(i for i, p in enumerate(positions) if p is None))


def read_cycle_metadata(source: Path | str | BinaryIO) -> CycleMetadata:
    """Read a cycle file's OME-XML only (first IFD), from a path or a seekable binary file object.

    With a ranged-read file object over S3 this fetches the TIFF header and the description tag,
    never the pixel data.
    """
    with tifffile.TiffFile(source, _multifile=False) as tif:
        xml = tif.pages.first.description if hasattr(tif.pages, "first") else tif.pages[0].description
    if not xml.lstrip().startswith("<"):
        raise ValueError("no OME-XML in the first IFD (the file is truncated, or not an OME-TIFF)")
    return parse_ome_xml(xml)


def read_tile(path: Path, index: int) -> np.ndarray:
    """Pixels of tile ``index`` of a cycle file, (C, Y, X)."""
    with tifffile.TiffFile(path) as tif:
        data = tif.series[index].asarray()
    return data.reshape((-1,) + data.shape[-2:])
