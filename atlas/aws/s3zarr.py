"""A zarr 3 store over an S3 prefix through one boto3 client (see :func:`atlas.aws.s3.s3_store`).

Its own module because it imports zarr, which the Lambda asset does not carry: :mod:`atlas.aws.s3`
(imported by the Lambdas) loads it only when a store is made.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TypeVar

from botocore.exceptions import BotoCoreError, ClientError
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest

from atlas.aws.s3 import S3Uri, error_code, get_bytes, list_sizes, object_size

T = TypeVar("T")


def _reraise(exc: Exception, uri: S3Uri) -> Exception:
    return exc


def _range_header(byte_range, size: int | None) -> str | None:
    """The ``Range`` header of a zarr byte request: None for the whole object, ``""`` when the answer is
    known to be empty without asking."""
    if byte_range is None:
        return None
    if isinstance(byte_range, RangeByteRequest):
        return "" if byte_range.end <= byte_range.start else f"bytes={byte_range.start}-{byte_range.end - 1}"
    if isinstance(byte_range, OffsetByteRequest):
        return "" if size is not None and byte_range.offset >= size else f"bytes={byte_range.offset}-"
    if isinstance(byte_range, SuffixByteRequest):
        return f"bytes=-{byte_range.suffix}"
    raise ValueError(f"unexpected byte range {byte_range!r}")


class S3Store(Store):
    """zarr 3 store over one S3 prefix; every request goes through the one client it was given.

    See :func:`atlas.aws.s3.s3_store`. ``requests`` and ``bytes_fetched`` count the GETs this store made.
    """

    supports_writes = True
    supports_deletes = True
    supports_listing = True

    def __init__(self, client, prefix: S3Uri, *, sizes: Mapping[str, int] | None = None,
                 read_only: bool = False, explain: Callable[[Exception, S3Uri], Exception] | None = None):
        super().__init__(read_only=read_only)
        self.client, self.prefix, self.explain = client, prefix.prefix(), explain or _reraise
        self.sizes = None if sizes is None else dict(sizes)
        self.requests = 0
        self.bytes_fetched = 0
        self._lock = threading.Lock()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Store) and (other.prefix, other.read_only) == (self.prefix, self.read_only)

    def __repr__(self) -> str:
        return f"S3Store({self.prefix})"

    def with_read_only(self, read_only: bool = False) -> S3Store:
        return S3Store(self.client, self.prefix, sizes=self.sizes, read_only=read_only, explain=self.explain)

    def _call(self, uri: S3Uri, action: Callable[[], T]) -> T:
        """``action()``, S3 failures as ``explain`` makes them."""
        try:
            return action()
        except (ClientError, BotoCoreError) as exc:  # BotoCoreError: no credentials, no connection, ...
            explained = self.explain(exc, uri)
            if explained is exc:
                raise
            raise explained from exc

    def _fetch(self, key: str, header: str | None) -> bytes | None:
        uri = self.prefix.join(key)

        def get() -> bytes | None:
            try:
                return get_bytes(self.client, uri, **({"Range": header} if header else {}))
            except ClientError as exc:
                if error_code(exc) == "InvalidRange":  # a range past the end: nothing there
                    return b""
                raise

        body = self._call(uri, get)
        with self._lock:
            self.requests += 1
            self.bytes_fetched += len(body or b"")
        return body

    async def get(self, key, prototype, byte_range=None):
        size = None
        if self.sizes is not None:
            if key not in self.sizes:
                return None
            size = self.sizes[key]
            if size == 0:
                return prototype.buffer.from_bytes(b"")
        header = _range_header(byte_range, size)
        if header == "":
            return prototype.buffer.from_bytes(b"")
        data = await asyncio.to_thread(self._fetch, key, header)
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype, key_ranges):
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        if self.sizes is not None:
            return key in self.sizes
        return await asyncio.to_thread(self._head, key) is not None

    def _head(self, key: str) -> int | None:
        uri = self.prefix.join(key)
        return self._call(uri, lambda: object_size(self.client, uri))

    async def getsize(self, key: str) -> int:
        size = self.sizes.get(key) if self.sizes is not None else await asyncio.to_thread(self._head, key)
        if size is None:
            raise FileNotFoundError(str(self.prefix.join(key)))
        return size

    async def set(self, key, value) -> None:
        self._check_writable()
        uri, data = self.prefix.join(key), value.to_bytes()
        await asyncio.to_thread(self._call, uri,
                                lambda: self.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=data))
        if self.sizes is not None:
            with self._lock:
                self.sizes[key] = len(data)

    async def delete(self, key) -> None:
        self._check_writable()
        uri = self.prefix.join(key)
        await asyncio.to_thread(self._call, uri, lambda: self.client.delete_object(Bucket=uri.bucket, Key=uri.key))
        if self.sizes is not None:
            with self._lock:
                self.sizes.pop(key, None)

    def _listed(self) -> dict[str, int]:
        if self.sizes is not None:
            return self.sizes
        return self._call(self.prefix, lambda: list_sizes(self.client, self.prefix))

    async def list(self) -> AsyncIterator[str]:
        for key in sorted(await asyncio.to_thread(self._listed)):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in sorted(await asyncio.to_thread(self._listed)):
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        keys = await asyncio.to_thread(self._listed)
        for name in sorted({k[len(prefix):].split("/", 1)[0] for k in keys if k.startswith(prefix)}):
            yield name
