"""A made sample slide with ground truth: synthetic multiplexed tissue, cut into tiles like a microscope would.

``make_sample(out)`` writes ``out/<slide_id>/`` (a slide in the convention of :mod:`atlas.slide.convention`) and,
beside it and never inside it, ``out/<slide_id>.truth/``: the true tile positions, the true nuclei and
cell label images, the true per-cell means and the camera model. End-to-end tests use it to check
stitching, registration, segmentation and quantification against truth; docs/sample-slide.md describes
every file and frame.

The image model, per channel ``c`` (counts = ADU, gain 1 e-/ADU)::

    S_c(p)      = background_c + autofluorescence_c * tissue(p) + PSF * marker_c(p)    specimen signal
    E[pixel]    = offset + flat(u) * S_c(p)                                          u = pixel in the tile
    pixel       = clip(round(offset + Poisson(flat(u) * S_c(p)) + Normal(0, read_noise)), 0, 65535)

where ``p`` is the specimen point the pixel saw: the tile's *true* position plus ``u``. The stored stage
positions are the nominal grid; the true positions add a per-tile jitter, and for every cycle after the
first also a global shift (the slide was put back on the stage slightly off).

The slide is made **streaming**, tile by tile: each tile renders only its window of the specimen
(:mod:`atlas.slide.specimen`, deterministic per frame pixel), writes its tile of every cycle file, and
adds the part of the frame it owns to the truth (labels to a tiled TIFF, per-cell sums to the tables
once a cell is complete). Worker processes render tiles; this process numbers the cells and writes.
Memory depends on the tile size and the channels, not on the slide's size.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import uuid
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from threadpoolctl import threadpool_limits

from atlas.errors import InvalidInput, Problem
from atlas.slide.cell_shapes import largest_pieces
from atlas.slide.convention import MARKERS, RAW, check_slide_id, write_manifest
from atlas.slide.ome import CycleWriter
from atlas.slide.specimen import (
    LABEL_HALO_PX,
    PIXEL_SIZE_UM,
    PSF_SIGMA_PX,
    Marker,
    Patch,
    Specimen,
    crop,
    marker_panel,
    normals,
    stream,
)
from atlas.slide.truth import TruthShare, TruthWriter

GENERATOR = "atlas.sample"     # a stable name: it seeds the sample files' UUIDs
GENERATOR_VERSION = 2
STAGE_ORIGIN_UM = (1500.0, 2500.0)      # stage (y, x) of the nominal top-left tile: real stages are not at 0
JITTER_SD_UM = 2.0                      # per-tile stage repositioning error, each axis
JITTER_MAX_UM = 5.0
CYCLE_SHIFT_UM = (8.0, 16.0)            # range of |global shift| of each later cycle (re-mounting error)
CAMERA_OFFSET = 100.0                   # ADU
READ_NOISE = 4.0                        # ADU (sd)
# Microscopes date their files (OME AcquisitionDate, TIFF DateTime); so does the sample's raw
# upload, one day per cycle, so that the pipeline is seen to keep dates out of every release.
ACQUIRED = datetime(2024, 3, 5, 14, 22, 31)
FLAT_CORNER = 0.68                      # illumination at the tile corners relative to the optical centre
MIN_OVERLAP_PX = 32
_GEOMETRY, _CAMERA = 7, 8               # purposes of random streams (atlas.slide.specimen uses 1-6)
# what `atlas sample` accepts: (flag, smallest, largest, example)
LIMITS = {"rows": ("--rows", 1, 64, 3), "cols": ("--cols", 1, 64, 3), "tile_size": ("--tile-size", 64, 4096, 512),
          "cycles": ("--cycles", 1, 20, 2), "channels": ("--channels", 1, 8, 3), "seed": ("--seed", 0, 2 ** 32 - 1, 0)}


@dataclass(frozen=True)
class SampleDesign:
    """What to make: the tile grid, tile size, overlap, cycles x channels per cycle, and the seed."""

    seed: int = 0
    rows: int = 3
    cols: int = 3
    tile_size: int = 512
    overlap: float = 0.1
    cycles: int = 2
    channels: int = 3

    @property
    def step_px(self) -> int:
        """Nominal distance of neighbouring tiles (px)."""
        return round(self.tile_size * (1 - self.overlap))

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    def problems(self) -> list[Problem]:
        """Every value out of range, each naming its flag and a value that works."""
        problems = []
        for name, (flag, low, high, example) in LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or not low <= value <= high:
                problems.append(Problem(flag, f"{value!r} is outside {low}..{high}",
                                        f"use a whole number such as {example}"))
        overlap, size = self.overlap, self.tile_size
        if not 0 < overlap < 0.5 or overlap * size < MIN_OVERLAP_PX:
            problems.append(Problem("--overlap", f"{overlap} of {size} px tiles is not in (0, 0.5) or is under "
                                    f"{MIN_OVERLAP_PX} px, too little for stitching with {JITTER_MAX_UM} µm jitter",
                                    "use e.g. 0.1 with 512 px tiles"))
        return problems


def markers(cycles: int = 2, channels: int = 3) -> list[str]:
    """Marker names in markers.csv order (cycles concatenated)."""
    return [m.name for cycle in marker_panel(cycles, channels) for m in cycle]


@dataclass(frozen=True)
class Geometry:
    """Where every tile was, in the stage frame (µm, image orientation) and the mosaic frame (px).

    Attributes
    ----------
    stage_um : (n_tiles, 2) float ndarray
        Nominal (y, x) top-left of each tile: what the OME-XML stores (every cycle).
    true_um : (n_cycles, n_tiles, 2) float ndarray
        Where each tile really was: nominal + jitter + the cycle's shift.
    shifts_um : (n_cycles, 2) float ndarray
        Global (y, x) re-mounting shift of each cycle (0 for the first).
    origin_um : (2,) float ndarray
        Stage (y, x) of mosaic pixel (0, 0): the element-wise minimum of the true cycle-1 positions.
    tile_px : (n_cycles, n_tiles, 2) float ndarray
        True top-left of each tile in the mosaic frame.
    frame_shape : (int, int)
    row_edges, col_edges : int ndarray
        The frame cut into one rectangle per tile (edges halfway through the nominal overlaps): tile
        ``t = row * cols + col`` owns rows ``row_edges[row]:row_edges[row + 1]`` and the like columns.
    """

    stage_um: np.ndarray
    true_um: np.ndarray
    shifts_um: np.ndarray
    origin_um: np.ndarray
    tile_px: np.ndarray
    frame_shape: tuple[int, int]
    row_edges: np.ndarray
    col_edges: np.ndarray

    def owned(self, t: int, cols: int) -> tuple[int, int, int, int]:
        """The window of the frame that tile ``t`` owns."""
        r, c = divmod(t, cols)
        return int(self.row_edges[r]), int(self.col_edges[c]), int(self.row_edges[r + 1]), int(self.col_edges[c + 1])


def geometry(design: SampleDesign) -> Geometry:
    """Stage, true and mosaic-frame positions of every tile of every cycle, from the design's seed."""
    rng = stream(design.seed, _GEOMETRY, 0, 0)
    rc = np.stack(np.meshgrid(np.arange(design.rows), np.arange(design.cols), indexing="ij"), -1).reshape(-1, 2)
    stage = np.asarray(STAGE_ORIGIN_UM) + rc * design.step_px * PIXEL_SIZE_UM
    angle = rng.uniform(0, 2 * np.pi, design.cycles)
    shifts = rng.uniform(*CYCLE_SHIFT_UM, design.cycles)[:, None] * np.stack([np.sin(angle), np.cos(angle)], 1)
    shifts[0] = 0
    jitter = np.clip(rng.normal(0, JITTER_SD_UM, (design.cycles, len(stage), 2)), -JITTER_MAX_UM, JITTER_MAX_UM)
    true = stage[None] + shifts[:, None] + jitter
    origin = true[0].min(axis=0)
    tile_px = (true - origin) / PIXEL_SIZE_UM
    frame_shape = tuple(int(v) for v in np.ceil(tile_px[0].max(axis=0) + design.tile_size))
    nominal = (stage[[0]] - origin) / PIXEL_SIZE_UM                   # top-left tile, frame px
    middle = (design.step_px + design.tile_size) / 2                  # of the overlap after each tile
    edges = [np.r_[0, np.round(nominal[0, a] + middle + design.step_px * np.arange(n - 1)), frame_shape[a]].astype(int)
             for a, n in ((0, design.rows), (1, design.cols))]
    return Geometry(stage_um=stage, true_um=true, shifts_um=shifts, origin_um=origin, tile_px=tile_px,
                    frame_shape=frame_shape, row_edges=edges[0], col_edges=edges[1])


def flatfield(tile_size: int) -> np.ndarray:
    """Illumination profile of a tile, (T, T) float32, 1 at the (slightly off-centre) optical axis."""
    t = np.arange(tile_size, dtype=np.float64)
    half = tile_size / 2
    r2 = ((t[:, None] - 0.47 * (tile_size - 1)) / half) ** 2 + ((t[None, :] - 0.53 * (tile_size - 1)) / half) ** 2
    a = (FLAT_CORNER ** -0.5 - 1) / 2
    return ((1 + a * r2) ** -2).astype(np.float32)


def _cubic_weights(frac: float) -> np.ndarray:
    """Keys cubic-convolution weights (a = -0.5) of samples -1, 0, 1, 2 for a point ``frac`` past sample 0."""
    f = frac
    return np.array([-0.5 * f ** 3 + f ** 2 - 0.5 * f, 1.5 * f ** 3 - 2.5 * f ** 2 + 1,
                     -1.5 * f ** 3 + 2 * f ** 2 + 0.5 * f, 0.5 * f ** 3 - 0.5 * f ** 2], np.float32)


def _sample_tile(signal: np.ndarray, top_left: np.ndarray, tile_size: int) -> np.ndarray:
    """Signal seen by a tile whose pixel (0, 0) sits at ``top_left`` (fractional px) of ``signal``.

    Separable cubic convolution; the signal is PSF-blurred (band-limited), so this is what the camera saw.

    Parameters
    ----------
    signal : (H, W) float32 ndarray
    top_left : (2,) float ndarray
        (y, x) in px of ``signal``, at least 1 px from its edge (and the tile 2 px inside it).

    Returns
    -------
    (tile_size, tile_size) float32 ndarray
    """
    start = np.floor(top_left).astype(int)
    wy, wx = (_cubic_weights(f) for f in top_left - start)
    y0, x0 = start
    rows = sum(w * signal[y0 - 1 + k:y0 - 1 + k + tile_size, x0 - 1:x0 + tile_size + 2] for k, w in enumerate(wy))
    return sum(w * rows[:, k:k + tile_size] for k, w in enumerate(wx))


def _camera(expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixel values of a tile from its expected photo-electrons ``expected`` (float32): camera offset +
    shot noise + read noise, rounded to uint16.

    Shot noise is Poisson(expected), drawn as its Gaussian limit N(expected, expected): every expected
    count here is at least ~60 e- (background x the darkest corner), where the two agree in mean and
    variance exactly and differ in skewness by under 0.13; one table-lookup normal per pixel
    (:func:`atlas.slide.specimen.normals`) is ~10x faster than a Poisson draw.
    """
    signal = np.maximum(expected, 0)
    counts = signal + np.float32(READ_NOISE ** 2)
    np.sqrt(counts, out=counts)
    counts *= normals(rng, expected.shape)
    counts += signal
    counts += np.float32(CAMERA_OFFSET + 0.5)             # + 0.5, then truncation: rounding (all >= 0 after clip)
    np.clip(counts, 0, 65535, out=counts)
    return counts.astype(np.uint16)


def _tile_window(geom: Geometry, design: SampleDesign, t: int, cycle: int | None = None) -> tuple[int, int, int, int]:
    """The frame window tile ``t`` needs: the footprint of every cycle (or of one) with the cubic
    kernel's margin, and the rectangle it owns."""
    start = np.floor(geom.tile_px[:, t] if cycle is None else geom.tile_px[[cycle], t]).astype(int)
    low = np.minimum(start.min(axis=0) - 1, geom.owned(t, design.cols)[:2])
    high = np.maximum(start.max(axis=0) + design.tile_size + 2, geom.owned(t, design.cols)[2:])
    return int(low[0]), int(low[1]), int(high[0]), int(high[1])


def _seen(geom: Geometry, design: SampleDesign, window: tuple[int, int, int, int]) -> np.ndarray:
    """Where some cycle-1 tile looked, on ``window``: the truth is defined there only (bool)."""
    y0, x0, y1, x1 = window
    seen = np.zeros((y1 - y0, x1 - x0), bool)
    top, left = np.ceil(geom.tile_px[0]).astype(int).T
    bottom, right = (np.floor(geom.tile_px[0]).astype(int) + design.tile_size).T
    for t in np.flatnonzero((top < y1) & (bottom > y0) & (left < x1) & (right > x0)):
        seen[max(top[t] - y0, 0):max(bottom[t] - y0, 0), max(left[t] - x0, 0):max(right[t] - x0, 0)] = True
    return seen


@dataclass
class _TileResult:
    """One tile rendered: its tile of every cycle, ``(C, T, T)`` uint16 each, and its share of the truth."""

    tiles: list[np.ndarray]
    share: TruthShare


class _TileMaker:
    """Renders the tiles of one design, one window each (in the main process or in a worker)."""

    def __init__(self, design: SampleDesign):
        self.design, self.geom = design, geometry(design)
        self.panel = marker_panel(design.cycles, design.channels)
        sides = np.subtract(_tile_window(self.geom, design, 0)[2:], _tile_window(self.geom, design, 0)[:2])
        self.specimen = Specimen(design.seed, [m for cycle in self.panel for m in cycle],
                                 window_px=int(sides.max()) + 2 * LABEL_HALO_PX)
        self.flat = flatfield(design.tile_size)

    def render(self, t: int) -> _TileResult:
        """Tile ``t`` of every cycle, and the truth of the rectangle it owns."""
        design, geom = self.design, self.geom
        patch = Patch(self.specimen, _tile_window(geom, design, t))
        rect = geom.owned(t, design.cols)
        share, parts, raw = self._truth_share(patch, rect)
        inside = np.flatnonzero(parts)                      # the rectangle's pixels that belong to a cell
        parts = parts[inside]
        tiles, channel = [], 0
        for k, cycle in enumerate(self.panel):
            window = _tile_window(geom, design, t, cycle=k)   # this cycle's footprint and the rectangle
            tile = np.empty((len(cycle), design.tile_size, design.tile_size), np.uint16)
            for c in range(len(cycle)):
                signal = patch.signal(channel, window)
                raw[:, 3 + channel] = np.bincount(parts, crop(signal, window, rect).ravel()[inside], len(raw))
                expected = self.flat * _sample_tile(signal, geom.tile_px[k, t] - window[:2], design.tile_size)
                tile[c] = _camera(expected, stream(design.seed, _CAMERA, (k << 8) | c, t))
                channel += 1
            tiles.append(tile)
        n = len(share["keys"])
        nucleus, cytoplasm = raw[n + 1:], raw[1:n + 1]      # parts: 1..n cytoplasm, n + 1..2n nucleus
        return _TileResult(tiles, TruthShare(t=t, sums=np.stack([nucleus, nucleus + cytoplasm], 1), **share))

    def _truth_share(self, patch: Patch, rect: tuple[int, int, int, int]):
        """The truth labels of the rectangle (cut where no cycle-1 tile looked), its cells, and the
        pixels' parts (0 none, i cytoplasm of cell i, n + i its nucleus) with area and centroid sums."""
        nuclei, bodies = patch.nuclei, patch.bodies
        seen = _seen(self.geom, self.design, patch.label_window)
        if not seen.all():      # cut by the frame's edge: a nucleus keeps its largest seen piece
            nuclei = largest_pieces(np.where(seen, nuclei, 0))
            present = np.bincount(nuclei.ravel(), minlength=len(patch.cells["key"]) + 1) > 0
            present[0] = False
            bodies = np.where(seen & present[bodies], bodies, 0)
        nuclei, bodies = crop(nuclei, patch.label_window, rect), crop(bodies, patch.label_window, rect)
        local, first = np.unique(bodies, return_index=True)
        local, first = local[local > 0], first[local > 0]
        number = np.zeros(len(patch.cells["key"]) + 1, np.uint32)
        number[local] = np.arange(1, len(local) + 1)
        nuclei, bodies = number[nuclei], number[bodies]
        n, cells = len(local), _take_cells(patch.cells, local - 1)
        parts = np.where(nuclei > 0, nuclei.astype(np.int64) + n, bodies).ravel()
        raw = np.zeros((2 * n + 1, 3 + sum(len(cycle) for cycle in self.panel)))
        rows, cols = np.indices(nuclei.shape)
        for q, weights in enumerate((None, rows + rect[0], cols + rect[1])):
            raw[:, q] = np.bincount(parts, None if weights is None else weights.ravel(), len(raw))
        share = {"nuclei": nuclei, "cells": bodies, "keys": cells["key"], "kinds": cells["kind"],
                 "centres": np.stack([cells["y"], cells["x"]], 1), "first": first}
        return share, parts, raw


def _take_cells(cells: dict, index: np.ndarray) -> dict:
    return {k: cells[k][index] for k in ("key", "kind", "y", "x")}


def _tile_positions(geom: Geometry, design: SampleDesign) -> pd.DataFrame:
    """tile_positions.csv: stage (stored) and true positions of every tile of every cycle."""
    n = design.n_tiles
    t = np.tile(np.arange(n), design.cycles)
    stage = np.tile(geom.stage_um, (design.cycles, 1))
    true, mosaic = geom.true_um.reshape(-1, 2), geom.tile_px.reshape(-1, 2)
    return pd.DataFrame({"cycle": np.repeat(np.arange(1, design.cycles + 1), n), "tile": t,
                         "row": t // design.cols, "col": t % design.cols,
                         "stage_y_um": stage[:, 0], "stage_x_um": stage[:, 1], "true_y_um": true[:, 0],
                         "true_x_um": true[:, 1], "mosaic_y_px": mosaic[:, 0], "mosaic_x_px": mosaic[:, 1]})


_WORKER: _TileMaker | None = None


def _start_worker(design: SampleDesign) -> None:
    global _WORKER
    threadpool_limits(1, "blas")        # see make_sample
    _WORKER = _TileMaker(design)


def _render_in_worker(tiles: range) -> list[_TileResult]:
    return [_WORKER.render(t) for t in tiles]


_TASK_BYTES = 32 << 20      # a worker's task: consecutive tiles of about this many bytes (at least one tile)


def _rendered(design: SampleDesign, workers: int):
    """Every tile rendered, in tile order, by ``workers`` processes; one worker renders here.

    A task is a run of consecutive tiles (neighbours share a worker's caches of placed cells and
    labels), and at most ``workers + 1`` tasks are in flight, so memory stays bounded."""
    if workers == 1:
        maker = _TileMaker(design)
        yield from (maker.render(t) for t in range(design.n_tiles))
        return
    tile_bytes = 2 * design.tile_size ** 2 * design.cycles * design.channels
    run = max(1, min(8, _TASK_BYTES // tile_bytes))
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(design,))
    try:
        pending: deque = deque()
        for start in range(0, design.n_tiles, run):
            pending.append(pool.submit(_render_in_worker, range(start, min(start + run, design.n_tiles))))
            if len(pending) > workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _truth_doc(design: SampleDesign, geom: Geometry, slide_id: str, panel: list[list[Marker]],
               cycle_files: list[str]) -> dict:
    return {
        "generator": GENERATOR, "generator_version": GENERATOR_VERSION, "seed": design.seed, "slide_id": slide_id,
        "pixel_size_um": PIXEL_SIZE_UM, "grid_rows_cols": [design.rows, design.cols], "tile_size_px": design.tile_size,
        "nominal_overlap": design.overlap, "step_px": design.step_px,
        "cycles": [{"cycle": k + 1, "file": f, "channels": [m.name for m in cycle]}
                   for k, (f, cycle) in enumerate(zip(cycle_files, panel, strict=True))],
        "cycle_shifts_um": [[round(float(v), 6) for v in s] for s in geom.shifts_um],
        "cycle_shifts_px": [[round(float(v) / PIXEL_SIZE_UM, 6) for v in s] for s in geom.shifts_um],
        "jitter_sd_um": JITTER_SD_UM, "jitter_max_um": JITTER_MAX_UM,
        "mosaic_frame": {"origin_stage_um": [float(v) for v in geom.origin_um], "shape_px": list(geom.frame_shape)},
        "camera": {"offset_adu": CAMERA_OFFSET, "read_noise_adu": READ_NOISE, "gain_e_per_adu": 1.0,
                   "psf_sigma_px": PSF_SIGMA_PX, "flat_corner": FLAT_CORNER},
        "files": {"tile_positions": "tile_positions.csv", "nuclei": "nuclei.tif", "cell": "cell.tif",
                  "nuclei_means": "nuclei.csv", "cell_means": "cell.csv", "cell_types": "cell_types.csv",
                  "flatfield": "flatfield.tif"},
    }


def _build(design: SampleDesign, slide_id: str, slide_dir: Path, truth_dir: Path, scratch: Path, workers: int) -> None:
    """Make the slide and its truth into fresh folders, tile by tile."""
    geom, panel = geometry(design), marker_panel(design.cycles, design.channels)
    names = [m.name for cycle in panel for m in cycle]
    (slide_dir / RAW).mkdir(parents=True)
    (slide_dir / MARKERS).write_text("channel_number,cycle_number,marker_name\n" + "".join(
        f"{i},{1 + (i - 1) // design.channels},{name}\n" for i, name in enumerate(names, start=1)))
    cycle_files = [f"{RAW}/cycle-{k + 1:02d}.ome.tif" for k in range(design.cycles)]
    truth = TruthWriter(truth_dir, scratch, geom.row_edges, geom.col_edges, names, CAMERA_OFFSET)
    with ExitStack() as files:
        writers = []
        for k, (rel, cycle) in enumerate(zip(cycle_files, panel, strict=True)):
            file_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"{GENERATOR}/{GENERATOR_VERSION}/{slide_id}/{design}/{k}")
            writers.append(files.enter_context(CycleWriter(slide_dir / rel, geom.stage_um, PIXEL_SIZE_UM,
                                                           [m.name for m in cycle], compression=None,
                                                           uuid=f"urn:uuid:{file_uuid}",
                                                           acquired=ACQUIRED + timedelta(days=k))))
        for tile in _rendered(design, workers):
            for writer, cycle_tile in zip(writers, tile.tiles, strict=True):
                writer.write(cycle_tile)
            truth.add(tile.share)
    _tile_positions(geom, design).to_csv(truth_dir / "tile_positions.csv", index=False, float_format="%.4f")
    tifffile.imwrite(truth_dir / "flatfield.tif", flatfield(design.tile_size))
    truth.close(_truth_doc(design, geom, slide_id, panel, cycle_files))
    write_manifest(slide_dir)


def _available_cpus() -> int:
    """CPUs this process may run on (its affinity, e.g. a container's share), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _made_by_sample(truth_dir: Path) -> bool:
    try:
        return json.loads((truth_dir / "truth.json").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def make_sample(out_dir: Path, *, slide_id: str = "sample", seed: int = 0, grid: tuple[int, int] = (3, 3),
                tile_size: int = 512, overlap: float = 0.1, cycles: int = 2, channels: int = 3,
                workers: int | None = None) -> tuple[Path, Path]:
    """Write the sample slide ``out_dir/<slide_id>/`` and its truth ``out_dir/<slide_id>.truth/``.

    Same arguments, same bytes. An earlier sample at the same place is replaced; any other existing
    folder there is left alone and reported. Files appear all at once (built in a temporary folder
    beside them), the slide's manifest.json written last. Streaming: memory does not grow with the
    number of tiles.

    Parameters
    ----------
    out_dir : Path
        Folder that receives both (created if missing).
    slide_id : str
        Name of the slide folder.
    seed : int
        Seed of every random stream (0 .. 2**32 - 1).
    grid : (rows, cols)
        Tiles per column and per row (each 1..64).
    tile_size : int
        Tile side (px, 64..4096).
    overlap : float
        Nominal overlap of neighbouring tiles as a fraction of ``tile_size``.
    cycles, channels : int
        Cycles (1..20) and channels per cycle (1..8, the first the DNA stain).
    workers : int, optional
        Processes that render tiles (default: the CPUs this process may use, at most one per tile).
        The files are the same whatever the number.

    Returns
    -------
    (slide_dir, truth_dir) : tuple of Path
    """
    design = SampleDesign(seed=seed, rows=grid[0], cols=grid[1], tile_size=tile_size, overlap=overlap,
                          cycles=cycles, channels=channels)
    if problems := check_slide_id(slide_id) + design.problems():
        raise InvalidInput(problems)
    out_dir = Path(out_dir)
    slide_dir, truth_dir = out_dir / slide_id, out_dir / f"{slide_id}.truth"
    foreign = [p for p in (slide_dir, truth_dir) if p.exists() and not _made_by_sample(truth_dir)]
    if foreign:
        raise InvalidInput([Problem(str(p), "already exists and is not a sample made by `atlas sample`",
                                    "choose another DIR or --slide-id, or move that folder away") for p in foreign])
    out_dir.mkdir(parents=True, exist_ok=True)
    # one BLAS thread: the field products are small, and OpenBLAS threads only spin on a shared machine
    with threadpool_limits(1, "blas"), tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{slide_id}.") as tmp:
        new_slide, new_truth = Path(tmp) / slide_id, Path(tmp) / truth_dir.name
        workers = min(workers or _available_cpus(), design.n_tiles)
        _build(design, slide_id, new_slide, new_truth, Path(tmp), workers)
        for old in (slide_dir, truth_dir):
            if old.exists():
                shutil.rmtree(old)
        new_slide.rename(slide_dir)
        new_truth.rename(truth_dir)
    return slide_dir, truth_dir
