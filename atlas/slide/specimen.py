"""The made sample slide's specimen: synthetic tissue that can be rendered on any window of its frame.

Everything here is a deterministic function of the seed and the frame pixel, computed block by block,
so a slide of any size is made one window at a time (see :mod:`atlas.slide.sample`, which cuts tiles
and writes the truth from these windows, and docs/sample-slide.md):

- **Tissue fields** (epithelium, lymphoid aggregates, density, stroma orientation, autofluorescence) are
  sums of random plane waves: smooth, defined everywhere, evaluated on a window in one matrix product.
- **Cells** are placed per block of ``PLACEMENT_BLOCK_PX`` (random sequential addition of candidates
  seeded by ``(seed, block)``). Neighbouring blocks are resolved in four phases (a 2 x 2 colouring):
  a block's candidates give way to the cells already accepted in its neighbours of earlier phases, so
  no two cells collide across a block edge, and a block depends only on blocks at most three away.
- **Labels** of a window are drawn from the cells within ``REACH_PX`` of it; a pixel goes to the
  nucleus (cell body) whose irregular ellipse holds it most centrally.
- **Textures** (chromatin, stroma fibres, chromocentre spots) filter white noise drawn per block.
- **Signal** per marker: background + autofluorescence x tissue + PSF-blurred per-cell expression.

Frame coordinates are mosaic-frame pixels (0.65 µm); windows are ``(y0, x0, y1, x1)``, end exclusive.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.special import ndtri

from atlas.slide.cell_shapes import render_labels

PIXEL_SIZE_UM = 0.65
PSF_SIGMA_PX = 1.0
PLACEMENT_BLOCK_PX = 128                 # > the largest interaction distance of two cells (36 px)
NOISE_BLOCK_PX = 128
CANDIDATES_PER_BLOCK = round(PLACEMENT_BLOCK_PX ** 2 / 30)
REACH_PX = 25                            # no cell draws a pixel farther than this from its centre
PATTERN_HALO_PX = 24                     # textures (sd <= 4 px) and the tissue blur (sd 6 px) need this
LABEL_HALO_PX = PATTERN_HALO_PX + 2 * REACH_PX   # whole cells and their rivals around the pattern window
_BLOCK_OFFSET = 1 << 20                  # block indices may be negative: seeds take non-negative ints
# purposes of the seeded random streams
_FIELDS, _PLACE, _LEVELS, _CHROMATIN, _FIBRES, _SPOTS = range(1, 7)     # 7 and up: atlas.slide.sample

CELL_TYPES = ("epithelial", "t_cell", "immune_other", "stromal", "other")
# nucleus semi-axes (µm, mean long/short), relative sd, cytoplasm rim (µm, long/short)
_SHAPES = np.array([
    (5.4, 4.3, 0.10, 3.6, 3.2),     # epithelial
    (3.9, 3.5, 0.08, 1.2, 1.1),     # t_cell
    (4.5, 3.9, 0.10, 2.2, 2.0),     # immune_other
    (7.0, 2.6, 0.12, 3.5, 1.2),     # stromal
    (5.0, 3.8, 0.10, 2.6, 2.2),     # other
])
_SIZE_SD_CLIP = 3.0                      # size draws are clipped at 3 sd, so REACH_PX bounds every cell
# region code (see _regions) -> (type probabilities in CELL_TYPES order, acceptance density, packing factor);
# stroma's density follows the tissue density field (None)
_REGIONS = {
    1: ((0.88, 0.06, 0.03, 0.0, 0.03), 1.0, 0.78),     # epithelium
    2: ((0.0, 0.60, 0.35, 0.0, 0.05), 1.0, 0.72),      # lymphoid aggregate
    3: ((0.0, 0.15, 0.10, 0.60, 0.15), None, 0.90),    # stroma
}
_DNA_MEDIAN = 3500.0
_NONSPECIFIC = 0.03                      # negative cells still show this fraction of a typical positive
_LEVEL_SD = 0.35                         # log-normal spread of a cell's marker level around its type's median
_SPOT_DENSITY = 0.006                    # chromocentres per nucleus pixel
_SPOT_SIGMA_PX = 0.8


@dataclass(frozen=True)
class Marker:
    """How one channel's stain looks.

    Attributes
    ----------
    name : str
    pattern : str
        ``dna``, ``nuclear``, ``membrane``, ``cytoplasm`` or ``fibrillar``: where in an expressing cell.
    background, autofluorescence : float
        Counts (ADU) of the slide's background and of autofluorescence over tissue in this channel.
    expression : dict of str to float
        Median level (counts at full illumination) by cell type; absent types are negative. For the DNA
        stain: ``{"all": scale}``, the stain's brightness relative to the first cycle.
    """

    name: str
    pattern: str
    background: float
    autofluorescence: float
    expression: dict

    def medians(self) -> np.ndarray:
        """Median level of each cell type, in CELL_TYPES order (negative types at the nonspecific level)."""
        if self.pattern == "dna":
            return np.full(len(CELL_TYPES), _DNA_MEDIAN * self.expression["all"])
        typical = max(self.expression.values())
        return np.array([self.expression.get(t, _NONSPECIFIC * typical) for t in CELL_TYPES])


# The non-DNA stains, in the order a panel takes them: (name, pattern, background ADU, autofluorescence ADU,
# median level by cell type). The first four are the default sample's. Real antibody targets, with the
# cell types of this tissue that carry them.
_STAINS = (
    ("CD45", "membrane", 120.0, 250.0, {"t_cell": 1800.0, "immune_other": 2200.0}),
    ("panCK", "cytoplasm", 100.0, 150.0, {"epithelial": 2500.0}),
    ("CD3", "membrane", 90.0, 120.0, {"t_cell": 1400.0}),
    ("aSMA", "fibrillar", 110.0, 100.0, {"stromal": 1800.0}),
    ("CD20", "membrane", 100.0, 140.0, {"immune_other": 1600.0}),
    ("Ki67", "nuclear", 95.0, 90.0, {"epithelial": 900.0, "t_cell": 500.0, "immune_other": 500.0}),
    ("CD31", "membrane", 105.0, 110.0, {"other": 1500.0}),
    ("Vimentin", "cytoplasm", 115.0, 130.0, {"stromal": 1600.0, "other": 900.0, "immune_other": 500.0}),
    ("ECad", "membrane", 100.0, 120.0, {"epithelial": 1700.0}),
    ("CD8a", "membrane", 90.0, 110.0, {"t_cell": 1000.0}),
    ("CD68", "cytoplasm", 110.0, 160.0, {"immune_other": 1300.0}),
    ("CD4", "membrane", 95.0, 120.0, {"t_cell": 800.0, "immune_other": 600.0}),
    ("FOXP3", "nuclear", 90.0, 80.0, {"t_cell": 500.0}),
    ("PD1", "membrane", 90.0, 100.0, {"t_cell": 600.0}),
    ("HLADR", "membrane", 100.0, 130.0, {"immune_other": 1400.0, "epithelial": 300.0}),
    ("CD163", "membrane", 105.0, 150.0, {"immune_other": 900.0}),
)


def marker_panel(cycles: int, channels: int) -> list[list[Marker]]:
    """The stains of each cycle: ``DNA_k`` first (fading by 1 / (1 + 0.25 (k - 1))), then the next
    ``channels - 1`` of the stain list; past its end the list repeats with a number (``CD45_2``: the
    same antibody again in a later cycle)."""
    panel, used = [], 0
    for k in range(1, cycles + 1):
        cycle = [Marker(f"DNA_{k}", "dna", max(150.0 - 10 * (k - 1), 100.0), 60.0, {"all": 1 / (1 + 0.25 * (k - 1))})]
        for _ in range(channels - 1):
            name, pattern, background, autofluorescence, expression = _STAINS[used % len(_STAINS)]
            repeat = used // len(_STAINS)
            name = f"{name}_{repeat + 1}" if repeat else name
            cycle.append(Marker(name, pattern, background, autofluorescence, expression))
            used += 1
        panel.append(cycle)
    return panel


class Field:
    """A smooth random field (sum of random plane waves, about N(0, 1)), defined at every frame point (px)."""

    def __init__(self, rng: np.random.Generator, wavelength_px: float, n_modes: int = 16):
        k = 2 * np.pi / (wavelength_px * rng.uniform(0.6, 1.4, n_modes))
        angle = rng.uniform(0, np.pi, n_modes)
        self.ky, self.kx = k * np.sin(angle), k * np.cos(angle)
        self.phase = rng.uniform(0, 2 * np.pi, n_modes)
        self.scale = math.sqrt(2 / n_modes)

    def grid(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """Values on the pixels of ``window``, (H, W) float32: cos(a + b) = cos a cos b - sin a sin b, one product."""
        y0, x0, y1, x1 = window
        return _at_grid(self, np.arange(y0, y1), np.arange(x0, x1))


def _regions(epithelial: np.ndarray, lymphoid: np.ndarray, density: np.ndarray) -> np.ndarray:
    """Tissue region code per point: 0 none (lumen or gap), 1 epithelium, 2 lymphoid aggregate, 3 stroma."""
    region = np.full(epithelial.shape, 3, np.uint8)
    region[lymphoid > 1.3] = 2
    region[epithelial > 0.45] = 1
    region[(epithelial > 1.7) | (density < -1.4)] = 0     # gland lumen, tissue tear
    return region


def _at_points(fields: list[Field], y: np.ndarray, x: np.ndarray, origin: tuple[float, float]) -> np.ndarray:
    """Values of several fields at points (y, x) (px) near ``origin``, (n_fields, n_points) float32.

    The phase at the origin is reduced in float64; the rest (a few radians) is added in float32."""
    ky, kx = np.concatenate([f.ky for f in fields]), np.concatenate([f.kx for f in fields])
    start = (ky * origin[0] + kx * origin[1] + np.concatenate([f.phase for f in fields])) % (2 * np.pi)
    dy, dx = (y - origin[0]).astype(np.float32), (x - origin[1]).astype(np.float32)
    phase = np.multiply.outer(dy, ky.astype(np.float32)) + np.multiply.outer(dx, kx.astype(np.float32))
    phase += start.astype(np.float32)
    waves = np.cos(phase, out=phase)
    parts = np.split(waves, len(fields), axis=1)
    return np.stack([f.scale * part.sum(1) for f, part in zip(fields, parts, strict=True)])


_NORMAL_LEVELS = 1 << 16
_NORMAL_TABLE = ndtri((np.arange(_NORMAL_LEVELS) + 0.5) / _NORMAL_LEVELS).astype(np.float32)


def normals(rng: np.random.Generator, shape) -> np.ndarray:
    """N(0, 1) float32 noise for images, by inverse-CDF lookup of 16-bit uniforms: the normal
    quantised to 65,536 equiprobable levels (cut at 4.3 sd), 3x faster than the ziggurat."""
    return _NORMAL_TABLE[rng.integers(0, _NORMAL_LEVELS, shape, dtype=np.uint16)]


def stream(seed: int, purpose: int, a: int, b: int) -> np.random.Generator:
    """The random stream of one purpose at one place ``(a, b)`` (each < 2**32): Philox, a counter-based
    generator keyed by all four numbers, so every block, tile and channel has its own stream."""
    return np.random.Generator(np.random.Philox(key=[(seed << 32) | purpose, (a << 32) | b]))


def _seeded(seed: int, purpose: int, block: tuple[int, int]) -> np.random.Generator:
    return stream(seed, purpose, block[0] + _BLOCK_OFFSET, block[1] + _BLOCK_OFFSET)


def _blocks(window: tuple[int, int, int, int], size: int):
    """(bi, bj) of the blocks of ``size`` px that overlap ``window``."""
    y0, x0, y1, x1 = window
    for bi in range(y0 // size, (y1 - 1) // size + 1):
        for bj in range(x0 // size, (x1 - 1) // size + 1):
            yield bi, bj


def _phase(block: tuple[int, int]) -> int:
    return 2 * (block[0] % 2) + block[1] % 2


def _cat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _take(cells: dict, index) -> dict:
    return {k: v[index] for k, v in cells.items()}


def _greedy(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Which of ``n`` candidates random sequential addition accepts, in index order, given the
    conflicting pairs ``(i[k], j[k])``, i < j. Vectorised in rounds: a candidate with no undecided
    earlier rival is accepted and its later rivals are rejected; the result equals the one-by-one loop."""
    state = np.zeros(n, np.int8)                     # 0 undecided, 1 accepted, -1 rejected
    while (undecided := state == 0).any():
        live = undecided[i] & undecided[j]
        i, j = i[live], j[live]
        blocked = np.zeros(n, bool)
        blocked[j] = True
        new = undecided & ~blocked
        state[new] = 1
        state[j[new[i]]] = -1
    return state == 1


class Specimen:
    """The tissue of one seed with a panel of markers; renders any window of the frame.

    Parameters
    ----------
    seed : int
    markers : list of Marker
        Channels in markers.csv order.
    window_px : int
        Side of the windows it will render, one after the other along a row: its cache of placed
        cells keeps the blocks of about two such windows, so memory depends on the window, never on
        how many are rendered.
    """

    def __init__(self, seed: int, markers: list[Marker], window_px: int = 1024):
        self.seed, self.markers = seed, list(markers)
        side = (window_px + 2 * (3 * PLACEMENT_BLOCK_PX + REACH_PX)) / PLACEMENT_BLOCK_PX + 1
        self._cache_size = 2 * math.ceil(side) ** 2           # placed blocks: two windows' worth, with neighbours
        rng = np.random.default_rng([seed, _FIELDS])
        self.fields = {name: Field(rng, wavelength_um / PIXEL_SIZE_UM) for name, wavelength_um in (
            ("epithelial", 260), ("lymphoid", 220), ("density", 400), ("orientation", 150), ("autofluorescence", 120))}
        self._blocks: OrderedDict = OrderedDict()
        self._medians = np.stack([m.medians() for m in self.markers]).astype(np.float32)   # (marker, type)

    # ---- cells
    def _candidates(self, block: tuple[int, int]) -> dict:
        """Candidate cells of a block in arrival order, thinned by the local density (px, frame)."""
        rng = _seeded(self.seed, _PLACE, block)
        n, size = CANDIDATES_PER_BLOCK, PLACEMENT_BLOCK_PX
        y, x = block[0] * size + rng.uniform(0, size, n), block[1] * size + rng.uniform(0, size, n)
        u_accept, u_type = rng.random(n), rng.random(n)
        z = np.clip(rng.standard_normal((2, n)), -_SIZE_SD_CLIP, _SIZE_SD_CLIP)
        theta, bend = rng.uniform(0, np.pi, n), rng.normal(0, 0.25, n)
        cells = {"y": y, "x": x, "wobble": rng.normal(0, 0.05, (n, 4)), "phases": rng.uniform(0, 2 * np.pi, (n, 4)),
                 "dna": _DNA_MEDIAN * np.exp(rng.normal(0, 0.2, n)) * np.where(rng.random(n) < 0.1, 1.8, 1.0)}
        f = self.fields
        epithelial, lymphoid, density, orientation = _at_points(
            [f["epithelial"], f["lymphoid"], f["density"], f["orientation"]], y, x, (block[0] * size, block[1] * size))
        region = _regions(epithelial, lymphoid, density)
        stroma_density = 0.25 + 0.3 / (1 + np.exp(-2 * density))
        kind, packing, keep = np.zeros(n, np.int64), np.ones(n), np.zeros(n, bool)
        for code, (probabilities, density, pack) in _REGIONS.items():
            here = region == code
            keep[here] = u_accept[here] < (density if density is not None else stroma_density[here])
            kind[here] = np.searchsorted(np.cumsum(probabilities), u_type[here] * 0.999999)
            packing[here] = pack
        shapes = _SHAPES[kind]
        a = shapes[:, 0] / PIXEL_SIZE_UM * (1 + shapes[:, 2] * z[0])
        b = np.minimum(shapes[:, 1] / PIXEL_SIZE_UM * (1 + shapes[:, 2] * z[1]), a)
        stromal = kind == CELL_TYPES.index("stromal")
        theta = np.where(stromal, np.pi / 2 * (orientation > 0) + bend, theta)   # stroma runs in bundles
        cells.update(kind=kind, a=a, b=b, ac=a + shapes[:, 3] / PIXEL_SIZE_UM, bc=b + shapes[:, 4] / PIXEL_SIZE_UM,
                     theta=theta, packing=packing)
        cells["dna"] = cells["dna"] * np.where(np.isin(kind, (1, 2)), 1.3, 1.0)   # condensed lymphocyte chromatin
        cells["radius"] = (cells["ac"] + cells["bc"]) / 2
        return _take(cells, keep)

    def block_cells(self, block: tuple[int, int]) -> dict:
        """The cells placed in a block (arrays over cells; ``key`` identifies a cell slide-wide)."""
        if block in self._blocks:
            self._blocks.move_to_end(block)
            return self._blocks[block]
        cand = self._candidates(block)
        earlier = [self.block_cells((block[0] + dy, block[1] + dx)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if _phase((block[0] + dy, block[1] + dx)) < _phase(block)]
        earlier = [c for c in earlier if len(c["y"])]
        if earlier:       # candidates arrive after the cells of earlier-phase neighbours: give way to them
            fixed = _cat(earlier)
            bound = float(cand["packing"].max(initial=0) * (cand["radius"].max(initial=0) + fixed["radius"].max()))
            near = cKDTree(np.stack([cand["y"], cand["x"]], 1)).sparse_distance_matrix(
                cKDTree(np.stack([fixed["y"], fixed["x"]], 1)), bound, output_type="ndarray")
            i, j, d = near["i"], near["j"], near["v"]
            clash = d < cand["packing"][i] * (cand["radius"][i] + fixed["radius"][j])
            cand = _take(cand, np.setdiff1d(np.arange(len(cand["y"])), i[clash]))
        points = np.stack([cand["y"], cand["x"]], 1)
        bound = float(2 * cand["packing"].max(initial=0) * cand["radius"].max(initial=0))
        i, j = cKDTree(points).query_pairs(bound, output_type="ndarray").reshape(-1, 2).T
        i, j = np.minimum(i, j), np.maximum(i, j)
        d = np.hypot(points[i, 0] - points[j, 0], points[i, 1] - points[j, 1])
        clash = d < cand["packing"][j] * (cand["radius"][i] + cand["radius"][j])
        cells = _take(cand, _greedy(i[clash], j[clash], len(points)))
        n = len(cells["y"])
        block_id = (block[0] + _BLOCK_OFFSET) * (1 << 21) + block[1] + _BLOCK_OFFSET
        cells["key"] = block_id * (1 << 16) + np.arange(n, dtype=np.int64)
        level_z = _seeded(self.seed, _LEVELS, block).standard_normal((len(self.markers), n))   # marker-major:
        cells["level_z"] = level_z.T.astype(np.float32)      # more markers keep the first ones' levels
        self._blocks[block] = cells
        if len(self._blocks) > self._cache_size:
            self._blocks.popitem(last=False)
        return cells

    def cells_near(self, window: tuple[int, int, int, int]) -> dict:
        """Cells whose centre lies within REACH_PX of ``window`` (all that can draw a pixel in it)."""
        y0, x0, y1, x1 = window
        grown = (y0 - REACH_PX, x0 - REACH_PX, y1 + REACH_PX, x1 + REACH_PX)
        cells = _cat([self.block_cells(b) for b in _blocks(grown, PLACEMENT_BLOCK_PX)])
        inside = (cells["y"] >= grown[0]) & (cells["y"] < grown[2]) & (cells["x"] >= grown[1]) & (cells["x"] < grown[3])
        return _take(cells, inside)

    def labels(self, window: tuple[int, int, int, int]):
        """The cells that can draw a pixel of ``window`` (sorted by key) and the window's labels
        (see :func:`render_labels`)."""
        cells = self.cells_near(window)
        cells = _take(cells, np.argsort(cells["key"]))
        return cells, *render_labels(cells, window)

    def levels(self, cells: dict, marker: int) -> np.ndarray:
        """Each cell's level of one marker (counts at full illumination), float32."""
        m = self.markers[marker]
        if m.pattern == "dna":
            return (cells["dna"] * m.expression["all"]).astype(np.float32)
        spread = np.exp(_LEVEL_SD * cells["level_z"][:, marker])
        return (self._medians[marker][cells["kind"]] * spread).astype(np.float32)

    # ---- noise drawn per block
    def noise(self, purpose: int, window: tuple[int, int, int, int]) -> np.ndarray:
        """White N(0, 1) noise on ``window``, (H, W) float32, the same at a pixel whatever the window."""
        y0, x0, y1, x1 = window
        out = np.empty((y1 - y0, x1 - x0), np.float32)
        size = NOISE_BLOCK_PX
        for bi, bj in _blocks(window, size):
            block = normals(_seeded(self.seed, purpose, (bi, bj)), (size, size))
            ys, xs = max(y0, bi * size), max(x0, bj * size)
            ye, xe = min(y1, (bi + 1) * size), min(x1, (bj + 1) * size)
            out[ys - y0:ye - y0, xs - x0:xe - x0] = block[ys - bi * size:ye - bi * size, xs - bj * size:xe - bj * size]
        return out

    def spots(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """Chromocentre seeds on ``window``: 1 at Poisson points of density _SPOT_DENSITY, else 0 (float32)."""
        y0, x0, y1, x1 = window
        out = np.zeros((y1 - y0, x1 - x0), np.float32)
        size = NOISE_BLOCK_PX
        for bi, bj in _blocks(window, size):
            rng = _seeded(self.seed, _SPOTS, (bi, bj))
            n = rng.poisson(_SPOT_DENSITY * size * size)
            y, x = bi * size + rng.integers(0, size, n), bj * size + rng.integers(0, size, n)
            inside = (y >= y0) & (y < y1) & (x >= x0) & (x < x1)
            out[y[inside] - y0, x[inside] - x0] = 1
        return out


def grow(window: tuple[int, int, int, int], by: int) -> tuple[int, int, int, int]:
    """``window`` with ``by`` px more on every side."""
    return window[0] - by, window[1] - by, window[2] + by, window[3] + by


def crop(image: np.ndarray, outer: tuple[int, int, int, int], inner: tuple[int, int, int, int]) -> np.ndarray:
    """The part of ``image`` (covering window ``outer``) that covers window ``inner``."""
    return image[inner[0] - outer[0]:inner[2] - outer[0], inner[1] - outer[1]:inner[3] - outer[1]]


def _unit_texture(noise: np.ndarray, sigma) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit sd (by the filter's own gain, so window-independent)."""
    gain = 1.0
    for s in np.broadcast_to(sigma, (2,)):
        radius = int(4 * s + 0.5)
        delta = np.zeros(2 * radius + 1)
        delta[radius] = 1
        gain *= float(np.sum(ndimage.gaussian_filter1d(delta, s, mode="constant") ** 2))
    return ndimage.gaussian_filter(noise, sigma) / np.float32(math.sqrt(gain))


def _inner_boundary(labels: np.ndarray) -> np.ndarray:
    """Pixels of a label with a 4-neighbour of another label (skimage's find_boundaries, mode='inner')."""
    edge = np.zeros(labels.shape, bool)
    down = labels[1:] != labels[:-1]
    edge[1:] |= down
    edge[:-1] |= down
    right = labels[:, 1:] != labels[:, :-1]
    edge[:, 1:] |= right
    edge[:, :-1] |= right
    return edge & (labels > 0)


class Patch:
    """A window of the specimen, rendered: its cells, labels, stain patterns and autofluorescence.

    Parameters
    ----------
    specimen : Specimen
    window : (y0, x0, y1, x1)
        The window ``R`` whose signal :meth:`signal` gives.

    Attributes
    ----------
    cells : dict of arrays
        The cells that can draw a pixel of ``label_window``, sorted by ``key``.
    label_window : (y0, x0, y1, x1)
        ``R`` grown by LABEL_HALO_PX: the window of ``nuclei`` and ``bodies``.
    nuclei, bodies : uint32 ndarray
        Labels of ``label_window``, IDs = 1 + index into ``cells``; exact within REACH_PX of ``R``.
    """

    def __init__(self, specimen: Specimen, window: tuple[int, int, int, int]):
        self.specimen, self.window = specimen, window
        self.label_window = grow(window, LABEL_HALO_PX)
        self.cells, self.nuclei, self.bodies, rho = specimen.labels(self.label_window)
        pattern_window = grow(window, PATTERN_HALO_PX)
        nuclei, bodies = (crop(x, self.label_window, pattern_window) for x in (self.nuclei, self.bodies))
        rho = crop(rho, self.label_window, pattern_window)
        self._patterns, fibres = self._stain_patterns(pattern_window, nuclei, bodies, rho)
        self._bodies = crop(bodies, pattern_window, grow(window, self._psf_halo))
        self._autofluorescence = crop(self._tissue(pattern_window, fibres), pattern_window, window)

    _psf_halo = int(4 * PSF_SIGMA_PX + 0.5)

    def _stain_patterns(self, window, nuclei, bodies, rho):
        """Where in an expressing cell each kind of stain sits (before its per-cell level), on the PSF window."""
        spec = self.specimen
        used = {m.pattern for m in spec.markers}
        chromatin = _unit_texture(spec.noise(_CHROMATIN, window), 0.7)
        nucleus = nuclei > 0
        fibre_noise = spec.noise(_FIBRES, window)
        along = spec.fields["orientation"].grid(window) > 0      # stroma fibres run in bundles
        fibres = np.where(along, _unit_texture(fibre_noise, (4, 0.7)), _unit_texture(fibre_noise, (0.7, 4)))
        cytoplasm = (bodies > 0) & ~nucleus
        patterns = {}
        if "dna" in used:
            spikes = spec.spots(window) * nucleus
            spots = ndimage.gaussian_filter(spikes, _SPOT_SIGMA_PX) / np.float32(_single_spot_peak())
            patterns["dna"] = np.clip(1 + 0.3 * chromatin + 0.3 * rho ** 4 + 1.2 * spots, 0.2, None) * nucleus
        if "nuclear" in used:
            patterns["nuclear"] = np.clip(1 + 0.3 * chromatin, 0.2, None) * nucleus
        if "membrane" in used:
            patterns["membrane"] = _inner_boundary(bodies) + 0.25 * cytoplasm + 0.1 * nucleus
        if "cytoplasm" in used:
            patterns["cytoplasm"] = cytoplasm * np.clip(1 + 0.3 * fibres, 0, None) + 0.25 * nucleus
        if "fibrillar" in used:
            patterns["fibrillar"] = cytoplasm * np.clip(0.4 + 0.8 * fibres, 0, None)
        psf = grow(self.window, self._psf_halo)
        return {k: crop(v, window, psf).astype(np.float32) for k, v in patterns.items()}, fibres

    def _tissue(self, window, fibres) -> np.ndarray:
        """Autofluorescence weight: the tissue mask smoothed (sd 6 px), brighter on stroma fibres."""
        f = self.specimen.fields
        region = _regions(f["epithelial"].grid(window), f["lymphoid"].grid(window), f["density"].grid(window))
        tissue = _smooth_tissue(f, window)
        return tissue * np.clip(0.7 + 0.15 * f["autofluorescence"].grid(window)
                                + 0.3 * (region == 3) * np.clip(fibres, 0, None), 0, None)

    def signal(self, marker: int, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Noise-free specimen signal S_c of one marker (no camera offset), (H, W) float32 counts, on
        ``window`` (default: the patch's; a sub-window is cheaper)."""
        window = window or self.window
        m = self.specimen.markers[marker]
        level = np.r_[np.float32(0), self.specimen.levels(self.cells, marker)]
        psf = grow(self.window, self._psf_halo)
        inner = grow(window, self._psf_halo)
        stained = level[crop(self._bodies, psf, inner)] * crop(self._patterns[m.pattern], psf, inner)
        stained = ndimage.gaussian_filter(stained, PSF_SIGMA_PX)
        h = self._psf_halo
        autofluorescence = crop(self._autofluorescence, self.window, window)
        return np.float32(m.background) + np.float32(m.autofluorescence) * autofluorescence + stained[h:-h, h:-h]


def _single_spot_peak() -> float:
    """Peak of one chromocentre seed after the spot blur (normalises spots to about 1)."""
    radius = int(4 * _SPOT_SIGMA_PX + 0.5)
    delta = np.zeros(2 * radius + 1)
    delta[radius] = 1
    return float(ndimage.gaussian_filter1d(delta, _SPOT_SIGMA_PX, mode="constant")[radius] ** 2)


_COARSE_PX = 4          # the tissue mask is smoothed on every 4th pixel of the frame (sd 6 px = 1.5 there)


def _smooth_tissue(fields: dict, window: tuple[int, int, int, int]) -> np.ndarray:
    """The tissue mask (region > 0) blurred by a Gaussian of sd 6 px, on ``window``: blurred on the
    frame's grid of every 4th pixel (the regions change over hundreds of px), then interpolated
    linearly; the same at a pixel whatever the window."""
    step, halo = _COARSE_PX, 4 * 6 // _COARSE_PX + 2
    y0, x0, y1, x1 = window
    coarse = (y0 // step - halo, x0 // step - halo, (y1 - 1) // step + halo + 2, (x1 - 1) // step + halo + 2)
    ys, xs = np.arange(coarse[0], coarse[2]) * step, np.arange(coarse[1], coarse[3]) * step
    values = [_at_grid(fields[name], ys, xs) for name in ("epithelial", "lymphoid", "density")]
    blurred = ndimage.gaussian_filter((_regions(*values) > 0).astype(np.float32), 6 / step)

    def weights(start: int, stop: int, first: int):
        position = (np.arange(start, stop) - first * step) / step
        low = np.floor(position).astype(int)
        return low, (position - low).astype(np.float32)

    (ry, fy), (rx, fx) = weights(y0, y1, coarse[0]), weights(x0, x1, coarse[1])
    rows = blurred[ry] * (1 - fy)[:, None] + blurred[ry + 1] * fy[:, None]
    return rows[:, rx] * (1 - fx) + rows[:, rx + 1] * fx


def _at_grid(field: Field, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """A field on the grid of rows ``ys`` x columns ``xs`` (px), float32."""
    along_y = np.multiply.outer(ys.astype(np.float64), field.ky) + field.phase
    along_x = np.multiply.outer(xs.astype(np.float64), field.kx)
    left = np.hstack([np.cos(along_y), -np.sin(along_y)]).astype(np.float32)
    right = np.hstack([np.cos(along_x), np.sin(along_x)]).astype(np.float32)
    return field.scale * (left @ right.T)
