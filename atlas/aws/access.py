"""Published results for external analysts: list, price, download and lazily read, on their own account.

The results bucket is **requester pays** and lives in **us-east-1** (see docs/external-access.md):
every request must say ``x-amz-request-payer: requester`` (the reader's account pays its requests
and transfer) and reading from inside us-east-1 costs no transfer. Every S3 client this module
uses or is given gets that header on every request (:func:`requester_pays`).

Releases in the bucket (written by :mod:`atlas.aws.release`)::

    <slide_id>/<run_id>/...            the results layout (docs/results.md), by HTAN level
    <slide_id>/<run_id>/manifest.json  written last: each file's level, size and sha256
    <slide_id>/latest.json             the current release of the slide

A release without its ``manifest.json`` is incomplete (still being copied) and is never shown.

Entry points: :func:`list_slides`, :func:`list_releases`, :func:`get_release` (the manifest),
:func:`estimate_cost`, :func:`download_release` (parallel ranged GETs, resumable, sha256-checked)
and :func:`open_zarr` (the Level 2 OME-Zarr as a lazy ``zarr.Array``; one GET per chunk touched).
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

from botocore.exceptions import ClientError, NoCredentialsError

from atlas import layout
from atlas.aws.release import LATEST, RESULTS_BUCKET_ENV, RESULTS_REGION
from atlas.aws.s3 import (
    PRECONDITION_CODES,
    S3Uri,
    error_code,
    get_bytes,
    is_missing,
    list_prefixes,
    parallel_map,
    requester_pays,
    s3_client,
    s3_store,
)
from atlas.errors import InvalidInput, Problem
from atlas.slide.convention import sha256_file

PART_SIZE = 8 * 2**20                   # bytes per ranged GET of a download
DOWNLOAD_THREADS = 8
GIB = 2**30                             # AWS bills transfer per "GB" of 2**30 bytes
PART_SUFFIX, STATE_SUFFIX = ".part", ".part.json"

LEVEL_NAMES = {2: "registered image (OME-TIFF, OME-Zarr)", 3: "segmentation masks", 4: "cell feature tables",
               5: "overview (web page)", None: "QC and provenance"}
QC_TOKEN = "qc"                          # how --levels names the auxiliary files (level None)


# --- prices ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PriceTable:
    """What a requester pays to read a requester-pays bucket in us-east-1 (USD, before tax).

    Attributes
    ----------
    as_of, source : str
        When the prices were taken, and from where.
    get_per_1000 : float
        GET, HEAD and all other read requests (S3 Standard and Intelligent-Tiering, same price).
    list_per_1000 : float
        LIST requests (each lists up to 1,000 keys).
    internet_tiers : tuple of (float, float)
        Data transfer out to the internet: (tier size in GB per month, price per GB), in order.
    same_region_per_gb : float
        Transfer to AWS services in us-east-1 (EC2, SageMaker, Lambda, ...).
    other_region_per_gb : float
        Transfer from us-east-1 to another AWS region, unless listed in ``region_per_gb``.
    region_per_gb : mapping of str to float
        Inter-region prices that differ from ``other_region_per_gb``.
    nat_gateway_per_gb : float
        NAT gateway data processing in us-east-1, paid when an instance reaches S3 through a NAT
        gateway instead of a (free) S3 gateway endpoint.
    """

    as_of: str
    source: str
    get_per_1000: float
    list_per_1000: float
    internet_tiers: tuple[tuple[float, float], ...]
    same_region_per_gb: float
    other_region_per_gb: float
    region_per_gb: Mapping[str, float]
    nat_gateway_per_gb: float


# The one price table. Update all values together, with the date, from the pages named in source.
PRICES = PriceTable(
    as_of="2025-06-01",
    source="https://aws.amazon.com/s3/pricing/ (Requests & data retrievals; Data transfer), S3 Standard, "
           "US East (N. Virginia); NAT: https://aws.amazon.com/vpc/pricing/",
    get_per_1000=0.0004,
    list_per_1000=0.005,
    internet_tiers=((10 * 1024, 0.09), (40 * 1024, 0.085), (100 * 1024, 0.07), (math.inf, 0.05)),
    same_region_per_gb=0.0,
    other_region_per_gb=0.02,
    region_per_gb={"us-east-2": 0.01},
    nat_gateway_per_gb=0.045,
)


# --- errors ---------------------------------------------------------------------------------------
class AccessError(InvalidInput):
    """S3 refused a request (no access, wrong region, no such bucket, no credentials); says how to fix it."""


class NotPublished(InvalidInput):
    """The slide, run or file asked for has no complete release in the bucket."""


_WRONG_REGION = ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "301",
                 "AuthorizationQueryParametersError")
_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired")
HOW_TO_GET_ACCESS = ("access is granted per AWS account: send your 12-digit AWS account ID (`aws sts "
                     "get-caller-identity --query Account --output text`) to the data team; reading works once they "
                     "have added it. Already granted? Your IAM user or role also needs s3:ListBucket and s3:GetObject "
                     "on the bucket, and every request must carry `x-amz-request-payer: requester` (atlas always "
                     "sends it; AWS CLI: --request-payer requester; boto3: RequestPayer='requester'; "
                     "s3fs: requester_pays=True)")


def access_error(exc: Exception, uri: S3Uri | str) -> AccessError:
    """The S3 failure ``exc`` on ``uri`` as an :class:`AccessError` that says what to do.

    Handles AccessDenied (how access is granted; the request-payer header), a wrong region
    (PermanentRedirect, AuthorizationHeaderMalformed: the bucket is in us-east-1), a missing bucket,
    bad or missing credentials. Other errors keep S3's code and message.
    """
    where = str(uri)
    if isinstance(exc, NoCredentialsError):
        return AccessError(Problem(where, "no AWS credentials found: a requester-pays bucket refuses anonymous "
                                          "requests (the reader's account pays)",
                                   "configure credentials of your own AWS account (`aws configure`, AWS_PROFILE or "
                                   "an instance role); " + HOW_TO_GET_ACCESS))
    error = exc.response.get("Error", {}) if isinstance(exc, ClientError) else {}
    code, message = error.get("Code", ""), error.get("Message", str(exc))
    headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) if isinstance(exc, ClientError) else {}
    if code in ("AccessDenied", "403", "AllAccessDisabled"):
        return AccessError(Problem(where, f"access denied ({code}: {message})", HOW_TO_GET_ACCESS))
    if code in _WRONG_REGION:
        actual = error.get("Region") or headers.get("x-amz-bucket-region") or _region_in(message)
        said = f"the bucket answered from region {actual}" if actual else "the request went to the wrong region"
        return AccessError(Problem(where, f"wrong region ({code}): {said}; the results bucket is in {RESULTS_REGION}",
                                   f"send requests to {RESULTS_REGION} (atlas does; AWS CLI: --region "
                                   f"{RESULTS_REGION}; boto3: region_name='{RESULTS_REGION}'), and check the bucket "
                                   f"name (--bucket / {RESULTS_BUCKET_ENV}) is the one the data team gave you"))
    if code == "NoSuchBucket":
        return AccessError(Problem(where, f"bucket {error.get('BucketName') or S3Uri.parse(where).bucket!r} does not "
                                          "exist",
                                   f"use the results bucket name the data team gave you (--bucket or env "
                                   f"{RESULTS_BUCKET_ENV})"))
    if code in _CREDENTIALS:
        return AccessError(Problem(where, f"your AWS credentials were refused ({code}: {message})",
                                   "refresh or fix the credentials of your AWS account (`aws sts "
                                   "get-caller-identity` must work)"))
    return AccessError(Problem(where, f"S3 error {code or type(exc).__name__}: {message}",
                               "retry later; if it persists, send this message to the data team"))


def _region_in(message: str) -> str | None:
    # AuthorizationHeaderMalformed: "... the region 'eu-west-1' is wrong; expecting 'us-east-1'"
    found = re.search(r"expecting '([a-z0-9-]+)'", message)
    return found.group(1) if found else None


# --- the client -----------------------------------------------------------------------------------
def results_client(session=None):
    """S3 client for the results bucket: us-east-1, requester pays, standard retries, a connection pool.

    Parameters
    ----------
    session : boto3.session.Session, optional
        Default boto3's default session (your AWS profile / environment). ``AWS_ENDPOINT_URL``
        points it elsewhere (tests and the local demo use an emulator).
    """
    return requester_pays(s3_client(region=RESULTS_REGION, pool=4 * DOWNLOAD_THREADS, session=session))


def results_bucket(bucket: str | None = None) -> str:
    """``bucket``, or env ``ATLAS_RESULTS_BUCKET``; InvalidInput when neither is set."""
    bucket = bucket or os.environ.get(RESULTS_BUCKET_ENV)
    if not bucket:
        raise InvalidInput(Problem("--bucket", "no results bucket given",
                                   f"pass --bucket NAME or set {RESULTS_BUCKET_ENV} to the bucket name the data "
                                   "team gave you"))
    return bucket


def _get_bytes(client, uri: S3Uri, **kwargs) -> bytes | None:
    """Object bytes, or None when the key does not exist; other failures as AccessError."""
    try:
        return get_bytes(client, uri, **kwargs)
    except (ClientError, NoCredentialsError) as exc:
        raise access_error(exc, uri) from exc


# --- listing --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReleasedFile:
    """One file of a release (from its manifest).

    Attributes
    ----------
    path : str
        Relative to the release, e.g. ``registration/S1.ome.tif``.
    level : int or None
        HTAN data level (2-5); None for QC and provenance.
    size : int
        Bytes.
    sha256 : str
    """

    path: str
    level: int | None
    size: int
    sha256: str


@dataclass(frozen=True)
class Release:
    """One complete release (run) of a slide in the results bucket.

    Attributes
    ----------
    bucket, slide_id, run_id : str
    released : datetime or None
        When its manifest was written.
    latest : bool
        Whether ``<slide_id>/latest.json`` names it.
    files : tuple of ReleasedFile
        Every file (empty until the manifest is read, see :func:`get_release`).
    manifest : bytes
        The manifest as published (b"" until read).
    """

    bucket: str
    slide_id: str
    run_id: str
    released: datetime | None = None
    latest: bool = False
    files: tuple[ReleasedFile, ...] = ()
    manifest: bytes = b""

    @property
    def prefix(self) -> S3Uri:
        return S3Uri(self.bucket, f"{self.slide_id}/{self.run_id}/")

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class SlideSummary:
    """A slide's current release, as ``<slide_id>/latest.json`` says."""

    slide_id: str
    run_id: str
    files: int
    bytes: int
    released: str


def _common_prefixes(client, bucket: str, prefix: str) -> list[str]:
    try:
        return list_prefixes(client, S3Uri(bucket, prefix))
    except (ClientError, NoCredentialsError) as exc:
        raise access_error(exc, S3Uri(bucket, prefix)) from exc


def list_slides(*, bucket: str | None = None, client=None) -> list[SlideSummary]:
    """Every slide with a complete release: one LIST, then one GET of each ``latest.json``."""
    bucket, client = results_bucket(bucket), client or results_client()
    slides = _common_prefixes(client, bucket, "")

    def latest(slide_id: str) -> SlideSummary | None:
        raw = _get_bytes(client, S3Uri(bucket, f"{slide_id}/{LATEST}"))
        if raw is None:
            return None
        doc = json.loads(raw)
        return SlideSummary(slide_id, doc["run_id"], int(doc.get("files", 0)), int(doc.get("bytes", 0)),
                            doc.get("released", ""))

    return [s for s in parallel_map(latest, slides) if s is not None]


def latest_run(slide_id: str, *, bucket: str, client) -> str:
    """Run id of the slide's current release; NotPublished when the slide has none."""
    uri = S3Uri(bucket, f"{slide_id}/{LATEST}")
    raw = _get_bytes(client, uri)
    if raw is None:
        raise NotPublished(Problem(str(uri), f"slide {slide_id!r} has no release in bucket {bucket!r}",
                                   "check the slide id: `atlas data ls` lists the published slides"))
    return json.loads(raw)["run_id"]


def list_releases(slide_id: str, *, bucket: str | None = None, client=None) -> list[Release]:
    """The slide's complete releases (those with a manifest), oldest first; files not read.

    One LIST of the slide's run prefixes, one HEAD of each run's manifest, one GET of latest.json.
    """
    bucket, client = results_bucket(bucket), client or results_client()
    runs = _common_prefixes(client, bucket, f"{slide_id}/")

    def released(run_id: str) -> datetime | None:
        uri = S3Uri(bucket, f"{slide_id}/{run_id}/{layout.MANIFEST}")
        try:
            return client.head_object(Bucket=uri.bucket, Key=uri.key)["LastModified"]
        except ClientError as exc:
            if is_missing(exc):
                return None  # still being released (or abandoned): not a release
            raise access_error(exc, uri) from exc

    times = parallel_map(released, runs)
    if not any(times):
        raise NotPublished(Problem(f"s3://{bucket}/{slide_id}/", f"slide {slide_id!r} has no release in bucket "
                                                                 f"{bucket!r}",
                                   "check the slide id: `atlas data ls` lists the published slides"))
    current = latest_run(slide_id, bucket=bucket, client=client)
    found = [Release(bucket, slide_id, run, when, run == current)
             for run, when in zip(runs, times, strict=True) if when]
    return sorted(found, key=lambda r: r.released)


def get_release(slide_id: str, run_id: str | None = None, *, bucket: str | None = None, client=None) -> Release:
    """A release with its files, read from its manifest (``run_id`` default: the latest release)."""
    bucket, client = results_bucket(bucket), client or results_client()
    current = latest_run(slide_id, bucket=bucket, client=client)
    run_id = run_id or current
    uri = S3Uri(bucket, f"{slide_id}/{run_id}/{layout.MANIFEST}")
    try:
        response = client.get_object(Bucket=uri.bucket, Key=uri.key)
    except ClientError as exc:
        if is_missing(exc):
            raise NotPublished(Problem(str(uri), f"run {run_id!r} of slide {slide_id!r} is not released",
                                       f"`atlas data ls {slide_id}` lists its releases")) from exc
        raise access_error(exc, uri) from exc
    raw = response["Body"].read()
    try:
        files = tuple(ReleasedFile(str(f["path"]), f["level"], int(f["size"]), str(f["sha256"]))
                      for f in json.loads(raw)["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AccessError(Problem(str(uri), f"not a readable release manifest ({exc.__class__.__name__}: {exc})",
                                  "tell the data team")) from exc
    outside = [f.path for f in files if PurePosixPath(f.path).is_absolute() or ".." in PurePosixPath(f.path).parts]
    if outside:  # never write outside the download folder, whatever the manifest says
        raise AccessError(Problem(str(uri), f"lists paths outside the release: {outside[:3]}",
                                  "do not use this release; tell the data team"))
    return Release(bucket, slide_id, run_id, response.get("LastModified"), run_id == current, files, raw)


def parse_levels(text: str | None) -> frozenset[int | None] | None:
    """``"2,3,qc"`` -> {2, 3, None}; None or ``"all"`` -> None (every file).

    Raises
    ------
    InvalidInput
        Naming the bad entry and the levels there are.
    """
    if text is None or text.strip().lower() == "all":
        return None
    levels: set[int | None] = set()
    for token in (t.strip().lower() for t in text.split(",") if t.strip()):
        if token == QC_TOKEN:
            levels.add(None)
        elif token.isdigit() and int(token) in LEVEL_NAMES:
            levels.add(int(token))
        else:
            known = ", ".join(f"{k if k is not None else QC_TOKEN} ({v})" for k, v in LEVEL_NAMES.items())
            raise InvalidInput(Problem("--levels", f"{token!r} is not a data level", f"use some of: {known}; or all"))
    if not levels:
        raise InvalidInput(Problem("--levels", "no level given", "e.g. --levels 2,3,4 (or all)"))
    return frozenset(levels)


def select(files: Iterable[ReleasedFile], levels: frozenset[int | None] | None) -> list[ReleasedFile]:
    """The files of the given levels (None: all)."""
    return [f for f in files if levels is None or f.level in levels]


@dataclass(frozen=True)
class Item:
    """What a person sees as one thing: a file, a whole OME-Zarr store, or the overview site."""

    path: str
    level: int | None
    files: int
    size: int


def items(files: Iterable[ReleasedFile]) -> list[Item]:
    """Group files for display: a ``*.zarr`` store and ``overview/`` are one item each, by level then path."""
    grouped: dict[tuple[int | None, str], list[ReleasedFile]] = {}
    for f in files:
        parts = PurePosixPath(f.path).parts
        zarr_at = next((i for i, p in enumerate(parts) if p.endswith(".zarr")), None)
        if zarr_at is not None and zarr_at < len(parts) - 1:
            name = "/".join(parts[:zarr_at + 1]) + "/"
        elif parts[0] == layout.OVERVIEW and len(parts) > 1:
            name = layout.OVERVIEW + "/"
        else:
            name = f.path
        grouped.setdefault((f.level, name), []).append(f)
    order = sorted(grouped, key=lambda k: (k[0] is None, k[0] or 0, k[1]))
    return [Item(name, level, len(grouped[(level, name)]), sum(f.size for f in grouped[(level, name)]))
            for level, name in order]


# --- cost -----------------------------------------------------------------------------------------
def parts_of(size: int, part_size: int = PART_SIZE) -> int:
    """Ranged GETs needed for a file of ``size`` bytes (an empty file needs none)."""
    return math.ceil(size / part_size)


def internet_transfer_usd(n_bytes: int, prices: PriceTable = PRICES) -> float:
    """Transfer out to the internet, tier by tier (as if nothing else was transferred this month)."""
    gb, usd = n_bytes / GIB, 0.0
    for tier_gb, per_gb in prices.internet_tiers:
        take = min(gb, tier_gb)
        usd += take * per_gb
        gb -= take
        if gb <= 0:
            break
    return usd


@dataclass(frozen=True)
class Scenario:
    """Cost of one way of reading."""

    where: str
    transfer_usd: float
    request_usd: float

    @property
    def total_usd(self) -> float:
        return self.transfer_usd + self.request_usd


@dataclass(frozen=True)
class CostEstimate:
    """What downloading part of a release costs the requester.

    Attributes
    ----------
    release : Release
    levels : frozenset or None
        Levels priced (None: all files).
    files, bytes, get_requests : int
        Files, their bytes and the ranged GETs of ``atlas data get`` (parts of ``part_size``; the
        manifest GET included).
    scenarios : list of Scenario
        Inside us-east-1, from another AWS region, to the internet.
    assumptions : list of str
    prices : PriceTable
    """

    release: Release
    levels: frozenset[int | None] | None
    files: int
    bytes: int
    get_requests: int
    scenarios: list[Scenario]
    assumptions: list[str]
    prices: PriceTable


def _region_ok(region: str) -> bool:
    return re.fullmatch(r"[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d", region) is not None


def estimate_cost(release: Release, levels: frozenset[int | None] | None = None, *, from_region: str | None = None,
                  part_size: int = PART_SIZE, prices: PriceTable = PRICES) -> CostEstimate:
    """Requester-pays cost of downloading the files of ``levels`` of ``release`` (bytes x prices).

    Parameters
    ----------
    release : Release
        With its files (:func:`get_release`).
    levels : frozenset or None
        From :func:`parse_levels`; None prices every file.
    from_region : str, optional
        The AWS region you would download into; priced as the "another region" scenario (the
        us-east-1 scenario when it is us-east-1). Default: a typical other region.
    part_size : int
        Bytes per ranged GET (as ``atlas data get`` uses).
    prices : PriceTable
    """
    if from_region is not None and not _region_ok(from_region):
        raise InvalidInput(Problem("--from-region", f"{from_region!r} is not an AWS region name",
                                   "use a region such as us-east-1 or eu-west-1"))
    chosen = select(release.files, levels)
    n_bytes = sum(f.size for f in chosen)
    gets = sum(parts_of(f.size, part_size) for f in chosen) + 1  # + the manifest
    request_usd = gets / 1000 * prices.get_per_1000
    gb = n_bytes / GIB
    other = from_region if from_region not in (None, RESULTS_REGION) else None
    other_rate = prices.region_per_gb.get(other, prices.other_region_per_gb)
    scenarios = [Scenario(f"inside {RESULTS_REGION} (EC2, SageMaker, ... in {RESULTS_REGION})",
                          gb * prices.same_region_per_gb, request_usd)]
    if from_region != RESULTS_REGION:
        scenarios.append(Scenario(f"from {other}" if other else "from another AWS region",
                                  gb * other_rate, request_usd))
    scenarios.append(Scenario("to the internet (your laptop, another cloud)",
                              internet_transfer_usd(n_bytes, prices), request_usd))
    regional = ", ".join(f"{r} ${p}/GB" for r, p in prices.region_per_gb.items())
    assumptions = [
        f"prices of S3 in {RESULTS_REGION} as of {prices.as_of} (USD, before tax), from {prices.source}",
        "you (the requester) pay requests and transfer; the data team pays storage",
        (f"GB = 2^30 bytes; {gets:,} GET requests = the files in {part_size // 2**20} MiB ranged parts plus the "
         f"manifest, at ${prices.get_per_1000} per 1,000; retries and re-fetched parts add requests"),
        (f"inside {RESULTS_REGION}: no transfer charge; reach S3 through a VPC gateway endpoint (free), not a NAT "
         f"gateway (+${prices.nat_gateway_per_gb}/GB)"),
        f"another region: ${prices.other_region_per_gb}/GB ({regional})",
        "internet: tiered per month over all your account's transfer out ("
        + ", ".join(f"${p}/GB" for _, p in prices.internet_tiers)
        + "); priced as if nothing else left your account this month, without the 100 GB/month free allowance",
        (f"listing (`atlas data ls`) costs ${prices.list_per_1000} per 1,000 LIST requests; lazy reads "
         "(`atlas data open`) cost one GET per chunk read and transfer only those chunks"),
    ]
    return CostEstimate(release, levels, len(chosen), n_bytes, gets, scenarios, assumptions, prices)


# --- download -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorruptFile:
    """A downloaded file whose sha256 differs from the release manifest (not kept)."""

    path: str
    expected_sha256: str
    actual_sha256: str
    size: int


@dataclass
class DownloadResult:
    """What :func:`download_release` did.

    Attributes
    ----------
    target : Path
        ``<dir>/<slide_id>/<run_id>/``, the release layout (manifest.json included).
    fetched : list of str
        Files downloaded now (fully or the rest of a partial download) and verified.
    resumed : list of str
        Of those, the ones continued from an interrupted download.
    verified : list of str
        Files already complete on disk, checked against the manifest's sha256 and kept.
    corrupt : list of CorruptFile
        Files whose content does not match the manifest: reported, removed, never renamed into place.
    requests : int
        Ranged GETs whose parts were written (manifest not counted).
    bytes_fetched : int
    """

    target: Path
    fetched: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    corrupt: list[CorruptFile] = field(default_factory=list)
    requests: int = 0
    bytes_fetched: int = 0


class _PartialFile:
    """One file being downloaded: ``<name>.part`` (written at part offsets) and ``<name>.part.json``
    (the object's ETag and the parts already written), so an interrupted download resumes.

    ``generation`` changes when the object turns out to have changed between parts: writes of
    parts fetched for an older generation are dropped.
    """

    def __init__(self, entry: ReleasedFile, final: Path, part_size: int):
        self.entry, self.final, self.part_size = entry, final, part_size
        self.data = final.with_name(final.name + PART_SUFFIX)
        self.state = final.with_name(final.name + STATE_SUFFIX)
        self.count = parts_of(entry.size, part_size)
        self.lock = threading.Lock()
        self.etag: str | None = None
        self.done: set[int] = set()
        self.generation = 0
        self.outstanding = 0  # fetches submitted and not yet collected (main thread only)
        self.file = None

    def open(self) -> bool:
        """Open for writing; True when a partial download of the same object is continued."""
        self.final.parent.mkdir(parents=True, exist_ok=True)
        state = self._read_state()
        resumed = bool(state and self.data.is_file() and self.data.stat().st_size == self.entry.size
                       and state.get("size") == self.entry.size and state.get("part_size") == self.part_size
                       and state.get("sha256") == self.entry.sha256 and state.get("done"))
        if resumed:
            self.etag, self.done = state["etag"], set(state["done"])
        else:
            self.state.unlink(missing_ok=True)
        if not resumed:
            self.data.write_bytes(b"")
        self.file = open(self.data, "r+b")  # noqa: SIM115 - open across parts, closed by close()
        if not resumed:
            self.file.truncate(self.entry.size)
        return resumed

    def _read_state(self) -> dict | None:
        try:
            return json.loads(self.state.read_text())
        except (OSError, ValueError):
            return None

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.done]

    def byte_range(self, index: int) -> tuple[int, int]:
        """First and last byte (inclusive) of part ``index``."""
        start = index * self.part_size
        return start, min(self.entry.size, start + self.part_size) - 1

    def write(self, index: int, data: bytes, etag: str, generation: int) -> bool:
        """Write one part at its offset, then record it; False (nothing written) for a stale generation."""
        with self.lock:
            if generation != self.generation:
                return False
            self.file.seek(index * self.part_size)
            self.file.write(data)
            self.file.flush()
            self.etag = self.etag or etag
            self.done.add(index)
            tmp = self.state.with_name(self.state.name + ".tmp")
            tmp.write_text(json.dumps({"etag": self.etag, "size": self.entry.size, "part_size": self.part_size,
                                       "sha256": self.entry.sha256, "done": sorted(self.done)}))
            os.replace(tmp, self.state)
            return True

    def restart(self) -> None:
        """Forget every part: the object changed since they were fetched."""
        with self.lock:
            self.generation += 1
            self.etag, self.done = None, set()
            self.state.unlink(missing_ok=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def finish(self) -> str | None:
        """Verify and move into place; the actual sha256 when it differs from the manifest (file removed)."""
        self.close()
        digest = sha256_file(self.data)
        self.state.unlink(missing_ok=True)
        if digest != self.entry.sha256:
            self.data.unlink(missing_ok=True)
            return digest
        os.replace(self.data, self.final)
        return None


class _Stats:
    """Requests and bytes fetched, across threads; ``on_bytes`` is told about each part."""

    def __init__(self, on_bytes: Callable[[int], None] | None):
        self.lock, self.requests, self.bytes, self.on_bytes = threading.Lock(), 0, 0, on_bytes

    def add(self, n: int) -> None:
        with self.lock:
            self.requests += 1
            self.bytes += n
        if self.on_bytes is not None:
            self.on_bytes(n)


class _Changed(Exception):
    """The object changed between parts of one download (its ETag no longer matches)."""


def download_release(release: Release, out_dir: Path | str, *, levels: frozenset[int | None] | None = None,
                     client=None, part_size: int = PART_SIZE, threads: int = DOWNLOAD_THREADS,
                     progress=None) -> DownloadResult:
    """Download the files of ``levels`` of a release into ``out_dir/<slide_id>/<run_id>/``, verified.

    Every file is fetched in ranged GETs of ``part_size`` bytes, on ``threads`` threads across and
    within files. Each part is written at its offset into ``<name>.part`` and recorded in
    ``<name>.part.json`` with the object's ETag, so a download interrupted at any point (network,
    Ctrl-C, a crash) continues with the missing parts when called again. Parts after the first
    are fetched with ``If-Match`` on that ETag, so parts of two object versions are never mixed (a
    changed object is fetched again from the start, once). A finished file's sha256 must equal
    the manifest's before it is renamed into place; files already in place are re-verified, not
    fetched again.

    Parameters
    ----------
    release : Release
        With its files (:func:`get_release`).
    out_dir : path
    levels : frozenset or None
        From :func:`parse_levels`; None downloads every file.
    client : botocore S3 client, optional
        Default :func:`results_client`; the request-payer header is added to a given client too.
    part_size : int
        Bytes per ranged GET.
    threads : int
        Parallel requests.
    progress : rich.progress.Progress, optional
        Gets one task counting bytes (files already complete count at once).

    Returns
    -------
    DownloadResult
        ``corrupt`` lists files whose content differs from the manifest (tampered with or damaged):
        they are removed, never left in place.

    Raises
    ------
    AccessError
        S3 refused (no access, wrong region, ...); the parts already written are kept for the next call.
    """
    client = requester_pays(client) if client is not None else results_client()
    root = Path(out_dir) / release.slide_id / release.run_id
    root.mkdir(parents=True, exist_ok=True)
    (root / layout.MANIFEST).write_bytes(release.manifest)
    chosen = select(release.files, levels)
    result = DownloadResult(root)
    task = progress.add_task(f"{release.slide_id} {release.run_id}", total=sum(f.size for f in chosen)) \
        if progress is not None else None
    stats = _Stats((lambda n: progress.advance(task, n)) if progress is not None else None)

    pending: list[_PartialFile] = []
    for entry in chosen:
        final = root / entry.path
        if final.is_file() and final.stat().st_size == entry.size and sha256_file(final) == entry.sha256:
            result.verified.append(entry.path)
            if progress is not None:
                progress.advance(task, entry.size)
            continue
        final.unlink(missing_ok=True)
        pending.append(_PartialFile(entry, final, part_size))

    def fetch(partial: _PartialFile, index: int, generation: int) -> None:
        start, end = partial.byte_range(index)
        uri = release.prefix.join(partial.entry.path)
        condition = {"IfMatch": partial.etag} if partial.etag else {}
        try:
            response = client.get_object(Bucket=uri.bucket, Key=uri.key, Range=f"bytes={start}-{end}", **condition)
        except ClientError as exc:
            if error_code(exc) in PRECONDITION_CODES:
                raise _Changed(partial.entry.path) from exc
            if is_missing(exc):
                raise NotPublished(Problem(str(uri), "listed in the release manifest but missing from the bucket",
                                           "tell the data team; the other files are not affected")) from exc
            raise access_error(exc, uri) from exc
        except NoCredentialsError as exc:
            raise access_error(exc, uri) from exc
        data = response["Body"].read()
        if len(data) != end - start + 1:
            raise OSError(f"{uri}: asked for bytes {start}-{end}, got {len(data)} bytes")
        if partial.write(index, data, response["ETag"], generation):
            stats.add(len(data))

    def finish(partial: _PartialFile) -> None:
        actual = partial.finish()
        if actual is None:
            result.fetched.append(partial.entry.path)
        else:
            result.corrupt.append(CorruptFile(partial.entry.path, partial.entry.sha256, actual, partial.entry.size))

    futures: dict[Future, tuple[str, _PartialFile, int]] = {}
    restarts: set[str] = set()
    with ThreadPoolExecutor(max_workers=threads) as pool:

        def submit_fetches(partial: _PartialFile, indices: list[int], kind: str = "part") -> None:
            for i in indices:
                futures[pool.submit(fetch, partial, i, partial.generation)] = (kind, partial, partial.generation)
                partial.outstanding += 1

        def schedule(partial: _PartialFile) -> None:
            """Next step of a file: its first part (which fixes the ETag), the rest, or verification."""
            missing = partial.missing()
            if not missing:
                futures[pool.submit(finish, partial)] = ("finish", partial, partial.generation)
            elif partial.etag is None:
                submit_fetches(partial, missing[:1], "first")
            else:
                submit_fetches(partial, missing)

        try:
            for partial in pending:
                if partial.open():
                    result.resumed.append(partial.entry.path)
                    if progress is not None:
                        progress.advance(task, sum(partial.byte_range(i)[1] - partial.byte_range(i)[0] + 1
                                                   for i in partial.done))
                schedule(partial)
            while futures:
                done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                for future in done:
                    kind, partial, generation = futures.pop(future)
                    if kind == "finish":
                        future.result()
                        continue
                    partial.outstanding -= 1
                    try:
                        future.result()
                    except _Changed:
                        if generation == partial.generation:  # the first report of this change
                            if partial.entry.path in restarts:
                                raise AccessError(Problem(str(release.prefix.join(partial.entry.path)),
                                                          "the object keeps changing while it is downloaded",
                                                          "retry later; if it persists, tell the data team")) from None
                            restarts.add(partial.entry.path)
                            partial.restart()
                    # the first part fixed the ETag: fetch the rest; otherwise go on once nothing is in flight
                    # (after a restart, the stale fetches drain first)
                    if (kind == "first" and generation == partial.generation) or partial.outstanding == 0:
                        schedule(partial)
        finally:
            for future in futures:
                future.cancel()
            wait(list(futures))
            for partial in pending:
                partial.close()
            result.requests, result.bytes_fetched = stats.requests, stats.bytes
    return result


# --- lazy OME-Zarr ---------------------------------------------------------------------------------
def release_store(release: Release, path: str, *, client=None):
    """A read-only zarr store over ``path`` (a ``*.zarr`` folder) of a release, keys from its manifest.

    Raises
    ------
    NotPublished
        The release has no files below ``path``.
    """
    top = path.rstrip("/") + "/"
    sizes = {f.path[len(top):]: f.size for f in release.files if f.path.startswith(top)}
    if not sizes:
        raise NotPublished(Problem(str(release.prefix.join(path)), f"release {release.run_id} has no {path}",
                                   f"`atlas data ls {release.slide_id}` lists what it has"))
    client = requester_pays(client) if client is not None else results_client()
    return s3_store(client, release.prefix.join(top), sizes=sizes, read_only=True, explain=access_error)


def open_zarr_group(slide_id: str, *, run_id: str | None = None, bucket: str | None = None, client=None,
                    release: Release | None = None):
    """The slide's Level 2 OME-Zarr (NGFF 0.4) as a lazy, read-only ``zarr.Group`` over S3.

    Levels are ``group["0"]``, ``group["1"]``, ...; masks, when published, under ``group["labels"]``;
    channel names in ``group.attrs["omero"]["channels"]``. Nothing but metadata is read until you
    index an array; then one requester-pays GET per chunk touched. ``group.store.requests`` and
    ``group.store.bytes_fetched`` say what was read.

    Parameters
    ----------
    slide_id : str
    run_id : str, optional
        Default: the latest release.
    bucket : str, optional
        Default env ``ATLAS_RESULTS_BUCKET``.
    client : botocore S3 client, optional
        Default :func:`results_client`; a given client gets the request-payer header added. It must
        be for us-east-1.
    release : Release, optional
        An already read release (skips reading the manifest again).
    """
    import zarr

    client = requester_pays(client) if client is not None else results_client()
    release = release or get_release(slide_id, run_id, bucket=bucket, client=client)
    store = release_store(release, layout.registration_zarr(release.slide_id), client=client)
    return zarr.open_group(store=store, mode="r")


def open_zarr(slide_id: str, *, level: int = 0, run_id: str | None = None, bucket: str | None = None, client=None):
    """The slide's registered image as a lazy ``zarr.Array`` ``(C, Y, X)`` read from S3 as needed.

    Parameters
    ----------
    slide_id : str
    level : int
        Pyramid level: 0 is full resolution, each next level halves Y and X.
    run_id, bucket, client
        As for :func:`open_zarr_group`.

    Returns
    -------
    zarr.Array
        Indexing it, e.g. ``image[0, 1000:1512, 2000:2512]`` (channel 0, a 512 x 512 region in
        pixels), reads only the chunks it touches (requester pays, one GET per chunk).

    Examples
    --------
    >>> image = open_zarr("S1", bucket="atlas-results-123456789012")      # doctest: +SKIP
    >>> region = image[:, 1000:1512, 2000:2512]                           # doctest: +SKIP
    """
    group = open_zarr_group(slide_id, run_id=run_id, bucket=bucket, client=client)
    datasets = group.attrs["multiscales"][0]["datasets"]
    if not 0 <= level < len(datasets):
        raise InvalidInput(Problem("level", f"level {level} does not exist", f"use 0..{len(datasets) - 1}"))
    return group[datasets[level]["path"]]
