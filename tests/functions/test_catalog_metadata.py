"""OME metadata read over S3 ranged GETs: the header only, never the pixels."""
from __future__ import annotations

import io
import random

import boto3
import numpy as np
import pytest
import tifffile
from botocore.exceptions import ClientError
from moto import mock_aws

from atlas.aws.catalog import cycle_metadata_from_item
from atlas.aws.s3 import S3RangeFile
from atlas.slide.ome import read_cycle_metadata

CYCLE = "raw/cycle-01.ome.tif"


@pytest.fixture
def bucket():
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket="ranged")
        yield "ranged"


def ome_header_size(path) -> int:
    """Bytes of the OME-XML (ImageDescription of the first IFD) that any reader must fetch."""
    with tifffile.TiffFile(path) as tif:
        return len(tif.pages.first.description.encode())


def test_metadata_costs_at_most_twice_the_ome_header(bucket, sample_slide):
    path = sample_slide / CYCLE
    s3 = boto3.client("s3")
    s3.upload_file(str(path), bucket, CYCLE)
    fh = S3RangeFile(s3, bucket, CYCLE, size=path.stat().st_size)
    remote = read_cycle_metadata(fh)
    header = ome_header_size(path)
    print(f"\nOME metadata of {CYCLE} ({path.stat().st_size} bytes): fetched {fh.bytes_fetched} bytes in "
          f"{fh.requests} ranged GETs; OME-XML header {header} bytes -> {fh.bytes_fetched / header:.2f}x")
    assert fh.bytes_fetched <= 2 * header
    local = read_cycle_metadata(path)
    assert (remote.n_tiles, remote.tile_shape, remote.channel_names, remote.pixel_size_um) == \
        (local.n_tiles, local.tile_shape, local.channel_names, local.pixel_size_um)
    np.testing.assert_array_equal(remote.positions_um, local.positions_um)


def test_reads_match_the_object_at_any_offset(bucket):
    data = bytes(random.Random(1).getrandbits(8) for _ in range(50_000))
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="blob", Body=data)
    fh = S3RangeFile(s3, bucket, "blob", readahead=1000)  # size from one HEAD
    assert fh.size == len(data)
    rng = random.Random(2)
    for _ in range(200):
        start, n = rng.randrange(len(data) + 10), rng.randrange(3000)
        fh.seek(start)
        assert fh.read(n) == data[start:start + n]
    fh.seek(-10, io.SEEK_END)
    assert fh.read() == data[-10:] and fh.read(5) == b""
    requests = fh.requests
    fh.seek(len(data) - 10)
    fh.read(10)
    assert fh.requests == requests  # served from the cache


def test_an_object_replaced_while_read_is_refused(bucket):
    s3 = boto3.client("s3")
    etag = s3.put_object(Bucket=bucket, Key="k", Body=b"first")["ETag"]
    s3.put_object(Bucket=bucket, Key="k", Body=b"second")
    with pytest.raises(ClientError, match="PreconditionFailed|412"):
        S3RangeFile(s3, bucket, "k", etag=etag, size=5).read()


def test_catalog_item_holds_the_cycle_metadata(cloud, ingest, sample_slide):
    ingest.upload_and_settle(sample_slide, manifest=False)
    item = cloud.slide_record("sample", f"OBJECT#sample/{CYCLE}")
    local = read_cycle_metadata(sample_slide / CYCLE)
    ome = item["ome"]
    assert ome["series"] == local.n_tiles and tuple(ome["tile_shape"]) == local.tile_shape
    assert tuple(ome["channel_names"]) == local.channel_names and ome["pixel_size_um"] == local.pixel_size_um
    np.testing.assert_allclose(ome["positions_um"], local.positions_um)
    assert item["ome_bytes_read"] <= 2 * ome_header_size(sample_slide / CYCLE)
    assert cycle_metadata_from_item(ome).n_channels == local.n_channels
    # what else a catalog item records about the object
    assert item["size"] == (sample_slide / CYCLE).stat().st_size and item["version_id"] and item["etag"]
    assert len(item["sha256"]) == 64 and len(item["sequencer"]) == 32
