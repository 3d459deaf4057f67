"""Quantification by row bands: MCQuant's tables of a slide made by many jobs, exactly as by one.

The label image is cut into row bands; each band's job measures the cells it *owns*, those whose
first (top) row lies in the band. It reads the masks in its band and a margin above (to see which
cells began earlier) and below (to finish the cells crossing its lower edge), extended until no
owned cell touches the last row read; the image's channels only in the owned cells' rows (the band
and the overhang of the cells crossing its lower edge). A cell on a band edge is measured once,
whole, by the band where it begins.

Why the bands' tables equal the one-band table bit for bit: an owned cell has no pixel above the
band, so in the rows read its pixels come in the same raster order as in the whole image and
:func:`atlas.science.quantification.quantify` makes the very same float64 additions from 0.0 for
its means (any dtype, not only integer images); its shape features are integer sums taken about
its bounding box, independent of where the rows read begin. Only ``Y_centroid`` is an absolute
row: it is restored exactly from the integer sum it was divided from (:func:`_shift_rows`).

The one assumption is that a label's pixels are connected (a cell, not scattered pieces): a label
with pieces farther apart than the margin could be owned by two bands, or lose a piece.
:func:`merge_bands` detects both (a label twice; areas that do not add up to the foreground
pixels the bands counted) and raises :class:`BandsDisagree`; the caller then measures that mask
in one band.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where tables are joined (atlas quantify measures without it)
    import pandas as pd

from atlas.science.quantification import ID_COLUMN, quantify, strip_rows

Rows = tuple[int, int]  # half-open [start, stop) rows

BAND_MARGIN = 256  # rows read above and below a band; grows below while an owned cell reaches its end


def band_rows(height: int, count: int, chunk: int = 1) -> list[Rows]:
    """``count`` row bands covering ``height`` rows, equal to within one ``chunk`` (the chunk height
    of the arrays read, so that no chunk is decoded by two neighbours more than needed). Bands past
    the last chunk are empty (``start == stop``)."""
    if count < 1 or chunk < 1:
        raise ValueError(f"need at least one band of at least one row, got {count} bands of {chunk}-row chunks")
    chunks = -(-height // chunk)
    edges = [min(i * chunks // count * chunk, height) for i in range(count + 1)]
    return [(edges[i], edges[i + 1]) for i in range(count)]


class _RowWindow:
    """Rows ``[start, stop)`` of a (Y, X) or (C, Y, X) array-like, seen as an array of that height;
    indexing reads only those rows of the array below (zarr chunks, numpy)."""

    def __init__(self, array, rows: Rows):
        self.array, self.start = array, rows[0]
        self.shape = (*array.shape[:-2], rows[1] - rows[0], array.shape[-1])
        self.ndim, self.dtype = array.ndim, array.dtype
        self.chunks = getattr(array, "chunks", None)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        axis = self.ndim - 2
        if len(key) <= axis or not isinstance(key[axis], slice) or key[axis].step not in (None, 1):
            raise IndexError(f"a row window is read by row slices, not {key!r}")
        start, stop, _ = key[axis].indices(self.shape[-2])
        return self.array[(*key[:axis], slice(self.start + start, self.start + stop), *key[axis + 1:])]


def _plane_rows(mask, start: int, stop: int) -> np.ndarray:
    """Rows of a (Y, X) or (1, Y, X) mask as a (rows, X) ndarray of its own (changed in place)."""
    rows = mask[start:stop] if mask.ndim == 2 else mask[0, start:stop]
    return rows.copy() if isinstance(mask, np.ndarray) else np.asarray(rows)


def _runs(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and lengths of the runs of equal value along the rows of a (h, w) block, raster order."""
    edge = np.ones(block.shape, dtype=bool)
    np.not_equal(block[:, 1:], block[:, :-1], out=edge[:, 1:])
    starts = np.flatnonzero(edge)
    return block.ravel()[starts], np.diff(starts, append=block.size)


def _labels(block: np.ndarray) -> np.ndarray:
    """The foreground labels of a block, ascending."""
    values = np.unique(_runs(block)[0])
    return values[values != 0]


@dataclass(frozen=True)
class BandMasks:
    """The masks as one band's job measures them.

    Attributes
    ----------
    rows : (int, int)
        The owned cells' rows, ``[start, stop)`` of the whole image: from the band's first row
        (no owned cell begins above it) to the last row an owned cell reaches; all of the image
        the band reads.
    read : (int, int)
        Rows of the masks read: the band, its margins and their extension.
    masks : dict of str to (stop - start, X) ndarray
        Each mask in ``rows``, labels the band does not own set to 0.
    foreground : dict of str to int
        Foreground pixels of each mask in the band's own rows (what its owned areas add up to
        over all bands, see :func:`merge_bands`).
    """

    rows: Rows
    read: Rows
    masks: dict[str, np.ndarray]
    foreground: dict[str, int]


def band_masks(masks: Mapping[str, object], band: Rows, margin: int = BAND_MARGIN) -> BandMasks:
    """Read a band of each mask with the margins its cells need, keeping only the labels it owns.

    Parameters
    ----------
    masks : dict of str to (Y, X) or (1, Y, X) integer array-like
        Read by rows (zarr, numpy).
    band : (int, int)
        The band's rows.
    margin : int
        Rows read above the band, and at first below it (doubled until no owned label touches
        the last row read, or the image ends).
    """
    height = next(iter(masks.values())).shape[-2]
    start = max(band[0] - margin, 0)
    blocks = {name: _plane_rows(mask, start, min(band[1] + margin, height)) for name, mask in masks.items()}
    stop = min(band[1] + margin, height)
    owned = {}
    for name, block in blocks.items():
        top, own = block[:band[0] - start], block[band[0] - start:band[1] - start]
        owned[name] = np.setdiff1d(_labels(own), _labels(top), assume_unique=True)
    while stop < height and any(np.isin(blocks[n][-1], owned[n]).any() for n in blocks):
        more = min(stop + margin, height)
        margin *= 2
        blocks = {n: np.concatenate([b, _plane_rows(masks[n], stop, more)]) for n, b in blocks.items()}
        stop = more
    foreground = {n: int(np.count_nonzero(b[band[0] - start:band[1] - start])) for n, b in blocks.items()}
    end = min(band[0] + 1, height)  # owned cells' rows: from the band's start (none begins above) to their last
    for name, block in blocks.items():
        values, lengths = _runs(block)
        block[np.repeat(~np.isin(values, owned[name]), lengths).reshape(block.shape)] = 0  # in place: no copy
        rows = np.flatnonzero(block.any(axis=1))
        end = max(end, start + int(rows[-1]) + 1 if rows.size else end)
    masks_owned = {n: b[band[0] - start:end - start] for n, b in blocks.items()}
    return BandMasks((band[0], end), (start, stop), masks_owned, foreground)


def _shift_rows(table: pd.DataFrame, rows: int) -> pd.DataFrame:
    """``Y_centroid`` of a table measured on rows starting at ``rows``, as measured on the whole image.

    The centroid is ``S / Area`` with ``S`` an integer sum of rows (exact in float64 below 2**53),
    so ``S`` is recovered by rounding and ``(S + Area * rows) / Area`` is the one-band division.
    """
    area = table["Area"].to_numpy()
    local = np.rint(table["Y_centroid"].to_numpy() * area).astype(np.int64)
    if not np.array_equal(local / area, table["Y_centroid"].to_numpy()):
        raise ArithmeticError("Y_centroid is not an integer sum over Area; cannot shift it exactly")
    table["Y_centroid"] = (local + area.astype(np.int64) * rows) / area
    return table


def quantify_band(image, masks: Mapping[str, object], marker_names: Sequence[str], band: Rows, *,
                  channels: Sequence[int] | None = None, margin: int = BAND_MARGIN,
                  rows: int | None = None) -> tuple[dict[str, pd.DataFrame], BandMasks]:
    """MCQuant's table rows of the cells a band owns, each mask's, and what was read.

    Parameters
    ----------
    image : (C, Y, X) or (Y, X) array-like
        Read only in the rows of the cells the band owns (:class:`BandMasks` ``rows``).
    masks : dict of str to (Y, X) or (1, Y, X) integer array-like
    marker_names, channels, rows
        As for :func:`atlas.science.quantification.quantify`.
    band : (int, int)
        The band's rows (:func:`band_rows`), not empty.
    margin : int
        See :func:`band_masks`.

    Returns
    -------
    tables : dict of str to pandas.DataFrame
        Each mask's table of the owned cells, values bit-identical to their rows in the one-band table.
    read : BandMasks
        Without its ``masks`` (released once measured: a caller measuring the next part must not
        hold this one's labels meanwhile).
    """
    window = band_masks(masks, band, margin)
    tables = quantify(_RowWindow(image, window.rows), window.masks, marker_names, channels=channels, rows=rows,
                      by_columns=True)
    return {name: _shift_rows(table, window.rows[0]) for name, table in tables.items()}, replace(window, masks={})


def quantify_band_in_parts(image, masks: Mapping[str, object], marker_names: Sequence[str], band: Rows, *,
                           max_pixels: int, chunk: int = 1, channels: Sequence[int] | None = None,
                           rows: int | None = None) -> tuple[dict[str, pd.DataFrame], BandMasks]:
    """:func:`quantify_band` of ``band``, measured as consecutive sub-bands (whole ``chunk`` rows, at
    least one) whose labels and the image strip they are measured a strip at a time from
    (:func:`atlas.science.quantification.strip_rows` of the image, or ``rows``) hold at most
    ``max_pixels`` together: memory bounded whatever the band's height, and the same at any width
    where a strip is one chunk row (a wider image: shorter sub-bands).

    Exact: the sub-bands split the band's rows, so every cell the band owns is owned by exactly one
    of them and measured whole there (:func:`band_masks`); the tables are their rows, concatenated.

    Returns
    -------
    tables : dict of str to pandas.DataFrame
        As :func:`quantify_band` (rows in sub-band order; :func:`merge_bands` sorts them).
    read : BandMasks
        ``rows`` and ``read``: the span of the sub-bands'; ``foreground``: their sums; ``masks`` empty
        (each sub-band's were released after it was measured).
    """
    import pandas as pd

    width = int(np.shape(next(iter(masks.values())))[-1]) if masks else 1
    height = band[1] - band[0]
    strip = width * (rows or strip_rows(image, width))
    per_part = max(1, (max_pixels - strip) // max(1, width * chunk)) * chunk
    parts = band_rows(height, max(1, -(-height // per_part)), chunk)
    tables: dict[str, list[pd.DataFrame]] = {}
    spans, reads, foreground = [], [], dict.fromkeys(masks, 0)
    for start, stop in parts:
        if stop <= start:
            continue
        part, window = quantify_band(image, masks, marker_names, (band[0] + start, band[0] + stop),
                                     channels=channels, rows=rows)
        for name, table in part.items():
            tables.setdefault(name, []).append(table)
        spans.append(window.rows)
        reads.append(window.read)
        foreground = {name: foreground[name] + window.foreground[name] for name in foreground}
    joined = {name: pd.concat(t, ignore_index=True) for name, t in tables.items()}
    return joined, BandMasks(rows=(min(r[0] for r in spans), max(r[1] for r in spans)),
                             read=(min(r[0] for r in reads), max(r[1] for r in reads)), masks={},
                             foreground=foreground)


class BandsDisagree(ValueError):
    """The bands' tables of a mask are not one table: a label owned twice, or pieces left out."""


def merge_bands(parts: Sequence[pd.DataFrame], foreground: int) -> pd.DataFrame:
    """One mask's table from its bands' tables: rows by ascending ``CellID``.

    Parameters
    ----------
    parts : sequence of pandas.DataFrame
        The bands' tables (:func:`quantify_band`), same columns.
    foreground : int
        Foreground pixels of the mask (sum of the bands' :attr:`BandMasks.foreground`).

    Raises
    ------
    BandsDisagree
        A label measured by two bands, or areas not adding up to ``foreground`` (a label with
        pieces farther apart than the bands' margins).
    """
    import pandas as pd

    table = pd.concat(parts, ignore_index=True).sort_values(ID_COLUMN, kind="stable", ignore_index=True)
    twice = table[ID_COLUMN][table[ID_COLUMN].duplicated()]
    if len(twice):
        raise BandsDisagree(f"labels measured by two bands, e.g. {int(twice.iloc[0])}: their pieces lie "
                            "farther apart than the bands' margins")
    if int(table["Area"].sum()) != foreground:
        raise BandsDisagree(f"the bands' cells cover {int(table['Area'].sum())} px of {foreground} foreground px: "
                            "a label has pieces farther apart than the bands' margins")
    return table
