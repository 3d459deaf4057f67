"""S3, once: URIs, the client, small-object and listing helpers, ranged file reads and a zarr 3 store.

Every S3 request of the package goes through a client made by :func:`s3_client` (standard retries,
a connection pool sized for parallel transfers) or one given by the caller. What crosses modules:

- :class:`S3Uri` -- ``s3://bucket/prefix/`` locations;
- :func:`get_bytes`, :func:`list_sizes`, :func:`list_prefixes` -- small objects and listings, with
  "no such key" (:func:`is_missing`, one set of error codes) as ``None`` rather than an exception;
- :class:`S3RangeFile` -- a seekable file object over ranged GETs (tifffile parses headers in place);
- :func:`s3_store` -- a zarr 3 store over a prefix (reads and writes, every request through the one
  client given, optionally answering listings from known sizes; the class lives in
  :mod:`atlas.aws.s3zarr`, loaded on first use: the Lambdas import this module and have no zarr);
- :func:`requester_pays` -- the ``x-amz-request-payer`` header on every request of a client;
- :func:`expect_bucket_owner` -- ``ExpectedBucketOwner`` on every request of a client to our buckets;
- :func:`count_transfers` -- a botocore event hook counting requests and bytes of a client.
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from botocore.exceptions import ClientError

from atlas.errors import InvalidInput, Problem

if TYPE_CHECKING:
    from atlas.aws.s3zarr import S3Store

T = TypeVar("T")
R = TypeVar("R")

# Error codes meaning "this key (or version) is not there": GET says NoSuchKey, HEAD only its status.
MISSING_CODES = frozenset({"NoSuchKey", "NoSuchVersion", "NotFound", "404"})
# A conditional request (If-Match / If-None-Match) whose condition did not hold.
PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
REQUEST_PAYER_HEADER = "x-amz-request-payer"
# The account owning the buckets of a deployment, where a job or the CLI finds it (the CDK app sets it
# on the job definitions from the stack's account; analysts and labs may set it for the CLI).
BUCKET_OWNER_ENV = "ATLAS_BUCKET_OWNER"
TRANSFER_THREADS = 16                   # parallel requests of parallel_map (S3 requests are latency-bound)
RETRIES = {"max_attempts": 10, "mode": "standard"}  # throttling, 5xx and dropped connections


@dataclass(frozen=True)
class S3Uri:
    """A bucket and a key prefix (``""`` or ending in ``/``) or a key.

    Attributes
    ----------
    bucket : str
    key : str
        Without a leading ``/``; a prefix ends in ``/``.
    """

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        """Parse ``s3://bucket/key``; ValueError names the bad URI."""
        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"{uri!r} is not an S3 URI like s3://bucket/prefix/")
        return cls(parts.netloc, parts.path.lstrip("/"))

    def prefix(self) -> S3Uri:
        """The same location as a prefix (trailing ``/``; the bucket root stays ``""``)."""
        return self if not self.key or self.key.endswith("/") else S3Uri(self.bucket, self.key + "/")

    def join(self, *parts: str) -> S3Uri:
        """The key ``parts`` below this prefix, e.g. ``work.join("qc", "provenance", "stitch.json")``."""
        rel = "/".join(p.strip("/") for p in parts if p.strip("/"))
        return S3Uri(self.bucket, self.prefix().key + rel)

    @property
    def name(self) -> str:
        """Last path component, e.g. the slide id of ``s3://ingest/S1/``."""
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


# --- the client -----------------------------------------------------------------------------------
def s3_client(*, region: str | None = None, pool: int = 2 * TRANSFER_THREADS, session=None):
    """An S3 client with botocore's standard retries and a connection pool of ``pool``.

    Parameters
    ----------
    region : str, optional
        Default: the session's region (``AWS_REGION`` / the profile).
    pool : int
        Connections kept open; at least the number of threads sharing the client.
    session : boto3.session.Session, optional
        Default boto3's default session. ``AWS_ENDPOINT_URL`` points it elsewhere (the emulator).
    """
    import boto3
    from botocore.config import Config

    factory = session.client if session is not None else boto3.client
    return factory("s3", region_name=region, config=Config(retries=RETRIES, max_pool_connections=pool))


def _add_request_payer(request, **_) -> None:
    request.headers[REQUEST_PAYER_HEADER] = "requester"


def requester_pays(client):
    """Make ``client`` send ``x-amz-request-payer: requester`` on every request (idempotent); returns it.

    The header is added before signing, so it is part of the SigV4 signature as S3 requires.
    """
    client.meta.events.register("before-sign.s3", _add_request_payer, unique_id="atlas-request-payer")
    return client


def _copy_source_bucket(source) -> str | None:
    """The bucket of a CopySource parameter (``{"Bucket": ...}`` or ``"bucket/key[?versionId=...]"``)."""
    if isinstance(source, Mapping):
        return source.get("Bucket")
    return source.lstrip("/").partition("/")[0] if isinstance(source, str) else None


def is_account_id(value: str) -> bool:
    """True for an AWS account id: 12 digits."""
    return len(value) == 12 and value.isdigit()


def expect_bucket_owner(client, account: str, buckets: Iterable[str]):
    """Make ``client`` send ``ExpectedBucketOwner=account`` on every request to one of ``buckets``; returns it.

    S3 then refuses (403) a request whose bucket is owned by another account: a bucket of ours that
    was deleted and re-created elsewhere under its (predictable) name cannot be read from or
    written to by mistake. Copies from one of ``buckets`` also get ``ExpectedSourceBucketOwner``.
    Requests to other buckets (an analyst's own, another lab's) are left as they are, and so are
    operations without the parameter and pre-signed URLs (a browser could not send the header).
    A parameter the caller gave wins. Registering the same account and buckets again changes
    nothing; other buckets add to them.

    Parameters
    ----------
    client : botocore S3 client
    account : str
        The owning AWS account id (12 digits).
    buckets : iterable of str
        Bucket names owned by ``account``.

    Raises
    ------
    ValueError
        ``account`` is not an AWS account id.
    """
    if not is_account_id(account):
        raise ValueError(f"{account!r} is not an AWS account id (12 digits)")
    owned = frozenset(buckets)

    def add_owner(params, model, context, **_) -> None:
        if context.get("is_presign_request"):
            return
        members = model.input_shape.members if model.input_shape is not None else {}
        if "ExpectedBucketOwner" in members and params.get("Bucket") in owned:
            params.setdefault("ExpectedBucketOwner", account)
        if "ExpectedSourceBucketOwner" in members and _copy_source_bucket(params.get("CopySource")) in owned:
            params.setdefault("ExpectedSourceBucketOwner", account)

    client.meta.events.register("provide-client-params.s3", add_owner,
                                unique_id=f"atlas-bucket-owner:{account}:{','.join(sorted(owned))}")
    return client


@dataclass
class Transfers:
    """Requests and payload bytes of one client since :func:`count_transfers` (thread-safe totals)."""

    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def _add(self, read: int = 0, written: int = 0, requests: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_read += read
            self.bytes_written += written



def expect_given_owner(client, owner: str | None, buckets: Iterable[str], fix: str):
    """:func:`expect_bucket_owner` for the account a person gave with ``--bucket-owner``, if any; returns
    ``client``. An owner that is no account id is an InvalidInput naming the option, with ``fix``."""
    if not owner:
        return client
    try:
        return expect_bucket_owner(client, owner, buckets)
    except ValueError as exc:
        raise InvalidInput(Problem("--bucket-owner", str(exc), fix)) from exc

def count_transfers(client) -> Transfers:
    """Count every request ``client`` makes and the payload bytes it receives and sends.

    Read: each response body (a GetObject's ``Content-Length``; the XML of listings); HEAD counts
    none. Written: each request body (PutObject, UploadPart, ...). Once per call: bytes of retried
    attempts are not counted again. Registering twice on one client replaces the first counter.
    """
    from botocore.utils import determine_content_length

    counted = Transfers()

    def after_call(http_response, parsed, model, **_) -> None:
        if model.has_streaming_output:
            read = int(parsed.get("ContentLength") or 0)
        elif model.http.get("method") == "HEAD":
            read = 0
        else:
            read = len(http_response.content or b"")
        counted._add(read=read, requests=1)

    def before_call(params, **_) -> None:
        body = params.get("body")
        if body:
            counted._add(written=determine_content_length(body) or 0)

    client.meta.events.register("after-call.s3", after_call, unique_id="atlas-count-read")
    client.meta.events.register("before-call.s3", before_call, unique_id="atlas-count-written")
    return counted


# --- small objects and listings -------------------------------------------------------------------
def error_code(exc: BaseException) -> str | None:
    """S3's error code of a botocore ``ClientError`` (``NoSuchKey``, ``404``, ...), else None."""
    return exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None


def is_missing(exc: BaseException) -> bool:
    """True for "no such key / version" answers (GET: NoSuchKey, NoSuchVersion; HEAD: 404)."""
    return error_code(exc) in MISSING_CODES


def object_size(client, uri: S3Uri) -> int | None:
    """The object's size in bytes (a HEAD), or None when the key does not exist."""
    try:
        return int(client.head_object(Bucket=uri.bucket, Key=uri.key)["ContentLength"])
    except ClientError as exc:
        if is_missing(exc):
            return None
        raise


def get_bytes(client, uri: S3Uri, **kwargs) -> bytes | None:
    """The object's bytes, or None when the key does not exist; other failures raise ``ClientError``.

    ``kwargs`` go to GetObject (``VersionId``, ``Range``, ``IfMatch``, ...).
    """
    try:
        return client.get_object(Bucket=uri.bucket, Key=uri.key, **kwargs)["Body"].read()
    except ClientError as exc:
        if is_missing(exc):
            return None
        raise


def list_sizes(client, prefix: S3Uri) -> dict[str, int]:
    """Key relative to ``prefix`` -> size in bytes, of every object below ``prefix``."""
    prefix = prefix.prefix()
    sizes: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=prefix.bucket, Prefix=prefix.key):
        sizes.update({obj["Key"][len(prefix.key):]: obj["Size"] for obj in page.get("Contents", [])})
    return sizes


def list_prefixes(client, prefix: S3Uri) -> list[str]:
    """Names of the "folders" directly below ``prefix`` (its common prefixes, without the ``/``)."""
    prefix = prefix.prefix()
    names: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=prefix.bucket, Prefix=prefix.key,
                                                                 Delimiter="/"):
        names += [p["Prefix"][len(prefix.key):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return names


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]`` on a thread pool (S3 requests are latency-bound)."""
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=TRANSFER_THREADS) as pool:
        return list(pool.map(fn, items))


# --- ranged reads ---------------------------------------------------------------------------------
class S3RangeFile(io.RawIOBase):
    """Read-only, seekable view of one S3 object version, fetched by ranges on demand.

    Lets tifffile (and :func:`atlas.slide.ome.read_cycle_metadata`) parse a TIFF header in place on
    S3 without downloading the file: every read becomes a ``Range: bytes=a-b`` GET of just the
    bytes asked for (plus a small read-ahead for the many tiny header reads), served from a small
    cache of the extents already fetched.

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
            raise OSError(f"{self.name}: asked for bytes {start}-{end - 1}, got {len(data)}: the object is shorter "
                          f"than the {self.size} bytes it was opened with (replaced or truncated meanwhile?); open "
                          "it again without size= (one HEAD) or with the version id of the upload to read")
        self._extents[start] = data
        while len(self._extents) > self._max_extents:
            self._extents.popitem(last=False)
        return data[:n]


# --- zarr 3 store ---------------------------------------------------------------------------------
def s3_store(client, prefix: S3Uri, *, sizes: Mapping[str, int] | None = None, read_only: bool = False,
             explain: Callable[[Exception, S3Uri], Exception] | None = None) -> S3Store:
    """A zarr 3 store over ``prefix`` (a ``*.zarr`` folder), every request through ``client``.

    ``zarr.open_group(store=s3_store(...), mode="r")`` reads only the chunks indexed (one GET each);
    ``zarr.create_array(store=...)`` writes chunk by chunk (one PUT each).

    Parameters
    ----------
    client : botocore S3 client
        Used for every request, so hooks registered on it (:func:`count_transfers`,
        :func:`requester_pays`) see them all.
    prefix : S3Uri
        The store's root.
    sizes : mapping of str to int, optional
        Every key below ``prefix`` (relative) -> its size, when known (e.g. from a release manifest):
        listing, existence and sizes are then answered without requests, and absent keys (zarr
        probes several metadata names) without a GET. Writes and deletes keep it up to date.
        Without it, HEAD and LIST requests answer them.
    read_only : bool
    explain : callable, optional
        ``explain(exc, uri)`` -> the exception to raise for an S3 failure on ``uri`` (e.g. one
        that says how to get access); default re-raises botocore's.
    """
    from atlas.aws.s3zarr import S3Store  # zarr only where a store is made (the Lambdas have no zarr)

    return S3Store(client, prefix, sizes=sizes, read_only=read_only, explain=explain)
