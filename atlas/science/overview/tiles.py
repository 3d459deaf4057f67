"""Deep-zoom tiles in Minerva's layout: ``<layer path>/<level>_<x>_<y>.<ext>``, level 0 = full size.

A channel group becomes RGB JPEG tiles (each channel scaled to its display range, tinted with its
colour, summed and clipped, as Minerva's ``composite_channel`` does); a label image becomes RGBA
PNG tiles of its object outlines, transparent elsewhere, to lay over any group.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import imagecodecs
import numpy as np

JPEG_QUALITY = 85  # Minerva's
PNG_LEVEL = 1      # fast zlib; outline tiles are mostly transparent and compress well anyway


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """``"ff8000"`` -> ``(255, 128, 0)``."""
    return int(color[0:2], 16), int(color[2:4], 16), int(color[4:6], 16)


def scale_to_display(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map intensities linearly from ``[low, high]`` to 0..255, clipping outside.

    Parameters
    ----------
    plane : ndarray
        Intensities of one channel, any shape and real dtype; NaN shows black.
    low, high : float
        Display range in the channel's units, ``high > low``.

    Returns
    -------
    uint8 ndarray of the same shape. Integer planes of up to 16 bits go through a lookup table
    of the same mapping, which is several times faster than the arithmetic.
    """
    plane = np.asarray(plane)
    if plane.dtype.kind in "ub" and plane.dtype.itemsize <= 2:
        lut = scale_to_display(np.arange(2 ** (8 * plane.dtype.itemsize), dtype=np.float32), low, high)
        return np.take(lut, plane)
    scaled = (plane.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.nan_to_num(np.clip(scaled, 0, 255), nan=0.0).round().astype(np.uint8)


def composite(planes: np.ndarray, ranges: Sequence[tuple[float, float]], colors: Sequence[str]) -> np.ndarray:
    """Colour-composite channels into one RGB image.

    Parameters
    ----------
    planes : (C, Y, X) ndarray
        Intensities of the group's channels.
    ranges : sequence of (low, high)
        Display range of each channel (see :func:`atlas.science.overview.contrast.auto_contrast`).
    colors : sequence of str
        6-hex-digit colour of each channel.

    Returns
    -------
    (Y, X, 3) uint8 ndarray: sum over channels of scaled intensity x colour, clipped to 255.
    """
    acc = np.zeros((3, *planes.shape[1:]), dtype=np.uint16)
    for plane, (low, high), color in zip(planes, ranges, colors, strict=True):
        value = scale_to_display(plane, low, high).astype(np.uint16)
        for component, weight in enumerate(hex_to_rgb(color)):
            if weight == 255:
                acc[component] += value
            elif weight:
                acc[component] += value * np.uint16(weight) // np.uint16(255)
    np.minimum(acc, 255, out=acc)
    return np.ascontiguousarray(acc.astype(np.uint8).transpose(1, 2, 0))


def outlines(labels: np.ndarray, margin: int = 1) -> np.ndarray:
    """Inner object boundaries of a label image.

    Parameters
    ----------
    labels : (Y + 2 * margin, X + 2 * margin) integer ndarray
        Labels (0 = background) with ``margin`` extra pixels on every side, so boundaries at the
        edge of a tile are the same as in the whole image.
    margin : int
        Must be 1.

    Returns
    -------
    (Y, X) bool ndarray: True on object pixels that touch a different label (4-connectivity).
    """
    if margin != 1:
        raise ValueError("margin must be 1")
    core = labels[1:-1, 1:-1]
    edge = ((core != labels[:-2, 1:-1]) | (core != labels[2:, 1:-1])
            | (core != labels[1:-1, :-2]) | (core != labels[1:-1, 2:]))
    return edge & (core != 0)


def outline_rgba(edge: np.ndarray, color: str) -> np.ndarray:
    """(Y, X, 4) uint8 image: ``color`` opaque where ``edge``, transparent elsewhere."""
    rgba = np.zeros((*edge.shape, 4), dtype=np.uint8)
    rgba[edge] = (*hex_to_rgb(color), 255)
    return rgba


def encode_jpeg(rgb: np.ndarray) -> bytes:
    return imagecodecs.jpeg8_encode(rgb, level=JPEG_QUALITY)


def encode_png(rgba: np.ndarray) -> bytes:
    return imagecodecs.png_encode(rgba, level=PNG_LEVEL)


def tile_name(level: int, x: int, y: int, ext: str) -> str:
    """Minerva's tile file name, e.g. ``0_3_1.jpg`` (level, column, row)."""
    return f"{level}_{x}_{y}.{ext}"


@dataclass(frozen=True)
class TileLayer:
    """One deep-zoom layer of the overview: its folder below ``images/``, tile format, how a tile is made.

    Attributes
    ----------
    path : str
        The layer's folder, relative to the overview's ``images/``.
    ext : str
        File extension of the encoded tiles ("jpg" or "png").
    render : callable
        ``render(level, y0, y1, x0, x1) -> bytes``: the encoded tile of that region of the level.
    """

    path: str
    ext: str
    render: Callable[[int, int, int, int, int], bytes]


@dataclass(frozen=True)
class TileUnit:
    """A unit of rendering work: one row of tiles of one level of one layer.

    Attributes
    ----------
    layer : int
        Index of the layer in the overview's layer list.
    level : int
        Pyramid level (0 = full size).
    row : int
        Tile row of that level.
    """

    layer: int
    level: int
    row: int

    @property
    def name(self) -> str:
        """Unique in an overview: ``layer2-level0-row5``."""
        return f"layer{self.layer}-level{self.level}-row{self.row}"


def tile_units(n_layers: int, level_shapes: Sequence[tuple[int, int]], tile_size: int) -> list[TileUnit]:
    """Every unit of an overview of ``n_layers`` layers, in a fixed order: level by level (full size
    first), row by row, layer by layer. A share ``units[index::count]`` then holds about as many rows
    of each level as any other share (at 1,000 tiles of 2048 px and 11 layers, 168 shares: the
    largest has 1.08x the mean's tiles; layer by layer first it would have 1.26x)."""
    return [TileUnit(layer, level, row) for level, (height, _) in enumerate(level_shapes)
            for row in range(math.ceil(height / tile_size)) for layer in range(n_layers)]


def tile_paths(layers: Sequence[tuple[str, str]], level_shapes: Sequence[tuple[int, int]], tile_size: int
               ) -> list[str]:
    """Every tile file of the layers ``(path, ext)``, relative to ``images/``, as :func:`render_tiles` names them."""
    return [f"{path}/{tile_name(level, x, y, ext)}" for path, ext in layers
            for level, (height, width) in enumerate(level_shapes)
            for y in range(math.ceil(height / tile_size)) for x in range(math.ceil(width / tile_size))]


def render_tiles(layers: Sequence[TileLayer], units: Sequence[TileUnit], level_shapes: Sequence[tuple[int, int]],
                 tile_size: int, write: Callable[[str, bytes], None], *, workers: int | None = None) -> int:
    """Render every tile of ``units`` and hand each to ``write``, in parallel threads.

    Parameters
    ----------
    layers : sequence of TileLayer
        The overview's layers, indexed by the units.
    units : sequence of TileUnit
    level_shapes : sequence of (Y, X)
        Shape of each level, full resolution first.
    tile_size : int
        Tile edge in pixels; edge tiles are smaller.
    write : callable
        ``write(path, data)``, ``path`` relative to ``images/`` (``<layer path>/<level>_<x>_<y>.<ext>``);
        called from the threads, one tile at a time.
    workers : int, optional
        Threads; default the number of CPUs (reading, decoding and encoding release the GIL).

    Returns
    -------
    int : number of tiles written.
    """
    def one(index: tuple[TileUnit, int]) -> None:
        unit, x = index
        layer = layers[unit.layer]
        height, width = level_shapes[unit.level]
        y0, x0 = unit.row * tile_size, x * tile_size
        data = layer.render(unit.level, y0, min(y0 + tile_size, height), x0, min(x0 + tile_size, width))
        write(f"{layer.path}/{tile_name(unit.level, x, unit.row, layer.ext)}", data)

    tiles = [(unit, x) for unit in units for x in range(math.ceil(level_shapes[unit.level][1] / tile_size))]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        for _ in pool.map(one, tiles):
            pass
    return len(tiles)
