"""The truth folder of a made sample slide, written as its tiles come (see :mod:`atlas.slide.sample`).

The mosaic frame is cut into one rectangle per tile. Each tile hands over its :class:`TruthShare` (the
truth labels of its rectangle and the per-cell sums over it); :class:`TruthWriter` numbers the cells,
keeps the rectangle's labels (compressed, in a scratch folder) and writes a cell's table rows once no
later tile's rectangle can reach it. At the end the rectangles are pieced into tiled TIFFs. Memory
holds one tile's share and the cells of about one row of tiles, whatever the slide's size.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from atlas.slide.specimen import CELL_TYPES, REACH_PX, crop

TRUTH_CHUNK_PX = 512                    # chunks (TIFF tiles) of the truth label images
_ROWS_PER_WRITE = 20_000                # complete cells are written in batches of about this many


@dataclass
class TruthShare:
    """The truth of the rectangle tile ``t`` owns, its cells numbered 1..n locally.

    Attributes
    ----------
    t : int
    nuclei, cells : (h, w) uint32 ndarray
        Label images of the rectangle, local cell numbers (0 = none).
    keys : (n,) int64 ndarray
        Each cell's slide-wide identity (:attr:`atlas.slide.specimen.Specimen.block_cells` ``key``).
    kinds : (n,) int ndarray
        Index into CELL_TYPES.
    centres : (n, 2) float ndarray
        (y, x) of each cell's centre, frame px.
    first : (n,) int ndarray
        Raster index of the cell's first pixel in the rectangle.
    sums : (n, 2, 3 + channels) float64 ndarray
        Over the rectangle, per mask (nucleus, cell): area, sum of y, sum of x, sum of S_c per channel.
    """

    t: int
    nuclei: np.ndarray
    cells: np.ndarray
    keys: np.ndarray
    kinds: np.ndarray
    centres: np.ndarray
    first: np.ndarray
    sums: np.ndarray


@dataclass
class _OpenCells:
    """Per-cell sums of cells that later tiles may still add to, indexed by ID - ``first``."""

    n_values: int
    first: int = 1
    last_tile: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    kind: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sums: np.ndarray = None

    def __post_init__(self):
        self.sums = np.zeros((0, 2, self.n_values))

    def add(self, last_tile: np.ndarray, kind: np.ndarray) -> None:
        """Open the next IDs."""
        self.last_tile, self.kind = np.r_[self.last_tile, last_tile], np.r_[self.kind, kind]
        self.sums = np.concatenate([self.sums, np.zeros((len(kind), 2, self.n_values))])

    def complete(self, t: int):
        """Close the leading cells no tile after ``t`` touches: (first ID, kinds, sums)."""
        pending = np.flatnonzero(self.last_tile > t)
        n = int(pending[0]) if len(pending) else len(self.kind)
        done = (self.first, self.kind[:n].copy(), self.sums[:n].copy())      # copies: no view keeps the whole
        self.first += n
        self.last_tile, self.kind, self.sums = self.last_tile[n:].copy(), self.kind[n:].copy(), self.sums[n:].copy()
        return done


class TruthWriter:
    """Writes ``nuclei.tif``, ``cell.tif``, ``nuclei.csv``, ``cell.csv``, ``cell_types.csv`` and
    ``truth.json`` of a truth folder from the tiles' shares, given in tile order.

    IDs run 1..N in the order of the tiles' rectangles, and within a rectangle in raster order of the
    cell's first pixel there; cell ``i`` holds nucleus ``i``. A true mean is ``offset + S_c`` averaged
    over the cell's pixels.

    Parameters
    ----------
    folder : Path
        The truth folder (created).
    scratch : Path
        An existing folder for the rectangles' labels until :meth:`close`.
    row_edges, col_edges : int ndarray
        Tile ``t = row * cols + col`` owns frame rows ``row_edges[row]:row_edges[row + 1]`` and the like
        columns; the last edges are the frame's shape.
    names : list of str
        Marker names, in channel order.
    offset : float
        Camera offset added to the true means.
    """

    def __init__(self, folder: Path, scratch: Path, row_edges: np.ndarray, col_edges: np.ndarray,
                 names: list[str], offset: float):
        self.folder, self.scratch, self.names, self.offset = folder, scratch, names, offset
        self.row_edges, self.col_edges = np.asarray(row_edges), np.asarray(col_edges)
        self.ids: dict[int, int] = {}              # cell key -> ID, while a later tile may meet the cell again
        self.expiry: dict[int, list[int]] = {}     # last tile that may meet a cell -> keys
        self.next_id = 1
        self.open = _OpenCells(3 + len(names))
        self.type_counts = np.zeros(len(CELL_TYPES), np.int64)
        self._done: list = []                      # complete cells not yet written: (first ID, kinds, sums)
        self._done_rows = 0
        folder.mkdir()
        header = ",".join(["CellID", *names, "X_centroid", "Y_centroid", "Area"]) + "\n"
        for name in ("nuclei", "cell"):
            (folder / f"{name}.csv").write_text(header)
        (folder / "cell_types.csv").write_text("CellID,cell_type\n")

    def _rect(self, t: int) -> tuple[int, int, int, int]:
        r, c = divmod(t, len(self.col_edges) - 1)
        return (int(self.row_edges[r]), int(self.col_edges[c]), int(self.row_edges[r + 1]),
                int(self.col_edges[c + 1]))

    def add(self, share: TruthShare) -> None:
        """Number the tile's new cells, keep its rectangle of the labels, add its sums, write complete cells."""
        ids = np.array([self.ids.get(k, 0) for k in share.keys.tolist()], np.int64)
        new = np.flatnonzero(ids == 0)
        new = new[np.argsort(share.first[new], kind="stable")]
        ids[new] = self.next_id + np.arange(len(new))
        self.next_id += len(new)
        self._open(share.centres[new], share.kinds[new], share.keys[new], ids[new])
        lut = np.r_[np.uint32(0), ids.astype(np.uint32)]
        for name, labels in (("nuclei", share.nuclei), ("cell", share.cells)):
            (self.scratch / f"{name}-{share.t}.zlib").write_bytes(zlib.compress(lut[labels].tobytes(), 1))
        self.open.sums[ids - self.open.first] += share.sums
        self._write_complete(share.t)

    def _open(self, centres: np.ndarray, kinds: np.ndarray, keys: np.ndarray, ids: np.ndarray) -> None:
        """Remember new cells until the last tile whose rectangle their reach touches."""
        rows, cols = len(self.row_edges) - 1, len(self.col_edges) - 1
        row = np.searchsorted(self.row_edges, centres[:, 0] + REACH_PX, side="right") - 1
        col = np.searchsorted(self.col_edges, centres[:, 1] + REACH_PX, side="right") - 1
        last = np.clip(row, 0, rows - 1) * cols + np.clip(col, 0, cols - 1)
        self.open.add(last, kinds)
        for key, cell_id, until in zip(keys.tolist(), ids.tolist(), last.tolist(), strict=True):
            self.ids[key] = cell_id
            self.expiry.setdefault(until, []).append(key)

    def _write_complete(self, t: int) -> None:
        """Queue the rows of the cells no tile after ``t`` can add to; write them in batches."""
        first, kinds, sums = self.open.complete(t)
        for key in self.expiry.pop(t, []):
            del self.ids[key]
        if len(kinds):
            self._done.append((first, kinds, sums))
            self._done_rows += len(kinds)
        if self._done_rows >= _ROWS_PER_WRITE:
            self._flush()

    def _flush(self) -> None:
        """Append the queued rows to the tables (pandas' fast formatter, 4 decimals)."""
        if not self._done:
            return
        first, kinds, sums = self._done[0][0], np.concatenate([d[1] for d in self._done]), \
            np.concatenate([d[2] for d in self._done])
        self._done, self._done_rows = [], 0
        ids = first + np.arange(len(kinds))
        for mask, name in enumerate(("nuclei", "cell")):
            area = sums[:, mask, 0]
            means = {n: self.offset + sums[:, mask, 3 + c] / area for c, n in enumerate(self.names)}
            table = pd.DataFrame({"CellID": ids, **means, "X_centroid": sums[:, mask, 2] / area,
                                  "Y_centroid": sums[:, mask, 1] / area}).round(4)
            table["Area"] = area.astype(np.int64)
            table.to_csv(self.folder / f"{name}.csv", mode="a", header=False, index=False)
        pd.DataFrame({"CellID": ids, "cell_type": np.array(CELL_TYPES)[kinds]}).to_csv(
            self.folder / "cell_types.csv", mode="a", header=False, index=False)
        self.type_counts += np.bincount(kinds, minlength=len(CELL_TYPES))

    def _chunks(self, name: str):
        """The label image ``name`` in chunks of TRUTH_CHUNK_PX, row-major (as a tiled TIFF takes them),
        each pieced together from the tiles' rectangles it overlaps."""
        height, width, size = int(self.row_edges[-1]), int(self.col_edges[-1]), TRUTH_CHUNK_PX
        cols = len(self.col_edges) - 1
        for y in range(0, height, size):
            rows = range(np.searchsorted(self.row_edges, y, "right") - 1,
                         np.searchsorted(self.row_edges, min(y + size, height)))
            for x in range(0, width, size):
                chunk = np.zeros((min(size, height - y), min(size, width - x)), np.uint32)
                for t in (r * cols + c for r in rows for c in range(
                        np.searchsorted(self.col_edges, x, "right") - 1,
                        np.searchsorted(self.col_edges, min(x + size, width)))):
                    rect = self._rect(t)
                    piece = zlib.decompress((self.scratch / f"{name}-{t}.zlib").read_bytes())
                    piece = np.frombuffer(piece, np.uint32).reshape(rect[2] - rect[0], rect[3] - rect[1])
                    part = (max(rect[0], y), max(rect[1], x), min(rect[2], y + size), min(rect[3], x + size))
                    chunk[part[0] - y:part[2] - y, part[1] - x:part[3] - x] = crop(piece, rect, part)
                yield chunk

    def close(self, doc: dict) -> None:
        """Write the label images as tiled TIFFs (512 px tiles, zlib) and ``truth.json`` (``doc`` with
        ``n_cells`` and ``cell_type_counts`` added)."""
        if len(self.open.kind):
            raise RuntimeError(f"{len(self.open.kind)} cells were never completed")
        self._flush()
        shape = (int(self.row_edges[-1]), int(self.col_edges[-1]))
        for name in ("nuclei", "cell"):
            tifffile.imwrite(self.folder / f"{name}.tif", self._chunks(name), shape=shape, dtype=np.uint32,
                             tile=(TRUTH_CHUNK_PX, TRUTH_CHUNK_PX), compression="zlib", maxworkers=1)
        counts = zip(CELL_TYPES, self.type_counts, strict=True)
        doc.update(n_cells=self.next_id - 1, cell_type_counts={t: int(n) for t, n in counts if n})
        (self.folder / "truth.json").write_text(json.dumps(doc, indent=1) + "\n")
