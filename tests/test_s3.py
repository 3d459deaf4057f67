"""atlas.aws.s3 against S3 emulated by moto: small objects, listings, transfer counting, the zarr store.

The arrays are synthetic on purpose: these tests are about which requests and bytes the storage
layer makes (chunks written one PUT each, a region read one GET per chunk it touches), which any
values show; the science tests use the real data.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from atlas.aws.s3 import (
    REQUEST_PAYER_HEADER,
    S3RangeFile,
    S3Uri,
    count_transfers,
    expect_bucket_owner,
    get_bytes,
    is_missing,
    list_prefixes,
    list_sizes,
    requester_pays,
    s3_client,
    s3_store,
)

BUCKET = "store"


@pytest.fixture
def client():
    with mock_aws():
        s3 = s3_client(region="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        yield s3


def test_small_objects_and_listings(client):
    for key, body in (("a/x.json", b"{}"), ("a/b/y.bin", b"12345"), ("c/z", b"")):
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
    assert get_bytes(client, S3Uri(BUCKET, "a/b/y.bin")) == b"12345"
    assert get_bytes(client, S3Uri(BUCKET, "a/nothing")) is None
    assert get_bytes(client, S3Uri(BUCKET, "a/b/y.bin"), Range="bytes=1-2") == b"23"
    assert list_sizes(client, S3Uri(BUCKET, "a")) == {"x.json": 2, "b/y.bin": 5}
    assert list_prefixes(client, S3Uri(BUCKET)) == ["a", "c"]
    with pytest.raises(ClientError) as raised:
        client.head_object(Bucket=BUCKET, Key="a/nothing")
    assert is_missing(raised.value)
    with pytest.raises(ClientError) as raised:
        get_bytes(client, S3Uri("no-such-bucket", "k"))
    assert not is_missing(raised.value)  # a missing bucket is an error, not an absent key


def test_transfers_counts_payload_bytes_both_ways(client):
    counted = count_transfers(client)
    client.put_object(Bucket=BUCKET, Key="k", Body=b"x" * 1000)
    client.head_object(Bucket=BUCKET, Key="k")
    assert get_bytes(client, S3Uri(BUCKET, "k"), Range="bytes=0-99") == b"x" * 100
    assert (counted.requests, counted.bytes_written, counted.bytes_read) == (3, 1000, 100)


def test_zarr_store_writes_chunk_by_chunk_and_reads_only_what_is_indexed(client):
    import zarr

    prefix = S3Uri(BUCKET, "work/run/image.zarr/")
    image = np.arange(4 * 64 * 96, dtype=np.uint16).reshape(4, 64, 96)
    written = count_transfers(client)
    array = zarr.create_array(store=s3_store(client, prefix), shape=image.shape, chunks=(1, 32, 32),
                              dtype=image.dtype, compressors=None)
    array[:] = image
    chunk_bytes = 32 * 32 * 2
    n_chunks = 4 * 2 * 3
    objects = list_sizes(client, prefix)
    assert sum(1 for k in objects if k.startswith("c/")) == n_chunks
    assert written.bytes_written >= n_chunks * chunk_bytes

    reader = s3_client(region="us-east-1")
    read = count_transfers(reader)
    store = s3_store(reader, prefix, sizes=objects, read_only=True)
    region = zarr.open_array(store=store, mode="r")[2, 10:40, 40:70]  # 2 x 2 chunks of channel 2
    np.testing.assert_array_equal(region, image[2, 10:40, 40:70])
    assert store.requests == 1 + 4  # zarr.json, then one GET per chunk touched
    assert read.bytes_read == store.bytes_fetched < 5 * chunk_bytes


def test_known_sizes_answer_listing_and_absent_keys_without_requests(client):
    import zarr

    prefix = S3Uri(BUCKET, "g.zarr/")
    zarr.create_group(store=s3_store(client, prefix)).create_array("a", shape=(4,), dtype="u1")[:] = 1
    counted = count_transfers(client)
    store = s3_store(client, prefix, sizes=list_sizes(client, prefix), read_only=True)
    listed = counted.requests
    group = zarr.open_group(store=store, mode="r")
    assert list(group.array_keys()) == ["a"]
    assert store.requests == counted.requests - listed  # every request was a GET of something that exists
    plain = s3_store(client, prefix, read_only=True)  # no sizes: LIST and HEAD answer
    assert list(zarr.open_group(store=plain, mode="r").array_keys()) == ["a"]


def test_a_read_only_store_refuses_writes(client):
    import zarr

    with pytest.raises(ValueError, match="read-only"):
        zarr.create_array(store=s3_store(client, S3Uri(BUCKET, "ro.zarr/"), read_only=True), shape=(2,), dtype="u1")
    assert list_sizes(client, S3Uri(BUCKET, "ro.zarr/")) == {}


def test_store_failures_go_through_explain(client):
    import zarr

    class Explained(Exception):
        pass

    store = s3_store(client, S3Uri("no-such-bucket", "x.zarr/"), read_only=True,
                     explain=lambda exc, uri: Explained(f"{uri}: {exc}"))
    with pytest.raises(Explained, match="s3://no-such-bucket/x.zarr/"):
        zarr.open_group(store=store, mode="r")


def test_requester_pays_is_on_every_request_of_the_client(client):
    import zarr

    headers = []
    payer = requester_pays(s3_client(region="us-east-1"))
    payer.meta.events.register("before-send.s3", lambda request, **_: headers.append(
        request.headers.get(REQUEST_PAYER_HEADER)))
    zarr.create_array(store=s3_store(payer, S3Uri(BUCKET, "p.zarr/")), shape=(8,), chunks=(4,), dtype="u1")[:] = 3
    assert zarr.open_array(store=s3_store(payer, S3Uri(BUCKET, "p.zarr/"), read_only=True), mode="r")[5] == 3
    assert len(headers) >= 4 and set(headers) == {b"requester"}  # metadata and chunks, written and read


OWNER, OTHER_ACCOUNT = "111122223333", "444455556666"
OWNER_HEADER, SOURCE_OWNER_HEADER = "x-amz-expected-bucket-owner", "x-amz-source-expected-bucket-owner"


def test_expected_bucket_owner_goes_on_every_request_to_our_buckets_only(client, tmp_path):
    """Every request to an owned bucket carries the owner, whatever made it (transfer manager, paginator,
    copies); an analyst's own bucket gets nothing; a caller's own value wins; pre-signed URLs stay plain."""
    from urllib.parse import urlsplit

    from boto3.s3.transfer import TransferConfig

    client.create_bucket(Bucket="theirs")
    sent = []

    def record(request, **_):
        url = urlsplit(request.url)  # virtual-hosted style: https://<bucket>.s3.amazonaws.com/<key>
        sent.append((request.method, url.hostname.split(".")[0], url.path.lstrip("/"),
                     request.headers.get(OWNER_HEADER), request.headers.get(SOURCE_OWNER_HEADER)))

    owned = expect_bucket_owner(client, OWNER, [BUCKET])
    assert expect_bucket_owner(client, OWNER, [BUCKET]) is owned  # registering again changes nothing
    owned.meta.events.register("before-send.s3", record)
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (6 << 20))
    parts = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    owned.upload_file(str(big), BUCKET, "big.bin", Config=parts)        # multipart: create, parts, complete
    owned.download_file(BUCKET, "big.bin", str(tmp_path / "back.bin"))  # head, get
    owned.put_object(Bucket=BUCKET, Key="k", Body=b"1")
    assert list_sizes(owned, S3Uri(BUCKET)) == {"big.bin": 6 << 20, "k": 1}
    assert len(sent) >= 7 and {(owner, source) for *_, owner, source in sent} == {(OWNER.encode(), None)}

    sent.clear()
    owned.copy({"Bucket": BUCKET, "Key": "k"}, "theirs", "k")            # ours -> theirs: the source is ours
    owned.copy_object(Bucket=BUCKET, Key="k2", CopySource=f"{BUCKET}/k")  # ours -> ours, a string source
    owned.put_object(Bucket="theirs", Key="x", Body=b"2")
    owned.head_object(Bucket=BUCKET, Key="k", ExpectedBucketOwner=OTHER_ACCOUNT)
    assert sent == [("HEAD", BUCKET, "k", OWNER.encode(), None),          # the managed copy looks at its source
                    ("PUT", "theirs", "k", None, OWNER.encode()),
                    ("PUT", BUCKET, "k2", OWNER.encode(), OWNER.encode()),
                    ("PUT", "theirs", "x", None, None),
                    ("HEAD", BUCKET, "k", OTHER_ACCOUNT.encode(), None)]
    url = owned.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "k"})
    assert "expected-bucket-owner" not in url.lower()


def test_expected_bucket_owner_needs_an_account_id(client):
    with pytest.raises(ValueError, match="'ours' is not an AWS account id"):
        expect_bucket_owner(client, "ours", [BUCKET])


def test_range_file_on_a_shrunken_object_says_how_to_reopen(client):
    client.put_object(Bucket=BUCKET, Key="k", Body=b"short")
    fh = S3RangeFile(client, BUCKET, "k", size=100, readahead=1)
    fh.seek(0)
    with pytest.raises(OSError, match="shorter than the 100 bytes.*open it again"):
        fh.read(50)


def test_the_lambdas_load_the_s3_helpers_without_zarr():
    """The Lambda asset has no zarr (infra.bundling.LAMBDA_PACKAGES): only making a store may import it."""
    from infra.bundling import LAMBDA_PACKAGES

    assert "zarr" not in LAMBDA_PACKAGES
    code = "import sys; sys.modules['zarr'] = None; import atlas.aws.s3, atlas.aws.catalog"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
