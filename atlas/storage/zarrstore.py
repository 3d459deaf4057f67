"""The zarr 3 store over an atlas :class:`~atlas.storage.Store` (loaded on first use: zarr is a heavy import).

Every chunk a stage reads or writes through it goes through the atlas store's primitives, so a
:class:`~atlas.storage.JobView` checks and records it and, on S3, the job's one boto3 client (and its
byte-counting hook) makes the request.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.abc.store import Store as ZarrBase
from zarr.core.buffer import Buffer, BufferPrototype

from atlas.storage import MissingObject, Store, join


class ZarrStore(ZarrBase):
    """zarr 3 store for the hierarchy below ``prefix`` of an atlas :class:`Store`.

    Chunk and metadata reads are whole-object reads (checked against their records in a
    :class:`JobView`); writes put one chunk at a time. Blocking I/O runs in worker threads.
    """

    supports_writes = True
    supports_deletes = True
    supports_partial_writes = False
    supports_listing = True

    def __init__(self, store: Store, prefix: str = "", *, read_only: bool = False):
        super().__init__(read_only=read_only)
        self.store, self.prefix = store, prefix.strip("/")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ZarrStore) and (other.store, other.prefix) == (self.store, self.prefix)

    def __repr__(self) -> str:
        return f"ZarrStore({self.store!r}, {self.prefix!r})"

    def with_read_only(self, read_only: bool = False) -> ZarrStore:
        return ZarrStore(self.store, self.prefix, read_only=read_only)

    def _rel(self, key: str) -> str:
        return join(self.prefix, key)

    def _read(self, key: str, byte_range: ByteRequest | None) -> bytes | None:
        rel = self._rel(key)
        try:
            if byte_range is None:
                return self.store._get(rel)
            size = self.store.size(rel)
            if size is None:
                return None
            if isinstance(byte_range, RangeByteRequest):
                start, end = byte_range.start, byte_range.end
            elif isinstance(byte_range, OffsetByteRequest):
                start, end = byte_range.offset, size
            elif isinstance(byte_range, SuffixByteRequest):
                start, end = max(0, size - byte_range.suffix), size
            else:
                raise ValueError(f"unexpected byte range {byte_range!r}")
            return self.store._get(rel, start, min(end, size)) if end > start else b""
        except MissingObject:
            return None

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
                  ) -> Buffer | None:
        data = await asyncio.to_thread(self._read, key, byte_range)
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype, key_ranges):
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.store.exists, self._rel(key))

    async def getsize(self, key: str) -> int:
        size = await asyncio.to_thread(self.store.size, self._rel(key))
        if size is None:
            raise FileNotFoundError(key)
        return size

    async def set(self, key: str, value: Buffer) -> None:
        self._check_writable()
        await asyncio.to_thread(self.store._put, self._rel(key), value.to_bytes())

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if not await self.exists(key):
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        self._check_writable()
        await asyncio.to_thread(self.store._delete, self._rel(key))

    def _keys(self, prefix: str) -> list[str]:
        root = self.prefix + "/" if self.prefix else ""
        return sorted(rel[len(root):] for rel in self.store.list(self.prefix)
                      if rel.startswith(root) and rel[len(root):].startswith(prefix))

    async def list(self) -> AsyncIterator[str]:
        for key in await asyncio.to_thread(self._keys, ""):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in await asyncio.to_thread(self._keys, prefix):
            yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        keys = await asyncio.to_thread(self._keys, prefix)
        for name in sorted({k[len(prefix):].split("/", 1)[0] for k in keys}):
            yield name

