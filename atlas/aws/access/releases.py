"""Releases in the results bucket, as readers see them: the published slides, their releases and files.

Releases in the bucket (written by :mod:`atlas.aws.release`)::

    <slide_id>/<run_id>/...            the results layout (docs/results.md), by HTAN level
    <slide_id>/<run_id>/manifest.json  written last: each file's level, size and sha256
    <slide_id>/latest.json             the current release of the slide

A release without its ``manifest.json`` is incomplete (still being copied) and is never shown.
Every request goes through a requester-pays client (:func:`results_client`).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath

from botocore.exceptions import ClientError

from atlas import layout
from atlas.aws.access.errors import AccessError, NotPublished, access_errors
from atlas.aws.release import LATEST, RESULTS_BUCKET_ENV, RESULTS_REGION
from atlas.aws.s3 import (
    S3Uri,
    expect_given_owner,
    get_bytes,
    is_missing,
    list_prefixes,
    parallel_map,
    requester_pays,
    s3_client,
)
from atlas.errors import InvalidInput, Problem

DOWNLOAD_THREADS = 8                     # parallel requests of a download (the client's pool is sized for it)
LEVEL_NAMES = {2: "registered image (OME-TIFF, OME-Zarr)", 3: "segmentation masks", 4: "cell feature tables",
               5: "overview (web page)", None: "QC and provenance"}
QC_TOKEN = "qc"                          # how --levels names the auxiliary files (level None)


def results_client(session=None, *, owner: str | None = None, bucket: str | None = None):
    """S3 client for the results bucket: us-east-1, requester pays, standard retries, a connection pool.

    Parameters
    ----------
    session : boto3.session.Session, optional
        Default boto3's default session (your AWS profile / environment). ``AWS_ENDPOINT_URL``
        points it elsewhere (tests and the local demo use an emulator).
    owner : str, optional
        The AWS account id owning the results bucket, when the data team gave it: every request to
        ``bucket`` then carries it (``ExpectedBucketOwner``) and S3 refuses it if another account
        owns a bucket of that name. Not needed to read.
    bucket : str, optional
        The results bucket (required with ``owner``).

    Raises
    ------
    InvalidInput
        ``owner`` is not an AWS account id, or no bucket is given with it.
    """
    client = requester_pays(s3_client(region=RESULTS_REGION, pool=4 * DOWNLOAD_THREADS, session=session))
    return expect_given_owner(client, owner, [results_bucket(bucket)] if owner else [],
                              "give the 12-digit account id the data team gave you, or leave it out")


def results_bucket(bucket: str | None) -> str:
    """``bucket``; InvalidInput saying how to name it when it is not given (the CLI reads --bucket or
    env ``ATLAS_RESULTS_BUCKET``)."""
    if not bucket:
        raise InvalidInput(Problem("--bucket", "no results bucket given",
                                   f"pass --bucket NAME or set {RESULTS_BUCKET_ENV} to the bucket name the data "
                                   "team gave you"))
    return bucket


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
class PublishedRelease:
    """One complete release (run) of a slide in the results bucket, as a reader finds it.

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
    with access_errors(S3Uri(bucket, prefix)):
        return list_prefixes(client, S3Uri(bucket, prefix))


def _get_bytes(client, uri: S3Uri) -> bytes | None:
    with access_errors(uri):
        return get_bytes(client, uri)


def list_published_slides(*, bucket: str | None, client=None) -> list[SlideSummary]:
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


def list_releases(slide_id: str, *, bucket: str | None, client=None) -> list[PublishedRelease]:
    """The slide's complete releases (those with a manifest), oldest first; files not read.

    One LIST of the slide's run prefixes, one HEAD of each run's manifest, one GET of latest.json.
    """
    bucket, client = results_bucket(bucket), client or results_client()
    runs = _common_prefixes(client, bucket, f"{slide_id}/")

    def released(run_id: str) -> datetime | None:
        uri = S3Uri(bucket, f"{slide_id}/{run_id}/{layout.MANIFEST}")
        with access_errors(uri):
            try:
                return client.head_object(Bucket=uri.bucket, Key=uri.key)["LastModified"]
            except ClientError as exc:
                if is_missing(exc):
                    return None  # still being released (or abandoned): not a release
                raise

    times = parallel_map(released, runs)
    if not any(times):
        raise NotPublished(Problem(f"s3://{bucket}/{slide_id}/", f"slide {slide_id!r} has no release in bucket "
                                                                 f"{bucket!r}",
                                   "check the slide id: `atlas data ls` lists the published slides"))
    current = latest_run(slide_id, bucket=bucket, client=client)
    found = [PublishedRelease(bucket, slide_id, run, when, run == current)
             for run, when in zip(runs, times, strict=True) if when]
    return sorted(found, key=lambda r: r.released)


def get_release(slide_id: str, run_id: str | None = None, *, bucket: str | None, client=None) -> PublishedRelease:
    """A release with its files, read from its manifest (``run_id`` default: the latest release)."""
    bucket, client = results_bucket(bucket), client or results_client()
    current = latest_run(slide_id, bucket=bucket, client=client)
    run_id = run_id or current
    uri = S3Uri(bucket, f"{slide_id}/{run_id}/{layout.MANIFEST}")
    with access_errors(uri):
        try:
            response = client.get_object(Bucket=uri.bucket, Key=uri.key)
        except ClientError as exc:
            if is_missing(exc):
                raise NotPublished(Problem(str(uri), f"run {run_id!r} of slide {slide_id!r} is not released",
                                           f"`atlas data ls {slide_id}` lists its releases")) from exc
            raise
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
    return PublishedRelease(bucket, slide_id, run_id, response.get("LastModified"), run_id == current, files, raw)


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
