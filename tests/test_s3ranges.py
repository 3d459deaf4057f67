"""The emulated S3 of the demo serves byte ranges as S3 does, reading only the bytes asked for."""
from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError
from moto.s3.models import s3_backends

from localcloud.demo import ACCOUNT, local_aws_env, moto_server

SIZE = 6 * 2**20 + 7  # past moto's in-memory buffer (the object lies in a temporary file, as large tiles do)


@pytest.fixture(scope="module")
def stored():
    """A bucket on the demo's moto server with one object of SIZE bytes; the client and the object's bytes."""
    payload = bytes(range(256)) * (SIZE // 256) + bytes(SIZE % 256)
    with moto_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        for key, value in local_aws_env(endpoint).items():
            mp.setenv(key, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="ranges")
        s3.put_object(Bucket="ranges", Key="cycle.ome.tif", Body=payload)
        yield s3, payload


class CountingBuffer:
    """moto's buffer of one object, counting the bytes read from it."""

    def __init__(self, buffer):
        self.buffer, self.read_bytes = buffer, 0

    def read(self, n=-1):
        data = self.buffer.read(n)
        self.read_bytes += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.buffer, name)


@pytest.fixture
def counted(stored):
    key = s3_backends[ACCOUNT]["aws"].buckets["ranges"].keys["cycle.ome.tif"]
    original = key._value_buffer
    key._value_buffer = CountingBuffer(original)
    yield key._value_buffer
    key._value_buffer = original


@pytest.mark.parametrize(("spec", "first", "last"), [
    ("bytes=1000-66535", 1000, 66535),       # a tile
    ("bytes=0-0", 0, 0),
    (f"bytes={SIZE - 10}-", SIZE - 10, SIZE - 1),  # open-ended
    ("bytes=-4096", SIZE - 4096, SIZE - 1),  # the last 4 KiB (a TIFF tail)
    (f"bytes=5-{SIZE + 100}", 5, SIZE - 1),  # past the end: up to the end
])
def test_ranged_get_reads_only_its_range(stored, counted, spec, first, last):
    s3, payload = stored
    response = s3.get_object(Bucket="ranges", Key="cycle.ome.tif", Range=spec)
    body = response["Body"].read()
    assert body == payload[first:last + 1]
    assert response["ContentRange"] == f"bytes {first}-{last}/{SIZE}"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert counted.read_bytes == last - first + 1  # moto alone reads all SIZE bytes for each of these


def test_whole_get_and_bad_range_as_s3(stored, counted):
    s3, payload = stored
    assert s3.get_object(Bucket="ranges", Key="cycle.ome.tif")["Body"].read() == payload
    assert counted.read_bytes == SIZE
    with pytest.raises(ClientError) as raised:
        s3.get_object(Bucket="ranges", Key="cycle.ome.tif", Range=f"bytes={SIZE}-")
    assert raised.value.response["Error"]["Code"] == "InvalidRange"


def test_other_calls_still_see_bytes(stored):
    """Copies and HEADs (which read ``FakeKey.value`` outside a GET) are unaffected."""
    s3, payload = stored
    s3.copy_object(Bucket="ranges", Key="copy", CopySource={"Bucket": "ranges", "Key": "cycle.ome.tif"})
    assert s3.head_object(Bucket="ranges", Key="copy")["ContentLength"] == SIZE
    assert s3.get_object(Bucket="ranges", Key="copy", Range="bytes=10-19")["Body"].read() == payload[10:20]
