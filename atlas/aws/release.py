"""Release a run: its results go from the work prefix to the requester-pays results bucket, all at once.

Readers discover a release through its ``manifest.json``, so it is written only after every file it
lists is in place (and the overview is on the site), and ``<slide_id>/latest.json`` only after the
manifest. A release interrupted half-way therefore shows no manifest: readers never see it, and the
retried publish job copies again (server side, idempotent). Each run has its own prefix
``<slide_id>/<run_id>/``, so earlier releases of a slide stay as they were.

Results bucket::

    <slide_id>/<run_id>/registration/...      Level 2  (object metadata htan-level: 2)
    <slide_id>/<run_id>/segmentation/...      Level 3
    <slide_id>/<run_id>/quantification/...    Level 4
    <slide_id>/<run_id>/overview/...          Level 5
    <slide_id>/<run_id>/qc/...                auxiliary (htan-level: none)
    <slide_id>/<run_id>/manifest.json         written last
    <slide_id>/latest.json                    then this: which release is current

Overview site bucket (optional, served by CloudFront; browsers cannot read a requester-pays bucket)::

    <slide_id>/<run_id>/index.html ...        the contents of overview/
    index.html, index.json                    the portal: every released slide (atlas.aws.portal), rewritten
                                              after each release
"""
from __future__ import annotations

import json
import mimetypes
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from atlas import layout
from atlas.aws.s3 import S3Uri, list_sizes, parallel_map

LATEST = "latest.json"
# The results bucket is published for external analysts, who are told to read it from us-east-1
# (free in-region transfer, they pay requests): it must live there (the deployment config checks).
RESULTS_REGION = "us-east-1"
# The publish job's environment: where it releases to (the CDK app sets these on the job definitions).
RESULTS_BUCKET_ENV = "ATLAS_RESULTS_BUCKET"
OVERVIEW_BUCKET_ENV = "ATLAS_OVERVIEW_BUCKET"
CONTENT_TYPES = {".json": "application/json", ".csv": "text/csv", ".html": "text/html", ".js": "text/javascript",
                 ".css": "text/css", ".tif": "image/tiff", ".png": "image/png", ".jpg": "image/jpeg",
                 ".svg": "image/svg+xml"}


class ReleaseError(RuntimeError):
    """The run cannot be released as its manifest says; nothing was made visible."""


@dataclass(frozen=True)
class Release:
    """A published run.

    Attributes
    ----------
    prefix : S3Uri
        ``s3://<results>/<slide_id>/<run_id>/``.
    manifest : S3Uri
        Its ``manifest.json``.
    files : int
        Files released (the manifest not counted).
    bytes : int
        Their total size.
    overview : S3Uri or None
        Where the overview site copy went, when an overview bucket is configured.
    """

    prefix: S3Uri
    manifest: S3Uri
    files: int
    bytes: int
    overview: S3Uri | None


def release_prefix(results_bucket: str, slide_id: str, run_id: str) -> S3Uri:
    """Where a run is released: ``s3://<results>/<slide_id>/<run_id>/``."""
    return S3Uri(results_bucket, f"{slide_id}/{run_id}/")


def content_type(key: str) -> str:
    """MIME type of a key (browsers and S3 consoles need it for html/js; binary otherwise)."""
    suffix = PurePosixPath(key).suffix.lower()
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(key)[0] or "application/octet-stream"


# CopyObject copies up to 5 GB in one request; larger objects need the managed (multipart) copy.
COPY_OBJECT_MAX_BYTES = 5 * 10 ** 9


def _copy(s3, source: S3Uri, target: S3Uri, metadata: dict[str, str], size: int) -> None:
    """Server-side copy with new metadata. One CopyObject request where it can (a release has ~10^6
    objects at the target, mostly zarr chunks: the managed copy's per-call set-up -- a transfer
    manager, a HeadObject, threads -- was most of publish's CPU); the managed copy past 5 GB."""
    args = {"MetadataDirective": "REPLACE", "ContentType": content_type(target.key), "Metadata": metadata}
    if size < COPY_OBJECT_MAX_BYTES:
        # S3 computes the copy's own whole-object SHA-256 (a streamed source has only its parts')
        s3.copy_object(CopySource={"Bucket": source.bucket, "Key": source.key}, Bucket=target.bucket,
                       Key=target.key, ChecksumAlgorithm="SHA256", **args)
    else:
        s3.copy({"Bucket": source.bucket, "Key": source.key}, target.bucket, target.key, ExtraArgs=args)


def release_run(s3, manifest: Mapping, *, work: S3Uri, slide_id: str, run_id: str, results_bucket: str,
                overview_bucket: str | None = None, public: bool = True) -> Release:
    """Copy the run's results from ``work`` to ``s3://<results_bucket>/<slide_id>/<run_id>/``, manifest last.

    Parameters
    ----------
    s3 : botocore S3 client
    manifest : dict
        The results ``manifest.json`` the publish stage wrote to ``work`` (it lists every file to
        release with its level, size and sha256).
    work : S3Uri
        The run's work prefix, where every listed file and the manifest already are.
    slide_id, run_id : str
    results_bucket : str
        The requester-pays results bucket (the owner's writes need no request-payer header).
    overview_bucket : str, optional
        Overview site bucket; ``overview/`` is copied to ``<slide_id>/<run_id>/`` there (when
        ``public``), then the portal at its root is rewritten (:mod:`atlas.aws.portal`).
    public : bool
        ``overview.public`` of the slide's params.yml: False keeps the overview off the site (and
        the portal, rewritten all the same, then no longer lists the slide).

    Raises
    ------
    ReleaseError
        A listed file is missing from ``work`` or has another size; nothing becomes visible.
    """
    if (manifest.get("slide_id"), manifest.get("run_id")) != (slide_id, run_id):
        raise ReleaseError(f"manifest.json is for slide {manifest.get('slide_id')!r} run "
                           f"{manifest.get('run_id')!r}, not slide {slide_id!r} run {run_id!r}; nothing was released. "
                           f"Redo the publish stage of this run: atlas rerun {slide_id} --from publish")
    files = manifest["files"]
    work = work.prefix()
    sizes = list_sizes(s3, work)
    bad = [f["path"] for f in files if sizes.get(f["path"]) != f["size"]]
    if layout.MANIFEST not in sizes:
        bad.append(layout.MANIFEST)
    if bad:
        raise ReleaseError(f"cannot release run {run_id}: {len(bad)} file(s) listed in manifest.json are "
                           f"missing from {work} or differ in size, e.g. {', '.join(bad[:5])}; nothing was released. "
                           f"Redo the stage that wrote them (its completion record under {work.join('qc')} lists "
                           f"its outputs): atlas rerun {slide_id} --from STAGE")

    prefix = release_prefix(results_bucket, slide_id, run_id)
    parallel_map(lambda f: _copy(s3, work.join(f["path"]), prefix.join(f["path"]),
                                 {"htan-level": str(f["level"]) if f["level"] is not None else "none",
                                  "sha256": f["sha256"]}, f["size"]), files)
    site = None
    if overview_bucket and public:
        site = S3Uri(overview_bucket, f"{slide_id}/{run_id}/")
        top = layout.OVERVIEW + "/"
        parallel_map(lambda f: _copy(s3, work.join(f["path"]), site.join(f["path"][len(top):]),
                                     {"sha256": f["sha256"]}, f["size"]),
                     [f for f in files if f["path"].startswith(top)])
    # the manifest is the release: only now does it become visible
    _copy(s3, work.join(layout.MANIFEST), prefix.join(layout.MANIFEST), {"htan-level": "none"},
          sizes[layout.MANIFEST])
    latest = {"slide_id": slide_id, "run_id": run_id, "prefix": str(prefix),
              "manifest": str(prefix.join(layout.MANIFEST)),
              "files": len(files), "bytes": sum(f["size"] for f in files),
              "overview": str(site.join(layout.OVERVIEW_PAGE)) if site else None,
              "released": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    s3.put_object(Bucket=results_bucket, Key=f"{slide_id}/{LATEST}", Body=json.dumps(latest, indent=1).encode() + b"\n",
                  ContentType="application/json")
    if overview_bucket:  # the release is complete: the portal at the site's root now lists it
        from atlas.aws.portal import publish_portal

        publish_portal(s3, results_bucket=results_bucket, overview_bucket=overview_bucket)
    return Release(prefix, prefix.join(layout.MANIFEST), latest["files"], latest["bytes"], site)
