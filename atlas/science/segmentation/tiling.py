"""Tiled segmentation of images of any size, with seams that neither cut nor duplicate nuclei.

The image is split into *core* tiles on the native pixel grid. Each tile is segmented over its core
grown by ``overlap`` pixels, and keeps exactly the instances whose centroid lies in its core: the
cores partition the image, so every nucleus is kept by one tile, whole, provided the overlap exceeds
a nucleus diameter. Merging paints kept instances into one label image with globally unique ids.

Engines work at their own pixel size (the scale their parameters or weights were made for). A
:class:`ScaledImage` presents the native image at that scale; its pixel values depend only on
their position, not on which box is requested, so tiles see the same data as an untiled run.
Boxes are ``(y0, y1, x0, x1)`` tuples, half-open, in pixels.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels

Box = tuple[int, int, int, int]

CALIBRATION_BLOCK = 512      # px at working scale
CALIBRATION_BLOCKS_PER_AXIS = 8
MAX_EXTRA_PARTS = 4          # job_tiles tries grids of up to this many more tiles per axis than the fewest


class ScaledImage:
    """A 2-D image resampled on the fly to an engine's working pixel size.

    Parameters
    ----------
    plane : (Y, X) array-like
        Native pixels; anything sliceable as ``plane[y0:y1, x0:x1]`` (ndarray, zarr array, memmap).
    factor : float
        Working pixels per native pixel: ``native_pixel_size_um / working_pixel_size_um``.

    Notes
    -----
    Working pixel ``i`` sits at native coordinate ``(i + 0.5) / factor - 0.5`` and is linearly
    interpolated there (after a Gaussian anti-aliasing filter when shrinking), so its value does
    not depend on the requested box. Reads outside the image are mirror-padded.
    """

    def __init__(self, plane, factor: float = 1.0):
        if len(plane.shape) != 2:
            raise ValueError(f"expected a 2-D plane, got shape {tuple(plane.shape)}")
        self.plane = plane
        self.factor = 1.0 if abs(factor - 1.0) < 1e-3 else float(factor)
        self.native_shape: tuple[int, int] = tuple(int(n) for n in plane.shape)
        self.shape: tuple[int, int] = tuple(max(1, round(n * self.factor)) for n in self.native_shape)

    def read(self, box: Box) -> np.ndarray:
        """Pixels of ``box`` (working coordinates, may extend past the image) as float32."""
        y0, y1, x0, x1 = box
        iy0, iy1 = max(y0, 0), min(y1, self.shape[0])
        ix0, ix1 = max(x0, 0), min(x1, self.shape[1])
        if iy0 >= iy1 or ix0 >= ix1:
            raise ValueError(f"box {box} does not overlap the image of shape {self.shape}")
        inner = self._read_inside(iy0, iy1, ix0, ix1)
        pad = ((iy0 - y0, y1 - iy1), (ix0 - x0, x1 - ix1))
        return np.pad(inner, pad, mode="symmetric") if any(any(p) for p in pad) else inner

    def _read_inside(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self.factor == 1.0:
            return np.asarray(self.plane[y0:y1, x0:x1], dtype=np.float32)
        sigma = max(0.0, (1.0 / self.factor - 1.0) / 2.0)   # anti-aliasing, as skimage.transform.resize
        margin = math.ceil(4 * sigma) + 1
        ys, xs = self._coords(y0, y1, 0), self._coords(x0, x1, 1)
        r0, r1 = max(int(ys.min()) - margin, 0), min(int(ys.max()) + 2 + margin, self.native_shape[0])
        c0, c1 = max(int(xs.min()) - margin, 0), min(int(xs.max()) + 2 + margin, self.native_shape[1])
        block = np.asarray(self.plane[r0:r1, c0:c1], dtype=np.float32)
        if sigma > 0:
            block = ndi.gaussian_filter(block, sigma, mode="mirror")
        block = _interpolate(block, ys - r0, axis=0)
        return _interpolate(block, xs - c0, axis=1)

    def _coords(self, start: int, stop: int, axis: int) -> np.ndarray:
        coords = (np.arange(start, stop) + 0.5) / self.factor - 0.5
        return np.clip(coords, 0, self.native_shape[axis] - 1)

    def native_box_to_working(self, box: Box) -> Box:
        """Smallest working box whose pixels cover every native pixel centre in ``box``."""
        (y0, y1, x0, x1), f = box, self.factor
        return (max(math.floor((y0 + 0.5) * f - 0.5), 0), min(math.ceil((y1 - 0.5) * f - 0.5) + 1, self.shape[0]),
                max(math.floor((x0 + 0.5) * f - 0.5), 0), min(math.ceil((x1 - 0.5) * f - 0.5) + 1, self.shape[1]))

    def labels_to_native(self, labels: np.ndarray, work_box: Box, native_box: Box) -> np.ndarray:
        """Nearest-neighbour resample working-scale ``labels`` of ``work_box`` onto ``native_box``."""
        if self.factor == 1.0:
            y0, y1, x0, x1 = native_box
            return labels[y0 - work_box[0]:y1 - work_box[0], x0 - work_box[2]:x1 - work_box[2]]
        rows = self._nearest(native_box[0], native_box[1], 0) - work_box[0]
        cols = self._nearest(native_box[2], native_box[3], 1) - work_box[2]
        return labels[np.ix_(rows, cols)]

    def _nearest(self, start: int, stop: int, axis: int) -> np.ndarray:
        coords = np.floor((np.arange(start, stop) + 0.5) * self.factor - 0.5 + 0.5).astype(np.int64)
        return np.clip(coords, 0, self.shape[axis] - 1)


def _interpolate(block: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``block`` at fractional ``coords`` along ``axis``."""
    lower = np.floor(coords).astype(np.int64)
    upper = np.minimum(lower + 1, block.shape[axis] - 1)
    weight = (coords - lower).astype(np.float32)
    shape = [1, 1]
    shape[axis] = -1
    weight = weight.reshape(shape)
    return np.take(block, lower, axis=axis) * (1 - weight) + np.take(block, upper, axis=axis) * weight


def calibration_sample(view: ScaledImage, block: int = CALIBRATION_BLOCK,
                       per_axis: int = CALIBRATION_BLOCKS_PER_AXIS) -> list[np.ndarray]:
    """Evenly spaced full-resolution blocks (working scale) from which engines derive global constants.

    Up to ``per_axis`` x ``per_axis`` blocks of ``block`` x ``block`` pixels; an image that fits
    in that many blocks is sampled entirely. Depends only on the image, never on the tiling, so
    every tile of a run (and an untiled run) uses the same constants.
    """
    starts = []
    for size in view.shape:
        n_blocks = math.ceil(size / block)
        if n_blocks <= per_axis:
            starts.append([i * block for i in range(n_blocks)])
        else:
            starts.append(sorted({round(s) for s in np.linspace(0, size - block, per_axis)}))
    return [view.read((y, min(y + block, view.shape[0]), x, min(x + block, view.shape[1])))
            for y in starts[0] for x in starts[1]]


def tile_grid(shape: tuple[int, int], tile_size: int) -> list[Box]:
    """Core tiles of at most ``tile_size`` covering an image of ``shape`` (native px), row by row.

    Each axis is cut into the fewest parts, of equal size to within a pixel, so no tile is a thin
    sliver left at the image's edge.
    """
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    return even_grid(shape, (math.ceil(shape[0] / tile_size), math.ceil(shape[1] / tile_size)))


def even_grid(shape: tuple[int, int], counts: tuple[int, int]) -> list[Box]:
    """``counts[0]`` x ``counts[1]`` tiles of equal size (to within a pixel) covering ``shape``, row by row."""
    rows, cols = ([round(i * size / n) for i in range(n + 1)] for size, n in zip(shape, counts, strict=True))
    return [(y0, y1, x0, x1) for y0, y1 in pairwise(rows) for x0, x1 in pairwise(cols)]


def grown_area(core: Box, shape: tuple[int, int], overlap: int) -> int:
    """Pixels a tile reads: its core grown by ``overlap`` on every side, clipped to the image."""
    y0, y1, x0, x1 = core
    return (min(y1 + overlap, shape[0]) - max(y0 - overlap, 0)) * (min(x1 + overlap, shape[1]) - max(x0 - overlap, 0))


def assign_tiles(tiles: list[Box], shape: tuple[int, int], overlap: int, jobs: int) -> list[list[int]]:
    """Tile indices for each of ``jobs`` parallel jobs, balanced by the pixels each tile reads.

    Largest tile first, each to the job with the least work so far (ties: lowest job number).
    """
    loads, assigned = [(0, j) for j in range(jobs)], [[] for _ in range(jobs)]  # a heap of (load, job)
    work = [grown_area(tile, shape, overlap) for tile in tiles]
    for n in sorted(range(len(tiles)), key=lambda n: (-work[n], n)):
        load, job = heapq.heappop(loads)
        heapq.heappush(loads, (load + work[n], job))
        assigned[job].append(n)
    return [sorted(indices) for indices in assigned]


def job_tiles(shape: tuple[int, int], tile_size: int, overlap: int, jobs: int) -> tuple[list[Box], list[list[int]]]:
    """Core tiles for ``jobs`` parallel jobs and the indices of the tiles each job segments.

    Among grids with tiles of at most ``tile_size`` (up to ``min(jobs, MAX_EXTRA_PARTS)`` more parts
    per axis than the fewest), picks the one whose busiest job reads the fewest pixels (core +
    overlap), then the fewest in total: e.g. 4 jobs on a 2878 x 4237 px image with 2048 px tiles get
    2 x 4 tiles, two each, not 2 x 3 tiles shared 2, 2, 1, 1. (A slide of many tiles per job shares
    its fewest tiles evenly enough; the bound keeps the search small at thousands of jobs.)
    """
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    fewest = [math.ceil(size / tile_size) for size in shape]
    extra = min(jobs, MAX_EXTRA_PARTS)
    best = None
    for ny in range(fewest[0], min(fewest[0] + extra, shape[0]) + 1):
        for nx in range(fewest[1], min(fewest[1] + extra, shape[1]) + 1):
            tiles = even_grid(shape, (ny, nx))
            assigned = assign_tiles(tiles, shape, overlap, jobs)
            work = [grown_area(tile, shape, overlap) for tile in tiles]
            cost = (max(sum(work[n] for n in indices) for indices in assigned), sum(work))
            if best is None or cost < best[0]:
                best = (cost, tiles, assigned)
    return best[1], best[2]


@dataclass(frozen=True)
class TileResult:
    """Instances one tile keeps: those whose centroid lies in its core.

    Attributes
    ----------
    box : tuple of int
        Native box ``(y0, y1, x0, x1)`` that ``labels`` covers (the core grown by the overlap).
    labels : (y1 - y0, x1 - x0) uint32 ndarray
        Kept instances numbered 1..n in order of first appearance; 0 elsewhere.
    """

    box: Box
    labels: np.ndarray

    @property
    def count(self) -> int:
        return int(self.labels.max(initial=0))


def segment_tile(view: ScaledImage, core: Box, engine, calibration: dict, overlap: int) -> TileResult:
    """Segment one core tile (native box) with ``overlap`` px of context on every side.

    Parameters
    ----------
    view : ScaledImage
        The image at ``engine``'s working scale.
    core : tuple of int
        Native core box; only instances whose centroid falls inside it are kept.
    engine : Engine
        See :mod:`atlas.science.segmentation`.
    calibration : dict
        ``engine.calibrate`` of :func:`calibration_sample` of the whole image.
    overlap : int
        Context (native px) around the core; must exceed the largest nucleus diameter.
    """
    height, width = view.native_shape
    y0, y1, x0, x1 = core
    box = (max(y0 - overlap, 0), min(y1 + overlap, height), max(x0 - overlap, 0), min(x1 + overlap, width))
    work_box = view.native_box_to_working(box)
    labels = view.labels_to_native(engine.segment(view, work_box, calibration), work_box, box)
    return TileResult(box, keep_centred(labels, box, core))


def keep_centred(labels: np.ndarray, box: Box, core: Box) -> np.ndarray:
    """Keep the instances of ``labels`` (covering ``box``) whose centroid lies in ``core``.

    Returns a uint32 label image numbered 1..n in order of first appearance (row-major).
    """
    flat = labels.ravel()
    ids, first, inverse, counts = np.unique(flat, return_index=True, return_inverse=True, return_counts=True)
    rows, cols = np.divmod(np.arange(flat.size), labels.shape[1])
    cy = np.bincount(inverse, weights=rows, minlength=ids.size) / counts + box[0]
    cx = np.bincount(inverse, weights=cols, minlength=ids.size) / counts + box[2]
    keep = (ids != 0) & (cy >= core[0]) & (cy < core[1]) & (cx >= core[2]) & (cx < core[3])
    new_ids = np.zeros(ids.size, dtype=np.uint32)
    order = np.argsort(first[keep], kind="stable")
    new_ids[np.flatnonzero(keep)[order]] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return new_ids[inverse].reshape(labels.shape)


def paint_tiles(results: Iterable[TileResult], out) -> int:
    """Paint tile results into ``out`` with globally unique ids; returns the number of ids used.

    Tiles are painted in order, each instance only onto background, so an instance that two
    tiles disagree about at a seam cannot overwrite its neighbour. Ids are offset by the count
    of earlier tiles; call :func:`relabel_sequential_blocks` afterwards to close gaps.
    """
    offset = 0
    for result in results:
        y0, y1, x0, x1 = result.box
        region = np.asarray(out[y0:y1, x0:x1])
        paint = (result.labels > 0) & (region == 0)
        region[paint] = result.labels[paint] + np.uint32(offset)
        out[y0:y1, x0:x1] = region
        offset += result.count
    return offset


def sequential_lut(labels, n_ids: int, blocks: Iterable[Box]) -> np.ndarray:
    """(n_ids + 1,) uint32 map of the ids of ``labels`` (read in ``blocks``) onto 1..n in order of id, 0 to 0."""
    present = np.zeros(n_ids + 1, dtype=bool)
    for y0, y1, x0, x1 in blocks:
        present[np.unique(np.asarray(labels[y0:y1, x0:x1]))] = True
    present[0] = False
    lut = np.zeros(n_ids + 1, dtype=np.uint32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.uint32)
    return lut


def relabel_sequential_blocks(labels, n_ids: int, block: int = 4096) -> int:
    """Renumber ``labels`` in place to 1..n (in order of id), block by block; returns n."""
    lut = sequential_lut(labels, n_ids, tile_grid(labels.shape, block))
    for y0, y1, x0, x1 in tile_grid(labels.shape, block):
        labels[y0:y1, x0:x1] = lut[np.asarray(labels[y0:y1, x0:x1])]
    return int(lut.max(initial=0))


def chunk_grid(shape: tuple[int, int], block: int) -> list[Box]:
    """Blocks of ``block`` x ``block`` px from the origin (the last ones cut by the image's edge), row
    by row: each covers whole chunks of an array chunked by a divisor of ``block``."""
    return [(y, min(y + block, shape[0]), x, min(x + block, shape[1]))
            for y in range(0, shape[0], block) for x in range(0, shape[1], block)]


def merge_tiles(results: Iterable[TileResult], canvas, nuclei, cells, distance_px: float, block: int = 4096) -> int:
    """Nucleus and cell label images of a whole slide from its tiles, block by block.

    The same labels as :func:`paint_tiles` into one image, :func:`relabel_sequential_blocks` and
    :func:`expand_to_cells`, without holding or mapping the whole image: the tiles are painted into
    ``canvas`` (e.g. a chunked, compressed zarr array in scratch), then each block of
    :func:`chunk_grid` is renumbered and grown (with the margin growing needs) and written once to
    ``nuclei`` and ``cells`` (e.g. zarr arrays chunked by a divisor of ``block``).

    Parameters
    ----------
    results : iterable of TileResult
        In tile order.
    canvas : (Y, X) uint32 array-like
        Zero-filled; painted in place.
    nuclei, cells : (Y, X) uint32 array-like
        Written block by block; cell ``i`` contains nucleus ``i``.
    distance_px : float
        Cell expansion distance (px).
    block : int
        Block side (px).

    Returns
    -------
    int
        Nuclei (= cells), labelled 1..n.
    """
    n_ids = paint_tiles(results, canvas)
    shape = tuple(canvas.shape)
    lut = sequential_lut(canvas, n_ids, chunk_grid(shape, block))
    for y0, y1, x0, x1 in chunk_grid(shape, block):
        window, inner = _with_margin(canvas, (y0, y1, x0, x1), distance_px)
        window = lut[window]
        nuclei[y0:y1, x0:x1] = window[inner]
        cells[y0:y1, x0:x1] = _grow(window, distance_px)[inner]
    return int(lut.max(initial=0))


def expand_to_cells(nuclei, cells, distance_px: float, block: int = 4096) -> None:
    """Cell masks: nuclei grown by ``distance_px`` without overlap (``expand_labels``), blockwise.

    Parameters
    ----------
    nuclei : (Y, X) uint32 array-like
        Nucleus labels.
    cells : (Y, X) uint32 array-like
        Written in place; cell ``i`` contains nucleus ``i``.
    distance_px : float
        Expansion distance in pixels.
    """
    for y0, y1, x0, x1 in tile_grid(nuclei.shape, block):
        window, inner = _with_margin(nuclei, (y0, y1, x0, x1), distance_px)
        cells[y0:y1, x0:x1] = _grow(window, distance_px)[inner]


def _with_margin(labels, box: Box, distance_px: float) -> tuple[np.ndarray, tuple[slice, slice]]:
    """``box`` of ``labels`` read with the margin growing by ``distance_px`` needs, and where ``box`` lies in it."""
    y0, y1, x0, x1 = box
    margin = math.ceil(distance_px) + 1
    oy0, ox0 = max(y0 - margin, 0), max(x0 - margin, 0)
    window = np.asarray(labels[oy0:min(y1 + margin, labels.shape[0]), ox0:min(x1 + margin, labels.shape[1])])
    return window, (slice(y0 - oy0, y1 - oy0), slice(x0 - ox0, x1 - ox0))


def _grow(labels: np.ndarray, distance_px: float) -> np.ndarray:
    return expand_labels(labels, distance_px) if distance_px > 0 else labels


def segment_image(plane, engine, *, pixel_size_um: float | None = None, tile_size: int = 2048,
                  overlap: int = 128, out=None, on_tile: Callable[[], None] | None = None) -> np.ndarray:
    """Nucleus instances of a whole 2-D image, tile by tile.

    Parameters
    ----------
    plane : (Y, X) array-like
        Nucleus channel, any numeric dtype.
    engine : Engine
        A segmentation engine (:func:`atlas.science.segmentation.make_engine`).
    pixel_size_um : float, optional
        Native pixel size (µm); None assumes the engine's working scale.
    tile_size, overlap : int
        Core tile size and overlap in native pixels.
    out : (Y, X) uint32 array-like, optional
        Zero-filled destination (e.g. a memmap for images larger than memory).
    on_tile : callable, optional
        Called after each tile (progress display).

    Returns
    -------
    (Y, X) uint32 ndarray or ``out``
        Labels 1..n, 0 background.
    """
    engine, view = working_view(plane, engine, pixel_size_um)
    calibration = engine.calibrate(calibration_sample(view))
    if out is None:
        out = np.zeros(view.native_shape, dtype=np.uint32)

    def results() -> Iterable[TileResult]:
        for core in tile_grid(view.native_shape, tile_size):
            yield segment_tile(view, core, engine, calibration, overlap)
            if on_tile:
                on_tile()

    relabel_sequential_blocks(out, paint_tiles(results(), out))
    return out


def working_view(plane, engine, pixel_size_um: float | None):
    """``engine`` set to the working scale it picks for ``plane``, and ``plane`` seen at that scale.

    Parameters
    ----------
    plane : (Y, X) array-like
        Native pixels.
    engine : Engine
        As :func:`atlas.science.segmentation.make_engine` returns it.
    pixel_size_um : float or None
        Native pixel size (µm); None assumes the engine's reference scale (``engine.pixel_size_um``).

    Returns
    -------
    engine : Engine
        ``engine.scaled_for(pixel_size_um)``; its ``pixel_size_um`` is the working scale.
    view : ScaledImage
    """
    if pixel_size_um is not None and not pixel_size_um > 0:
        raise ValueError(f"pixel size must be positive, got {pixel_size_um} µm")
    native = pixel_size_um or engine.pixel_size_um
    engine = engine.scaled_for(pixel_size_um)
    return engine, ScaledImage(plane, native / engine.pixel_size_um)
