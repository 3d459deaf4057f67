"""The overview's story: authored waypoints resolved to pixels, or a story drafted from the data.

A drafted story (no story.yml) has an overview waypoint, then one waypoint per channel group,
centred on the region where that group's markers are most enriched:

- **with a cell table**: each marker's cells are split into high and low at the Otsu threshold of
  the log intensities of the cells with signal (cells at 0, e.g. outside a cycle's field, never
  count as high); the image is cut into a grid of square bins (64 along its longer side) and of
  the view-sized windows the one with the most cells high in any of the group's markers, weighted
  by their share of the cells in it (high² / cells, so that a dense region of mostly negative
  cells does not win), is chosen (the first in raster order on a tie). Its description gives the
  cells in view, the share of marker-high cells in view and on the slide, and each marker's mean
  intensity in view against the slide's.
- **without one** (no segmentation): the same window search over the group's display intensities
  at the coarsest pyramid level (brightest region), with their means in view and on the slide.

The group's markers are its channels other than DNA stains (all of them when it has only DNA
stains). The view is zoomed so that it holds 50 cells on average, between zoom 2 and 4.
Everything is deterministic: the same table and image give the same story.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from atlas.science.overview.exhibit import Group, View
from atlas.slide.story import Story, Waypoint, is_nuclear_stain

GRID_BINS = 64             # bins along the image's longer side
MIN_CELLS_IN_VIEW = 50     # the drafted zoom keeps about this many cells in view on average
DRAFT_ZOOMS = (2, 4)       # lowest and highest zoom of a drafted group waypoint
_MD_SPECIAL = "\\`*_{}[]()#+-.!|<>~"


@dataclass(frozen=True)
class CellTable:
    """What drafting needs of a cell feature table.

    Attributes
    ----------
    x, y : (N,) float ndarray
        Cell centroids in full-resolution pixels (MCQuant's ``X_centroid``, ``Y_centroid``).
    intensity : (N, C) float32 ndarray
        Mean intensity of each cell in each image channel, in channel order.
    """

    x: np.ndarray
    y: np.ndarray
    intensity: np.ndarray


def md_escape(text: str) -> str:
    """``text`` as literal markdown (marker names such as ``CD8_a*`` stay as written)."""
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in text)


def resolve_views(story: Story, groups: Sequence[Group], *, width: int, height: int,
                  pixel_size_um: float | None) -> list[View]:
    """The story's waypoints in full-resolution pixels (µm / pixel size; µm = px without one).

    Groups are looked up by name (checked beforehand by :func:`atlas.slide.story.check_story`);
    a waypoint without a group shows the first, without a centre the image centre.
    """
    scale = 1.0 / (pixel_size_um or 1.0)
    index = {g.name: i for i, g in enumerate(groups)}

    def px(point: Sequence[float]) -> tuple[float, ...]:
        return tuple(round(v * scale, 3) for v in point)

    return [View(w.name, w.description, index[w.group] if w.group is not None else 0,
                 px(w.center_um) if w.center_um is not None else (width / 2, height / 2), w.zoom,
                 tuple((px(a.at_um), a.text) for a in w.arrows), tuple(px(o.box_um) for o in w.overlays),
                 w.masks)
            for w in story.waypoints]


# ---- drafting -------------------------------------------------------------------------------

def _markers_of(group: Group) -> list[int]:
    """Positions within the group of the channels its waypoint is about (DNA stains only as a last resort)."""
    chosen = [i for i, label in enumerate(group.labels) if not is_nuclear_stain(label)]
    return chosen or list(range(len(group.labels)))


def _otsu_high(values: np.ndarray) -> np.ndarray:
    """Cells above the Otsu threshold of the log intensities of the cells with signal (> 0).

    Cells at 0 have no data (e.g. outside a cycle's field after registration): they are left out
    of the threshold, where they would otherwise pull it to the bottom, and are never high.
    """
    from skimage.filters import threshold_otsu

    values = np.nan_to_num(values.astype(np.float64), nan=0.0)
    positive = values[values > 0]
    if positive.size < 2 or positive.max() == positive.min():
        return np.zeros(values.shape, bool)
    return values > math.exp(threshold_otsu(np.log(positive)))


@dataclass(frozen=True)
class _Grid:
    """Square bins over the image and the window a drafted view covers, in bins."""

    size: float               # bin edge in pixels
    shape: tuple[int, int]    # (rows, columns)
    window: tuple[int, int]   # (rows, columns)

    @classmethod
    def for_image(cls, width: int, height: int, zoom: float) -> _Grid:
        size = max(width, height) / GRID_BINS
        rows, cols = max(1, math.ceil(height / size)), max(1, math.ceil(width / size))
        return cls(size, (rows, cols), (max(1, round(rows / zoom)), max(1, round(cols / zoom))))

    def histogram(self, x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        rows, cols = self.shape
        counts, _, _ = np.histogram2d(y, x, bins=(rows, cols), weights=weights,
                                      range=((0, rows * self.size), (0, cols * self.size)))
        return counts

    def window_sums(self, grid: np.ndarray) -> np.ndarray:
        """Sum of ``grid`` over every window position (rows - wy + 1, cols - wx + 1)."""
        wy, wx = self.window
        total = np.pad(grid, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        return total[wy:, wx:] - total[:-wy, wx:] - total[wy:, :-wx] + total[:-wy, :-wx]

    @staticmethod
    def best(score: np.ndarray) -> tuple[int, int] | None:
        """Top-left bin (row, column) of the window with the largest score; None when all are 0."""
        if not score.size or score.max() <= 0:
            return None
        row, col = np.unravel_index(int(np.argmax(score)), score.shape)  # first maximum in raster order
        return int(row), int(col)

    def bounds(self, row: int, col: int, width: int, height: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in pixels of the window at (row, col), inside the image."""
        wy, wx = self.window
        return (col * self.size, row * self.size, min((col + wx) * self.size, width),
                min((row + wy) * self.size, height))


def _zoom_for(n_cells: int | None) -> float:
    if n_cells is None:
        return float(DRAFT_ZOOMS[1])
    low, high = DRAFT_ZOOMS
    return float(min(high, max(low, math.floor(math.sqrt(n_cells / MIN_CELLS_IN_VIEW)))))


def _number(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _ratio(a: float, b: float) -> str:
    return f" ({a / b:.1f}×)" if b > 0 else ""


def _names(labels: Sequence[str]) -> str:
    return ", ".join(md_escape(label) for label in labels)


def _cell_waypoint(group: Group, cells: CellTable, high: dict[int, np.ndarray], grid: _Grid, zoom: float,
                   width: int, height: int, px: float) -> Waypoint:
    chosen = _markers_of(group)
    labels = [group.labels[i] for i in chosen]
    any_high = np.zeros(cells.x.shape, bool)
    for i in chosen:
        any_high |= high[group.channels[i]]
    high_in = grid.window_sums(grid.histogram(cells.x, cells.y, any_high.astype(np.float64)))
    all_in = grid.window_sums(grid.histogram(cells.x, cells.y))
    best = grid.best(high_in ** 2 / np.maximum(all_in, 1))  # many marker-high cells, and mostly marker-high
    name = f"{group.name}: {', '.join(labels)}"
    if best is None:
        return Waypoint(name, f"No cell is high in {_names(labels)} on this slide (Otsu threshold of the "
                              "log intensities over the cells), so this view shows the whole image.",
                        group.name, (width / 2 * px, height / 2 * px), 1.0)
    x0, y0, x1, y1 = grid.bounds(*best, width, height)
    inside = (cells.x >= x0) & (cells.x < x1) & (cells.y >= y0) & (cells.y < y1)
    n_view, n_all = int(inside.sum()), cells.x.size
    share_view = any_high[inside].mean() if n_view else 0.0
    lines = [f"Where {_names(labels)} are most enriched: **{int(any_high[inside].sum()):,}** of the "
             f"**{n_view:,}** cells in view are high in {'any of them' if len(labels) > 1 else 'it'} "
             f"(**{share_view:.0%}**; slide: {any_high.mean():.0%} of {n_all:,} cells).", "",
             "| Marker | High in view | High on slide | Mean in view | Mean on slide |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for i in chosen:
        c = group.channels[i]
        values, is_high = cells.intensity[:, c], high[c]
        mean_view = float(values[inside].mean()) if n_view else 0.0
        mean_all = float(values.mean())
        marker_share = is_high[inside].mean() if n_view else 0.0
        lines.append(f"| {md_escape(group.labels[i])} | {marker_share:.0%} | {is_high.mean():.0%} | "
                     f"{_number(mean_view)}{_ratio(mean_view, mean_all)} | {_number(mean_all)} |")
    lines += ["", "High: above the Otsu threshold of the marker's log intensities over the cells. "
                  "Drafted from the cell table; edit it with `atlas story draft`."]
    return Waypoint(name, "\n".join(lines), group.name,
                    (round((x0 + x1) / 2 * px, 1), round((y0 + y1) / 2 * px, 1)), zoom)


def _pixel_waypoint(group: Group, planes: np.ndarray, grid: _Grid, zoom: float, width: int, height: int,
                    px: float) -> Waypoint:
    chosen = _markers_of(group)
    labels = [group.labels[i] for i in chosen]
    ly, lx = planes.shape[1:]
    yy, xx = np.meshgrid((np.arange(ly) + 0.5) * height / ly, (np.arange(lx) + 0.5) * width / lx, indexing="ij")
    shown = np.zeros((ly, lx))
    for i in chosen:
        low, high = group.ranges[i]
        shown += np.clip((np.nan_to_num(planes[group.channels[i]].astype(np.float64)) - low) / (high - low), 0, 1)
    shown /= len(chosen)
    best = grid.best(grid.window_sums(grid.histogram(xx.ravel(), yy.ravel(), shown.ravel())))
    name = f"{group.name}: {', '.join(labels)}"
    if best is None:
        return Waypoint(name, f"{_names(labels)}: no signal above the display range anywhere on this slide, so "
                              "this view shows the whole image.", group.name, (width / 2 * px, height / 2 * px), 1.0)
    x0, y0, x1, y1 = grid.bounds(*best, width, height)
    inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    mean_view, mean_all = float(shown[inside].mean()), float(shown.mean())
    text = (f"Where {_names(labels)} are brightest: mean display intensity **{mean_view:.0%}** in view, "
            f"{mean_all:.0%} over the slide{_ratio(mean_view, mean_all)}.\n\nThis run has no cell table "
            "(no segmentation), so the view is chosen from the image itself.")
    return Waypoint(name, text, group.name, (round((x0 + x1) / 2 * px, 1), round((y0 + y1) / 2 * px, 1)), zoom)


def draft_story(*, groups: Sequence[Group], width: int, height: int, pixel_size_um: float | None, header: str,
                cells: CellTable | None = None, planes: np.ndarray | None = None) -> Story:
    """Draft a story from the data: an overview waypoint, then one per channel group.

    Parameters
    ----------
    groups : sequence of Group
        The overview's channel groups (with display ranges).
    width, height : int
        Full-resolution image size in pixels.
    pixel_size_um : float or None
        Story positions are in µm (pixels when None).
    header : str
        Markdown introduction; the overview waypoint's description starts with it.
    cells : CellTable, optional
        The cell table; None drafts from ``planes``.
    planes : (C, y, x) ndarray, optional
        The coarsest pyramid level, used without a cell table.

    Returns
    -------
    Story whose groups are empty (the overview's groups are kept) and whose positions are in µm.
    """
    if cells is None and planes is None:
        raise ValueError("draft_story needs the cell table or the coarsest image level")
    px = pixel_size_um or 1.0
    n_cells = int(cells.x.size) if cells is not None else None
    zoom = _zoom_for(n_cells)
    grid = _Grid.for_image(width, height, zoom)
    basis = ("one per channel group, centred where the group's markers are most enriched (cells high in them)"
             if cells is not None else "one per channel group, centred where the group's markers are brightest")
    overview = Waypoint("Overview", f"{header}\n\nThe whole slide. The next waypoints were drafted from the data: "
                                    f"{basis}.", groups[0].name, (round(width / 2 * px, 1), round(height / 2 * px, 1)),
                        1.0)
    waypoints = [overview]
    if cells is not None:
        high = {c: _otsu_high(cells.intensity[:, c]) for g in groups for c in g.channels}
        waypoints += [_cell_waypoint(g, cells, high, grid, zoom, width, height, px) for g in groups]
    else:
        waypoints += [_pixel_waypoint(g, planes, grid, zoom, width, height, px) for g in groups]
    return Story((), tuple(waypoints))
