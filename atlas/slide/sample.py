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
positions are the nominal grid; the true positions add a per-tile jitter, and for cycle 2 also a global
shift (the slide was put back on the stage slightly off).
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage
from skimage.measure import label as connected_components
from skimage.segmentation import find_boundaries

from atlas.errors import InvalidInput, Problem
from atlas.slide.convention import MARKERS, RAW, check_slide_id, write_manifest
from atlas.slide.ome import write_cycle

GENERATOR = "atlas.sample"     # a stable name: it seeds the sample files' UUIDs
GENERATOR_VERSION = 1
PIXEL_SIZE_UM = 0.65
CYCLE_CHANNELS = (("DNA_1", "CD45", "panCK"), ("DNA_2", "CD3", "aSMA"))
STAGE_ORIGIN_UM = (1500.0, 2500.0)      # stage (y, x) of the nominal top-left tile: real stages are not at 0
JITTER_SD_UM = 2.0                      # per-tile stage repositioning error, each axis
JITTER_MAX_UM = 5.0
CYCLE_SHIFT_UM = (8.0, 16.0)            # range of |global shift| of cycle 2 (re-mounting error)
CAMERA_OFFSET = 100.0                   # ADU
READ_NOISE = 4.0                        # ADU (sd)
PSF_SIGMA_PX = 1.0
# Microscopes date their files (OME AcquisitionDate, TIFF DateTime); so does the sample's raw
# upload, one day per cycle, so that the pipeline is seen to keep dates out of every release.
ACQUIRED = datetime(2024, 3, 5, 14, 22, 31)
FLAT_CORNER = 0.68                      # illumination at the tile corners relative to the optical centre
MIN_OVERLAP_PX = 32

CELL_TYPES = ("epithelial", "t_cell", "immune_other", "stromal", "other")
# nucleus semi-axes (µm, mean long/short), relative sd, cytoplasm rim (µm, long/short)
_SHAPES = {
    "epithelial": (5.4, 4.3, 0.10, 3.6, 3.2),
    "t_cell": (3.9, 3.5, 0.08, 1.2, 1.1),
    "immune_other": (4.5, 3.9, 0.10, 2.2, 2.0),
    "stromal": (7.0, 2.6, 0.12, 3.5, 1.2),
    "other": (5.0, 3.8, 0.10, 2.6, 2.2),
}
# median expression (counts at full illumination) of the non-DNA markers per type; 0 = negative
_EXPRESSION = {
    "epithelial": {"panCK": 2500.0},
    "t_cell": {"CD45": 1800.0, "CD3": 1400.0},
    "immune_other": {"CD45": 2200.0},
    "stromal": {"aSMA": 1800.0},
    "other": {},
}
_NONSPECIFIC = 0.03                     # negative cells still show this fraction of a typical positive
_DNA_MEDIAN = 3500.0
_DNA_BLEACH = {"DNA_1": 1.0, "DNA_2": 0.8}   # the DNA stain fades a little by cycle 2
_BACKGROUND = {"DNA_1": 150.0, "CD45": 120.0, "panCK": 100.0, "DNA_2": 140.0, "CD3": 90.0, "aSMA": 110.0}
_AUTOFLUORESCENCE = {"DNA_1": 60.0, "CD45": 250.0, "panCK": 150.0, "DNA_2": 60.0, "CD3": 120.0, "aSMA": 100.0}
# region code (see _regions) -> (type probabilities in CELL_TYPES order, acceptance density, packing factor);
# stroma's density follows the tissue density field (None)
_REGIONS = {
    1: ((0.88, 0.06, 0.03, 0.0, 0.03), 1.0, 0.78),     # epithelium
    2: ((0.0, 0.60, 0.35, 0.0, 0.05), 1.0, 0.72),      # lymphoid aggregate
    3: ((0.0, 0.15, 0.10, 0.60, 0.15), None, 0.90),    # stroma
}


@dataclass(frozen=True)
class SampleSlide:
    """Everything :func:`simulate` makes, as arrays (no files).

    Attributes
    ----------
    tiles : list of (n_tiles, 3, T, T) uint16 ndarray
        Raw tiles of each cycle, tile ``t = row * cols + col``.
    stage_positions_um : (n_tiles, 2) float ndarray
        Nominal (y, x) top-left of each tile, image orientation: what the OME-XML stores (both cycles).
    true_positions_um : (n_cycles, n_tiles, 2) float ndarray
        Where each tile really was, in the same stage frame.
    frame_origin_um : (2,) float ndarray
        Stage (y, x) of pixel (0, 0) of the mosaic frame: the element-wise minimum of the true cycle-1
        positions (the frame ASHLAR's mosaic ends up in).
    nuclei, cells : (H, W) uint32 ndarray
        True label images in the mosaic frame, IDs 1..N shared (cell ``i`` contains nucleus ``i``); 0
        outside cells and where no cycle-1 tile looked.
    cell_types : (N,) str ndarray
        Type of cell ID ``i + 1``.
    signal : (n_channels, H, W) float32 ndarray
        Noise-free, vignetting-free expected pixel value (``offset + S_c``) in the mosaic frame.
    flatfield : (T, T) float32 ndarray
        Illumination profile of every tile (1 at the optical centre).
    cycle_shift_um : (2,) float ndarray
        Global (y, x) shift of cycle 2's true positions relative to its stage positions.
    """

    tiles: list
    stage_positions_um: np.ndarray
    true_positions_um: np.ndarray
    frame_origin_um: np.ndarray
    nuclei: np.ndarray
    cells: np.ndarray
    cell_types: np.ndarray
    signal: np.ndarray
    flatfield: np.ndarray
    cycle_shift_um: np.ndarray


def markers() -> list[str]:
    """Marker names in markers.csv order (cycles concatenated)."""
    return [name for cycle in CYCLE_CHANNELS for name in cycle]


class _Field:
    """A smooth random field (sum of random plane waves, about N(0, 1)) evaluable at any point in px."""

    def __init__(self, rng: np.random.Generator, wavelength_px: float, n_modes: int = 16):
        k = 2 * np.pi / (wavelength_px * rng.uniform(0.6, 1.4, n_modes))
        angle = rng.uniform(0, np.pi, n_modes)
        self.ky, self.kx = k * np.sin(angle), k * np.cos(angle)
        self.phase = rng.uniform(0, 2 * np.pi, n_modes)
        self.scale = math.sqrt(2 / n_modes)

    def at(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Values at points (y, x) (same-shape arrays, px)."""
        return self.scale * np.cos(np.multiply.outer(y, self.ky) + np.multiply.outer(x, self.kx) + self.phase).sum(-1)

    def grid(self, shape: tuple[int, int]) -> np.ndarray:
        """Values on the pixel grid of ``shape``, (H, W) float32 (cos(a + b) = Re(e^ia e^ib): one matrix product)."""
        along_y = np.exp(1j * (np.multiply.outer(np.arange(shape[0]), self.ky) + self.phase))
        along_x = np.exp(1j * np.multiply.outer(np.arange(shape[1]), self.kx))
        return (self.scale * (along_y @ along_x.T).real).astype(np.float32)


def _regions(epithelial: np.ndarray, lymphoid: np.ndarray, density: np.ndarray) -> np.ndarray:
    """Tissue region code per point: 0 none (lumen or gap), 1 epithelium, 2 lymphoid aggregate, 3 stroma."""
    region = np.full(epithelial.shape, 3, np.uint8)
    region[lymphoid > 1.3] = 2
    region[epithelial > 0.45] = 1
    region[(epithelial > 1.7) | (density < -1.4)] = 0     # gland lumen, tissue tear
    return region


def _place_cells(rng: np.random.Generator, shape: tuple[int, int], fields: dict[str, _Field]) -> dict[str, np.ndarray]:
    """Random sequential addition of cells: type by tissue region, no two cell bodies overlapping much.

    Returns per-cell arrays (px, canvas coordinates): y, x, type index, nucleus semi-axes a, b, body
    semi-axes ac, bc, orientation theta.
    """
    margin = 20
    n = int(shape[0] * shape[1] / 30)
    y = rng.uniform(-margin, shape[0] + margin, n)
    x = rng.uniform(-margin, shape[1] + margin, n)
    region = _regions(fields["epithelial"].at(y, x), fields["lymphoid"].at(y, x), fields["density"].at(y, x))
    stroma_density = 0.25 + 0.3 / (1 + np.exp(-2 * fields["density"].at(y, x)))
    u_accept, u_type = rng.random(n), rng.random(n)
    kind = np.zeros(n, np.int64)
    packing = np.ones(n)
    keep = np.zeros(n, bool)
    for code, (probabilities, density, pack) in _REGIONS.items():
        here = region == code
        keep[here] = u_accept[here] < (density if density is not None else stroma_density[here])
        kind[here] = np.searchsorted(np.cumsum(probabilities), u_type[here] * 0.999999)
        packing[here] = pack
    shapes = np.array([_SHAPES[t] for t in CELL_TYPES])[kind]
    a = shapes[:, 0] / PIXEL_SIZE_UM * (1 + shapes[:, 2] * rng.standard_normal(n))
    b = np.minimum(shapes[:, 1] / PIXEL_SIZE_UM * (1 + shapes[:, 2] * rng.standard_normal(n)), a)
    ac, bc = a + shapes[:, 3] / PIXEL_SIZE_UM, b + shapes[:, 4] / PIXEL_SIZE_UM
    theta = rng.uniform(0, np.pi, n)
    stromal_angle = np.pi / 2 * (fields["orientation"].at(y, x) > 0)      # stroma runs in bundles
    theta = np.where(kind == CELL_TYPES.index("stromal"), stromal_angle + rng.normal(0, 0.25, n), theta)
    radius = (ac + bc) / 2

    bucket = float(2 * radius.max())
    grid: dict[tuple[int, int], list[int]] = {}
    accepted = []
    for i in np.flatnonzero(keep):
        yi, xi, ri, fi = y[i], x[i], radius[i], packing[i]
        gy, gx = int(yi // bucket), int(xi // bucket)
        if any((yi - y[j]) ** 2 + (xi - x[j]) ** 2 < (fi * (ri + radius[j])) ** 2
               for dy in (-1, 0, 1) for dx in (-1, 0, 1) for j in grid.get((gy + dy, gx + dx), ())):
            continue
        grid.setdefault((gy, gx), []).append(i)
        accepted.append(i)
    idx = np.array(accepted, np.int64)
    return {"y": y[idx], "x": x[idx], "kind": kind[idx], "a": a[idx], "b": b[idx],
            "ac": ac[idx], "bc": bc[idx], "theta": theta[idx]}


def _render_labels(rng: np.random.Generator, shape: tuple[int, int], cells: dict[str, np.ndarray]):
    """Nucleus and cell label images (IDs = 1 + index into ``cells``), and the normalised radius inside nuclei.

    A pixel goes to the nucleus (cell body) whose ellipse, with a slightly irregular outline, holds it most
    centrally, so crowded nuclei touch along a boundary instead of overlapping.
    """
    nuclei = np.zeros(shape, np.uint32)
    bodies = np.zeros(shape, np.uint32)
    best_n = np.ones(shape, np.float32)
    best_c = np.ones(shape, np.float32)
    n = len(cells["y"])
    wobble = rng.normal(0, 0.05, (n, 4))
    phases = rng.uniform(0, 2 * np.pi, (n, 4))
    for i in range(n):
        yc, xc, a, b, ac, bc, th = (cells[k][i] for k in ("y", "x", "a", "b", "ac", "bc", "theta"))
        half = int(math.ceil(ac * 1.15)) + 1
        y0, y1 = max(int(yc) - half, 0), min(int(yc) + half + 1, shape[0])
        x0, x1 = max(int(xc) - half, 0), min(int(xc) + half + 1, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(yc)
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(xc)
        u = dx * math.cos(th) + dy * math.sin(th)
        v = -dx * math.sin(th) + dy * math.cos(th)
        angle = np.arctan2(v * a, u * b)
        w = wobble[i]
        outline_n = 1 + w[0] * np.cos(2 * angle + phases[i, 0]) + w[1] * np.cos(3 * angle + phases[i, 1])
        outline_c = 1 + 2 * w[2] * np.cos(2 * angle + phases[i, 2]) + 2 * w[3] * np.cos(3 * angle + phases[i, 3])
        rho_n = np.sqrt((u / a) ** 2 + (v / b) ** 2) / outline_n
        rho_c = np.sqrt((u / ac) ** 2 + (v / bc) ** 2) / outline_c
        window = (slice(y0, y1), slice(x0, x1))
        won = rho_n < best_n[window]
        best_n[window][won], nuclei[window][won] = rho_n[won], i + 1
        won = rho_c < best_c[window]
        best_c[window][won], bodies[window][won] = rho_c[won], i + 1
    inside = nuclei > 0
    bodies[inside] = nuclei[inside]
    nuclei = _largest_pieces(nuclei)
    # a cell body keeps only the pieces connected to its own nucleus
    pieces = connected_components(bodies, background=0, connectivity=1)
    good = np.zeros(pieces.max() + 1, bool)
    good[np.unique(pieces[(nuclei > 0) & (nuclei == bodies)])] = True
    good[0] = False
    bodies[~good[pieces]] = 0
    bodies[nuclei > 0] = nuclei[nuclei > 0]
    return nuclei, bodies, np.where(nuclei > 0, best_n, 0).astype(np.float32)


def _largest_pieces(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest 4-connected piece of every label."""
    pieces = connected_components(labels, background=0, connectivity=1)
    size = np.bincount(pieces.ravel())
    owner = np.zeros(len(size), labels.dtype)
    owner[pieces.ravel()] = labels.ravel()
    order = np.lexsort((-size[1:], owner[1:])) + 1           # by owner, biggest first
    first = np.r_[True, owner[order][1:] != owner[order][:-1]]
    keep = np.zeros(len(size), bool)
    keep[order[first]] = True
    return np.where(keep[pieces], labels, 0).astype(labels.dtype)


def _texture(rng: np.random.Generator, shape: tuple[int, int], sigma) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit sd, (H, W) float32."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / field.std()


def _render_signal(rng: np.random.Generator, shape: tuple[int, int], nuclei: np.ndarray, bodies: np.ndarray,
                   rho: np.ndarray, kinds: np.ndarray, fields: dict[str, _Field]) -> np.ndarray:
    """Noise-free specimen signal S_c (without camera offset), (n_channels, H, W) float32 in counts."""
    n_cells = len(kinds)
    type_names = np.array(CELL_TYPES)[kinds]
    dna = _DNA_MEDIAN * np.exp(rng.normal(0, 0.2, n_cells))
    dna *= np.where(rng.random(n_cells) < 0.1, 1.8, 1.0)                 # G2/M cells
    dna *= np.where(np.isin(type_names, ("t_cell", "immune_other")), 1.3, 1.0)   # condensed lymphocyte chromatin
    chromatin = _texture(rng, shape, 0.7)
    spots = ndimage.gaussian_filter(((rng.random(shape) < 0.006) & (nuclei > 0)).astype(np.float32), 0.8)
    spots /= max(float(spots.max()), 1e-6)
    nucleus_pattern = np.clip(1 + 0.3 * chromatin + 0.3 * rho ** 4 + 1.2 * spots, 0.2, None) * (nuclei > 0)
    fibers = np.where(fields["orientation"].grid(shape) > 0,
                      _texture(rng, shape, (4, 0.7)), _texture(rng, shape, (0.7, 4)))
    membrane = find_boundaries(bodies, mode="inner") & (bodies > 0)
    cytoplasm = (bodies > 0) & (nuclei == 0)
    nucleus = nuclei > 0
    patterns = {   # spatial pattern of a marker inside an expressing cell, before its per-cell level
        "membrane": membrane + 0.25 * cytoplasm + 0.1 * nucleus,
        "cytoplasm": cytoplasm * np.clip(1 + 0.3 * fibers, 0, None) + 0.25 * nucleus,
        "fibrillar": cytoplasm * np.clip(0.4 + 0.8 * fibers, 0, None),
    }
    pattern_of = {"CD45": "membrane", "CD3": "membrane", "panCK": "cytoplasm", "aSMA": "fibrillar"}
    region = _regions(fields["epithelial"].grid(shape), fields["lymphoid"].grid(shape), fields["density"].grid(shape))
    tissue = ndimage.gaussian_filter((region > 0).astype(np.float32), 6)
    autofluorescence = tissue * np.clip(0.7 + 0.15 * fields["autofluorescence"].grid(shape)
                                        + 0.3 * (region == 3) * np.clip(fibers, 0, None), 0, None)
    signal = np.empty((len(markers()),) + shape, np.float32)
    for c, name in enumerate(markers()):
        if name in _DNA_BLEACH:
            level, pattern = dna * _DNA_BLEACH[name], nucleus_pattern
        else:
            typical = max(e.get(name, 0.0) for e in _EXPRESSION.values())
            median = np.array([_EXPRESSION[t].get(name, _NONSPECIFIC * typical) for t in type_names])
            level, pattern = median * np.exp(rng.normal(0, 0.35, n_cells)), patterns[pattern_of[name]]
        per_pixel = np.r_[0.0, level].astype(np.float32)[bodies] * pattern
        signal[c] = (_BACKGROUND[name] + _AUTOFLUORESCENCE[name] * autofluorescence
                     + ndimage.gaussian_filter(per_pixel, PSF_SIGMA_PX))
    return signal


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
    """Signal seen by a tile whose pixel (0, 0) sits at canvas coordinate ``top_left`` (fractional, px).

    Separable cubic convolution; the signal is PSF-blurred (band-limited), so this is what the camera saw.

    Parameters
    ----------
    signal : (C, H, W) float32 ndarray
    top_left : (2,) float ndarray
        (y, x) in canvas px, at least 1 px from the canvas edge (and the tile 2 px inside it).

    Returns
    -------
    (C, tile_size, tile_size) float32 ndarray
    """
    start = np.floor(top_left).astype(int)
    wy, wx = (_cubic_weights(f) for f in top_left - start)
    y0, x0 = start
    rows = sum(w * signal[:, y0 - 1 + k:y0 - 1 + k + tile_size, x0 - 1:x0 + tile_size + 2] for k, w in enumerate(wy))
    return sum(w * rows[:, :, k:k + tile_size] for k, w in enumerate(wx))


def _size_problems(grid: tuple[int, int], tile_size: int, overlap: float) -> list[Problem]:
    problems = []
    if min(grid) < 1 or max(grid) > 20:
        problems.append(Problem("--rows/--cols", f"grid {grid[0]}x{grid[1]} is outside 1..20 tiles per side",
                                "use e.g. 3 rows x 3 columns"))
    if not 64 <= tile_size <= 4096:
        problems.append(Problem("--tile-size", f"{tile_size} px is outside 64..4096", "use e.g. 512"))
    if not 0 < overlap < 0.5 or overlap * tile_size < MIN_OVERLAP_PX:
        problems.append(Problem("--overlap", f"{overlap} of {tile_size} px tiles is not in (0, 0.5) or is under "
                                f"{MIN_OVERLAP_PX} px, too little for stitching with {JITTER_MAX_UM} µm jitter",
                                "use e.g. 0.1 with 512 px tiles"))
    return problems


def simulate(*, seed: int = 0, grid: tuple[int, int] = (3, 3), tile_size: int = 512,
             overlap: float = 0.1) -> SampleSlide:
    """Make the sample slide's pixels and truth in memory, deterministically from ``seed``.

    Parameters
    ----------
    seed : int
        Seed of the only random generator used.
    grid : (rows, cols)
        Tiles per column and per row.
    tile_size : int
        Tile side (px).
    overlap : float
        Nominal overlap of neighbouring tiles as a fraction of ``tile_size``.

    Returns
    -------
    SampleSlide
    """
    if problems := _size_problems(grid, tile_size, overlap):
        raise InvalidInput(problems)
    rng = np.random.default_rng(seed)
    rows, cols = grid
    step_um = round(tile_size * (1 - overlap)) * PIXEL_SIZE_UM
    rc = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    stage = np.asarray(STAGE_ORIGIN_UM) + rc * step_um
    shift_angle = rng.uniform(0, 2 * np.pi)
    shift = rng.uniform(*CYCLE_SHIFT_UM) * np.array([math.sin(shift_angle), math.cos(shift_angle)])
    jitter = np.clip(rng.normal(0, JITTER_SD_UM, (len(CYCLE_CHANNELS), len(stage), 2)), -JITTER_MAX_UM, JITTER_MAX_UM)
    shifts = np.stack([np.zeros(2), shift])
    true = stage[None] + shifts[:, None] + jitter
    origin = true[0].min(axis=0)
    frame_px = (true - origin) / PIXEL_SIZE_UM                    # (cycle, tile, yx) in the mosaic frame
    frame_shape = tuple(int(v) for v in np.ceil(frame_px[0].max(axis=0) + tile_size))
    pad = 8
    low = np.floor(frame_px.min(axis=(0, 1))).astype(int) - pad   # canvas pixel 0 in frame coordinates
    canvas_shape = tuple(int(v) for v in np.ceil(frame_px.max(axis=(0, 1)) + tile_size).astype(int) + pad - low)

    fields = {"epithelial": _Field(rng, 260 / PIXEL_SIZE_UM), "lymphoid": _Field(rng, 220 / PIXEL_SIZE_UM),
              "density": _Field(rng, 400 / PIXEL_SIZE_UM), "orientation": _Field(rng, 150 / PIXEL_SIZE_UM),
              "autofluorescence": _Field(rng, 120 / PIXEL_SIZE_UM)}
    cells = _place_cells(rng, canvas_shape, fields)
    nuclei, bodies, rho = _render_labels(rng, canvas_shape, cells)
    signal = _render_signal(rng, canvas_shape, nuclei, bodies, rho, cells["kind"], fields)

    flat = flatfield(tile_size)
    tiles = _acquire(rng, signal, flat, frame_px - low, tile_size)
    nuclei_f, bodies_f, present = _truth_in_frame(nuclei, bodies, frame_px[0], low, frame_shape, tile_size)
    crop = (slice(-low[0], -low[0] + frame_shape[0]), slice(-low[1], -low[1] + frame_shape[1]))
    return SampleSlide(
        tiles=tiles, stage_positions_um=stage, true_positions_um=true, frame_origin_um=origin,
        nuclei=nuclei_f, cells=bodies_f,
        cell_types=np.array(CELL_TYPES)[cells["kind"][present - 1]],
        signal=signal[(slice(None),) + crop] + np.float32(CAMERA_OFFSET),
        flatfield=flat, cycle_shift_um=shift)


def _acquire(rng: np.random.Generator, signal: np.ndarray, flat: np.ndarray, corners_px: np.ndarray,
             tile_size: int) -> list[np.ndarray]:
    """Camera images of every tile of every cycle: shading, shot noise, offset and read noise.

    ``corners_px`` is (cycle, tile, yx), each tile's top-left corner on the canvas of ``signal``.
    Returns one (tiles, 3, tile_size, tile_size) uint16 array per cycle.
    """
    tiles = []
    for k in range(len(CYCLE_CHANNELS)):
        channels = slice(3 * k, 3 * k + 3)
        cycle = np.empty((corners_px.shape[1], 3, tile_size, tile_size), np.uint16)
        for t, corner in enumerate(corners_px[k]):
            expected = flat * _sample_tile(signal[channels], corner, tile_size)
            counts = CAMERA_OFFSET + rng.poisson(np.clip(expected, 0, None)) + rng.normal(0, READ_NOISE, expected.shape)
            cycle[t] = np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
        tiles.append(cycle)
    return tiles


def _truth_in_frame(nuclei: np.ndarray, bodies: np.ndarray, corners_px: np.ndarray, low: np.ndarray,
                    frame_shape: tuple[int, int], tile_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The label truth in the mosaic frame, only where a cycle-1 tile (top-left ``corners_px``) looked.

    Returns (nuclei, cells) relabelled 1..N in raster order of first pixel, as skimage numbers
    labels, and the canvas ids they came from (``present[i - 1]`` is label ``i``'s).
    """
    crop = (slice(-low[0], -low[0] + frame_shape[0]), slice(-low[1], -low[1] + frame_shape[1]))
    seen = np.zeros(frame_shape, bool)
    for y, x in corners_px:
        seen[int(math.ceil(y)):int(math.floor(y)) + tile_size, int(math.ceil(x)):int(math.floor(x)) + tile_size] = True
    nuclei_f = _largest_pieces(np.where(seen, nuclei[crop], 0))
    bodies_f = np.where(seen, bodies[crop], 0)
    ids, first_pixel = np.unique(nuclei_f, return_index=True)
    present = ids[1:][np.argsort(first_pixel[1:])] if ids[0] == 0 else ids[np.argsort(first_pixel)]
    relabel = np.zeros(int(max(nuclei.max(), bodies.max())) + 1, np.uint32)
    relabel[present] = np.arange(1, len(present) + 1, dtype=np.uint32)
    return relabel[nuclei_f], relabel[bodies_f], present


def mean_table(labels: np.ndarray, signal: np.ndarray, names: list[str]) -> pd.DataFrame:
    """Per-label means in MCQuant's layout: CellID, one column per channel, X_centroid, Y_centroid, Area.

    Parameters
    ----------
    labels : (H, W) integer ndarray
        Label image, IDs 1..N (0 = background).
    signal : (C, H, W) ndarray
    names : list of str
        Column name of each channel.

    Returns
    -------
    DataFrame
        One row per ID present; centroids in px (x = column, y = row), Area in px.
    """
    flat_labels = labels.ravel().astype(np.int64)
    n = int(flat_labels.max()) + 1
    area = np.bincount(flat_labels, minlength=n).astype(np.float64)
    ids = np.flatnonzero(area[1:]) + 1
    rows, columns = np.indices(labels.shape)
    table = {"CellID": ids}
    for name, channel in zip(names, signal, strict=True):
        table[name] = np.bincount(flat_labels, weights=channel.ravel().astype(np.float64), minlength=n)[ids] / area[ids]
    table["X_centroid"] = np.bincount(flat_labels, weights=columns.ravel(), minlength=n)[ids] / area[ids]
    table["Y_centroid"] = np.bincount(flat_labels, weights=rows.ravel(), minlength=n)[ids] / area[ids]
    table["Area"] = area[ids].astype(np.int64)
    return pd.DataFrame(table)


def _write_truth(truth_dir: Path, sample: SampleSlide, *, slide_id: str, seed: int, grid: tuple[int, int],
                 tile_size: int, overlap: float, cycle_files: list[str]) -> None:
    truth_dir.mkdir()
    names = markers()
    rows = []
    for k, positions in enumerate(sample.true_positions_um):
        for t, (stage, true) in enumerate(zip(sample.stage_positions_um, positions, strict=True)):
            frame = (true - sample.frame_origin_um) / PIXEL_SIZE_UM
            rows.append({"cycle": k + 1, "tile": t, "row": t // grid[1], "col": t % grid[1],
                         "stage_y_um": stage[0], "stage_x_um": stage[1], "true_y_um": true[0], "true_x_um": true[1],
                         "mosaic_y_px": frame[0], "mosaic_x_px": frame[1]})
    pd.DataFrame(rows).to_csv(truth_dir / "tile_positions.csv", index=False, float_format="%.4f")
    for name, labels in (("nuclei", sample.nuclei), ("cell", sample.cells)):
        tifffile.imwrite(truth_dir / f"{name}.tif", labels, compression="zlib")
        mean_table(labels, sample.signal, names).to_csv(truth_dir / f"{name}.csv", index=False, float_format="%.4f")
    pd.DataFrame({"CellID": np.arange(1, len(sample.cell_types) + 1), "cell_type": sample.cell_types}).to_csv(
        truth_dir / "cell_types.csv", index=False)
    tifffile.imwrite(truth_dir / "flatfield.tif", sample.flatfield)
    types, counts = np.unique(sample.cell_types, return_counts=True)
    doc = {
        "generator": GENERATOR, "generator_version": GENERATOR_VERSION, "seed": seed, "slide_id": slide_id,
        "pixel_size_um": PIXEL_SIZE_UM, "grid_rows_cols": list(grid), "tile_size_px": tile_size,
        "nominal_overlap": overlap, "step_px": round(tile_size * (1 - overlap)),
        "cycles": [{"cycle": k + 1, "file": f, "channels": list(ch)}
                   for k, (f, ch) in enumerate(zip(cycle_files, CYCLE_CHANNELS, strict=True))],
        "cycle2_shift_um": [round(float(v), 6) for v in sample.cycle_shift_um],
        "cycle2_shift_px": [round(float(v) / PIXEL_SIZE_UM, 6) for v in sample.cycle_shift_um],
        "jitter_sd_um": JITTER_SD_UM, "jitter_max_um": JITTER_MAX_UM,
        "mosaic_frame": {"origin_stage_um": [float(v) for v in sample.frame_origin_um],
                         "shape_px": list(sample.nuclei.shape)},
        "camera": {"offset_adu": CAMERA_OFFSET, "read_noise_adu": READ_NOISE, "gain_e_per_adu": 1.0,
                   "psf_sigma_px": PSF_SIGMA_PX, "flat_corner": FLAT_CORNER},
        "n_cells": int(len(sample.cell_types)),
        "cell_type_counts": {str(t): int(c) for t, c in zip(types, counts, strict=True)},
        "files": {"tile_positions": "tile_positions.csv", "nuclei": "nuclei.tif", "cell": "cell.tif",
                  "nuclei_means": "nuclei.csv", "cell_means": "cell.csv", "cell_types": "cell_types.csv",
                  "flatfield": "flatfield.tif"},
    }
    (truth_dir / "truth.json").write_text(json.dumps(doc, indent=1) + "\n")


def _made_by_sample(truth_dir: Path) -> bool:
    try:
        return json.loads((truth_dir / "truth.json").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def make_sample(out_dir: Path, *, slide_id: str = "sample", seed: int = 0, grid: tuple[int, int] = (3, 3),
                tile_size: int = 512, overlap: float = 0.1) -> tuple[Path, Path]:
    """Write the sample slide ``out_dir/<slide_id>/`` and its truth ``out_dir/<slide_id>.truth/``.

    Same arguments, same bytes. An earlier sample at the same place is replaced; any other existing
    folder there is left alone and reported. Files appear all at once (built in a temporary folder
    beside them), the slide's manifest.json written last.

    Parameters
    ----------
    out_dir : Path
        Folder that receives both (created if missing).
    slide_id : str
        Name of the slide folder.
    seed, grid, tile_size, overlap
        See :func:`simulate`.

    Returns
    -------
    (slide_dir, truth_dir) : tuple of Path
    """
    if problems := check_slide_id(slide_id) + _size_problems(grid, tile_size, overlap):
        raise InvalidInput(problems)
    out_dir = Path(out_dir)
    slide_dir, truth_dir = out_dir / slide_id, out_dir / f"{slide_id}.truth"
    foreign = [p for p in (slide_dir, truth_dir) if p.exists() and not _made_by_sample(truth_dir)]
    if foreign:
        raise InvalidInput([Problem(str(p), "already exists and is not a sample made by `atlas sample`",
                                    "choose another DIR or --slide-id, or move that folder away") for p in foreign])
    sample = simulate(seed=seed, grid=grid, tile_size=tile_size, overlap=overlap)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{slide_id}.") as tmp:
        new_slide, new_truth = Path(tmp) / slide_id, Path(tmp) / truth_dir.name
        (new_slide / RAW).mkdir(parents=True)
        (new_slide / MARKERS).write_text("channel_number,cycle_number,marker_name\n" + "".join(
            f"{i},{1 + (i - 1) // 3},{name}\n" for i, name in enumerate(markers(), start=1)))
        cycle_files = [f"{RAW}/cycle-{k + 1:02d}.ome.tif" for k in range(len(CYCLE_CHANNELS))]
        for k, (rel, tiles, channels) in enumerate(zip(cycle_files, sample.tiles, CYCLE_CHANNELS, strict=True)):
            file_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"{GENERATOR}/{GENERATOR_VERSION}/{slide_id}/{seed}/"
                                   f"{grid}/{tile_size}/{overlap}/{k}")
            write_cycle(new_slide / rel, tiles, sample.stage_positions_um, PIXEL_SIZE_UM, list(channels),
                        uuid=f"urn:uuid:{file_uuid}", acquired=ACQUIRED + timedelta(days=k))
        write_manifest(new_slide)
        _write_truth(new_truth, sample, slide_id=slide_id, seed=seed, grid=grid, tile_size=tile_size,
                     overlap=overlap, cycle_files=cycle_files)
        for old in (slide_dir, truth_dir):
            if old.exists():
                shutil.rmtree(old)
        new_slide.rename(slide_dir)
        new_truth.rename(truth_dir)
    return slide_dir, truth_dir
