"""The S3 side of the storage layer: an S3 prefix as an :class:`atlas.storage.Store`.

The Batch job builds these over its own botocore client and injects them into the stage's context
(``ctx.slide``, ``ctx.work``); stages never import this module. Ranged reads go through
:class:`atlas.aws.s3.S3RangeFile`; single objects are PUT with an S3-verified SHA256 checksum
(``ChecksumAlgorithm="SHA256"``: S3 refuses a body whose digest differs, so what is stored is what
the writer hashed); objects streamed through :meth:`S3Store.writer` go up as a multipart upload
whose parts are sent as they fill (each part SHA256-checksummed; the upload is aborted if the
writer fails, so no parts are left billed); files written with seeks are uploaded by boto3's managed
transfer (multipart above 8 MiB, parts checksummed the same way). :func:`counted` counts what the client moves with
:func:`atlas.aws.s3.count_transfers`' botocore event hook: every request the stores make, multipart
parts included.
"""
from __future__ import annotations

import base64
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from botocore.exceptions import ClientError

from atlas.aws.catalog import SHA256_METADATA
from atlas.aws.s3 import S3RangeFile, S3Uri, Transfers, count_transfers, is_missing, list_sizes, object_size
from atlas.storage import IoCounter, MissingObject, ObjectWriter, Store, join

PART_BYTES = 8 << 20        # first parts of a streamed upload (S3: >= 5 MiB but the last)
UPLOADS_IN_FLIGHT = 2       # parts sent beside the writer (an upload overlaps the encoding of the next)
PARTS_PER_SIZE = 1000       # the part size doubles every this many parts: S3 allows 10,000 parts,
                            # so objects up to ~8 TB fit, and a 140 GB one holds 128 MiB at most


class TransferCounter(IoCounter):
    """The bytes an S3 client moved, as :func:`atlas.aws.s3.count_transfers` counts them, seen as an
    :class:`atlas.storage.IoCounter` (the hook counts; nothing is added by hand)."""

    def __init__(self, transfers: Transfers):
        super().__init__()
        self._transfers = transfers

    @property
    def read(self) -> int:
        return self._transfers.bytes_read

    @property
    def written(self) -> int:
        return self._transfers.bytes_written

    def add(self, *, read: int = 0, written: int = 0) -> None:
        raise TypeError("an S3 client's bytes are counted by its event hook")


def counted(client) -> TransferCounter:
    """Count every request of ``client`` from now on (:func:`atlas.aws.s3.count_transfers`)."""
    return TransferCounter(count_transfers(client))


class S3Store(Store):
    """The objects below an S3 prefix as a store.

    Parameters
    ----------
    client : botocore S3 client
    prefix : S3Uri
    counter : IoCounter, optional
        What counts the client's bytes (:func:`counted`); stores of one job share it.
    """

    def __init__(self, client, prefix: S3Uri, *, counter: IoCounter | None = None):
        self.client, self.prefix = client, prefix.prefix()
        self.uri = str(self.prefix)
        self.counter = counter if counter is not None else IoCounter()

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    def _uri(self, rel: str) -> S3Uri:
        return self.prefix.join(rel)

    def _get(self, rel, start=None, end=None):
        uri = self._uri(rel)
        extra = {}
        if start is not None or end is not None:
            if end is not None and end <= (start or 0):
                return b""
            extra["Range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"
        try:
            return self.client.get_object(Bucket=uri.bucket, Key=uri.key, **extra)["Body"].read()
        except ClientError as exc:
            if is_missing(exc):
                raise MissingObject(rel, self.uri) from exc
            raise

    def _put(self, rel, data):
        uri = self._uri(rel)
        self.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=data, ChecksumAlgorithm="SHA256")

    def _put_file(self, rel, path):
        uri = self._uri(rel)
        self.client.upload_file(str(path), uri.bucket, uri.key, ExtraArgs={"ChecksumAlgorithm": "SHA256"})

    def _writer(self, rel):
        return _MultipartWriter(self.client, self._uri(rel), rel)

    def _delete(self, rel):
        uri = self._uri(rel)
        self.client.delete_object(Bucket=uri.bucket, Key=uri.key)

    def _list(self, prefix):
        base = self._uri(prefix).prefix() if prefix else self.prefix
        sizes = {join(prefix, rel): size for rel, size in list_sizes(self.client, base).items()}
        if prefix and not sizes:
            size = self._size(prefix)
            return {prefix: size} if size is not None else {}
        return sizes

    def _size(self, rel):
        return object_size(self.client, self._uri(rel))

    def _open(self, rel):
        uri = self._uri(rel)
        try:
            return S3RangeFile(self.client, uri.bucket, uri.key, readahead=64 << 10)
        except ClientError as exc:
            if is_missing(exc):
                raise MissingObject(rel, self.uri) from exc
            raise

    def _local_path(self, rel, scratch):
        return Path(tempfile.mkdtemp(prefix="put-", dir=scratch)) / Path(rel).name

    def vouched_sha256(self, rel: str) -> str | None:
        """A sha256 of the object's content known without reading it, or None.

        S3's own full-object SHA256 checksum (a single PUT with ``ChecksumAlgorithm="SHA256"``;
        S3 verified it on arrival), else the uploader's ``x-amz-meta-sha256`` (what the catalog
        compares with manifest.json).
        """
        uri = self._uri(rel)
        try:
            head = self.client.head_object(Bucket=uri.bucket, Key=uri.key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if is_missing(exc):
                raise MissingObject(rel, self.uri) from exc
            raise
        checksum = head.get("ChecksumSHA256")
        if checksum and "-" not in checksum and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            return base64.b64decode(checksum).hex()
        return (head.get("Metadata") or {}).get(SHA256_METADATA) or None


class _MultipartWriter(ObjectWriter):
    """An object streamed to S3: parts uploaded as they fill, up to :data:`UPLOADS_IN_FLIGHT` at once
    beside the writer (memory: that many parts and the one filling), completed on commit, aborted on
    error. An object smaller than one part is a single PUT (with its full SHA256 checksum)."""

    def __init__(self, client, uri: S3Uri, rel: str):
        super().__init__(rel)
        self._client, self._uri = client, uri
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._sent = 0                                   # parts handed to the uploader
        self._parts: list[dict] = []
        self._pending: list[Future] = []
        self._pool = ThreadPoolExecutor(max_workers=UPLOADS_IN_FLIGHT, thread_name_prefix="part-upload")

    def _part_bytes(self) -> int:
        return PART_BYTES << (self._sent // PARTS_PER_SIZE)

    def _send(self, data):
        self._buffer += data
        if len(self._buffer) >= self._part_bytes():
            self._send_part()

    def _upload_part(self, number: int, body: bytes) -> dict:
        answer = self._client.upload_part(Bucket=self._uri.bucket, Key=self._uri.key, UploadId=self._upload_id,
                                          PartNumber=number, Body=body, ChecksumAlgorithm="SHA256")
        return {"PartNumber": number, "ETag": answer["ETag"],
                **({"ChecksumSHA256": answer["ChecksumSHA256"]} if "ChecksumSHA256" in answer else {})}

    def _send_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = self._client.create_multipart_upload(Bucket=self._uri.bucket, Key=self._uri.key,
                                                                   ChecksumAlgorithm="SHA256")["UploadId"]
        while len(self._pending) >= UPLOADS_IN_FLIGHT:
            self._parts.append(self._pending.pop(0).result())
        self._sent += 1
        self._pending.append(self._pool.submit(self._upload_part, self._sent, bytes(self._buffer)))
        self._buffer.clear()

    def _commit(self):
        if self._upload_id is None:
            self._pool.shutdown()
            self._client.put_object(Bucket=self._uri.bucket, Key=self._uri.key, Body=bytes(self._buffer),
                                    ChecksumAlgorithm="SHA256")
            return
        if self._buffer:
            self._send_part()
        self._parts += [future.result() for future in self._pending]
        self._pending.clear()
        self._pool.shutdown()
        self._client.complete_multipart_upload(Bucket=self._uri.bucket, Key=self._uri.key, UploadId=self._upload_id,
                                               MultipartUpload={"Parts": self._parts})

    def _abort(self):
        self._pool.shutdown(cancel_futures=True)        # waits for the parts being sent
        if self._upload_id is not None:
            self._client.abort_multipart_upload(Bucket=self._uri.bucket, Key=self._uri.key, UploadId=self._upload_id)
        self._buffer.clear()
