"""Benchmark: ``atlas data get`` (atlas.aws.access.download_release) vs boto3's s3transfer, over HTTP.

Why our own downloader: s3transfer (boto3's ``TransferManager``) also fetches in parallel ranged
GETs, but keeps no state across processes: an interrupted download starts its files again from
byte 0, and it does not check content against a manifest. This measures what ours costs in speed
for resumability and sha256 checks, and what resuming saves.

Data: the 63 real fluorescence tiles of ``../shared/data/stitching/basicpy_wsi_brain`` (about 0.5 MB
each, as files they stand for OME-Zarr chunks and tables) plus one large file made of all of them
concatenated ``--copies`` times (stands for a Level 2 OME-TIFF). They are put in a bucket of S3
emulated by moto's server on localhost (real HTTP, one connection per request thread) with a
release manifest, as the publish job leaves it.

* ours: :func:`atlas.aws.access.download_release` (8 MiB parts, 8 threads, sha256 of every file);
* reference: ``boto3.s3.transfer.TransferManager`` with the same part size and concurrency and
  ``RequestPayer=requester``, every file submitted at once, then the same sha256 of every file.

Each side runs ``--repeat`` times, alternating; the best wall time counts. Then both downloads are
interrupted after about half of the large file and run again; the bytes requested in all are
counted from the requests' ``Range`` headers.

    .venv/bin/python benchmarks/download.py [--copies 4] [--repeat 3]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.realdata import data_root  # noqa: E402  (../shared/data, or fetched)

TILES = data_root() / "stitching" / "basicpy_wsi_brain"
BUCKET, SLIDE, RUN = "bench-results", "brain", "brain-000000000000"
PART, THREADS = 8 * 2**20, 8


class Interrupted(Exception):
    """Stands for a transfer dying mid-way."""


def make_release(s3, copies: int):
    """Upload the files and their manifest; returns the PublishedRelease as atlas.aws.access reads it."""
    import json

    from atlas.aws.access import get_release

    tiles = sorted(TILES.rglob("*.tif"))
    files = {f"segmentation/tiles/{p.name}": p.read_bytes() for p in tiles}
    files["registration/brain.ome.tif"] = b"".join(files.values()) * copies
    s3.create_bucket(Bucket=BUCKET)
    entries = []
    for rel, data in files.items():
        s3.put_object(Bucket=BUCKET, Key=f"{SLIDE}/{RUN}/{rel}", Body=data)
        entries.append({"path": rel, "level": 2 if rel.startswith("registration") else 3, "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    s3.put_object(Bucket=BUCKET, Key=f"{SLIDE}/{RUN}/manifest.json", Body=json.dumps({"files": entries}).encode())
    s3.put_object(Bucket=BUCKET, Key=f"{SLIDE}/latest.json", Body=json.dumps({"run_id": RUN}).encode())
    return get_release(SLIDE, bucket=BUCKET)


def reference(client, release, target: Path) -> None:
    """boto3's TransferManager, same part size and concurrency, then the same sha256 checks."""
    from boto3.s3.transfer import TransferConfig, TransferManager

    from atlas.slide.convention import sha256_file

    config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=THREADS)
    with TransferManager(client, config) as manager:
        futures = []
        for f in release.files:
            path = target / f.path
            path.parent.mkdir(parents=True, exist_ok=True)
            futures.append(manager.download(BUCKET, f"{SLIDE}/{RUN}/{f.path}", str(path),
                                            extra_args={"RequestPayer": "requester"}))
        for future in futures:
            future.result()
    bad = [f.path for f in release.files if sha256_file(target / f.path) != f.sha256]
    assert not bad, bad


def ours(client, release, target: Path) -> None:
    from atlas.aws.access import download_release

    result = download_release(release, target, client=client, part_size=PART, threads=THREADS)
    assert not result.corrupt and len(result.fetched) + len(result.verified) == len(release.files)


def counting_client(limit: int | None = None):
    """A requester-pays client counting the bytes S3 sends; raises Interrupted past ``limit`` bytes."""
    from atlas.aws.access import results_client

    client, counted = results_client(), {"bytes": 0}

    def stop(**_):
        if limit is not None and counted["bytes"] >= limit:
            raise Interrupted

    def count(http_response, **_):
        counted["bytes"] += int(http_response.headers.get("content-length", 0))

    client.meta.events.register("before-send.s3.GetObject", stop)
    client.meta.events.register("after-call.s3.GetObject", count)
    return client, counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=4, help="large file = all tiles concatenated this many times")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from localcloud.demo import moto_server

    with moto_server() as endpoint:
        os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        compare(args)


def compare(args: argparse.Namespace) -> None:
    """Download the made release with ours and s3transfer, whole and interrupted; print the ratios."""
    work = Path(tempfile.mkdtemp(prefix="atlas-bench-download-"))
    try:
        from atlas.aws.access import results_client

        release = make_release(results_client(), args.copies)
        total = release.size
        print(f"release: {len(release.files)} files, {total / 2**20:.1f} MiB (largest "
              f"{max(f.size for f in release.files) / 2**20:.1f} MiB); moto server on localhost")
        best = {"ours": float("inf"), "s3transfer": float("inf")}
        for _ in range(args.repeat):
            for name, fn in (("s3transfer", reference), ("ours", ours)):
                target = work / name
                shutil.rmtree(target, ignore_errors=True)
                t0 = time.perf_counter()
                fn(results_client(), release, target)
                best[name] = min(best[name], time.perf_counter() - t0)
        for name, seconds in best.items():
            print(f"{name:>10}: {seconds:.2f} s  {total / 2**20 / seconds:.0f} MiB/s")
        print(f"speed ratio ours / s3transfer: {best['s3transfer'] / best['ours']:.2f} (>1: ours faster)")

        big = max(f.size for f in release.files)
        fetched = {}
        for name, fn in (("s3transfer", reference), ("ours", ours)):
            target = work / f"{name}-resume"
            shutil.rmtree(target, ignore_errors=True)
            client, first = counting_client(limit=big // 2)
            with contextlib.suppress(Interrupted):
                fn(client, release, target)
            if name == "s3transfer":  # it leaves temp files that the next run does not use: start again
                shutil.rmtree(target, ignore_errors=True)
            client, second = counting_client()
            fn(client, release, target)
            fetched[name] = first["bytes"] + second["bytes"]
            print(f"{name:>10}: interrupted after {first['bytes'] / 2**20:.1f} MiB, then {second['bytes'] / 2**20:.1f} "
                  f"MiB more = {fetched[name] / total:.2f} x the release")
        print(f"bytes ratio with one interruption, s3transfer / ours: {fetched['s3transfer'] / fetched['ours']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
