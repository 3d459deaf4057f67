"""Cells drawn into label images: a pixel goes to the nucleus (cell body) whose irregular ellipse holds
it most centrally, then each nucleus keeps its largest piece and each body the pieces on its nucleus.

Cells are given as arrays (see :meth:`atlas.slide.specimen.Specimen.block_cells`): centre ``y``, ``x``,
nucleus semi-axes ``a``, ``b``, body semi-axes ``ac``, ``bc``, orientation ``theta``, and the outline's
harmonics ``wobble`` and ``phases`` (n, 4). Everything is vectorised over (cell, pixel) pairs.
"""
from __future__ import annotations

import numpy as np
from skimage.measure import label as connected_components


def _take(cells: dict, index) -> dict:
    return {k: v[index] for k, v in cells.items()}


def _ellipses(cells: dict, window: tuple[int, int, int, int]):
    """Every (pixel, cell) pair within a cell's drawing box that may lie inside the cell: flat pixel
    index in ``window``, cell index, and the normalised nucleus and body radii (< 1 inside; the
    outlines are ellipses made slightly irregular by 2nd and 3rd harmonics)."""
    y0, x0, y1, x1 = window
    c = {name: cells[name].astype(np.float32) for name in ("y", "x", "a", "b", "ac", "bc")}
    cos_t, sin_t = np.cos(cells["theta"]).astype(np.float32), np.sin(cells["theta"]).astype(np.float32)
    cos_p, sin_p = np.cos(cells["phases"]).astype(np.float32), np.sin(cells["phases"]).astype(np.float32)
    wobble = cells["wobble"].astype(np.float32) * np.float32([1, 1, 2, 2])
    widest = 1 + np.abs(wobble[:, 2:]).sum(1)                         # the body outline's largest factor
    half = (np.ceil(cells["ac"] * 1.15) + 1).astype(np.int32)
    top, left = np.floor(cells["y"]).astype(np.int32) - half, np.floor(cells["x"]).astype(np.int32) - half
    inv_ac, inv_bc = 1 / c["ac"], 1 / c["bc"]
    parts = []
    for h in np.unique(half):          # cells with the same drawing box: broadcast (cells, box pixels), no gathers
        which = np.flatnonzero(half == h)
        rows, cols = np.divmod(np.arange((2 * h + 1) ** 2, dtype=np.int32), 2 * h + 1)
        py, px = top[which, None] + rows, left[which, None] + cols
        dy = (top[which] - c["y"][which]).astype(np.float32)[:, None] + rows.astype(np.float32)
        dx = (left[which] - c["x"][which]).astype(np.float32)[:, None] + cols.astype(np.float32)
        ct, st = cos_t[which, None], sin_t[which, None]
        u, v = dx * ct + dy * st, dy * ct - dx * st
        plain_c = (u * inv_ac[which, None]) ** 2 + (v * inv_bc[which, None]) ** 2
        keep = (plain_c < (widest[which] ** 2)[:, None]) & (py >= y0) & (py < y1) & (px >= x0) & (px < x1)
        parts.append((which[np.nonzero(keep)[0]], py[keep], px[keep], u[keep], v[keep], plain_c[keep]))
    if not parts:
        empty = np.zeros(0, np.float32)
        return np.zeros(0, np.int64), np.zeros(0, np.int64), empty, empty
    cell, py, px, u, v, plain_c = (np.concatenate(p) for p in zip(*parts, strict=True))
    ub, va = u * c["b"][cell], v * c["a"][cell]
    hyp = np.hypot(ub, va)
    centre = hyp == 0
    hyp[centre] = 1
    cos_1, sin_1 = np.where(centre, 1, ub / hyp), va / hyp           # the angle atan2(va, ub) around the nucleus
    cos_2, sin_2 = 2 * cos_1 * cos_1 - 1, 2 * sin_1 * cos_1
    cos_3, sin_3 = cos_1 * (4 * cos_1 * cos_1 - 3), sin_1 * (3 - 4 * sin_1 * sin_1)

    def outline(q: int, cos_n: np.ndarray, sin_n: np.ndarray) -> np.ndarray:
        return wobble[cell, q] * (cos_n * cos_p[cell, q] - sin_n * sin_p[cell, q])

    outline_n = 1 + outline(0, cos_2, sin_2) + outline(1, cos_3, sin_3)
    outline_c = 1 + outline(2, cos_2, sin_2) + outline(3, cos_3, sin_3)
    rho_n = np.sqrt((u / c["a"][cell]) ** 2 + (v / c["b"][cell]) ** 2) / outline_n
    rho_c = np.sqrt(plain_c) / outline_c
    return (py - y0).astype(np.int64) * (x1 - x0) + (px - x0), cell, rho_n, rho_c


def _scatter_min(best: np.ndarray, pixel: np.ndarray, rho: np.ndarray, ids: np.ndarray) -> None:
    """best[p] = min(best[p], (rho, id)) over the entries at each pixel, on keys that pack a float32
    rho >= 0 (its bits order like the value) above a uint32 id: the smallest rho wins, ties the lowest id."""
    keep = rho < 1
    key = (rho[keep].view(np.int32).astype(np.int64) << 32) | ids[keep]
    np.minimum.at(best, pixel[keep], key)


def largest_pieces(labels: np.ndarray) -> np.ndarray:
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


def _draw(cells: dict, window: tuple[int, int, int, int], chunk: int = 1024):
    """Raw labels of ``window``: at each pixel the nucleus and the body whose ellipse holds it most
    centrally (IDs = 1 + index into ``cells``, uint32) and the nucleus's normalised radius there."""
    y0, x0, y1, x1 = window
    shape = (y1 - y0, x1 - x0)
    outside = (np.float32(1).view(np.int32).astype(np.int64) << 32)         # rho 1, id 0: nobody's
    best_n, best_c = np.full(shape[0] * shape[1], outside), np.full(shape[0] * shape[1], outside)
    for start in range(0, len(cells["y"]), chunk):
        pixel, cell, rho_n, rho_c = _ellipses(_take(cells, slice(start, start + chunk)), window)
        ids = cell.astype(np.int64) + start + 1
        _scatter_min(best_n, pixel, rho_n, ids)
        _scatter_min(best_c, pixel, rho_c, ids)
    nuclei, bodies = ((b & 0xFFFFFFFF).astype(np.uint32).reshape(shape) for b in (best_n, best_c))
    return nuclei, bodies, (best_n >> 32).astype(np.int32).view(np.float32).reshape(shape)


def _tidy(nuclei: np.ndarray, bodies: np.ndarray, rho: np.ndarray):
    """A nucleus keeps its largest piece, a cell body the pieces that touch its own nucleus (and the
    nucleus's pixels); rho is 0 outside nuclei."""
    inside = nuclei > 0
    bodies[inside] = nuclei[inside]
    nuclei = largest_pieces(nuclei)
    pieces = connected_components(bodies, background=0, connectivity=1)
    good = np.zeros(pieces.max() + 1, bool)
    good[np.unique(pieces[(nuclei > 0) & (nuclei == bodies)])] = True
    good[0] = False
    bodies[~good[pieces]] = 0
    bodies[nuclei > 0] = nuclei[nuclei > 0]
    return nuclei, bodies, np.where(nuclei > 0, rho, 0).astype(np.float32)


def render_labels(cells: dict, window: tuple[int, int, int, int]):
    """Nucleus and cell label images of ``window`` and the normalised radius inside nuclei.

    A pixel goes to the nucleus (cell body) whose ellipse holds it most centrally, so crowded nuclei
    touch along a boundary instead of overlapping; a nucleus keeps its largest piece, a cell body the
    pieces that touch its own nucleus. Exact for cells whose whole body lies in the window.

    Returns
    -------
    nuclei, bodies : (H, W) uint32 ndarray
        IDs = 1 + index into ``cells``; 0 = none.
    rho : (H, W) float32 ndarray
        Normalised nucleus radius (0 at the centre, 1 at the outline); 0 outside nuclei.
    """
    return _tidy(*_draw(cells, window))
