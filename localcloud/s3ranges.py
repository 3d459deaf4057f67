"""Byte-range GETs served by the emulated S3 without copying the whole object.

moto 5 answers ``GetObject`` with ``Range: bytes=a-b`` by reading the whole stored object into memory
(``FakeKey.value``) and then slicing it (``S3Response._handle_range_header``). The jobs read raw tiles
and zarr chunks by byte range, so on a 256-tile slide (530 MB per cycle file) every ranged read of a
tile copied its whole cycle file -- thousands of times per stage -- and the emulated run stalled where
S3 itself would serve each range in milliseconds. Here the GET path gets a view of the stored bytes
instead: its length is the object's size, and slicing it reads only that range from moto's buffer.
Everything else moto does for a GET (headers, conditional requests, range parsing and errors, part
numbers, checksums) is unchanged; a GET without a range still returns the whole object as bytes.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from functools import wraps
from typing import Any

_serving_get = threading.local()  # set while this thread runs moto's GetObject


class StoredBytes:
    """A moto object's bytes as its GET path uses them: ``len``, truth and slicing (``[a:b+1]``), each
    slice read from the object's buffer under its lock, never the whole object at once."""

    def __init__(self, key: Any) -> None:
        self._key = key

    def __len__(self) -> int:
        return int(self._key.size)

    def __getitem__(self, index: slice) -> bytes:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("StoredBytes supports contiguous slices only")
        start, stop, _ = index.indices(len(self))
        with self._key.lock:
            self._key._value_buffer.seek(start)
            return self._key._value_buffer.read(max(0, stop - start))

    def __bytes__(self) -> bytes:
        return self[:]


def serve_byte_ranges() -> None:
    """Make moto's S3 (in this process, e.g. its ThreadedMotoServer) read only the requested bytes of a
    ranged GET. Idempotent; affects moto's GetObject path only."""
    from moto.s3.models import FakeKey
    from moto.s3.responses import S3Response

    if getattr(S3Response.get_object, "serves_byte_ranges", False):
        return
    stored_value = FakeKey.value

    def value(key: FakeKey) -> bytes | StoredBytes:
        return StoredBytes(key) if getattr(_serving_get, "active", False) else stored_value.fget(key)

    FakeKey.value = property(value, stored_value.fset)
    S3Response.get_object = _marking_get(S3Response.get_object)
    S3Response.key_response = _whole_unless_ranged(S3Response.key_response)


def _marking_get(get_object: Callable) -> Callable:
    @wraps(get_object)
    def marked(self: Any) -> Any:
        _serving_get.active = True
        try:
            return get_object(self)
        finally:
            _serving_get.active = False

    marked.serves_byte_ranges = True
    return marked


def _whole_unless_ranged(key_response: Callable) -> Callable:
    """The response with a view turned into bytes: a GET without a range (or one moto answers whole)."""
    @wraps(key_response)
    def response(*args: Any, **kwargs: Any) -> Any:
        status, headers, body = key_response(*args, **kwargs)
        return status, headers, bytes(body) if isinstance(body, StoredBytes) else body

    return response
