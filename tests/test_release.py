"""Release of a run to the requester-pays results bucket: all at once, manifest last, earlier releases kept.

The run here is a small synthetic results folder (a few files per data level) standing for a real
run's outputs: release mechanics do not depend on pixels (the end-to-end tests in test_jobs.py
release a real run of the sample slide).
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from atlas import layout
from atlas.aws import release
from atlas.aws.release import LATEST, ReleaseError, content_type, release_run
from atlas.aws.s3 import S3Uri
from atlas.stages.publish import share

SLIDE = "S1"
BUCKETS = ("work", "results", "site")   # created by the s3 fixture (conftest)
FILES = {  # relative path -> bytes
    "registration/S1.ome.tif": b"II*\x00" + bytes(range(256)) * 40,
    "registration/S1.ome.zarr/zarr.json": b'{"zarr_format": 3}',
    "segmentation/unet-S1/cell.ome.tif": b"II*\x00cells",
    "quantification/S1--unet_cell.csv": b"CellID,DNA_1\n1,5.0\n",
    "overview/index.html": b"<!doctype html><title>S1</title>",
    "overview/openseadragon/openseadragon.min.js": b"var OpenSeadragon;",
    "qc/stitch/summary.json": b"{}",
}


def write_run(out_dir: Path, run_id: str) -> dict:
    """A results folder with its manifest (as the publish stage writes it)."""
    files = []
    for rel, data in FILES.items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data + run_id.encode())
        files.append({"path": rel, "size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                      "level": layout.level_of(rel)})
    manifest = {"slide_id": SLIDE, "run_id": run_id, "files": files}
    (out_dir / layout.MANIFEST).write_text(json.dumps(manifest))
    return manifest


def stage_to_work(s3, out_dir: Path, work: S3Uri) -> None:
    for path in sorted(out_dir.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), work.bucket, work.join(path.relative_to(out_dir).as_posix()).key)


def manifest_of(out: Path) -> dict:
    """The results manifest the publish stage left in a results folder."""
    return json.loads((out / "manifest.json").read_text())


def record_writes(s3) -> list[str]:
    """Keys of every write request, in the order they were sent."""
    writes: list[str] = []

    def note(params, model, **_):
        if model.name in ("PutObject", "CopyObject", "CompleteMultipartUpload"):
            writes.append(f"{params['Bucket']}/{params['Key']}")

    s3.meta.events.register("provide-client-params.s3", note)
    return writes


def keys(s3, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_release_copies_every_file_by_level_and_writes_manifest_last(s3, tmp_path):
    run_id = "S1-aaaaaaaaaaaa"
    manifest = write_run(tmp_path, run_id)
    work = S3Uri("work", f"{run_id}/")
    stage_to_work(s3, tmp_path, work)
    writes = record_writes(s3)

    release = release_run(s3, manifest_of(tmp_path), work=work, slide_id=SLIDE, run_id=run_id, results_bucket="results",
                          overview_bucket="site")

    prefix = f"{SLIDE}/{run_id}/"
    assert str(release.prefix) == f"s3://results/{prefix}"
    assert keys(s3, "results", prefix) == sorted([prefix + f["path"] for f in manifest["files"]]
                                                 + [prefix + "manifest.json"])
    for entry in manifest["files"]:
        obj = s3.get_object(Bucket="results", Key=prefix + entry["path"])
        assert obj["Body"].read() == (tmp_path / entry["path"]).read_bytes()
        assert obj["Metadata"]["htan-level"] == (str(entry["level"]) if entry["level"] is not None else "none")
        assert obj["Metadata"]["sha256"] == entry["sha256"]
        assert obj["ContentType"] == content_type(entry["path"])
    assert s3.head_object(Bucket="results", Key=prefix + "registration/S1.ome.tif")["Metadata"]["htan-level"] == "2"
    assert s3.head_object(Bucket="results", Key=prefix + "overview/index.html")["ContentType"] == "text/html"

    # the release becomes visible only with its manifest, after every file and the overview site; latest.json after that
    results_writes = [w for w in writes if w.startswith("results/")]
    assert results_writes[-2:] == [f"results/{prefix}manifest.json", f"results/{SLIDE}/{LATEST}"]
    last_site_write = max(i for i, w in enumerate(writes) if w.startswith(f"site/{prefix}"))
    assert writes.index(f"results/{prefix}manifest.json") > last_site_write
    latest = json.loads(s3.get_object(Bucket="results", Key=f"{SLIDE}/{LATEST}")["Body"].read())
    assert latest["run_id"] == run_id and latest["manifest"] == f"s3://results/{prefix}manifest.json"
    assert latest["files"] == len(FILES) and latest["bytes"] == sum(f["size"] for f in manifest["files"])

    # the overview site gets the overview folder, served with browser content types, and then the
    # portal at its root (tests/test_portal.py)
    assert keys(s3, "site", prefix) == sorted(f"{prefix}{rel[len('overview/'):]}"
                                              for rel in FILES if rel.startswith("overview/"))
    assert set(keys(s3, "site")) - set(keys(s3, "site", prefix)) == {"index.html", "index.json", "portal.js",
                                                                       "portal.css"}
    assert writes.index("site/index.json") > writes.index(f"results/{SLIDE}/{LATEST}")
    script = s3.head_object(Bucket="site", Key=prefix + "openseadragon/openseadragon.min.js")
    assert script["ContentType"] == "text/javascript"
    assert latest["overview"] == f"s3://site/{prefix}index.html"


def test_one_copy_request_per_object_the_managed_copy_past_the_limit(s3, tmp_path, monkeypatch):
    """Small objects (zarr chunks: most of a release) cost one CopyObject each; an object past
    CopyObject's limit (here lowered to 1 KB: the OME-TIFF) goes by the managed copy, same result."""
    monkeypatch.setattr(release, "COPY_OBJECT_MAX_BYTES", 1024)
    run_id = "S1-cccccccccccc"
    manifest = write_run(tmp_path, run_id)
    work = S3Uri("work", f"{run_id}/")
    stage_to_work(s3, tmp_path, work)
    calls: list[tuple[str, str]] = []
    s3.meta.events.register("provide-client-params.s3", lambda params, model, **_: calls.append(
        (model.name, params.get("Key") or params.get("CopySource", {}).get("Key", ""))))

    release_run(s3, manifest, work=work, slide_id=SLIDE, run_id=run_id, results_bucket="results")
    released = list(calls)

    big = [f["path"] for f in manifest["files"] if f["size"] >= 1024]
    assert big == ["registration/S1.ome.tif"]
    for entry in manifest["files"]:
        target = f"{SLIDE}/{run_id}/{entry['path']}"
        obj = s3.get_object(Bucket="results", Key=target)
        assert obj["Body"].read() == (tmp_path / entry["path"]).read_bytes()
        assert obj["Metadata"]["sha256"] == entry["sha256"] and obj["ContentType"] == content_type(entry["path"])
        asked = [name for name, key in released if key in (target, f"{run_id}/{entry['path']}")]
        if entry["path"] in big:  # the managed copy heads the source first
            assert "HeadObject" in asked and "CopyObject" in asked
        else:  # ... and the copy carries S3's own whole-object SHA-256: the manifest's, as analysts can check
            assert asked == ["CopyObject"]
            head = s3.head_object(Bucket="results", Key=target, ChecksumMode="ENABLED")
            assert base64.b64decode(head["ChecksumSHA256"]).hex() == entry["sha256"]


def test_earlier_releases_stay_and_latest_moves(s3, tmp_path):
    first, second = "S1-aaaaaaaaaaaa", "S1-bbbbbbbbbbbb"
    for run_id in (first, second):
        out = tmp_path / run_id
        write_run(out, run_id)
        stage_to_work(s3, out, S3Uri("work", f"{run_id}/"))
        release_run(s3, manifest_of(out), work=S3Uri("work", f"{run_id}/"), slide_id=SLIDE, run_id=run_id,
                    results_bucket="results")
    for run_id in (first, second):
        assert f"{SLIDE}/{run_id}/manifest.json" in keys(s3, "results")
        body = s3.get_object(Bucket="results", Key=f"{SLIDE}/{run_id}/registration/S1.ome.tif")["Body"].read()
        assert body == (tmp_path / run_id / "registration/S1.ome.tif").read_bytes()
    assert json.loads(s3.get_object(Bucket="results", Key=f"{SLIDE}/{LATEST}")["Body"].read())["run_id"] == second
    assert keys(s3, "site") == []  # no overview bucket configured: nothing there


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_incomplete_work_prefix_releases_nothing(s3, tmp_path, damage):
    run_id = "S1-cccccccccccc"
    write_run(tmp_path, run_id)
    work = S3Uri("work", f"{run_id}/")
    stage_to_work(s3, tmp_path, work)
    bad = work.join("quantification/S1--unet_cell.csv")
    if damage == "missing":
        s3.delete_object(Bucket=bad.bucket, Key=bad.key)
    else:
        s3.put_object(Bucket=bad.bucket, Key=bad.key, Body=b"CellID")

    with pytest.raises(ReleaseError, match="quantification/S1--unet_cell.csv"):
        release_run(s3, manifest_of(tmp_path), work=work, slide_id=SLIDE, run_id=run_id, results_bucket="results",
                    overview_bucket="site")
    assert keys(s3, "results") == [] and keys(s3, "site") == []


def test_release_refuses_a_manifest_of_another_run(s3, tmp_path):
    write_run(tmp_path, "S1-dddddddddddd")
    stage_to_work(s3, tmp_path, S3Uri("work", "S1-eeeeeeeeeeee/"))
    with pytest.raises(ReleaseError, match="not slide 'S1' run 'S1-eeeeeeeeeeee'"):
        release_run(s3, manifest_of(tmp_path), work=S3Uri("work", "S1-eeeeeeeeeeee/"), slide_id=SLIDE,
                    run_id="S1-eeeeeeeeeeee",
                    results_bucket="results")
    assert keys(s3, "results") == []


def released(s3, bucket: str, prefix: str) -> dict[str, tuple]:
    """Every object below ``prefix``: its bytes, metadata, content type and S3's own SHA-256."""
    out = {}
    for key in keys(s3, bucket, prefix):
        obj = s3.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        out[key[len(prefix):]] = (obj["Body"].read(), obj["Metadata"], obj["ContentType"], obj.get("ChecksumSHA256"))
    return out


def test_items_copying_their_shares_then_the_merge_release_what_one_go_releases(s3, tmp_path):
    """The publish stage's jobs (three items' shares, then the merge's finish) give the release that
    :func:`release_run` gives in one go: the same objects, metadata and checksums, manifest last."""
    run_id = "S1-ffffffffffff"
    manifest = write_run(tmp_path, run_id)
    work = S3Uri("work", f"{run_id}/")
    stage_to_work(s3, tmp_path, work)
    release_run(s3, manifest, work=work, slide_id=SLIDE, run_id=run_id, results_bucket="results")
    s3.create_bucket(Bucket="results-by-items")
    writes = record_writes(s3)
    publisher = release.S3Publisher(s3, work, SLIDE, run_id, "results-by-items")
    for index in range(3):
        publisher.copy(share(manifest["files"], index, 3))
    assert keys(s3, "results-by-items") == sorted(f"{SLIDE}/{run_id}/{f['path']}" for f in manifest["files"])
    publisher.finish(manifest)

    prefix = f"{SLIDE}/{run_id}/"
    assert released(s3, "results-by-items", prefix) == released(s3, "results", prefix)
    assert writes[-2:] == [f"results-by-items/{prefix}manifest.json", f"results-by-items/{SLIDE}/{LATEST}"]
    latest = [json.loads(s3.get_object(Bucket=b, Key=f"{SLIDE}/{LATEST}")["Body"].read()) for b in
              ("results", "results-by-items")]
    assert [{k: v for k, v in doc.items() if k in ("files", "bytes", "run_id")} for doc in latest] == [
        {"files": len(FILES), "bytes": sum(f["size"] for f in manifest["files"]), "run_id": run_id}] * 2


def test_the_managed_copy_sends_parts_of_the_configured_size(s3, monkeypatch):
    """Past CopyObject's limit (lowered here to 1 KB) an object is copied in parts of
    MANAGED_COPY_PART_BYTES (here S3's smallest, 5 MiB: a 12 MiB object in 3 UploadPartCopy requests)."""
    monkeypatch.setattr(release, "COPY_OBJECT_MAX_BYTES", 1024)
    monkeypatch.setattr(release, "MANAGED_COPY_PART_BYTES", 5 << 20)
    data = bytes(range(256)) * (12 << 12)
    s3.put_object(Bucket="work", Key="r/registration/S1.ome.tif", Body=data)
    calls: list[str] = []
    s3.meta.events.register("provide-client-params.s3", lambda params, model, **_: calls.append(model.name))
    release._copy(s3, S3Uri("work", "r/registration/S1.ome.tif"), S3Uri("results", "S1/r/registration/S1.ome.tif"),
                  {"sha256": hashlib.sha256(data).hexdigest()}, len(data))
    assert calls.count("UploadPartCopy") == 3 and "CompleteMultipartUpload" in calls
    assert s3.get_object(Bucket="results", Key="S1/r/registration/S1.ome.tif")["Body"].read() == data
