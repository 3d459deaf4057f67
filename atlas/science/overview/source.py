"""Region reads from the pyramid levels of a (C, Y, X) image, tile by tile: a TIFF / OME-TIFF
(:class:`TiffPyramid`) or an OME-Zarr (:class:`ZarrPyramid`), behind one interface.

Levels stored in the file (SubIFDs, as ASHLAR and :mod:`atlas.science.pyramid` write them; the
OME-Zarr's datasets) are read by decoding only the TIFF tiles (or strips, or zarr chunks) a region
touches, so several threads can read at once. Levels the file lacks are made in memory from the
smallest stored one.
"""
from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import tifffile

from atlas.errors import InvalidInput, Problem
from atlas.science.imageio import open_tiff
from atlas.science.pyramid import downsample, level_shapes

# A computed (not stored) level may hold at most this many bytes over all channels.
MAX_COMPUTED_LEVEL_BYTES = 2 << 30


class _Pyramid(ABC):
    """What both pyramids share: ``shape`` (C, Y, X), ``level_shapes``, and ``read``/``close`` of their own."""

    shape: tuple[int, int, int]
    level_shapes: list[tuple[int, int]]
    labels: bool
    _stored: list        # the levels the source holds
    _computed: dict      # level -> (C, Y, X) array made from the level above

    @property
    def n_levels(self) -> int:
        return len(self.level_shapes)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def level(self, k: int) -> np.ndarray:
        """Level ``k`` whole, (C, Y_k, X_k); for small levels (contrast sampling)."""
        y, x = self.level_shapes[k]
        return self.read(k, range(self.shape[0]), 0, y, 0, x)

    def _computed_level(self, k: int) -> np.ndarray:
        """Level ``k`` beyond the stored ones, made from the level above (kept in ``_computed``)."""
        if k not in self._computed:
            src = self.level(k - 1) if k - 1 < len(self._stored) else self._computed_level(k - 1)
            self._computed[k] = np.stack([downsample(plane, labels=self.labels) for plane in src])
        return self._computed[k]

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def read(self, k: int, channels: range | list[int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray: ...


class TiffPyramid(_Pyramid):
    """Pyramid of a (C, Y, X) or (Y, X) TIFF, completed down to a level that fits one tile.

    Parameters
    ----------
    path : path
        TIFF or OME-TIFF; levels beyond the first are SubIFD (or series) pyramid levels.
    tile_size : int
        The pyramid continues (halving, sizes rounded up) until the longest side is at most this.
    labels : bool
        Integer label image: levels the file lacks are made by nearest neighbour, not the mean.

    Attributes
    ----------
    shape : (C, Y, X) tuple of int
        Full-resolution shape.
    dtype : numpy.dtype
    level_shapes : list of (Y, X)
        Shape of every level, full resolution first (level k is ``ceil(Y / 2**k)``).
    pixel_size_um : float or None
        OME ``PhysicalSizeX`` in µm, if the file has one.
    channel_names : list of str or None
        OME ``Channel@Name`` values, if all channels have one.
    """

    def __init__(self, path: str | os.PathLike, tile_size: int, *, labels: bool = False):
        self.path = Path(path)
        self.name = self.path.name
        self.labels = labels
        self._tif = open_tiff(self.path, "give a (pyramidal OME-)TIFF file")
        series = self._tif.series[0]
        if not series.axes.endswith("YX"):
            self._tif.close()
            raise InvalidInput(Problem(str(self.path), f"has axes {series.axes} {series.shape}; expected "
                                       "channel planes (C, Y, X), not interleaved colour samples",
                                       "write channels as separate planes (C, Y, X), e.g. as ASHLAR does"))
        self.dtype = np.dtype(series.dtype)
        if labels and self.dtype.kind not in "iu":
            self._tif.close()
            raise InvalidInput(Problem(str(self.path), f"mask has dtype {self.dtype}, not integer labels",
                                       "give the label image (e.g. segmentation/<engine>-<slide>/cell.ome.tif)"))
        height, width = series.shape[-2:]
        self.shape = (int(np.prod(series.shape[:-2])), int(height), int(width))
        self.level_shapes = level_shapes((height, width), tile_size)
        self.pixel_size_um, self.channel_names = _ome_info(self._tif, self.shape[0])
        self._fd = os.open(self.path, os.O_RDONLY)
        # Per stored level, per channel: (page or frame, index of its first segment). Channels are
        # either pages (OME-TIFF) or planar samples of one page (plain tifffile.imwrite of C, Y, X).
        self._stored: list[list[tuple[tifffile.TiffPage | tifffile.TiffFrame, int]]] = []
        for level in series.levels:
            expected = self.level_shapes[len(self._stored)] if len(self._stored) < len(self.level_shapes) else None
            # Accept sizes rounded down as well as up; anything else is not our factor-2 pyramid.
            if expected is None or any(abs(g - e) > 1 for g, e in zip(level.shape[-2:], expected, strict=True)):
                break
            pages = list(level.pages)
            if len(pages) == self.shape[0]:
                self._stored.append([(page, 0) for page in pages])
            elif (len(pages) == 1 and pages[0].keyframe.samplesperpixel == self.shape[0]
                  and pages[0].keyframe.planarconfig == 2):
                per_plane = len(pages[0].dataoffsets) // self.shape[0]
                self._stored.append([(pages[0], c * per_plane) for c in range(self.shape[0])])
            else:
                break
        self._computed: dict[int, np.ndarray] = {}
        last = len(self._stored) - 1
        if len(self._stored) < len(self.level_shapes):
            y, x = self.level_shapes[last + 1]
            if self.shape[0] * y * x * self.dtype.itemsize > MAX_COMPUTED_LEVEL_BYTES:
                self.close()
                raise InvalidInput(Problem(str(self.path), f"has {last + 1} pyramid level(s), the smallest "
                                           f"{self.level_shapes[last]} px; too large to complete in memory",
                                           "write it as a pyramidal OME-TIFF (ASHLAR, or "
                                           "atlas.science.pyramid.write_ome_tiff_pyramid)"))

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        self._tif.close()

    def read(self, k: int, channels: range | list[int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Region ``[y0:y1, x0:x1]`` of level ``k`` for ``channels``.

        Returns
        -------
        (len(channels), y1 - y0, x1 - x0) ndarray of the image dtype. A stored level one pixel
        smaller than :attr:`level_shapes` says is padded by repeating its edge.
        """
        if k < len(self._stored):
            return np.stack([self._read_stored(*self._stored[k][c], y0, y1, x0, x1) for c in channels])
        return self._computed_level(k)[list(channels), y0:y1, x0:x1]

    def _read_stored(self, frame: tifffile.TiffPage | tifffile.TiffFrame, first: int,
                     y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        page = frame.keyframe  # a frame has its own data offsets but shares its keyframe's layout
        height, width = page.imagelength, page.imagewidth
        if page.is_tiled:
            seg_h, seg_w = page.tilelength, page.tilewidth
        else:
            seg_h, seg_w = page.rowsperstrip, width
        per_row = math.ceil(width / seg_w)
        out = np.empty((y1 - y0, x1 - x0), dtype=self.dtype)
        ry1, rx1 = min(y1, height), min(x1, width)
        for sy in range(y0 // seg_h, math.ceil(ry1 / seg_h)):
            for sx in range(x0 // seg_w, math.ceil(rx1 / seg_w)):
                index = first + sy * per_row + sx
                data = os.pread(self._fd, frame.databytecounts[index], frame.dataoffsets[index])
                segment = page.decode(data, index, jpegtables=page.jpegtables)[0]
                segment = segment.reshape(segment.shape[-3], segment.shape[-2])
                top, left = sy * seg_h, sx * seg_w
                ya, yb = max(y0, top), min(ry1, top + segment.shape[0])
                xa, xb = max(x0, left), min(rx1, left + segment.shape[1])
                out[ya - y0:yb - y0, xa - x0:xb - x0] = segment[ya - top:yb - top, xa - left:xb - left]
        if ry1 < y1:
            out[ry1 - y0:] = out[ry1 - y0 - 1]
        if rx1 < x1:
            out[:, rx1 - x0:] = out[:, rx1 - x0 - 1:rx1 - x0]
        return out


def _ome_info(tif: tifffile.TiffFile, n_channels: int) -> tuple[float | None, list[str] | None]:
    """(PhysicalSizeX in µm, channel names) from the OME-XML, where present."""
    if not tif.is_ome:
        return None, None
    try:
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
    except (KeyError, IndexError, TypeError, ValueError):
        return None, None
    size = pixels.get("PhysicalSizeX")
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
    pixel_size = float(size) * scale if size is not None and scale is not None else None
    channels = pixels.get("Channel", [])
    channels = channels if isinstance(channels, list) else [channels]
    names = [str(c.get("Name", "")) for c in channels]
    return pixel_size, (names if len(names) == n_channels and all(names) else None)


class ZarrPyramid(_Pyramid):
    """Pyramid of an OME-Zarr multiscale image (NGFF 0.4, (C, Y, X) or (Y, X) datasets), read chunk by
    chunk: the same interface as :class:`TiffPyramid`.

    Parameters
    ----------
    group : zarr.Group
        The multiscale group: the image's ``.ome.zarr`` root, or a label image under ``labels/``.
        Over any zarr store (a folder, S3): only the chunks a region touches are read.
    tile_size : int
        The pyramid continues (halving, sizes rounded up) until the longest side is at most this.
    labels : bool
        Integer label image: levels the group lacks are made by nearest neighbour, not the mean.
    name : str
        Named in errors.
    """

    def __init__(self, group, tile_size: int, *, labels: bool = False, name: str = "image"):
        self.name, self.labels = name, labels
        multiscales = group.attrs["multiscales"][0]
        arrays = [group[d["path"]] for d in multiscales["datasets"]]
        base = arrays[0]
        self.dtype = np.dtype(base.dtype)
        if labels and self.dtype.kind not in "iu":
            raise InvalidInput(Problem(name, f"mask has dtype {self.dtype}, not integer labels",
                                       "give an integer label image"))
        height, width = base.shape[-2:]
        self.shape = (int(np.prod(base.shape[:-2])), int(height), int(width))
        self.level_shapes = level_shapes((height, width), tile_size)
        self.pixel_size_um = float(multiscales["datasets"][0]["coordinateTransformations"][0]["scale"][-1])
        channels = (group.attrs.get("omero") or {}).get("channels", [])
        names = [str(c.get("label", "")) for c in channels]
        self.channel_names = names if len(names) == self.shape[0] and all(names) else None
        self._stored = []
        for array, expected in zip(arrays, self.level_shapes, strict=False):
            if tuple(array.shape[-2:]) != tuple(expected):
                break
            self._stored.append(array)
        self._computed: dict[int, np.ndarray] = {}
        if len(self._stored) < len(self.level_shapes):
            y, x = self.level_shapes[len(self._stored)]
            if self.shape[0] * y * x * self.dtype.itemsize > MAX_COMPUTED_LEVEL_BYTES:
                raise InvalidInput(Problem(name, f"has {len(self._stored)} pyramid level(s), too few to complete "
                                           "in memory", "write it with atlas.science.pyramid.write_ome_zarr"))

    def close(self) -> None:
        self._computed.clear()

    def read(self, k: int, channels: range | list[int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Region ``[y0:y1, x0:x1]`` of level ``k`` for ``channels``: (len(channels), y1 - y0, x1 - x0)."""
        if k < len(self._stored):
            array = self._stored[k]
            if array.ndim == 2:
                return np.stack([np.asarray(array[y0:y1, x0:x1]) for _ in channels])
            return np.stack([np.asarray(array[c, y0:y1, x0:x1]) for c in channels])
        return self._computed_level(k)[list(channels), y0:y1, x0:x1]
