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
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from atlas.aws.catalog import SHA256_METADATA
from atlas.aws.s3 import S3Uri, is_missing, s3_client
from atlas.errors import InvalidInput, Problem
from atlas.slide.convention import MANIFEST, build_manifest, check_slide_id, run_id_for
from atlas.slide.validate import validate_slide

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


def manifest_bytes(slide_dir: Path, slide_id: str) -> tuple[bytes, dict]:
    """The manifest of the folder's current files, as uploaded (same layout as ``write_manifest``)."""
    doc = build_manifest(slide_dir) | {"slide_id": slide_id}
    return (json.dumps(doc, indent=1) + "\n").encode(), doc


def check_before_upload(slide_dir: Path, slide_id: str, data: bytes) -> list[Problem]:
    """Every problem of the slide as it will be uploaded (its files plus the regenerated manifest).

    Runs :func:`atlas.slide.validate.validate_slide` on a view of the folder named ``slide_id`` whose
    files are links to the originals, so the folder itself is never modified.
    """
    with tempfile.TemporaryDirectory(prefix="atlas-upload-") as tmp:
        view = Path(tmp) / slide_id
        view.mkdir()
        for rel in (e["path"] for e in json.loads(data)["files"]):
            (view / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink((Path(slide_dir) / rel).resolve(), view / rel)
        (view / MANIFEST).write_bytes(data)
        return validate_slide(view)


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


def upload_slide(slide_dir: Path, uri: str, *, s3=None, progress=None, attempts: int = 3, backoff_s: float = 2.0,
                 multipart_threshold: int = MULTIPART_THRESHOLD,
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
        With every problem of the slide, before anything is uploaded.
    UploadFailed
        A file could not be sent after ``attempts`` tries (manifest.json is then not written).
    """
    from boto3.s3.transfer import TransferConfig

    slide_dir = Path(slide_dir)
    if not slide_dir.is_dir():
        raise InvalidInput(Problem(str(slide_dir), "is not a folder", "give the path of the slide folder"))
    root, slide_id = destination(slide_dir, uri)
    data, doc = manifest_bytes(slide_dir, slide_id)
    if problems := check_before_upload(slide_dir, slide_id, data):
        raise InvalidInput(problems)
    s3 = s3 or s3_client()
    prefix = root.join(slide_id).prefix()
    result = UploadResult(slide_id, str(prefix.join(MANIFEST)), run_id_for(slide_id, data))
    config = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunk)
    total = sum(f["size"] for f in doc["files"]) + len(data)
    task = progress.add_task(f"upload {slide_id}", total=total) if progress is not None else None

    def advance(n: int) -> None:
        if progress is not None:
            progress.advance(task, n)

    def send(entry: dict) -> bool:
        """One try at one file; a failed try takes back the bytes it counted."""
        key = prefix.join(entry["path"]).key
        sent = 0

        def count(n: int) -> None:
            nonlocal sent
            sent += n
            advance(n)

        if _remote_sha256(s3, root.bucket, key) == entry["sha256"]:
            return False
        try:
            s3.upload_file(str(slide_dir / entry["path"]), root.bucket, key, Config=config, Callback=count,
                           ExtraArgs={"Metadata": {SHA256_METADATA: entry["sha256"]}})
        except BaseException:
            advance(-sent)
            raise
        return True

    for entry in doc["files"]:
        if _with_retries(functools.partial(send, entry), entry["path"], attempts, backoff_s):
            result.uploaded.append(entry["path"])
            result.bytes_sent += entry["size"]
        else:
            result.skipped.append(entry["path"])
            advance(entry["size"])

    manifest_sha = hashlib.sha256(data).hexdigest()
    manifest_key = prefix.join(MANIFEST).key

    def send_manifest() -> bool:
        if _remote_sha256(s3, root.bucket, manifest_key) == manifest_sha:
            return False  # the same manifest: the catalog already has (or had) this run
        s3.put_object(Bucket=root.bucket, Key=manifest_key, Body=data, ContentType="application/json",
                      Metadata={SHA256_METADATA: manifest_sha})
        return True

    if _with_retries(send_manifest, MANIFEST, attempts, backoff_s):
        result.uploaded.append(MANIFEST)
        result.bytes_sent += len(data)
    else:
        result.skipped.append(MANIFEST)
    advance(len(data))
    return result
