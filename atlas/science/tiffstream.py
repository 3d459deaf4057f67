"""A pyramidal OME-TIFF written strictly in order, for a writer that cannot seek (an S3 multipart upload).

tifffile's writer seeks back into the file while it writes (each IFD's tile offsets, the SubIFDs of
the full-resolution pages, the next-IFD chain, the OME-XML), so its output must lie in a local file
until it is finished: the whole image in scratch. This writer lays the file out so that every byte is
final when it is written, which also lets the sink hash it as it goes (no patched header, so the
sha256 of the object is computed incrementally):

    header (16 bytes, first IFD at 16)
    channel 0: [IFD + values of level 0, IFD + values of level 1, ...] [tiles of level 0, level 1, ...]
    channel 1: ...

A channel's tiles are encoded into a scratch file first (the compressed pyramid of one channel:
about 1/C of the file), because its IFDs, which come before them, hold their offsets and sizes; the
IFDs of a channel then point at the next channel's first IFD, right after the block. Each channel's
full-resolution page is a page of the main IFD chain (OME ``TiffData IFD="c"``) with its reduced
levels in SubIFDs, as tifffile writes them; tiles are encoded with the codecs tifffile uses
(``tifffile.TIFF.PREDICTORS`` / ``COMPRESSORS``: horizontal predictor for integers, Deflate), edge
tiles zero-padded, and the OME-XML is tifffile's :class:`tifffile.OmeXml` of the same metadata.
"""
from __future__ import annotations

import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import tifffile

DEFLATE = 8                      # TIFF Compression: Adobe Deflate (tifffile's "adobe_deflate")
HORIZONTAL = 2                   # TIFF Predictor: horizontal differencing
_ALIGN = 8                       # IFDs and their values start on 8-byte boundaries
_COPY_BLOCK = 8 << 20
# TIFF field types: SHORT, LONG, RATIONAL, ASCII, LONG8, IFD8 -> struct code and size
_TYPES = {3: ("H", 2), 4: ("I", 4), 5: ("I", 4), 2: ("s", 1), 16: ("Q", 8), 18: ("Q", 8)}


class Sink(Protocol):
    """Where the file goes: bytes written in order."""

    def write(self, data: bytes, /) -> Any: ...


@dataclass(frozen=True)
class TiffOptions:
    """What every page shares: tile size, pixel type, resolution (pixels per cm at full resolution)."""

    tile_size: int
    dtype: np.dtype
    per_cm: float
    workers: int


def _entry(tag: int, kind: int, values: Any) -> tuple[int, int, int, bytes]:
    """(tag, type, count, packed little-endian value bytes) of one IFD entry."""
    code, size = _TYPES[kind]
    if kind == 2:
        data = values.encode("utf-8") + b"\0"
        return tag, kind, len(data), data
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    count = len(values) // 2 if kind == 5 else len(values)
    return tag, kind, count, struct.pack(f"<{len(values)}{code}", *values)


def _rational(value: float) -> tuple[int, int]:
    return tifffile.tifffile.rational(value)


def _page_entries(shape_yx: tuple[int, int], level: int, opts: TiffOptions, offsets: Sequence[int],
                  counts: Sequence[int], *, description: str | None, subifds: Sequence[int]) -> list:
    """The IFD entries of one page (tags ascending), as tifffile writes them for our options."""
    dtype = opts.dtype
    res = _rational(opts.per_cm / 2 ** level)
    entries = [_entry(254, 4, 1)] if level else []
    entries += [_entry(256, 4, shape_yx[1]), _entry(257, 4, shape_yx[0]), _entry(258, 3, dtype.itemsize * 8),
                _entry(259, 3, DEFLATE), _entry(262, 3, 1)]
    if description is not None:
        entries.append(_entry(270, 2, description))
    entries += [_entry(277, 3, 1), _entry(282, 5, res), _entry(283, 5, res), _entry(296, 3, 3)]
    if description is not None:
        entries.append(_entry(305, 2, "tissue-atlas"))
    if dtype.kind in "iu":
        entries.append(_entry(317, 3, HORIZONTAL))
    entries += [_entry(322, 4, opts.tile_size), _entry(323, 4, opts.tile_size), _entry(324, 16, offsets),
                _entry(325, 4, counts)]
    if subifds:
        entries.append(_entry(330, 18, subifds))
    if dtype.kind != "u":
        entries.append(_entry(339, 3, 2 if dtype.kind == "i" else 3))
    return entries


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _ifd_size(entries: list) -> int:
    """Bytes of an IFD and its out-of-line values, each aligned."""
    size = _aligned(8 + 20 * len(entries) + 8)
    return size + sum(_aligned(len(data)) for *_, data in entries if len(data) > 8)


def _pack_ifd(entries: list, at: int, next_ifd: int) -> bytes:
    """The IFD at file offset ``at`` followed by its out-of-line values."""
    head = [struct.pack("<Q", len(entries))]
    values = []
    where = at + _aligned(8 + 20 * len(entries) + 8)
    for tag, kind, count, data in entries:
        if len(data) <= 8:
            head.append(struct.pack("<HHQ", tag, kind, count) + data.ljust(8, b"\0"))
        else:
            head.append(struct.pack("<HHQQ", tag, kind, count, where))
            values.append(data.ljust(_aligned(len(data)), b"\0"))
            where += _aligned(len(data))
    head.append(struct.pack("<Q", next_ifd))
    ifd = b"".join(head)
    return ifd.ljust(_aligned(len(ifd)), b"\0") + b"".join(values)


def _encoder(dtype: np.dtype):
    compress = tifffile.TIFF.COMPRESSORS[DEFLATE]
    predict = tifffile.TIFF.PREDICTORS[HORIZONTAL] if dtype.kind in "iu" else None

    def encode(tile: np.ndarray) -> bytes:
        return compress(predict(tile, axis=-1) if predict is not None else tile)
    return encode


def _tile_reads(level, c: int, size: int) -> Iterator[tuple[Any, int, int, int]]:
    for y in range(0, level.shape[1], size):
        for x in range(0, level.shape[2], size):
            yield level, c, y, x


def _encode_channel(levels: Sequence, c: int, opts: TiffOptions, pool: ThreadPoolExecutor, buffer: BinaryIO
                    ) -> list[tuple[list[int], list[int]]]:
    """Encode every tile of channel ``c`` of every level into ``buffer`` (in TIFF order); per level
    the tiles' (offsets in the buffer, byte counts). A few tiles per worker are in flight at a time."""
    size, encode = opts.tile_size, _encoder(opts.dtype)

    def read_encode(job: tuple[Any, int, int, int]) -> bytes:
        level, c, y, x = job
        tile = np.zeros((size, size), opts.dtype)
        block = np.asarray(level[c, y:y + size, x:x + size])
        tile[:block.shape[0], :block.shape[1]] = block
        return encode(tile)

    pages, batch = [], 4 * opts.workers
    for level in levels:
        offsets, counts = [], []
        jobs = list(_tile_reads(level, c, size))
        for start in range(0, len(jobs), batch):
            for data in pool.map(read_encode, jobs[start:start + batch]):
                offsets.append(buffer.tell())
                counts.append(len(data))
                buffer.write(data)
        pages.append((offsets, counts))
    return pages


def _channel_ifds(levels: Sequence, pages: list, opts: TiffOptions, start: int, last: bool,
                  description: str | None) -> tuple[bytes, int]:
    """The IFDs of one channel's block at file offset ``start`` (full resolution first, then its
    SubIFDs), given its tiles' offsets in the buffer; and the block's total size."""
    shapes = [tuple(level.shape[1:]) for level in levels]

    def entries(k: int, base: int, subifds: Sequence[int]) -> list:
        offsets, counts = pages[k]
        return _page_entries(shapes[k], k, opts, [base + o for o in offsets], counts,
                             description=description if k == 0 else None, subifds=subifds)

    # sizes do not depend on the offsets' values, only on their number
    placeholder = [0] * (len(levels) - 1)
    sizes = [_ifd_size(entries(k, 0, placeholder if k == 0 else ())) for k in range(len(levels))]
    at = [start + sum(sizes[:k]) for k in range(len(levels))]
    tiles_at = start + sum(sizes)
    tile_bytes = sum(sum(counts) for _, counts in pages)
    block_end = tiles_at + tile_bytes
    ifds = [_pack_ifd(entries(0, tiles_at, at[1:]), at[0], 0 if last else block_end)]
    ifds += [_pack_ifd(entries(k, tiles_at, ()), at[k], 0) for k in range(1, len(levels))]
    return b"".join(ifds), block_end - start


def stream_ome_tiff(sink: Sink, levels: Sequence, *, description: str, tile_size: int, per_cm: float,
                    workers: int, scratch: str | Path | None = None,
                    on_scratch: Callable[[int], None] | None = None) -> int:
    """Write a BigTIFF pyramid (full-resolution pages in the main chain, reduced levels in SubIFDs)
    to ``sink`` strictly in order; returns the bytes written.

    Parameters
    ----------
    sink : object with ``write(bytes)``
        Receives the file front to back (a local file, :meth:`atlas.storage.Store.writer`).
    levels : sequence of (C, Y_k, X_k) array-likes
        The pyramid, full resolution first; read one ``tile_size`` block at a time.
    description : str
        The OME-XML of the first page's ImageDescription.
    tile_size : int
        Tile edge in pixels (a multiple of 16).
    per_cm : float
        Pixels per centimetre at full resolution (level k: ``per_cm / 2**k``).
    workers : int
        Threads reading and encoding tiles.
    scratch : path, optional
        Folder of the per-channel tile buffer (about 1/C of the file; a named file, so what measures
        the folder sees it); default the system's temp folder.
    on_scratch : callable, optional
        Called with the buffer's bytes once each channel's tiles are in it (what the job's scratch
        peak is, however briefly the buffer lives).
    """
    opts = TiffOptions(tile_size, np.dtype(levels[0].dtype), per_cm, workers)
    n_channels = levels[0].shape[0]
    sink.write(b"II" + struct.pack("<HHHQ", 43, 8, 0, 16))
    written = 16
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tempfile.NamedTemporaryFile(prefix="tiles-", dir=scratch) as buffer:
        for c in range(n_channels):
            buffer.seek(0)
            buffer.truncate()
            pages = _encode_channel(levels, c, opts, pool, buffer)
            if on_scratch is not None:
                on_scratch(buffer.tell())
            ifds, block = _channel_ifds(levels, pages, opts, written, c == n_channels - 1,
                                        description if c == 0 else None)
            sink.write(ifds)
            buffer.seek(0)
            shutil.copyfileobj(buffer, sink, _COPY_BLOCK)
            written += block
    return written
