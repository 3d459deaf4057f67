"""Stitching and cycle registration: ASHLAR's aligners, our bounded-memory mosaic.

The science, without file layout: tiles come in as :class:`TileSet` objects (ASHLAR's reader
protocol over any ``read(tile, channel)`` function), :func:`align_cycles` runs ASHLAR's
``EdgeAligner`` on the first cycle and ``LayerAligner`` on every later one, and
:class:`MosaicImage` is a lazy ``(C, Y, X)`` array-like that assembles any strip of any channel
from the tiles on demand, so the pyramid writers (:mod:`atlas.science.pyramid`) stream it to disk
without ever holding a whole channel plane.

Placement differs from ASHLAR's ``Mosaic`` on purpose: tiles are placed at whole-pixel
positions (ASHLAR's sub-pixel position rounded, error ≤ 0.5 px) and every mosaic pixel is copied
from exactly one tile: the one in which it lies deepest (farthest from that tile's edge; ties go
to the lower tile index). ASHLAR instead resamples each tile by a cubic-spline sub-pixel shift
and blends overlaps linearly, so its output pixels are not measured values. Ours are, which is
what per-cell quantification wants, and taking overlap pixels from the tile interior avoids the
darker tile borders (vignetting) without blending.

Coordinates are image orientation throughout: ``(y, x)`` with y growing downwards, in pixels of
the first cycle unless a name says ``_um``.
"""
from __future__ import annotations

import contextlib
import io
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

# A later cycle counts as registered when at least this many of its tiles (or all of them, for
# smaller cycles) registered consistently with ASHLAR's model of the first cycle.
MIN_REGISTERED_TILES = 3


@dataclass(frozen=True)
class TileMetadata:
    """The part of ASHLAR's ``Metadata`` protocol the aligners use.

    Attributes
    ----------
    positions : (N, 2) float ndarray
        Nominal top-left (y, x) of each tile in pixels (stage positions / pixel size).
    size : (2,) int ndarray
        Tile (height, width) in pixels.
    num_channels : int
    pixel_size : float
        µm per pixel.
    pixel_dtype : numpy.dtype
    """

    positions: np.ndarray
    size: np.ndarray
    num_channels: int
    pixel_size: float
    pixel_dtype: np.dtype

    @property
    def num_images(self) -> int:
        return len(self.positions)

    _num_images = num_images

    @property
    def origin(self) -> np.ndarray:
        return self.positions.min(axis=0)

    @property
    def centers(self) -> np.ndarray:
        return self.positions + self.size / 2

    def tile_position(self, i: int) -> np.ndarray:
        return self.positions[i]

    def tile_size(self, i: int) -> np.ndarray:
        return self.size


class TileSet:
    """One cycle's tiles as an ASHLAR reader (``reader.metadata``, ``reader.read(series, c)``).

    Parameters
    ----------
    read_tile : callable (tile index, channel index) -> (Y, X) ndarray
        Pixels of one channel of one tile.
    positions_um : (N, 2) float array
        Top-left (y, x) of each tile in µm, image orientation (y down).
    tile_shape : (int, int)
        (Y, X) of every tile.
    n_channels : int
    dtype : numpy dtype
    pixel_size_um : float
    flip_x, flip_y : bool
        Negate the stage X / Y axis (ASHLAR's ``--flip-x/--flip-y``), for microscopes whose
        stage axes point the other way.
    """

    def __init__(self, read_tile: Callable[[int, int], np.ndarray], positions_um: np.ndarray,
                 tile_shape: tuple[int, int], n_channels: int, dtype, pixel_size_um: float,
                 *, flip_x: bool = False, flip_y: bool = False):
        signs = np.array([-1.0 if flip_y else 1.0, -1.0 if flip_x else 1.0])
        self._read_tile = read_tile
        self.metadata = TileMetadata(
            positions=np.asarray(positions_um, dtype=float) * signs / pixel_size_um,
            size=np.array(tile_shape, dtype=int), num_channels=int(n_channels),
            pixel_size=float(pixel_size_um), pixel_dtype=np.dtype(dtype))

    @classmethod
    def from_array(cls, tiles: np.ndarray, positions_um: np.ndarray, pixel_size_um: float,
                   **flips: bool) -> TileSet:
        """Tiles held in memory: ``tiles`` is (N, C, Y, X)."""
        return cls(lambda t, c: tiles[t, c], positions_um, tiles.shape[2:], tiles.shape[1], tiles.dtype,
                   pixel_size_um, **flips)

    def read(self, series: int, c: int) -> np.ndarray:
        return np.asarray(self._read_tile(series, c))


@dataclass
class CycleAlignment:
    """Where one cycle's tiles go in the mosaic, and how well they got there.

    Attributes
    ----------
    positions : (N, 2) float ndarray
        Aligned top-left (y, x) of each tile, mosaic pixels (sub-pixel, ASHLAR's result).
    nominal : (N, 2) float ndarray
        Stage positions in pixels, shifted so the first cycle's nominal origin is (0, 0).
    errors : (N,) float ndarray
        Alignment error per tile (ASHLAR's −log normalised correlation; lower is better, inf when
        nothing could be measured). First cycle: the best of the tile's edges to its neighbours.
    aligned : (N,) bool ndarray
        True where the tile's position was measured from image content; False where it was
        predicted from the stage position and ASHLAR's fitted model (blank tiles, failures).
    registered : bool
        Cycle-level verdict: True for the first cycle; for later cycles, whether enough tiles
        registered consistently (see :data:`MIN_REGISTERED_TILES`).
    offset : (2,) float ndarray
        Later cycles: translation of the cycle relative to the first (pixels); zeros for cycle 1.
    edges : list of dict
        First cycle: one record per neighbouring tile pair (``tile1, tile2, shift_y, shift_x,
        error, accepted``).
    warnings : list of str
        ASHLAR's data warnings raised while aligning this cycle.
    """

    positions: np.ndarray
    nominal: np.ndarray
    errors: np.ndarray
    aligned: np.ndarray
    registered: bool
    offset: np.ndarray
    edges: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def placement(self) -> np.ndarray:
        """(N, 2) int: whole-pixel top-left of each tile in the mosaic (halves round up).

        ASHLAR's positions are multiples of 0.1 px plus float noise, so exact halves are common:
        snap to 1e-3 px first so that 921.5 and 921.4999999 place the tile alike."""
        return np.floor(np.round(self.positions, 3) + 0.5).astype(np.int64)

    @property
    def shifts(self) -> np.ndarray:
        """(N, 2) float: aligned minus nominal position (pixels)."""
        return self.positions - self.nominal


class TileCache:
    """ASHLAR reader of one cycle that keeps only the last ``capacity`` tiles of the alignment channel
    read (least recently used go first), in place of ASHLAR's ``CachingReader``, which keeps every
    tile of the cycle (8-11 GB for 1,000 tiles of 2048^2 px). Aligning reads tiles row by row, so a
    few tile rows (:func:`rows_capacity`) hold what is read again. Thread-safe: later cycles are
    registered in parallel against the first cycle's tiles.
    """

    def __init__(self, reader: TileSet, channel: int, capacity: int):
        self.reader, self.channel, self.capacity = reader, channel, max(1, int(capacity))
        self._tiles: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def metadata(self) -> TileMetadata:
        return self.reader.metadata

    def read(self, series: int, c: int) -> np.ndarray:
        if c != self.channel:
            return self.reader.read(series, c)
        with self._lock:
            if series in self._tiles:
                self._tiles.move_to_end(series)
                return self._tiles[series]
        tile = self.reader.read(series, c)
        with self._lock:
            self._tiles[series] = tile
            while len(self._tiles) > self.capacity:
                self._tiles.popitem(last=False)
        return tile


def rows_capacity(metadata: TileMetadata, rows: int = 3) -> int:
    """Tiles in ``rows`` rows of a cycle's grid (a new row where sorted nominal y jumps by half a tile)."""
    ys = np.sort(metadata.positions[:, 0])
    grid_rows = 1 + int(np.count_nonzero(np.diff(ys) > metadata.size[0] / 2))
    return rows * math.ceil(metadata.num_images / grid_rows) + 1


_warnings_of_thread = threading.local()


@contextlib.contextmanager
def _quiet_ashlar():
    """Silence ASHLAR's progress prints and collect its data warnings into the list of the thread
    that raised them (:func:`_collecting`); other warnings are dropped."""
    from ashlar import reg

    def collect(message, category, *args, **kwargs) -> None:
        caught = getattr(_warnings_of_thread, "caught", None)
        if caught is not None and issubclass(category, reg.DataWarning):
            caught.append(str(message))

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always", reg.DataWarning)
        # ashlar 1.20 calls scikit-image APIs deprecated in 0.26; not our users' concern.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.showwarning = collect
        yield


def _collecting(work: Callable[[], object]) -> tuple[object, list[str]]:
    """``work()`` and the ASHLAR data warnings it raised in this thread."""
    _warnings_of_thread.caught = []
    try:
        return work(), _warnings_of_thread.caught
    finally:
        del _warnings_of_thread.caught


def align_cycles(cycles: Sequence[TileSet], *, channel: int = 0, max_shift_um: float = 30.0,
                 alpha: float = 0.01, filter_sigma: float = 0.0, cache_rows: int = 3,
                 workers: int = 1) -> list[CycleAlignment]:
    """Align the first cycle's tiles to each other and register every later cycle to it.

    Parameters
    ----------
    cycles : sequence of TileSet
        In cycle order; the first is the reference.
    channel : int
        Channel used for alignment in every cycle (the DNA stain).
    max_shift_um : float
        Largest correction of a stage position accepted (µm), ASHLAR's ``-m``.
    alpha : float
        Significance level of ASHLAR's permutation test for accepting an edge.
    filter_sigma : float
        Gaussian sigma (pixels) applied before correlation; 0 = ASHLAR's Laplacian whitening only.
    cache_rows : int
        Tile rows of the first cycle's alignment channel kept in memory (:class:`TileCache`).
    workers : int
        Threads (the job's vCPUs): the first cycle's tile pairs registered at once, beside its
        thumbnail and error threshold (:func:`prepare_edges`), then the later cycles' tiles
        registered at once (every cycle's thumbnail and coarse offset in a thread of its own).

    Returns
    -------
    list of CycleAlignment
        One per cycle, positions in the first cycle's mosaic frame.
    """
    from ashlar import reg
    first = cycles[0]
    edge_aligner = reg.EdgeAligner(first, channel=channel, max_shift=max_shift_um, alpha=alpha,
                                   filter_sigma=filter_sigma, do_make_thumbnail=len(cycles) > 1)
    edge_aligner.reader = TileCache(first, channel, rows_capacity(first.metadata, cache_rows))
    with _quiet_ashlar():
        prepared = prepare_edges(edge_aligner, workers)
        _, caught = _collecting(edge_aligner.run)
        caught = prepared + caught
        origin = first.metadata.origin
        results = [_edge_result(edge_aligner, origin, caught)]
        # Translation from "stage positions minus their origin" to the mosaic frame.
        frame = results[0].nominal[0] - (first.metadata.positions[0] - origin)

        with ThreadPoolExecutor(max(1, workers)) as tiles, ThreadPoolExecutor(max(1, len(cycles) - 1)) as pool:
            layer_aligner = _tiles_registered_in(tiles, reg) if workers > 1 else reg.LayerAligner

            def register(cycle: TileSet) -> CycleAlignment:
                aligner = layer_aligner(cycle, edge_aligner, channel=channel, max_shift=max_shift_um,
                                        filter_sigma=filter_sigma)
                _, caught = _collecting(aligner.run)
                return _layer_result(aligner, edge_aligner, results[0], origin - frame, caught)

            results += list(pool.map(register, cycles[1:]))
    return results


def _tiles_registered_in(pool: ThreadPoolExecutor, reg) -> type:
    """ASHLAR's ``LayerAligner`` whose tiles are registered in ``pool``'s threads: once ``coarse_align``
    has placed the cycle against the first, ASHLAR's own ``register`` measures every tile at once (each
    tile's registration depends only on that placement), and ``register_all`` then takes the results
    in its order, so shifts, errors and positions are exactly those of the serial run."""

    class LayerAligner(reg.LayerAligner):
        def coarse_align(self):
            super().coarse_align()
            self._measured = list(pool.map(super().register, range(self.metadata.num_images)))

        def register(self, t):
            return self._measured[t]

    return LayerAligner


def prepare_edges(aligner, workers: int) -> list[str]:
    """Do the work of ASHLAR's ``EdgeAligner.run`` that it does one step after another, in
    ``workers`` threads at once, so that ``run`` then finds it done: the thumbnail (for the later
    cycles' coarse offset), the error threshold (its sampling of non-overlapping strips) and the
    registration of every pair of neighbouring tiles. Returns the data warnings they raised.

    ASHLAR's own methods do the work: ``make_thumbnail`` and ``compute_threshold`` each in a thread
    of its own (``run`` then skips them: no thumbnail asked again, a threshold already set), and
    ``register_pair``, which caches each pair's shift and error, over the remaining threads (the
    FFTs and filters release the GIL). The cache is then put back in the order ``register_all``
    would have filled it, so ``run`` builds the same spanning tree: shifts, errors, threshold and
    positions are exactly those of the serial run. Tiles come through the aligner's reader (a
    :class:`TileCache`, thread-safe); pairs are handed out in ASHLAR's order, tile row after tile row.
    With one worker nothing is done here: ``run`` does it all.
    """
    pairs = [tuple(sorted(edge)) for edge in aligner.neighbors_graph.edges]
    if workers < 2:
        return []
    steps = [aligner.compute_threshold] + ([aligner.make_thumbnail] if aligner.do_make_thumbnail else [])
    with ThreadPoolExecutor(workers) as pool:
        caught = [pool.submit(_collecting, step) for step in steps]
        list(pool.map(lambda pair: aligner.register_pair(*pair), pairs))
        caught = [message for future in caught for message in future.result()[1]]
    aligner.do_make_thumbnail = False
    aligner._cache = {pair: aligner._cache[pair] for pair in pairs}
    return caught


def _edge_result(aligner, nominal_origin: np.ndarray, caught: list[str]) -> CycleAlignment:
    n = aligner.metadata.num_images
    errors = np.full(n, np.inf)
    edges = []
    for (t1, t2), (shift, error) in sorted(aligner._cache.items()):
        accepted = bool(np.isfinite(error))
        edges.append({"tile1": int(t1), "tile2": int(t2), "shift_y": float(shift[0]),
                      "shift_x": float(shift[1]), "error": float(error), "accepted": accepted})
        for t in (t1, t2):
            errors[t] = min(errors[t], error)
    # Tiles joined to a neighbour by an accepted edge were placed from image content; the rest
    # (singletons of ASHLAR's spanning forest) by the linear model of the stage positions.
    aligned = np.array([aligner.spanning_tree.degree(t) > 0 for t in range(n)])
    nominal = aligner.metadata.positions - nominal_origin
    # ASHLAR puts the mosaic origin at the minimum aligned position; express nominal positions in
    # the same frame (the fitted model's translation) so shifts are corrections, not the origin.
    nominal = nominal + _median_offset(aligner.positions, nominal, aligned)
    return CycleAlignment(positions=aligner.positions.copy(), nominal=nominal, errors=errors, aligned=aligned,
                          registered=True, offset=np.zeros(2), edges=edges, warnings=caught)


def _median_offset(positions: np.ndarray, nominal: np.ndarray, aligned: np.ndarray) -> np.ndarray:
    use = aligned if aligned.any() else np.ones(len(positions), bool)
    return np.median(positions[use] - nominal[use], axis=0)


def _layer_result(aligner, reference, reference_result: CycleAlignment, nominal_origin: np.ndarray,
                  caught: list[str]) -> CycleAlignment:
    """Later-cycle result. ASHLAR discards a tile whose registration lands exactly (to 0.1 px) on
    the cycle-1 position, assuming the camera's fixed pattern correlated rather than the tissue;
    that is also what a perfectly repeatable instrument (in-place staining) produces. Such a tile
    keeps its measured position and counts as registered when its cycle-1 counterpart was aligned from content and its
    error beats cycle 1's permutation-test threshold (a random match over a whole tile scores
    worse than one over an overlap strip, so the threshold is conservative)."""
    measured = (aligner.corrected_nominal_positions + aligner.shifts + aligner.reference_aligner_positions
                - aligner.reference_positions)
    unmoved = (np.rint(np.abs(measured - aligner.reference_aligner_positions) * 10) == 0).all(axis=1)
    rescued = aligner.discard & unmoved & (aligner.errors < reference.max_error) \
        & reference_result.aligned[aligner.reference_idx]
    aligned = ~aligner.discard | rescued
    positions = aligner.positions.copy()
    positions[rescued] = measured[rescued]       # instead of ASHLAR's model prediction
    needed = min(MIN_REGISTERED_TILES, aligner.metadata.num_images)
    nominal = aligner.metadata.positions - nominal_origin
    return CycleAlignment(positions=positions, nominal=nominal, errors=aligner.errors.copy(),
                          aligned=aligned, registered=int(aligned.sum()) >= needed,
                          offset=np.asarray(aligner.cycle_offset, float) + np.asarray(aligner.offset, float),
                          warnings=caught)


def mosaic_shape(alignment: CycleAlignment, tile_shape: tuple[int, int]) -> tuple[int, int]:
    """(Y, X) of the mosaic canvas that holds every tile of ``alignment`` at its placement."""
    corner = (alignment.placement + np.asarray(tile_shape)).max(axis=0)
    return int(corner[0]), int(corner[1])


def _edge_depth(start: int, size: int, lo: int, hi: int) -> np.ndarray:
    """Distance of pixels lo..hi-1 to the nearer edge of a tile spanning start..start+size-1."""
    idx = np.arange(lo, hi) - start
    return np.minimum(idx, size - 1 - idx)


class MosaicImage:
    """Lazy ``(C, Y, X)`` mosaic of one or more aligned cycles, assembled strip by strip.

    ``image[c, y0:y1, x0:x1]`` returns that region of output channel ``c`` as a new ndarray.
    Output channels are the cycles' channels concatenated in cycle order (ASHLAR's order).
    Pixels no tile covers are 0.

    Parameters
    ----------
    cycles : sequence of TileSet
    placements : sequence of (N, 2) int ndarray
        Whole-pixel top-left of each tile (:attr:`CycleAlignment.placement`), same order as ``cycles``.
    shape : (int, int)
        Canvas (Y, X), normally :func:`mosaic_shape` of the first cycle.

    Notes
    -----
    Memory: the tiles overlapping the requested rows of one channel, kept while successive
    requests move down the image (the writers read top to bottom, channel by channel), plus the
    output region and an int32 depth map of its size.
    """

    def __init__(self, cycles: Sequence[TileSet], placements: Sequence[np.ndarray], shape: tuple[int, int]):
        self.cycles = list(cycles)
        self.channels = [(k, c) for k, cycle in enumerate(self.cycles) for c in range(cycle.metadata.num_channels)]
        self.shape = (len(self.channels), int(shape[0]), int(shape[1]))
        self.dtype = self.cycles[0].metadata.pixel_dtype
        self._placement = [np.asarray(p, dtype=np.int64) for p in placements]
        self._cache_key: tuple[int, int] | None = None
        self._cache: dict[int, np.ndarray] = {}

    def _tile(self, cycle: int, channel: int, tile: int) -> np.ndarray:
        data = self._cache.get(tile)
        if data is None:
            data = self._cache[tile] = self.cycles[cycle].read(tile, channel)
        return data

    def __getitem__(self, key) -> np.ndarray:
        c, ys, xs = key
        y0, y1, _ = ys.indices(self.shape[1])
        x0, x1, _ = xs.indices(self.shape[2])
        cycle, channel = self.channels[c]
        places = self._placement[cycle]
        th, tw = self.cycles[cycle].metadata.size
        if self._cache_key != (cycle, channel):
            self._cache_key, self._cache = (cycle, channel), {}
        # Requests move downwards: forget tiles that end above this one.
        for t in [t for t in self._cache if places[t, 0] + th <= y0]:
            del self._cache[t]
        out = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0)), self.dtype)
        best = np.full(out.shape, -1, np.int32)
        hits = np.flatnonzero((places[:, 0] < y1) & (places[:, 0] + th > y0)
                              & (places[:, 1] < x1) & (places[:, 1] + tw > x0))
        for t in hits:
            py, px = places[t]
            ry0, ry1 = max(y0, py), min(y1, py + th)
            rx0, rx1 = max(x0, px), min(x1, px + tw)
            depth = np.minimum.outer(_edge_depth(py, th, ry0, ry1), _edge_depth(px, tw, rx0, rx1))
            region = (slice(ry0 - y0, ry1 - y0), slice(rx0 - x0, rx1 - x0))
            take = depth > best[region]
            best[region][take] = depth[take]
            out[region][take] = self._tile(cycle, channel, t)[ry0 - py:ry1 - py, rx0 - px:rx1 - px][take]
        return out


def thumbnail_uint8(plane: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.9)) -> np.ndarray:
    """Contrast-stretch a (Y, X) plane to uint8 for a QC picture (percentiles of non-zero pixels)."""
    values = plane[plane > 0]
    if values.size == 0:
        return np.zeros(plane.shape, np.uint8)
    lo, hi = np.percentile(values, percentiles)
    scaled = (plane.astype(np.float32) - lo) / max(hi - lo, 1e-6)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)
