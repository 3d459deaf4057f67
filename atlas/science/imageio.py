"""Opening the image files that users and earlier stages give, with errors that name the file and the fix."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import numpy as np
import tifffile

from atlas.errors import InvalidInput, Problem


def open_tiff(path: str | os.PathLike | BinaryIO, fix: str, *, name: str | None = None) -> tifffile.TiffFile:
    """``tifffile.TiffFile(path)``, or InvalidInput naming the file when it cannot be read as TIFF.

    Parameters
    ----------
    path : str or os.PathLike or binary file
        A path, or a seekable file object (e.g. ranged reads of an object in S3).
    fix : str
        What to give instead, for the error (e.g. ``"give a (pyramidal OME-)TIFF file"``).
    name : str, optional
        The file's name in the error (default: ``path``).

    Returns
    -------
    tifffile.TiffFile
        Open; the caller closes it (``with open_tiff(path, fix) as tif: ...``).

    Raises
    ------
    InvalidInput
        The file is missing, unreadable or not a TIFF.
    """
    try:
        return tifffile.TiffFile(path)
    except (OSError, tifffile.TiffFileError) as exc:
        raise InvalidInput(Problem(name or str(path), f"cannot be read as TIFF ({exc})", fix)) from exc


class TiffRows:
    """The full-resolution level of a TIFF series as a read-only (..., Y, X) array read by row slices.

    ``array[c, r0:r1]`` (any leading indices, then a row slice, then optionally ``:``) reads and
    decodes only the tiles (or strips) of plane ``c`` that hold rows ``r0:r1``, straight into one
    (rows, X) ndarray, with tifffile's codecs but not zarr's per-chunk machinery: segments stored
    back to back (a tile row) are one read into a reused buffer, decoded from there (reading the
    benchmark's 1.8 GB float32 image by tile rows: ~0.36 s of CPU instead of ~0.51 s through
    ``series.aszarr``, and no zarr import). Safe to share between threads (reads take turns).

    Parameters
    ----------
    tif : tifffile.TiffFile
        Open; it must stay open while the array is read.
    series : tifffile.TiffPageSeries
        One of ``tif.series``, whose level-0 pages are 2-D planes (one per leading index).

    Attributes
    ----------
    shape, ndim, dtype
        As the series' level 0 (singleton dimensions squeezed, as tifffile gives them).
    chunks : tuple of int
        1 per leading axis, then the tile (or strip) height and width.
    """

    def __init__(self, tif: tifffile.TiffFile, series: tifffile.TiffPageSeries):
        level = series.levels[0]
        self._fh, self._pages = tif.filehandle, list(level.pages)
        self.shape, self.dtype = tuple(level.shape), level.dtype
        self.ndim = len(self.shape)
        if not self.is_planar(series):
            raise ValueError(f"{series!r}: level 0 is not one single-sample 2-D page per plane")
        key = self._pages[0].keyframe
        self._key = key   # the keyframe: tile shape, compression, codecs of every plane
        self._across = int(key.chunked[-1])   # segments per row of segments
        self.chunks = (*(1,) * (self.ndim - 2), *key.chunks[-2:])
        self._buffer = np.empty(0, np.uint8)   # file bytes of the segments being decoded
        self._lock = threading.Lock()          # one read at a time uses the buffer

    @staticmethod
    def is_planar(series: tifffile.TiffPageSeries) -> bool:
        """Whether ``series`` can be read as :class:`TiffRows`: its level-0 pages are single-sample 2-D
        planes, one per index of the leading axes (so not RGB, volumetric tiles or a page per row)."""
        level = series.levels[0]
        pages = level.pages
        return (len(pages) > 0 and pages[0] is not None and pages[0].keyframe.shape == tuple(level.shape[-2:])
                and len(level.shape) >= 2 and len(pages) == int(np.prod(level.shape[:-2], dtype=np.int64)))

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        lead, rows, rest = key[:self.ndim - 2], key[self.ndim - 2] if len(key) > self.ndim - 2 else slice(None), \
            key[self.ndim - 1:]
        if (not all(isinstance(i, (int, np.integer)) for i in lead) or not isinstance(rows, slice)
                or rows.step not in (None, 1) or any(k != slice(None) for k in rest)):
            raise IndexError(f"a TIFF plane is read by plane index and row slice, not {key!r}")
        page = self._pages[int(np.ravel_multi_index(lead, self.shape[:-2]))] if lead else self._pages[0]
        r0, r1, _ = rows.indices(self.shape[-2])
        r1 = max(r0, r1)
        height, width = self.chunks[-2:]
        index = range(r0 // height * self._across, -(-r1 // height) * self._across)
        written = all(page.dataoffsets[i] > 0 and page.databytecounts[i] > 0 for i in index)
        # Tiles never written read as 0; np.empty otherwise: it reuses freed memory where np.zeros'
        # calloc takes fresh pages from the kernel (a third of the reading time in page faults).
        out = (np.empty if written else np.zeros)((r1 - r0, self.shape[-1]), self.dtype)
        with self._lock:
            for i, tile in self._segments(page, index):
                y0, x0 = (i // self._across) * height, (i % self._across) * width
                a, b = max(r0, y0), min(r1, y0 + tile.shape[1])
                out[a - r0:b - r0, x0:x0 + tile.shape[2]] = tile[0, a - y0:b - y0, :self.shape[-1] - x0, 0]
        return out

    def _segments(self, page, index: range) -> Iterator[tuple[int, np.ndarray]]:
        """Segment ``i`` of ``page`` decoded, for each ``i`` in ``index`` that was written.

        Segments stored back to back (a tile row, as writers lay it out) are read with one
        ``readinto`` into a buffer kept between calls; the decoded segment may be a view of that
        buffer, valid until the next call.
        """
        offsets, counts = page.dataoffsets, page.databytecounts
        stored = sorted((offsets[i], counts[i], i) for i in index if offsets[i] > 0 and counts[i] > 0)
        runs, start = [], 0
        for n in range(1, len(stored) + 1):
            if n == len(stored) or stored[n][0] != stored[n - 1][0] + stored[n - 1][1]:
                runs.append(stored[start:n])
                start = n
        for run in runs:
            begin = run[0][0]
            data = self._read(begin, run[-1][0] + run[-1][1] - begin)
            for offset, count, i in run:
                segment = data[offset - begin:offset - begin + count]
                yield i, self._key.decode(segment, i, jpegtables=self._key.jpegtables,
                                          jpegheader=self._key.jpegheader)[0]

    def _read(self, offset: int, size: int) -> memoryview:
        """``size`` bytes at ``offset`` of the file, in the reused buffer."""
        if self._buffer.size < size:
            self._buffer = np.empty(size, np.uint8)
        view = memoryview(self._buffer)[:size]
        with self._fh.lock:
            self._fh.seek(offset)
            done = 0
            while done < size:
                got = self._fh.readinto(view[done:])
                if not got:
                    raise OSError(f"{self._fh.name}: file ends {size - done} bytes early at offset {offset + done}")
                done += got
        return view


def read_ahead(reads: Iterable[Callable[[], np.ndarray]]) -> Iterator[np.ndarray]:
    """The result of each read in order, the next one running in a thread while the caller works.

    Reading (file I/O, decompression, zarr's copies) overlaps the arithmetic on the block before;
    at most two blocks are in memory.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        pending = None
        for read in reads:
            ahead = pool.submit(read)
            if pending is not None:
                yield pending.result()
            pending = ahead
        if pending is not None:
            yield pending.result()
