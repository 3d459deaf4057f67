"""Release a run: its results go from the work prefix to the requester-pays results bucket, manifest last.

The publish stage's items copy their shares of the files (:meth:`S3Publisher.copy`, server side),
its merge then makes the release visible (:meth:`S3Publisher.finish`); :func:`release_run` does both
in one go. Readers discover a release through its ``manifest.json``, so it is written only after
every file it lists is in place (and the overview is on the site), and ``<slide_id>/latest.json``
only after the manifest. A release interrupted half-way therefore shows no manifest: readers never
see it, and the retried jobs copy again (server side, idempotent). Each run has its own prefix
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

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
# The managed copy's parts are copied by S3 itself (UploadPartCopy): the job's threads only wait on
# them, so many run at once. The OME-TIFF at the target (~220 GB) is ~3,300 parts of 64 MiB, against
# boto3's default of 10 threads and ~10,000 parts (its 8 MiB parts grown to S3's limit).
MANAGED_COPY_PART_BYTES, MANAGED_COPY_THREADS = 64 << 20, 64


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
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_chunksize=MANAGED_COPY_PART_BYTES, max_concurrency=MANAGED_COPY_THREADS)
        s3.copy({"Bucket": source.bucket, "Key": source.key}, target.bucket, target.key, ExtraArgs=args, Config=config)


@dataclass(frozen=True)
class S3Publisher:
    """A run's release on S3 (:class:`atlas.stages.publish.Publisher`): what the publish stage's jobs copy with.

    Attributes
    ----------
    s3 : botocore S3 client
    work : S3Uri
        The run's work prefix, where every file to release already is.
    slide_id, run_id : str
    results_bucket : str
        The requester-pays results bucket (the owner's writes need no request-payer header).
    overview_bucket : str or None
        Overview site bucket: ``overview/`` goes to ``<slide_id>/<run_id>/`` there when ``public``,
        and the portal at its root is rewritten once the release is complete (:mod:`atlas.aws.portal`).
    public : bool
        ``overview.public`` of the slide's params.yml: False keeps the overview off the site (and the
        portal, rewritten all the same, then no longer lists the slide).
    """

    s3: Any
    work: S3Uri
    slide_id: str
    run_id: str
    results_bucket: str
    overview_bucket: str | None = None
    public: bool = True

    @property
    def prefix(self) -> S3Uri:
        return release_prefix(self.results_bucket, self.slide_id, self.run_id)

    @property
    def destination(self) -> str:
        """Where this release's copies go: the results prefix, and the site when the overview is public."""
        return f"{self.prefix}" + (f" s3://{self.overview_bucket}/" if self.overview_bucket and self.public else "")

    @property
    def site(self) -> S3Uri | None:
        """Where the overview goes on the site, or None (no site, or not public)."""
        return S3Uri(self.overview_bucket, f"{self.slide_id}/{self.run_id}/") if self.overview_bucket and self.public \
            else None

    def copy(self, files: Sequence[Mapping]) -> None:
        """Copy ``files`` (manifest entries) server-side to the release, the overview's to the site too."""
        work, prefix, site, top = self.work.prefix(), self.prefix, self.site, layout.OVERVIEW + "/"

        def one(f: Mapping) -> None:
            level = str(f["level"]) if f["level"] is not None else "none"
            _copy(self.s3, work.join(f["path"]), prefix.join(f["path"]), {"htan-level": level, "sha256": f["sha256"]},
                  f["size"])
            if site is not None and f["path"].startswith(top):
                _copy(self.s3, work.join(f["path"]), site.join(f["path"][len(top):]), {"sha256": f["sha256"]},
                      f["size"])
        parallel_map(one, files)

    def finish(self, manifest: Mapping) -> Release:
        """Make the release visible, every file it lists being in place: the manifest copied last,
        then ``<slide_id>/latest.json``, then the portal."""
        work, prefix, site = self.work.prefix(), self.prefix, self.site
        size = self.s3.head_object(Bucket=work.bucket, Key=work.join(layout.MANIFEST).key)["ContentLength"]
        # the manifest is the release: only now does it become visible
        _copy(self.s3, work.join(layout.MANIFEST), prefix.join(layout.MANIFEST), {"htan-level": "none"}, size)
        files = manifest["files"]
        latest = {"slide_id": self.slide_id, "run_id": self.run_id, "prefix": str(prefix),
                  "manifest": str(prefix.join(layout.MANIFEST)),
                  "files": len(files), "bytes": sum(f["size"] for f in files),
                  "overview": str(site.join(layout.OVERVIEW_PAGE)) if site else None,
                  "released": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.s3.put_object(Bucket=self.results_bucket, Key=f"{self.slide_id}/{LATEST}",
                           Body=json.dumps(latest, indent=1).encode() + b"\n", ContentType="application/json")
        if self.overview_bucket:  # the release is complete: the portal at the site's root now lists it
            from atlas.aws.portal import publish_portal

            publish_portal(self.s3, results_bucket=self.results_bucket, overview_bucket=self.overview_bucket)
        return Release(prefix, prefix.join(layout.MANIFEST), latest["files"], latest["bytes"], site)


def check_release(s3, manifest: Mapping, *, work: S3Uri, slide_id: str, run_id: str) -> None:
    """ReleaseError unless ``manifest`` is this run's and every file it lists (and the manifest) is in
    ``work`` at its size."""
    if (manifest.get("slide_id"), manifest.get("run_id")) != (slide_id, run_id):
        raise ReleaseError(f"manifest.json is for slide {manifest.get('slide_id')!r} run "
                           f"{manifest.get('run_id')!r}, not slide {slide_id!r} run {run_id!r}; nothing was released. "
                           f"Redo the publish stage of this run: atlas rerun {slide_id} --from publish")
    work = work.prefix()
    sizes = list_sizes(s3, work)
    bad = [f["path"] for f in manifest["files"] if sizes.get(f["path"]) != f["size"]]
    if layout.MANIFEST not in sizes:
        bad.append(layout.MANIFEST)
    if bad:
        raise ReleaseError(f"cannot release run {run_id}: {len(bad)} file(s) listed in manifest.json are "
                           f"missing from {work} or differ in size, e.g. {', '.join(bad[:5])}; nothing was released. "
                           f"Redo the stage that wrote them (its completion record under {work.join('qc')} lists "
                           f"its outputs): atlas rerun {slide_id} --from STAGE")


def release_run(s3, manifest: Mapping, *, work: S3Uri, slide_id: str, run_id: str, results_bucket: str,
                overview_bucket: str | None = None, public: bool = True) -> Release:
    """Copy the run's results from ``work`` to ``s3://<results_bucket>/<slide_id>/<run_id>/``, manifest last,
    in one go (what the publish stage's items and merge do between them; :class:`S3Publisher`).

    Parameters
    ----------
    s3 : botocore S3 client
    manifest : dict
        The results ``manifest.json`` the publish stage wrote to ``work`` (it lists every file to
        release with its level, size and sha256).
    work : S3Uri
        The run's work prefix, where every listed file and the manifest already are.
    slide_id, run_id, results_bucket, overview_bucket, public
        As :class:`S3Publisher` has them.

    Raises
    ------
    ReleaseError
        A listed file is missing from ``work`` or has another size; nothing becomes visible.
    """
    check_release(s3, manifest, work=work, slide_id=slide_id, run_id=run_id)
    publisher = S3Publisher(s3, work, slide_id, run_id, results_bucket, overview_bucket, public)
    publisher.copy(manifest["files"])
    return publisher.finish(manifest)
