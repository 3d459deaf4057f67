"""Upload a slide folder to the ingest bucket: validate first, every file, then manifest.json last.

The manifest is the catalog's completeness signal, so it is regenerated from the files being
uploaded (the folder's own manifest.json, possibly stale, is not trusted) and written only after
every other file is safely in S3. Each object carries its sha256 as ``x-amz-meta-sha256``: the
catalog compares it with the manifest, and a second ``atlas upload`` of the same folder skips files
that are already there (an interrupted upload resumes where it stopped).
"""
from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from atlas.aws.catalog import SHA256_METADATA
from atlas.aws.s3 import S3Uri, expect_given_owner, is_missing, s3_client
from atlas.errors import InvalidInput, Problem
from atlas.slide.convention import SLIDE_MANIFEST, check_slide_id, manifest_bytes, run_id_for, slide_manifest
from atlas.slide.validate import validate_with_manifest

T = TypeVar("T")
MiB = 1 << 20
MULTIPART_THRESHOLD = 64 * MiB
MULTIPART_CHUNK = 64 * MiB        # 10,000 parts max -> files up to 625 GiB


class UploadFailed(RuntimeError):
    """A file could not be sent even after retries (what was sent stays; uploading again resumes)."""


@dataclass
class UploadResult:
    """What :func:`upload_slide` did.

    Attributes
    ----------
    slide_id : str
    manifest_uri : str
    run_id : str
        The run the catalog will start for this manifest.
    uploaded, skipped : list of str
        Slide-relative paths sent, and those already in S3 with the same sha256.
    bytes_sent : int
    """

    slide_id: str
    manifest_uri: str
    run_id: str
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_sent: int = 0

    def add(self, path: str, size: int, sent: bool) -> None:
        """Record one file as sent (``size`` bytes) or skipped (already in S3)."""
        if sent:
            self.uploaded.append(path)
            self.bytes_sent += size
        else:
            self.skipped.append(path)


def destination(slide_dir: Path, uri: str) -> tuple[S3Uri, str]:
    """(bucket root, slide id) for ``s3://bucket`` (slide id = folder name) or ``s3://bucket/SLIDE_ID``.

    Raises
    ------
    InvalidInput
        A bad URI, a nested prefix (the catalog takes the first key component as the slide id) or
        an invalid slide id.
    """
    try:
        target = S3Uri.parse(uri)
    except ValueError as exc:
        raise InvalidInput(Problem(uri, str(exc),
                                   "give the ingest bucket as s3://BUCKET or s3://BUCKET/SLIDE_ID")) from exc
    slide_id = target.key.strip("/") or Path(slide_dir).resolve().name
    if "/" in slide_id:
        raise InvalidInput(Problem(uri, f"prefix {target.key!r} has more than one level; slides live at "
                                        "s3://BUCKET/<slide_id>/ (the catalog reads the slide id from the key)",
                                   f"use s3://{target.bucket}/ or s3://{target.bucket}/<slide_id>"))
    if problems := check_slide_id(slide_id):
        raise InvalidInput(problems)
    return S3Uri(target.bucket), slide_id


def _remote_sha256(s3, bucket: str, key: str) -> str | None:
    try:
        return s3.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get(SHA256_METADATA)
    except ClientError as exc:
        if is_missing(exc):
            return None
        raise


def _with_retries(action: Callable[[], T], what: str, attempts: int, backoff_s: float) -> T:
    """``action()``; on a transfer failure wait and try again, up to ``attempts`` times in all."""
    from boto3.exceptions import S3UploadFailedError

    for attempt in range(1, attempts + 1):
        try:
            return action()
        except (S3UploadFailedError, ClientError, BotoCoreError) as exc:
            if attempt == attempts:
                raise UploadFailed(f"uploading {what} failed after {attempts} attempts: {exc}; nothing is lost: "
                                   "run the same `atlas upload` again to resume") from exc
            time.sleep(backoff_s * 2 ** (attempt - 1))


def upload_slide(slide_dir: Path, uri: str, *, s3=None, bucket_owner: str | None = None, progress=None,
                 attempts: int = 3, backoff_s: float = 2.0, multipart_threshold: int = MULTIPART_THRESHOLD,
                 multipart_chunk: int = MULTIPART_CHUNK) -> UploadResult:
    """Validate a slide folder and upload it to ``s3://bucket/<slide_id>/``, manifest.json last.

    Parameters
    ----------
    slide_dir : Path
        The slide folder (``markers.csv``, ``raw/*.ome.tif``, optional ``params.yml``).
    uri : str
        ``s3://bucket`` or ``s3://bucket/SLIDE_ID`` (default slide id: the folder name).
    s3 : botocore S3 client, optional
        Default :func:`atlas.aws.s3.s3_client` (honours ``AWS_ENDPOINT_URL`` and the usual AWS settings).
    bucket_owner : str, optional
        The AWS account id owning the ingest bucket (from the data team): every request then carries
        ``ExpectedBucketOwner``, so S3 refuses it if another account owns a bucket of that name.
    progress : rich.progress.Progress, optional
        Gets one task counting bytes sent.
    attempts : int
        Tries per file on top of botocore's own per-request retries.
    backoff_s : float
        Wait before the second try (s), doubling after each failure.
    multipart_threshold, multipart_chunk : int
        Files from this size up are sent as multipart uploads of this part size (bytes).

    Raises
    ------
    InvalidInput
        With every problem of the slide, or a ``bucket_owner`` that is no account id, before anything is uploaded.
    UploadFailed
        A file could not be sent after ``attempts`` tries (manifest.json is then not written).
    """
    from boto3.s3.transfer import TransferConfig

    slide_dir = Path(slide_dir)
    if not slide_dir.is_dir():
        raise InvalidInput(Problem(str(slide_dir), "is not a folder", "give the path of the slide folder"))
    root, slide_id = destination(slide_dir, uri)
    doc = slide_manifest(slide_dir, slide_id)
    data = manifest_bytes(doc)
    if problems := validate_with_manifest(slide_dir, slide_id, data):
        raise InvalidInput(problems)
    prefix = root.join(slide_id).prefix()
    result = UploadResult(slide_id, str(prefix.join(SLIDE_MANIFEST)), run_id_for(slide_id, data))
    config = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunk)
    total = sum(f["size"] for f in doc["files"]) + len(data)
    client = expect_given_owner(s3 or s3_client(), bucket_owner, [root.bucket],
                                "give the 12-digit account id of the ingest bucket the data team gave you, "
                                "or leave it out")
    sender = _Sender(client, prefix, config,
                     _Progress(progress, f"upload {slide_id}", total))
    for entry in doc["files"]:
        send = functools.partial(sender.send_file, slide_dir / entry["path"], entry["path"], entry["sha256"])
        sent = _with_retries(send, entry["path"], attempts, backoff_s)
        result.add(entry["path"], entry["size"], sent)
        if not sent:
            sender.progress.advance(entry["size"])  # already there: counts at once
    send = functools.partial(sender.send_manifest, data)
    result.add(SLIDE_MANIFEST, len(data), _with_retries(send, SLIDE_MANIFEST, attempts, backoff_s))
    sender.progress.advance(len(data))
    return result


class _Progress:
    """One task of a rich progress bar counting bytes (nothing without a bar)."""

    def __init__(self, progress, description: str, total: int):
        self.bar = progress
        self.task = progress.add_task(description, total=total) if progress is not None else None

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)


class _Sender:
    """Puts a slide's files below its prefix, each with its sha256 as metadata, unless already there."""

    def __init__(self, s3, prefix: S3Uri, config, progress: _Progress):
        self.s3, self.prefix, self.config, self.progress = s3, prefix, config, progress

    def _present(self, key: str, sha256: str) -> bool:
        return _remote_sha256(self.s3, self.prefix.bucket, key) == sha256

    def send_file(self, path: Path, rel: str, sha256: str) -> bool:
        """One try at one file; False when it is already there. A failed try takes back the bytes it counted."""
        key = self.prefix.join(rel).key
        if self._present(key, sha256):
            return False
        sent = 0

        def count(n: int) -> None:
            nonlocal sent
            sent += n
            self.progress.advance(n)

        try:
            self.s3.upload_file(str(path), self.prefix.bucket, key, Config=self.config, Callback=count,
                                ExtraArgs={"Metadata": {SHA256_METADATA: sha256}})
        except BaseException:
            self.progress.advance(-sent)
            raise
        return True

    def send_manifest(self, data: bytes) -> bool:
        """manifest.json (last); False when the same manifest is there: the catalog has (or had) this run."""
        key, sha256 = self.prefix.join(SLIDE_MANIFEST).key, hashlib.sha256(data).hexdigest()
        if self._present(key, sha256):
            return False
        self.s3.put_object(Bucket=self.prefix.bucket, Key=key, Body=data, ContentType="application/json",
                           Metadata={SHA256_METADATA: sha256})
        return True
