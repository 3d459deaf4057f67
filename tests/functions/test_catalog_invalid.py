"""A broken slide is INVALID with every problem named (file + fix), the lab is told, and nothing is lost.

The broken uploads are the sample slide with one realistic fault each, sent object by object with a
manifest that matches the broken files (as a lab using its own tools would): `atlas upload` would
have refused them locally.
"""
from __future__ import annotations

import json

import boto3
import pytest

BREAKAGES = {
    # an upload cut off half-way: the OME-XML (at the end of the file) is gone
    "corrupt_tiff": ("raw/cycle-02.ome.tif", "not a readable OME-TIFF"),
    # markers.csv lists a fourth channel for cycle 2, whose file has three
    "channel_mismatch": ("raw/cycle-02.ome.tif", "markers.csv lists 4"),
    # markers.csv is not a markers table at all
    "junk_markers": ("markers.csv", "missing column"),
}


def break_slide(slide_dir, kind: str) -> None:
    if kind == "corrupt_tiff":
        path = slide_dir / "raw/cycle-02.ome.tif"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "channel_mismatch":
        path = slide_dir / "markers.csv"
        path.write_text(path.read_text() + "7,2,CD8\n")
    else:
        (slide_dir / "markers.csv").write_bytes(b"\x89PNG\r\n\x1a\n this is an image, not a table\n")


def raw_objects(cloud) -> dict[str, list[tuple[str, bool]]]:
    """Every version of every object in the ingest bucket: key -> [(version id, is delete marker)]."""
    listing = boto3.client("s3").list_object_versions(Bucket=cloud.ingest_bucket)
    found: dict[str, list[tuple[str, bool]]] = {}
    for v in listing.get("Versions", []):
        found.setdefault(v["Key"], []).append((v["VersionId"], False))
    for v in listing.get("DeleteMarkers", []):
        found.setdefault(v["Key"], []).append((v["VersionId"], True))
    return found


@pytest.mark.parametrize("kind", sorted(BREAKAGES))
def test_broken_slide_is_invalid_with_reasons_notified_and_kept(cloud, ingest, slide_copy, kind):
    # GIVEN a slide with one fault, uploaded completely
    break_slide(slide_copy, kind)
    ingest.upload_and_settle(slide_copy)
    # THEN it is INVALID, nothing runs, and the problem names the file and the fix
    record = cloud.slide_record("sample")
    assert record["status"] == "INVALID"
    assert cloud.executions() == []
    file, phrase = BREAKAGES[kind]
    matching = [p for p in record["problems"] if p["file"] == file and phrase in p["message"]]
    assert matching, record["problems"]
    assert all(p["fix"] for p in record["problems"])
    # AND the lab got exactly one message listing every problem with its fix
    notes = cloud.notifications()
    assert [n["Subject"] for n in notes] == ["[atlas] sample: INVALID"]
    for problem in record["problems"]:
        assert f"{problem['file']}: {problem['message']} -- fix: {problem['fix']}" in notes[0]["Message"]
    attributes = notes[0]["MessageAttributes"]
    assert attributes["status"]["Value"] == "INVALID" and attributes["slide_id"]["Value"] == "sample"
    # AND every uploaded object is still there, byte for byte, nothing deleted
    s3 = boto3.client("s3")
    versions = raw_objects(cloud)
    assert all(len(v) == 1 and not v[0][1] for v in versions.values())
    for path in slide_copy.rglob("*"):
        if path.is_file() and path.name != "manifest.json":
            key = f"sample/{path.relative_to(slide_copy).as_posix()}"
            assert s3.get_object(Bucket=cloud.ingest_bucket, Key=key)["Body"].read() == path.read_bytes()


def test_fixed_reupload_of_an_invalid_slide_runs(cloud, ingest, sample_slide, slide_copy):
    break_slide(slide_copy, "channel_mismatch")
    ingest.upload_and_settle(slide_copy)
    assert cloud.slide_record("sample")["status"] == "INVALID"
    cloud.notifications()
    # WHEN the lab uploads the corrected markers.csv and a new manifest
    (slide_copy / "markers.csv").write_bytes((sample_slide / "markers.csv").read_bytes())
    ingest.upload_and_settle(slide_copy)
    # THEN the slide runs, and the repeated INVALID events sent no second message
    record = cloud.slide_record("sample")
    assert record["status"] == "READY" and "problems" not in record
    assert len(cloud.executions()) == 1
    assert cloud.notifications() == []


def test_every_problem_is_listed_not_just_the_first(cloud, ingest, slide_copy):
    break_slide(slide_copy, "corrupt_tiff")
    (slide_copy / "params.yml").write_text("segment:\n  engin: classical\n")
    ingest.upload_and_settle(slide_copy)
    files = {p["file"] for p in cloud.slide_record("sample")["problems"]}
    assert {"raw/cycle-02.ome.tif", "params.yml"} <= files


def test_broken_manifest_is_invalid(cloud, ingest, sample_slide):
    ingest.upload_and_settle(sample_slide, manifest=False)
    ingest.deliver(ingest.put("sample", "manifest.json", b'{"files": [{"path": "markers.csv"}]}'))
    ingest.settle()
    record = cloud.slide_record("sample")
    assert record["status"] == "INVALID"
    assert [p["file"] for p in record["problems"]] == ["manifest.json"]
    assert json.loads(json.dumps(record["problems"]))[0]["fix"]


def test_empty_markers_file_is_invalid_not_an_error(cloud, ingest, slide_copy):
    (slide_copy / "markers.csv").write_bytes(b"")
    ingest.upload_and_settle(slide_copy)
    record = cloud.slide_record("sample")
    assert record["status"] == "INVALID"
    assert "markers.csv" in {p["file"] for p in record["problems"]}
