"""External access to published results (atlas.aws.access, ``atlas data``) against S3 emulated by moto.

The release is real: the sample slide is stitched (its Level 2 OME-TIFF and OME-Zarr, the stitch QC)
and published by the publish stage's manifest and :func:`atlas.aws.release.release_run`, exactly as the
publish job releases a run. Only the later stages are left out (they do not change how a release is
read). The emulator does not enforce requester pays, so the header is checked on every request with
botocore's ``before-send`` event; error answers that the emulator cannot produce (AccessDenied, wrong
region) come from botocore's Stubber in the shapes S3 sends.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import boto3
import numpy as np
import pytest
import zarr
from botocore.stub import Stubber
from fake_aws import use_fake_aws
from moto import mock_aws
from typer.testing import CliRunner

from atlas import layout
from atlas.aws.access import (
    GIB,
    PART_SIZE,
    PART_SUFFIX,
    PRICES,
    STATE_SUFFIX,
    AccessError,
    NotPublished,
    download_release,
    estimate_cost,
    get_release,
    internet_transfer_usd,
    items,
    list_published_slides,
    list_releases,
    open_zarr,
    parse_levels,
    results_client,
)
from atlas.aws.release import release_run
from atlas.aws.s3 import REQUEST_PAYER_HEADER, S3Uri
from atlas.cli import app
from atlas.cli.data import human
from atlas.errors import InvalidInput
from atlas.pipeline.local import make_context

RESULTS, WORK = "atlas-test-results", "atlas-test-work"


@dataclass(frozen=True)
class Published:
    slide_id: str
    run_id: str
    out_dir: Path          # the local results folder that was released
    manifest: dict


@pytest.fixture(scope="module")
def published(sample_slide, sample_run):
    """The sample slide's run released to an emulated requester-pays results bucket."""
    out = sample_run
    ctx = make_context(sample_slide, out)
    with pytest.MonkeyPatch.context() as mp:
        use_fake_aws(mp, region="eu-west-1", ATLAS_RESULTS_BUCKET=RESULTS)  # a reader not in us-east-1
        with mock_aws():
            s3 = boto3.client("s3", region_name="us-east-1")
            for bucket in (RESULTS, WORK):
                s3.create_bucket(Bucket=bucket)
            s3.put_bucket_request_payment(Bucket=RESULTS, RequestPaymentConfiguration={"Payer": "Requester"})
            for path in sorted(p for p in out.rglob("*") if p.is_file()):
                s3.upload_file(str(path), WORK, f"{ctx.run_id}/{path.relative_to(out).as_posix()}")
            release_run(s3, json.loads((out / layout.MANIFEST).read_text()), work=S3Uri(WORK, f"{ctx.run_id}/"),
                        slide_id=ctx.slide_id, run_id=ctx.run_id,
                        results_bucket=RESULTS)
            yield Published(ctx.slide_id, ctx.run_id, out, json.loads((out / layout.MANIFEST).read_text()))


def cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


@pytest.fixture
def requests_seen(monkeypatch):
    """(operation, x-amz-request-payer) of every S3 request any boto3 client made during the test."""
    seen: list[tuple[str, bytes | None]] = []

    def record(request, event_name, **_):
        seen.append((event_name.rsplit(".", 1)[-1], request.headers.get(REQUEST_PAYER_HEADER)))

    session = boto3.session.Session()
    session.events.register("before-send.s3", record)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", session)
    return seen


def level_files(published: Published, level) -> list[dict]:
    return [f for f in published.manifest["files"] if f["level"] == level]


def test_ls_lists_complete_releases_by_level_with_sizes(published):
    s3 = boto3.client("s3", region_name="us-east-1")
    half_released = f"{published.slide_id}/{published.slide_id}-000000000000/registration/x.ome.tif"
    s3.put_object(Bucket=RESULTS, Key=half_released, Body=b"no manifest yet")  # a release still being copied
    try:
        [slide] = list_published_slides(bucket=RESULTS)
        assert (slide.slide_id, slide.run_id) == (published.slide_id, published.run_id)
        assert slide.files == len(published.manifest["files"])
        releases = list_releases(published.slide_id, bucket=RESULTS)
        assert [(r.run_id, r.latest) for r in releases] == [(published.run_id, True)]

        release = get_release(published.slide_id, bucket=RESULTS)
        zarr_path = layout.registration_zarr(published.slide_id) + "/"
        shown = {i.path: i for i in items(release.files)}
        zarr_files = [f for f in published.manifest["files"] if f["path"].startswith(zarr_path)]
        assert shown[zarr_path].files == len(zarr_files) and shown[zarr_path].level == 2
        assert shown[zarr_path].size == sum(f["size"] for f in zarr_files)
        tiff = layout.registration_tiff(published.slide_id)
        assert shown[tiff].size == next(f["size"] for f in published.manifest["files"] if f["path"] == tiff)

        listing = cli("data", "ls")
        assert listing.exit_code == 0, listing.output
        assert published.slide_id in listing.output and published.run_id in listing.output
        detail = cli("data", "ls", published.slide_id)
        assert detail.exit_code == 0, detail.output
        assert "000000000000" not in detail.output  # the half-released run is not shown
        for path in (zarr_path, tiff):
            line = next(line for line in detail.output.splitlines() if path in line)
            assert human(shown[path].size) in line and line.split()[1] == "2"
        assert "2 registered image" in detail.output
    finally:
        s3.delete_object(Bucket=RESULTS, Key=half_released)


def test_every_request_of_atlas_data_says_the_requester_pays(published, requests_seen, tmp_path):
    for args in (("data", "ls"), ("data", "ls", published.slide_id), ("data", "cost", published.slide_id),
                 ("data", "get", published.slide_id, "--levels", "qc", "-o", str(tmp_path)),
                 ("data", "open", published.slide_id)):
        result = cli(*args)
        assert result.exit_code == 0, (args, result.output)
    open_zarr(published.slide_id, bucket=RESULTS)[:, :300, :300]  # chunk reads
    # a client the user brings gets the header as well
    open_zarr(published.slide_id, bucket=RESULTS, client=boto3.client("s3", region_name="us-east-1"))[0, :10, :10]
    operations = {op for op, _ in requests_seen}
    assert {"ListObjectsV2", "HeadObject", "GetObject"} <= operations
    without = [(op, payer) for op, payer in requests_seen if payer != b"requester"]
    assert len(requests_seen) > 20 and without == []


def test_atlas_data_names_the_bucket_owner_only_when_given(published, monkeypatch, tmp_path):
    """--bucket-owner / ATLAS_BUCKET_OWNER: ExpectedBucketOwner on every request to the results bucket; without
    it (an analyst who was not given the account) the requests are as before and still work."""
    seen = []
    session = boto3.session.Session()
    session.events.register("before-send.s3", lambda request, **_: seen.append(
        request.headers.get("x-amz-expected-bucket-owner")))
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", session)
    commands = (("data", "ls", published.slide_id), ("data", "get", published.slide_id, "--levels", "qc",
                                                        "-o", str(tmp_path)), ("data", "open", published.slide_id))
    for args in commands:
        assert cli(*args).exit_code == 0
    assert seen and set(seen) == {None}
    seen.clear()
    monkeypatch.setenv("ATLAS_BUCKET_OWNER", "123456789012")
    for args in commands:
        assert cli(*args).exit_code == 0
    assert seen and set(seen) == {b"123456789012"}
    bad = cli("data", "ls", "--bucket-owner", "ours")
    assert isinstance(bad.exception, InvalidInput) and "--bucket-owner: 'ours' is not an AWS account id" in str(
        bad.exception)


def test_cost_is_bytes_times_prices_per_place(published):
    release = get_release(published.slide_id, bucket=RESULTS)
    level2 = level_files(published, 2)
    n_bytes = sum(f["size"] for f in level2)
    estimate = estimate_cost(release, parse_levels("2"), from_region="eu-west-1")
    assert (estimate.files, estimate.bytes) == (len(level2), n_bytes)
    assert estimate.get_requests == sum(math.ceil(f["size"] / PART_SIZE) for f in level2) + 1
    inside, other, internet = estimate.scenarios
    requests_usd = estimate.get_requests / 1000 * PRICES.get_per_1000
    assert [s.request_usd for s in estimate.scenarios] == [pytest.approx(requests_usd)] * 3
    assert inside.transfer_usd == 0 and inside.total_usd == pytest.approx(requests_usd)
    assert "eu-west-1" in other.where and other.transfer_usd == pytest.approx(n_bytes / GIB * 0.02)
    assert internet.transfer_usd == pytest.approx(n_bytes / GIB * 0.09)
    assert inside.total_usd < other.total_usd < internet.total_usd
    # more levels cost more; a neighbour region is cheaper; inside us-east-1 has no "other region" row
    assert estimate_cost(release).bytes == sum(f["size"] for f in published.manifest["files"])
    assert estimate_cost(release, parse_levels("2"), from_region="us-east-2").scenarios[1].transfer_usd == \
        pytest.approx(n_bytes / GIB * 0.01)
    assert len(estimate_cost(release, from_region="us-east-1").scenarios) == 2
    assert any(PRICES.as_of in a for a in estimate.assumptions)
    # internet transfer is tiered: 60 TiB = 10 TiB at 0.09 + 40 TiB at 0.085 + 10 TiB at 0.07
    assert internet_transfer_usd(60 * 1024 * GIB) == pytest.approx(10240 * 0.09 + 40960 * 0.085 + 10240 * 0.07)

    shown = cli("data", "cost", published.slide_id, "--levels", "2,3,4", "--from-region", "eu-west-1")
    assert shown.exit_code == 0, shown.output
    assert "us-east-1" in shown.output and "eu-west-1" in shown.output and "internet" in shown.output
    assert PRICES.as_of in shown.output and "Assumptions" in shown.output
    bad = cli("data", "cost", published.slide_id, "--levels", "2,7")
    assert isinstance(bad.exception, InvalidInput) and "'7' is not a data level" in str(bad.exception)
    with pytest.raises(InvalidInput, match="not an AWS region"):
        estimate_cost(release, from_region="Virginia")


class Interrupted(Exception):
    """Stands for the transfer dying mid-way (network loss, Ctrl-C, a killed process)."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_get_resumes_an_interrupted_download_and_verifies_checksums(published, tmp_path):
    release = get_release(published.slide_id, bucket=RESULTS)
    part = 256 * 1024
    wanted = level_files(published, 2)
    big = max(wanted, key=lambda f: f["size"])
    assert big["size"] > 4 * part  # the OME-TIFF comes in several parts

    client, gets = results_client(), []

    def interrupt(event_name, **_):
        if event_name.endswith("GetObject"):
            gets.append(1)
            if len(gets) > 6:
                raise Interrupted

    client.meta.events.register("before-send.s3", interrupt)
    with pytest.raises(Interrupted):
        download_release(release, tmp_path, levels=parse_levels("2"), client=client, part_size=part, threads=2)
    target = tmp_path / published.slide_id / published.run_id
    states = {p: json.loads(p.read_text()) for p in target.rglob("*" + STATE_SUFFIX)}
    assert states, "the interrupted download left no resumable state"
    done_before = {(str(p.relative_to(target))[:-len(STATE_SUFFIX)], i) for p, s in states.items() for i in s["done"]}

    client2, ranges2 = results_client(), []
    client2.meta.events.register(
        "before-send.s3", lambda request, event_name, **_: ranges2.append(
            (request.url.split(f"/{published.run_id}/", 1)[-1], request.headers["Range"].decode()))
        if event_name.endswith("GetObject") else None)
    result = download_release(release, tmp_path, levels=parse_levels("2"), client=client2, part_size=part, threads=4)
    assert result.corrupt == [] and result.resumed
    refetched = {(path, int(r.split("=")[1].split("-")[0]) // part) for path, r in ranges2} & done_before
    assert refetched == set(), "parts written before the interruption were fetched again"
    assert result.bytes_fetched < sum(f["size"] for f in wanted)
    for f in wanted:
        assert sha256(target / f["path"]) == f["sha256"], f["path"]
    assert not list(target.rglob("*" + PART_SUFFIX)) and not list(target.rglob("*" + STATE_SUFFIX))
    assert json.loads((target / layout.MANIFEST).read_text()) == published.manifest

    again = download_release(release, tmp_path, levels=parse_levels("2"), part_size=part)
    assert (again.requests, sorted(again.verified)) == (0, sorted(f["path"] for f in wanted))


def tampered(key: str):
    """Replace a released object by other bytes of the same size for the duration of the block."""
    s3 = boto3.client("s3", region_name="us-east-1")

    @contextlib.contextmanager
    def block():
        original = s3.get_object(Bucket=RESULTS, Key=key)["Body"].read()
        s3.put_object(Bucket=RESULTS, Key=key, Body=bytes(b ^ 0x20 if i == 5 else b for i, b in enumerate(original)))
        try:
            yield
        finally:
            s3.put_object(Bucket=RESULTS, Key=key, Body=original)
    return block()


def test_a_tampered_file_is_reported_and_not_kept(published, tmp_path):
    qc = level_files(published, None)
    victim = next(f for f in qc if f["path"].endswith("summary.json"))
    with tampered(f"{published.slide_id}/{published.run_id}/{victim['path']}"):
        result = download_release(get_release(published.slide_id, bucket=RESULTS), tmp_path, levels=parse_levels("qc"))
        [bad] = result.corrupt
        assert (bad.path, bad.expected_sha256) == (victim["path"], victim["sha256"])
        assert bad.actual_sha256 != bad.expected_sha256
        target = result.target
        assert not (target / victim["path"]).exists() and not list(target.rglob("*" + PART_SUFFIX))
        assert sorted(result.fetched) == sorted(f["path"] for f in qc if f is not victim)

        shown = cli("data", "get", published.slide_id, "--levels", "qc", "-o", str(tmp_path / "cli"))
        assert shown.exit_code == 1
        assert victim["path"] in shown.output and "tampered" in shown.output


def test_an_object_replaced_between_parts_is_refetched_whole_and_reported(published, tmp_path):
    release = get_release(published.slide_id, bucket=RESULTS)
    tiff = layout.registration_tiff(published.slide_id)
    levels, part = parse_levels("2"), 256 * 1024
    client, gets = results_client(), []

    def interrupt(request, event_name, **_):
        if event_name.endswith("GetObject") and tiff in request.url:
            gets.append(1)
            if len(gets) > 3:
                raise Interrupted

    client.meta.events.register("before-send.s3", interrupt)
    with pytest.raises(Interrupted):
        download_release(release, tmp_path, levels=levels, client=client, part_size=part, threads=1)
    with tampered(f"{published.slide_id}/{published.run_id}/{tiff}"):
        result = download_release(release, tmp_path, levels=levels, part_size=part)
    # the resumed parts no longer match the object (If-Match fails): it is fetched whole, then fails its sha256
    assert [c.path for c in result.corrupt] == [tiff]
    assert result.bytes_fetched >= next(f["size"] for f in published.manifest["files"] if f["path"] == tiff)


def test_open_reads_a_region_lazily_equal_to_the_local_image(published, requests_seen):
    local = zarr.open_group(str(published.out_dir / layout.registration_zarr(published.slide_id)), mode="r")
    image = open_zarr(published.slide_id, bucket=RESULTS)
    assert (image.shape, image.dtype) == (local["0"].shape, local["0"].dtype)
    store = image.store
    region = image[:, 200:900, 300:1300]
    assert np.array_equal(region, local["0"][:, 200:900, 300:1300])
    zarr_bytes = sum(f["size"] for f in published.manifest["files"]
                     if f["path"].startswith(layout.registration_zarr(published.slide_id) + "/"))
    assert 0 < store.bytes_fetched < zarr_bytes  # a region, not the slide
    lower = open_zarr(published.slide_id, bucket=RESULTS, level=1)
    assert np.array_equal(lower[2, 100:300, 50:400], local["1"][2, 100:300, 50:400])
    with pytest.raises(InvalidInput, match="level 9 does not exist"):
        open_zarr(published.slide_id, bucket=RESULTS, level=9)

    shown = cli("data", "open", published.slide_id)
    assert shown.exit_code == 0, shown.output
    assert str(local["0"].shape) in shown.output and "DNA_1" in shown.output
    code = shown.output.split("In Python (reads only the chunks a region touches):", 1)[1]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "<atlas data open snippet>", "exec"), {})  # the snippet works as printed
    y, x = (min(512, n) for n in local["0"].shape[1:])
    assert printed.getvalue().startswith(f"({y}, {x}) uint16")
    assert all(payer == b"requester" for _, payer in requests_seen)


REDIRECT = "The bucket you are attempting to access must be addressed using the specified endpoint."
MALFORMED = "The authorization header is malformed; the region 'eu-west-1' is wrong; expecting 'us-east-1'"


@pytest.mark.parametrize("code, status, message, meta, expected", [
    ("AccessDenied", 403, "Access Denied", {}, "send your 12-digit AWS account ID"),
    ("PermanentRedirect", 301, REDIRECT, {"HTTPHeaders": {"x-amz-bucket-region": "eu-west-1"}},
     "answered from region eu-west-1; the results bucket is in us-east-1"),
    ("AuthorizationHeaderMalformed", 400, MALFORMED, {}, "the results bucket is in us-east-1"),
    ("NoSuchBucket", 404, "The specified bucket does not exist", {}, "--bucket or env ATLAS_RESULTS_BUCKET"),
])
def test_s3_refusals_say_what_to_do(published, code, status, message, meta, expected):
    client = results_client()
    with Stubber(client) as stub:
        stub.add_client_error("get_object", service_error_code=code, service_message=message,
                              http_status_code=status, response_meta=meta)
        with pytest.raises(AccessError) as caught:
            get_release(published.slide_id, bucket=RESULTS, client=client)
    text = str(caught.value)
    assert expected in text and f"s3://{RESULTS}/{published.slide_id}/latest.json" in text
    if code == "AccessDenied":
        assert "--request-payer requester" in text  # and how other tools send the header


def test_missing_things_are_named(published, monkeypatch):
    with pytest.raises(NotPublished, match="atlas data ls"):
        get_release("no-such-slide", bucket=RESULTS)
    with pytest.raises(NotPublished, match="is not released"):
        get_release(published.slide_id, "sample-000000000000", bucket=RESULTS)
    monkeypatch.delenv("ATLAS_RESULTS_BUCKET")
    result = cli("data", "ls")
    assert isinstance(result.exception, InvalidInput) and "--bucket" in str(result.exception)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(AccessError, match="no AWS credentials"):
        list_published_slides(bucket=RESULTS, client=boto3.session.Session().client("s3", region_name="us-east-1"))


def test_a_manifest_pointing_outside_the_release_is_refused(published, tmp_path):
    s3 = boto3.client("s3", region_name="us-east-1")
    key = f"{published.slide_id}/{published.slide_id}-0123456789ab/{layout.MANIFEST}"
    evil = {"slide_id": published.slide_id, "files": [{"path": "../../.bashrc", "level": 2, "size": 1, "sha256": "0"}]}
    s3.put_object(Bucket=RESULTS, Key=key, Body=json.dumps(evil).encode())
    try:
        with pytest.raises(AccessError, match="outside the release"):
            get_release(published.slide_id, f"{published.slide_id}-0123456789ab", bucket=RESULTS)
    finally:
        s3.delete_object(Bucket=RESULTS, Key=key)
