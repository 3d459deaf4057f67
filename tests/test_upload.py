"""`atlas upload`: validate first, every file (multipart when large), manifest.json last, resumable."""
from __future__ import annotations

import hashlib
import json

import pytest
from botocore.awsrequest import AWSResponse
from typer.testing import CliRunner

from atlas.aws.upload import UploadFailed, upload_slide
from atlas.cli import app
from atlas.errors import InvalidInput
from atlas.slide.convention import run_id_for, slide_manifest

BUCKET = "ingest"
BUCKETS = (BUCKET,)   # created by the s3 fixture (conftest)
SMALL_PARTS = {"multipart_threshold": 5 << 20, "multipart_chunk": 5 << 20}  # the sample's cycles go multipart


def calls(client, *operations: str) -> list[tuple[str, str]]:
    """Record (operation, key) of every call of ``operations`` made with ``client``, in order."""
    seen = []
    for op in operations:
        client.meta.events.register(f"provide-client-params.s3.{op}",
                                    lambda params, model, **_: seen.append((model.name, params.get("Key"))))
    return seen


class _Body:
    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **_):
        yield self.data


def server_error(request, status: int) -> AWSResponse:
    """What S3 answers when it is having a bad moment (retryable)."""
    body = b"<Error><Code>InternalError</Code><Message>injected by the test</Message></Error>"
    return AWSResponse(request.url, status, {}, _Body(body))


def keys(s3) -> dict[str, bytes]:
    listed = s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


def test_upload_sends_every_file_then_the_manifest_last(s3, sample_slide):
    seen = calls(s3, "PutObject", "CreateMultipartUpload", "CompleteMultipartUpload")
    result = upload_slide(sample_slide, f"s3://{BUCKET}", s3=s3, **SMALL_PARTS)
    # every file arrived intact, with its sha256 recorded for the catalog
    stored = keys(s3)
    for entry in slide_manifest(sample_slide)["files"]:
        key = f"sample/{entry['path']}"
        assert hashlib.sha256(stored[key]).hexdigest() == entry["sha256"]
        assert s3.head_object(Bucket=BUCKET, Key=key)["Metadata"]["sha256"] == entry["sha256"]
    # the large cycle files went multipart, and the manifest was the very last write
    assert ("CompleteMultipartUpload", "sample/raw/cycle-01.ome.tif") in seen
    assert seen[-1] == ("PutObject", "sample/manifest.json")
    manifest = stored["sample/manifest.json"]
    assert json.loads(manifest) == slide_manifest(sample_slide)
    assert result.run_id == run_id_for("sample", manifest)
    assert result.uploaded == [f["path"] for f in slide_manifest(sample_slide)["files"]] + ["manifest.json"]


def test_second_upload_skips_what_is_there(s3, sample_slide):
    upload_slide(sample_slide, f"s3://{BUCKET}", s3=s3)
    seen = calls(s3, "PutObject", "CreateMultipartUpload")
    result = upload_slide(sample_slide, f"s3://{BUCKET}", s3=s3)
    assert seen == [] and result.uploaded == [] and result.bytes_sent == 0
    assert "manifest.json" in result.skipped


def test_interrupted_upload_resumes_without_a_manifest_in_between(s3, sample_slide):
    # GIVEN a network that drops every request for the second cycle
    def refuse(request, **_):
        if "cycle-02" in request.url:
            return server_error(request, 500)
        return None

    s3.meta.events.register("before-send.s3", refuse)
    with pytest.raises(UploadFailed, match="raw/cycle-02.ome.tif failed after 2 attempts"):
        upload_slide(sample_slide, f"s3://{BUCKET}", s3=s3, attempts=2, backoff_s=0)
    # THEN the manifest was not written (the catalog keeps waiting) and the rest stays
    assert "sample/manifest.json" not in keys(s3) and "sample/raw/cycle-01.ome.tif" in keys(s3)
    # WHEN the network is back, the same command sends only what is missing
    s3.meta.events.unregister("before-send.s3", refuse)
    result = upload_slide(sample_slide, f"s3://{BUCKET}", s3=s3)
    assert result.uploaded == ["raw/cycle-02.ome.tif", "manifest.json"]


def test_transient_failures_are_retried(s3, sample_slide):
    failures = {"left": 2}

    def flaky(request, **_):
        if "uploadId" in request.url and request.method == "PUT" and failures["left"]:
            failures["left"] -= 1
            return server_error(request, 503)
        return None

    s3.meta.events.register("before-send.s3", flaky)
    result = upload_slide(sample_slide, f"s3://{BUCKET}", s3=s3, backoff_s=0, **SMALL_PARTS)
    assert failures["left"] == 0
    assert "manifest.json" in result.uploaded
    assert hashlib.sha256(keys(s3)["sample/raw/cycle-01.ome.tif"]).hexdigest() == \
        hashlib.sha256((sample_slide / "raw/cycle-01.ome.tif").read_bytes()).hexdigest()


def test_invalid_slide_is_refused_before_anything_is_sent(s3, slide_copy):
    (slide_copy / "markers.csv").write_text("channel,name\n1,DNA\n")
    before = (slide_copy / "markers.csv").read_bytes(), sorted(p.name for p in slide_copy.rglob("*"))
    with pytest.raises(InvalidInput) as info:
        upload_slide(slide_copy, f"s3://{BUCKET}", s3=s3)
    assert [p.file for p in info.value.problems] == ["markers.csv"]
    assert keys(s3) == {}
    assert ((slide_copy / "markers.csv").read_bytes(), sorted(p.name for p in slide_copy.rglob("*"))) == before


def test_stale_local_manifest_is_regenerated_not_trusted(s3, slide_copy):
    (slide_copy / "params.yml").write_text("segment:\n  expand_um: 3.0\n")  # added after manifest.json
    upload_slide(slide_copy, f"s3://{BUCKET}", s3=s3)
    manifest = json.loads(keys(s3)["sample/manifest.json"])
    assert "params.yml" in [f["path"] for f in manifest["files"]]


@pytest.mark.parametrize("uri, slide_id", [(f"s3://{BUCKET}", "sample"), (f"s3://{BUCKET}/", "sample"),
                                           (f"s3://{BUCKET}/S_42", "S_42")])
def test_destination_names_the_slide(s3, sample_slide, uri, slide_id):
    upload_slide(sample_slide, uri, s3=s3)
    stored = keys(s3)
    assert json.loads(stored[f"{slide_id}/manifest.json"])["slide_id"] == slide_id
    assert all(k.startswith(f"{slide_id}/") for k in stored)


@pytest.mark.parametrize("uri, message", [(f"s3://{BUCKET}/lab/S1", "more than one level"),
                                          (f"s3://{BUCKET}/bad id", "slide id"),
                                          ("/tmp/bucket", "not an S3 URI")])
def test_bad_destinations_are_refused(s3, sample_slide, uri, message):
    with pytest.raises(InvalidInput, match=message):
        upload_slide(sample_slide, uri, s3=s3)
    assert keys(s3) == {}


def test_cli_reports_what_it_did(s3, sample_slide):
    result = CliRunner().invoke(app, ["upload", str(sample_slide), f"s3://{BUCKET}"])
    assert result.exit_code == 0, result.output
    assert "uploaded 4 file(s)" in result.output
    assert run_id_for("sample", keys(s3)["sample/manifest.json"]) in result.output


def test_upload_names_the_bucket_owner_only_when_given(s3, sample_slide, monkeypatch):
    """--bucket-owner / ATLAS_BUCKET_OWNER: ExpectedBucketOwner on every request to the ingest bucket
    (S3 refuses a bucket of that name owned by another account); without it the requests are as before."""
    seen = []
    s3.meta.events.register("before-send.s3", lambda request, **_: seen.append(
        (request.method, request.url, request.headers.get("x-amz-expected-bucket-owner"))))
    upload_slide(sample_slide, f"s3://{BUCKET}", s3=s3)
    assert seen and {owner for *_, owner in seen} == {None}
    s3.delete_object(Bucket=BUCKET, Key="sample/markers.csv")   # so the second upload sends a file, not only HEADs
    seen.clear()
    upload_slide(sample_slide, f"s3://{BUCKET}", s3=s3, bucket_owner="123456789012")
    assert ("PUT", f"https://{BUCKET}.s3.amazonaws.com/sample/markers.csv", b"123456789012") in seen
    assert {owner for *_, owner in seen} == {b"123456789012"}
    monkeypatch.setenv("ATLAS_BUCKET_OWNER", "ours")
    bad = CliRunner().invoke(app, ["upload", str(sample_slide), f"s3://{BUCKET}"])
    assert isinstance(bad.exception, InvalidInput) and "--bucket-owner: 'ours' is not an AWS account id" in str(
        bad.exception)
