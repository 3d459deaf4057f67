"""A seekable, read-only file object over S3 ranged GETs.

Lets tifffile (and :func:`atlas.slide.ome.read_cycle_metadata`) parse a TIFF header in place on
S3 without downloading the file: every read becomes a ``Range: bytes=a-b`` GET of just the
bytes asked for (plus a small read-ahead for the many tiny header reads), served from a small
cache of the extents already fetched. ``bytes_fetched`` and ``requests`` say what it cost.
"""
from __future__ import annotations

import io
from collections import OrderedDict


class S3RangeFile(io.RawIOBase):
    """Read-only, seekable view of one S3 object version, fetched by ranges on demand.

    Parameters
    ----------
    client : botocore S3 client
    bucket, key : str
        The object.
    version_id : str, optional
        Read exactly this version (recommended: the version id of the event being processed).
    etag : str, optional
        Without a version id: fail with ``PreconditionFailed`` (HTTP 412) if the object was
        replaced by another upload while it is being read.
    size : int, optional
        Object size in bytes; looked up with one HEAD request when not given.
    readahead : int
        Minimum bytes per GET (bytes). TIFF parsers read headers a few bytes at a time; one small
        read-ahead turns those into a single request while a large read (the OME-XML) is fetched
        exactly.
    cache_extents : int
        How many fetched extents to keep (least recently used are dropped).

    Attributes
    ----------
    bytes_fetched : int
        Total bytes received from S3.
    requests : int
        Number of ranged GETs issued.
    """

    def __init__(self, client, bucket: str, key: str, *, version_id: str | None = None, etag: str | None = None,
                 size: int | None = None, readahead: int = 4096, cache_extents: int = 16):
        super().__init__()
        self._client, self.bucket, self.key = client, bucket, key
        self._conditions = {"VersionId": version_id} if version_id else {}
        if etag and not version_id:
            self._conditions["IfMatch"] = etag if etag.startswith('"') else f'"{etag}"'
        if size is None:
            size = int(client.head_object(Bucket=bucket, Key=key, **self._conditions)["ContentLength"])
        self.size = size
        self.name = f"s3://{bucket}/{key}"
        self._readahead, self._max_extents = readahead, cache_extents
        self._extents: OrderedDict[int, bytes] = OrderedDict()  # start offset -> bytes, LRU order
        self._pos = 0
        self.bytes_fetched = 0
        self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), max(0, self.size - self._pos))
        if n == 0:
            return 0
        data = self._cached(self._pos, n)
        if data is None:
            data = self._fetch(self._pos, n)
        view[:n] = data
        self._pos += n
        return n

    def _cached(self, start: int, n: int) -> bytes | None:
        for first, data in self._extents.items():
            if first <= start and start + n <= first + len(data):
                self._extents.move_to_end(first)
                return data[start - first:start - first + n]
        return None

    def _fetch(self, start: int, n: int) -> bytes:
        end = min(self.size, start + max(n, self._readahead))  # exclusive
        response = self._client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{end - 1}",
                                           **self._conditions)
        data = response["Body"].read()
        self.requests += 1
        self.bytes_fetched += len(data)
        if len(data) < min(n, end - start):
            raise OSError(f"{self.name}: asked for bytes {start}-{end - 1}, got {len(data)} bytes")
        self._extents[start] = data
        while len(self._extents) > self._max_extents:
            self._extents.popitem(last=False)
        return data[:n]
