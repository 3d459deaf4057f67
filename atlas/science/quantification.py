"""Per-cell quantification: MCQuant's single-cell feature table, exact and in bounded memory.

One table per label image (mask), one row per label in ascending order, columns exactly as
MCQuant (labsyspharm/quantification) writes them::

    CellID, <marker_1>, ..., <marker_N>, X_centroid, Y_centroid, Area, MajorAxisLength,
    MinorAxisLength, Eccentricity, Solidity, Extent, Orientation

Marker columns are mean raw pixel values inside the label. Morphology follows
``skimage.measure.regionprops`` (pixels; ``Orientation`` in radians, skimage's convention).

How it stays exact, fast and lean
---------------------------------
The image and masks are read once, in row strips of full width (a multiple of the file's tile
height), one channel at a time, the next block read while the current one is summed; memory is
a few strips whatever the slide's height or channel count. Where the image takes column slices
(zarr) and is 8- or 16-bit, a strip of the channels can be summed in column blocks of whole chunks
(``by_columns``; what the row bands of a wide slide use), so that memory does not grow with its width.

* Means: per strip and channel one ``np.bincount`` with float64 weights. The running sums of the
  labels present in the strip are prepended to the strip's pixels, so every label's pixels are
  added one by one in raster order starting from 0.0 -- the very additions
  ``scipy.ndimage.mean`` makes over the whole image, hence bit-identical results for any dtype.
* Morphology: from the masks' row runs (maximal horizontal stretches of one label), gathered in
  the same pass that indexes the means. Area, centroid and second moments are integer sums over runs in closed form; the
  convex hull that ``Solidity`` needs is built for all labels at once with Andrew's monotone
  chain run in lock-step over labels, and its pixels are counted in exact integer arithmetic.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

from atlas.science.imageio import read_ahead

if TYPE_CHECKING:  # pandas (~0.3 s to import) only where a table is built: measuring needs numpy alone
    import pandas as pd

ID_COLUMN = "CellID"
MORPHOLOGY_COLUMNS = ("X_centroid", "Y_centroid", "Area", "MajorAxisLength", "MinorAxisLength",
                      "Eccentricity", "Solidity", "Extent", "Orientation")
STRIP_PIXELS = 1 << 22  # smallest strip worth a numpy call when the file's tiles are short
BATCH_RUNS = 1 << 19    # runs per morphology batch: ~150 MB of temporaries


def marker_columns(names: Sequence[str]) -> list[str]:
    """Column names of the markers, with MCQuant's rule for repeated names.

    Every occurrence of a name that appears more than once gets ``_1``, ``_2``, ... in order,
    the first included (``["DNA", "CD3", "DNA"]`` -> ``["DNA_1", "CD3", "DNA_2"]``).
    """
    names = list(names)
    return [f"{n}_{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def table_columns(marker_names: Sequence[str]) -> list[str]:
    """All columns of a table, in MCQuant's order."""
    return [ID_COLUMN, *marker_columns(marker_names), *MORPHOLOGY_COLUMNS]


def strip_rows(array, width: int) -> int:
    """Rows per strip: a multiple of the array's chunk height holding at least ``STRIP_PIXELS``.

    Parameters
    ----------
    array : array-like
        A zarr array (its ``chunks`` are the file's tiles or strips) or a numpy array.
    width : int
        Image width (px).
    """
    chunks = getattr(array, "chunks", None)
    base = int(chunks[-2]) if chunks else 1
    return base * max(1, -(-STRIP_PIXELS // (base * max(width, 1))))


def column_blocks(array, width: int, rows: int) -> list[tuple[int, int]]:
    """Column ranges ``[c0, c1)`` a strip of ``rows`` rows of the channels is summed in: whole chunk
    columns of the array holding about :data:`STRIP_PIXELS`, so that what a strip holds while it is
    summed does not grow with the image's width. One block of full width for an array without
    chunks, and for images other than 8- and 16-bit integers: only there is every running sum an
    integer below 2**53, exact in float64 whatever the order its pixels are added in.
    """
    chunks = getattr(array, "chunks", None)
    if not chunks or not (np.issubdtype(array.dtype, np.integer) and np.dtype(array.dtype).itemsize <= 2):
        return [(0, width)]
    base = int(chunks[-1])
    step = base * max(1, STRIP_PIXELS // (base * max(rows, 1)))
    return [(c0, min(c0 + step, width)) for c0 in range(0, width, step)]


def _row_runs(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal value along each row of a (h, w) block, in raster order.

    Returns
    -------
    starts : (R,) int64
        Flat index of each run's first pixel in ``block``.
    values : (R,) block.dtype
        Label of each run (0 = background included).
    lengths : (R,) int64
        Pixels in each run; runs never cross rows.
    """
    h, w = block.shape
    edge = np.empty((h, w), dtype=bool)
    edge[:, 0] = True
    np.not_equal(block[:, 1:], block[:, :-1], out=edge[:, 1:])
    starts = np.flatnonzero(edge)
    return starts, block.ravel()[starts], np.diff(starts, append=block.size)


def _ceil_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return -((-num) // den)


def _square_sum(m: np.ndarray) -> np.ndarray:
    """0² + 1² + ... + m² for integer m >= -1."""
    return m * (m + 1) * (2 * m + 1) // 6


def _lower_hull_edges(t: np.ndarray, v: np.ndarray, length: np.ndarray):
    """Edges of the lower convex hulls of many point sequences (Andrew's monotone chain).

    All sequences advance in lock-step, longest first, so each step is a few numpy operations
    on the sequences still active; points are laid out step-major so those are slices.

    Parameters
    ----------
    t, v : (P,) int64
        Points of the sequences one after another, each sorted by ``t`` (equal ``t`` only for
        identical points).
    length : (S,) int64
        Points per sequence (>= 1).

    Returns
    -------
    seq, t0, v0, t1, v1 : (E,) int64
        Sequence of each hull edge and its end points, ``t0 < t1``.
    """
    n_seq = length.size
    order = np.argsort(-length, kind="stable")
    rank = np.empty(n_seq, np.int64)
    rank[order] = np.arange(n_seq)
    longest = int(length.max())
    active = n_seq - np.cumsum(np.bincount(length, minlength=longest + 1))[:longest]
    off = np.r_[0, np.cumsum(active)]
    first = np.cumsum(length) - length
    step = np.arange(t.size) - np.repeat(first, length)
    slot = off[step] + np.repeat(rank, length)
    pt_t, pt_v = np.empty_like(t), np.empty_like(v)
    pt_t[slot], pt_v[slot] = t, v
    st_t, st_v = np.empty_like(t), np.empty_like(v)   # stack slot j of sequence rank r: off[j] + r
    top = np.zeros(n_seq, np.int64)
    at, av, ot, ov = (np.zeros(n_seq, t.dtype) for _ in range(4))  # top and second of each stack
    ranks = np.arange(n_seq)
    for i in range(longest):
        n = int(active[i])
        qt, qv = pt_t[off[i]:off[i] + n], pt_v[off[i]:off[i] + n]
        if i >= 2:
            turn = (at[:n] - ot[:n]) * (qv - ov[:n]) - (av[:n] - ov[:n]) * (qt - ot[:n])
            pop = np.flatnonzero(turn <= 0)
            while pop.size:
                top[pop] -= 1
                at[pop], av[pop] = ot[pop], ov[pop]
                pop = pop[top[pop] >= 2]
                below = off[top[pop] - 2] + pop
                ot[pop], ov[pop] = st_t[below], st_v[below]
                turn = (at[pop] - ot[pop]) * (qv[pop] - ov[pop]) - (av[pop] - ov[pop]) * (qt[pop] - ot[pop])
                pop = pop[turn <= 0]
        push = off[top[:n]] + ranks[:n]
        st_t[push], st_v[push] = qt, qv
        ot[:n], ov[:n] = at[:n], av[:n]
        at[:n], av[:n] = qt, qv
        top[:n] += 1
    edges = top - 1
    r = np.repeat(ranks, edges)
    j = np.arange(r.size) - np.repeat(np.cumsum(edges) - edges, edges)
    s0, s1 = off[j] + r, off[j + 1] + r
    return order[r], st_t[s0], st_v[s0], st_t[s1], st_v[s1]


def _convex_areas(grp: np.ndarray, y: np.ndarray, x0: np.ndarray, x1: np.ndarray,
                  height: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Pixel count of ``skimage.morphology.convex_hull_image`` of every label.

    skimage takes the hull of the label pixels' edge midpoints and counts the pixel centres
    inside it or on its border. In doubled coordinates (all integers), the hull's left side is
    the lower hull of the row extremes' midpoints over ``t = 2 * row``, its right side the lower
    hull of the negated right extremes; per row the pixel centres between the two sides are
    counted with exact integer ceil/floor.

    Parameters
    ----------
    grp, y, x0, x1 : (R,) int64
        Foreground runs sorted by label then raster order: label index, row and first/last
        column, relative to the label's bounding box.
    height, width : (K,) int64
        Bounding-box size of each label.

    Returns
    -------
    (K,) int64
    """
    k = height.size
    # int32 halves the memory traffic; exact while |turn| < 2**31, i.e. labels under 8192 px.
    coord = np.int32 if max(int(height.max()), int(width.max())) < 1 << 13 else np.int64
    first = np.flatnonzero(np.r_[True, (grp[1:] != grp[:-1]) | (y[1:] != y[:-1])])
    last = np.r_[first[1:] - 1, grp.size - 1]
    g, r = grp[first], y[first].astype(coord)
    prev = np.r_[False, (g[1:] == g[:-1]) & (r[1:] == r[:-1] + 1)]
    nxt = np.r_[prev[1:], False]
    chains = []
    for e in (x0[first].astype(coord), -x1[last].astype(coord)):
        # Per row, edge midpoints of its extreme pixel e (the right side negated), in doubled
        # coordinates (t, v = 2x): top (2r - 1, 2e), side (2r, 2e - 1), bottom (2r + 1, 2e).
        # A bottom and the next row's top share t: the outer one is kept as that row's top, so
        # bottoms remain only before a gap or at the end. Points on or inside the chord of their
        # neighbours are no hull vertices and are left out: a side unless e is a local minimum,
        # a shared top unless e jumps by 2 or more.
        e_prev, e_next = np.r_[e[:1], e[:-1]], np.r_[e[1:], e[-1:]]
        keep = np.stack([~prev | (np.abs(e - e_prev) >= 2),
                         (~prev | (e <= e_prev)) & (~nxt | (e <= e_next)), ~nxt], axis=1)
        t = np.stack([2 * r - 1, 2 * r, 2 * r + 1], axis=1)[keep]
        v = np.stack([2 * np.where(prev, np.minimum(e, e_prev), e), 2 * e - 1, 2 * e], axis=1)[keep]
        chains.append((t, v, np.bincount(g, weights=keep.sum(axis=1), minlength=k).astype(np.int64)))
    t, v, length = (np.concatenate(c) for c in zip(*chains, strict=True))
    seq, t0, v0, t1, v1 = _lower_hull_edges(t, v, length)
    # Each edge [t0, t1) covers the pixel rows t = 2 * row in it; per row ceil(v / 2) of the hull.
    e0 = t0 + (t0 & 1)
    n_rows = np.maximum((t1 - e0 + 1) // 2, 0)
    q = np.repeat(np.arange(seq.size), n_rows)
    dt = (t1 - t0)[q]
    qt = e0[q] + 2 * (np.arange(q.size, dtype=coord) - np.repeat((np.cumsum(n_rows) - n_rows).astype(coord), n_rows))
    side = _ceil_div(v0[q] * dt + (v1 - v0)[q] * (qt - t0[q]), 2 * dt)
    sums = np.bincount(seq[q], weights=side, minlength=2 * k).astype(np.int64)
    return height - sums[:k] - sums[k:]


@dataclass(frozen=True)
class Morphology:
    """Shape features of every label of a mask.

    Attributes
    ----------
    labels : (K,) int64
        Label values, ascending (the table's ``CellID``).
    area : (K,) int64
        Pixels per label.
    columns : dict of str to (K,) float64
        ``MORPHOLOGY_COLUMNS``, as ``skimage.measure.regionprops`` computes them: centroid (px,
        X = column, Y = row), area (px), axis lengths (px), eccentricity, solidity, extent,
        orientation (rad).
    """

    labels: np.ndarray
    area: np.ndarray
    columns: dict[str, np.ndarray]


def _features(label: np.ndarray, row: np.ndarray, col: np.ndarray, length: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Labels, areas and morphology columns from runs sorted by label (raster order within)."""
    label, row, col, length = (np.asarray(x, np.int64) for x in (label, row, col, length))
    first = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    labels = label[first]
    k = labels.size
    last = np.r_[first[1:], label.size] - 1
    grp = np.repeat(np.arange(k), last - first + 1)
    area = np.add.reduceat(length, first)
    rmin, rmax = row[first], row[last]
    cmin = np.minimum.reduceat(col, first)
    cmax = np.maximum.reduceat(col + length - 1, first)
    # Integer moments about the bounding-box corner (exact; regionprops' local frame).
    y = row - rmin[grp]
    x0 = col - cmin[grp]
    x1 = x0 + length - 1
    sx = (x0 + x1) * length // 2
    s_y, s_yy, s_x, s_xx, s_xy = (np.add.reduceat(a, first) for a in (
        length * y, length * y * y, sx, _square_sum(x1) - _square_sum(x0 - 1), y * sx))
    n = area.astype(np.float64)
    mu_yy = s_yy - s_y.astype(np.float64) ** 2 / n
    mu_xx = s_xx - s_x.astype(np.float64) ** 2 / n
    mu_xy = s_xy - s_x.astype(np.float64) * s_y / n
    # Inertia tensor [[a, b], [b, c]] as skimage.measure.inertia_tensor forms it.
    a = (mu_yy + mu_xx - mu_yy) / n
    c = (mu_yy + mu_xx - mu_xx) / n
    b = -mu_xy / n
    radius = np.hypot((a - c) / 2, b)
    l1 = np.maximum((a + c) / 2 + radius, 0.0)
    l2 = np.maximum((a + c) / 2 - radius, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        eccentricity = np.where(l1 > 0, np.sqrt(np.minimum(2 * radius / l1, 1.0)), 0.0)
    orientation = np.where(a - c == 0, np.where(b < 0, np.pi / 4, -np.pi / 4), 0.5 * np.arctan2(-2 * b, c - a))
    height, width = rmax - rmin + 1, cmax - cmin + 1
    convex = _convex_areas(grp, y, x0, x1, height, width)
    columns = {
        "X_centroid": (area * cmin + s_x) / n,
        "Y_centroid": (area * rmin + s_y) / n,
        "Area": n,
        "MajorAxisLength": 4 * np.sqrt(l1),
        "MinorAxisLength": 4 * np.sqrt(l2),
        "Eccentricity": eccentricity,
        "Solidity": n / convex,
        "Extent": n / (height * width),
        "Orientation": orientation,
    }
    return labels, area, columns


def morphology_from_runs(label: np.ndarray, row: np.ndarray, col: np.ndarray, length: np.ndarray,
                         batch_runs: int = BATCH_RUNS) -> Morphology:
    """Morphology of every label from its row runs, ``batch_runs`` runs of whole labels at a time.

    Parameters
    ----------
    label, row, col, length : (R,) integer ndarray
        Foreground runs in raster order: label, row, first column, pixels.
    batch_runs : int
        Runs per batch (bounds the memory of the hull computation).
    """
    order = np.argsort(label, kind="stable")
    ordered = label[order]
    parts = []
    if ordered.size:
        first = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # where each label starts
        # batches start at the first label starting at or after every multiple of batch_runs
        starts = first[np.minimum(np.searchsorted(first, np.arange(0, ordered.size, batch_runs)), first.size - 1)]
        parts = [_features(ordered[a:b], row[order[a:b]], col[order[a:b]], length[order[a:b]])
                 for a, b in pairwise(np.unique(np.r_[starts, ordered.size]))]
    if not parts:
        return Morphology(np.empty(0, np.int64), np.empty(0, np.int64), {c: np.empty(0) for c in MORPHOLOGY_COLUMNS})
    return Morphology(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                      {c: np.concatenate([p[2][c] for p in parts]) for c in MORPHOLOGY_COLUMNS})


class NegativeLabels(ValueError):
    """A mask holds labels below 0; ``mask`` is the mask's name as given to :func:`quantify`."""

    def __init__(self, mask: str):
        self.mask = mask
        super().__init__(f"mask {mask!r} has negative labels; labels must be >= 0 (0 = background)")


def _rows(array, r0: int, r1: int, channel: int = 0, columns: slice = slice(None)) -> np.ndarray:
    """Rows ``r0:r1`` (and ``columns``) of a (Y, X) array or of one channel of a (C, Y, X) array, as numpy."""
    if array.ndim == 2:
        return np.ascontiguousarray(array[r0:r1] if columns == slice(None) else array[r0:r1, columns])
    return np.ascontiguousarray(array[channel, r0:r1] if columns == slice(None) else array[channel, r0:r1, columns])


def _block_runs(runs: tuple[np.ndarray, ...], c0: int, c1: int) -> tuple[np.ndarray, ...]:
    """The (label, row, column, length) runs of a strip clipped to columns ``[c0, c1)``, columns from ``c0``."""
    values, row, col, lengths = runs
    start, end = np.maximum(col, c0), np.minimum(col + lengths, c1)
    keep = end > start
    return values[keep], row[keep], start[keep] - c0, (end - start)[keep]


class _RunningSums:
    """Per-label float64 sums of several channels, grown strip by strip in raster order.

    Labels are added as strips reveal them (sorted, with their sums), so a single pass over the
    masks serves both the shape features and the means.
    """

    def __init__(self, n_channels: int):
        self.labels = np.empty(0, np.int64)
        self.sums = np.zeros((n_channels, 0))

    def positions(self, present: np.ndarray) -> np.ndarray:
        """Columns of ``self.sums`` of the (sorted, unique) ``present`` labels, adding new ones."""
        at = np.searchsorted(self.labels, present)
        known = at < self.labels.size
        known[known] = self.labels[at[known]] == present[known]
        if not known.all():
            new = present[~known]
            where = np.searchsorted(self.labels, new)
            self.labels = np.insert(self.labels, where, new)
            self.sums = np.insert(self.sums, where, 0.0, axis=1)
            at = np.searchsorted(self.labels, present)
        return at


def _strip_runs(block: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground row runs of a mask strip: flat start, label, length (see :func:`_row_runs`)."""
    starts, values, lengths = _row_runs(block)
    keep = values != 0
    if keep.any() and values[keep].min() < 0:
        raise NegativeLabels(name)
    return starts[keep], values[keep], lengths[keep]


def _strip_index(starts: np.ndarray, values: np.ndarray, lengths: np.ndarray, size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where a strip's foreground pixels are and which label each has, from its foreground runs.

    Parameters
    ----------
    starts, values, lengths : (R,) arrays
        The strip's foreground runs in raster order: flat start, label, length.
    size : int
        Pixels in the strip.

    Returns
    -------
    present : (L,) label values in the strip, ascending.
    index : (L + F,) intp
        ``0..L-1`` (where the running sums go), then the local label index of each of the F
        foreground pixels in raster order.
    foreground : (size,) bool
        The strip's foreground pixels (1 byte a pixel where their flat positions took 8 a foreground pixel).
    """
    present, inverse = np.unique(values, return_inverse=True)
    n = present.size
    index = np.repeat(np.r_[np.arange(n), inverse.ravel()], np.r_[np.ones(n, np.int64), lengths])
    # background before each run, then the run, then background to the strip's end
    gaps = starts - np.r_[0, starts[:-1] + lengths[:-1]]
    end = int(starts[-1] + lengths[-1]) if starts.size else 0
    counts = np.column_stack([gaps, lengths]).ravel()
    foreground = np.repeat(np.tile(np.array([False, True]), starts.size), counts)
    return present, index, np.concatenate([foreground, np.zeros(size - end, bool)])


def _sum_block(sums: Mapping[str, _RunningSums], block_runs: Mapping[str, tuple[np.ndarray, ...]], r0: int, r1: int,
               width: int, planes: Iterable[np.ndarray]) -> None:
    """Add a block of rows ``r0:r1`` and ``width`` columns of every channel (``planes``, flat, in channel
    order) to each mask's running sums, indexed by the mask's runs in the block (columns from its left)."""
    index = {}
    for name, (values, row, col, lengths) in block_runs.items():
        if values.size:
            present, idx, foreground = _strip_index((row - r0).astype(np.int64) * width + col, values, lengths,
                                                    (r1 - r0) * width)
            index[name] = (sums[name].positions(present), idx, foreground, np.empty(idx.size))
    for j, plane in enumerate(planes):
        for name, (pos, idx, foreground, weights) in index.items():
            # Running sums first, then the pixels: each label's float64 additions happen in raster order
            # (of the block) from 0.0, as one bincount over the whole image makes them (any order where
            # column_blocks splits the rows: integer sums, exact).
            weights[:pos.size] = sums[name].sums[j, pos]
            weights[pos.size:] = plane[foreground]
            sums[name].sums[j, pos] = np.bincount(idx, weights=weights, minlength=pos.size)


def _strips_morphology(strip_runs: list[tuple[np.ndarray, ...]]) -> Morphology:
    """:func:`morphology_from_runs` of the (label, row, column, length) runs of every strip."""
    return morphology_from_runs(*(np.concatenate(part) for part in zip(*strip_runs, strict=True)))


def measure(image, masks: Mapping[str, object], channels: Sequence[int], *, rows: int | None = None,
            by_columns: bool = False, progress: Callable[[int], None] | None = None
            ) -> dict[str, tuple[Morphology, np.ndarray]]:
    """Shape of every label of each mask and its mean in each channel, reading every pixel once.

    Parameters
    ----------
    image : (C, Y, X) or (Y, X) array-like
        Numpy or zarr; read strip by strip, each strip of each channel once for all masks.
    masks : dict of str to (Y, X) integer array-like
    channels : sequence of int
        Image channels to measure, in output order.
    rows : int, optional
        Rows per strip (default :func:`strip_rows` of the image).
    by_columns : bool
        Sum each strip of the channels in :func:`column_blocks` (the image must take column slices,
        e.g. zarr): what is held while summing stops growing with the image's width.
    progress : callable, optional
        Called with the number of rows done after each mask strip and each image strip.

    Returns
    -------
    dict of str to (Morphology, (K, len(channels)) float64 means)

    Notes
    -----
    Means are bit-identical to ``scipy.ndimage.mean`` for every dtype: per strip and channel one
    ``np.bincount`` over the foreground pixels, with the running sums of the labels present in
    the strip prepended to its pixels, so every label's float64 additions happen one by one in
    raster order from 0.0 -- the very additions of one bincount over the whole image. The masks
    are read first, strip by strip, and kept only as their foreground row runs (~16 bytes a run):
    these give the shape features (:func:`morphology_from_runs`, computed in a thread while the
    channels are summed) and index the means. Then the channels, strip by strip. The next block
    is always read while the current one is worked on.
    """
    height, width = image.shape[-2:]
    rows = rows or strip_rows(image, width)
    strips = [(r0, min(r0 + rows, height)) for r0 in range(0, height, rows)]
    columns = column_blocks(image, width, rows) if by_columns else [(0, width)]
    sums = {name: _RunningSums(len(channels)) for name in masks}
    runs: dict[str, list] = {name: [] for name in masks}

    def reads() -> Iterator[Callable[[], np.ndarray]]:
        for r0, r1 in strips:
            for mask in masks.values():
                yield lambda mask=mask, r0=r0, r1=r1: _rows(mask, r0, r1)
        for r0, r1 in strips:
            for c0, c1 in columns:
                cut = slice(None) if (c0, c1) == (0, width) else slice(c0, c1)
                for channel in channels:
                    yield lambda channel=channel, r0=r0, r1=r1, cut=cut: _rows(image, r0, r1, channel, cut).ravel()

    blocks = read_ahead(reads())
    for r0, r1 in strips:   # the masks, strip by strip: their foreground row runs
        for name in masks:
            starts, values, lengths = _strip_runs(next(blocks), name)
            runs[name].append((values, (starts // width + r0).astype(np.int32),
                               (starts % width).astype(np.int32), lengths.astype(np.int32)))
            if progress:
                progress(r1 - r0)
    with ThreadPoolExecutor(1, thread_name_prefix="morphology") as pool:
        # shapes in a thread while the channels are summed (numpy releases the GIL in both)
        shapes = {name: pool.submit(_strips_morphology, runs[name]) for name in masks}
        for k, (r0, r1) in enumerate(strips):
            for c0, c1 in columns:   # one block of full width: the strip's runs as they are
                block_runs = {name: runs[name][k] if len(columns) == 1 else _block_runs(runs[name][k], c0, c1)
                              for name in masks}
                _sum_block(sums, block_runs, r0, r1, c1 - c0, (next(blocks) for _ in channels))
            if progress:
                progress(r1 - r0)
        result = {}
        for name in masks:
            shape = shapes[name].result()
            if not np.array_equal(shape.labels, sums[name].labels):
                raise AssertionError(f"mask {name!r}: labels of the shape and mean passes differ")
            result[name] = (shape, (sums[name].sums / shape.area.astype(np.float64)).T)
    return result


def feature_table(morphology: Morphology, means: np.ndarray, marker_names: Sequence[str]) -> pd.DataFrame:
    """Assemble one MCQuant table.

    Parameters
    ----------
    morphology : Morphology
    means : (K, N) float64
        Mean intensities, one column per marker.
    marker_names : sequence of str
        N names (repeats get MCQuant's suffixes).
    """
    import pandas as pd

    data = {ID_COLUMN: morphology.labels.astype(np.int64)}
    columns = np.asarray(means, np.float64).reshape(-1, len(marker_names)).T
    data.update(zip(marker_columns(marker_names), columns, strict=True))
    data.update(morphology.columns)
    return pd.DataFrame(data, columns=table_columns(marker_names))


def quantify(image, masks: Mapping[str, object], marker_names: Sequence[str], *,
             channels: Sequence[int] | None = None, rows: int | None = None, by_columns: bool = False,
             progress: Callable[[int], None] | None = None) -> dict[str, pd.DataFrame]:
    """MCQuant's single-cell table of each mask.

    Parameters
    ----------
    image : (C, Y, X) or (Y, X) array-like
        Registered image (numpy or zarr, read by row strips).
    masks : dict of str to (Y, X) integer array-like
        Label images of the same (Y, X) shape, 0 = background (e.g. ``{"cell": ..., "nuclei": ...}``).
    marker_names : sequence of str
        Name of each measured channel (the marker columns, in order).
    channels : sequence of int, optional
        Image channels measured, one per name (default ``range(len(marker_names))``); channels
        left out (markers.csv ``remove``) are never read.
    rows : int, optional
        Rows per strip (default: from the arrays' chunking, see :func:`strip_rows`).
    by_columns : bool
        As for :func:`measure`.
    progress : callable, optional
        Called with rows done; the total is ``Y * (len(masks) + 1)``.

    Returns
    -------
    dict of str to pandas.DataFrame
        One table per mask, columns :func:`table_columns`, one row per label (ascending).

    Raises
    ------
    ValueError
        Shapes or counts that do not fit, a non-integer or negative mask.
    """
    channels = list(range(len(marker_names)) if channels is None else channels)
    n_channels = image.shape[0] if image.ndim == 3 else 1
    if len(channels) != len(marker_names):
        raise ValueError(f"{len(marker_names)} marker names for {len(channels)} channels")
    if image.ndim not in (2, 3) or any(not 0 <= c < n_channels for c in channels):
        raise ValueError(f"image of shape {image.shape} has no channels {channels}")
    for name, mask in masks.items():
        if mask.shape[-2:] != image.shape[-2:] or not (mask.ndim == 2 or mask.shape[0] == 1):
            raise ValueError(f"mask {name!r} has shape {mask.shape}, the image {image.shape}: "
                             "the mask must cover the image pixel for pixel")
        if not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(f"mask {name!r} has dtype {mask.dtype}; labels must be integers")
    measured = measure(image, masks, channels, rows=rows, by_columns=by_columns, progress=progress)
    return {name: feature_table(shape, means, marker_names) for name, (shape, means) in measured.items()}
