"""The storage layer (atlas.storage, atlas.aws.store): one contract for a local folder and S3 (emulated
by moto in-process), checked on both: small objects, ranged reads that fetch only what is read, zarr
chunk writes and reads, files written with seeks, and the job's view that enforces the registry and
records what it writes."""
from __future__ import annotations

import hashlib
import io
from functools import partial

import numpy as np
import pytest
import tifffile
import zarr
from fake_aws import use_fake_aws
from moto import mock_aws

from atlas.aws.store import S3Store, counted
from atlas.storage import FolderStore, IntegrityError, JobView, MissingObject, UndeclaredAccess
from atlas.storage.journal import Journal

BUCKET = "atlas-test-store"


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path, monkeypatch):
    """An empty store of each kind: a local folder, and a prefix of a bucket in emulated S3."""
    if request.param == "folder":
        yield FolderStore(tmp_path / "store")
        return
    use_fake_aws(monkeypatch)
    with mock_aws():
        import boto3

        from atlas.aws.s3 import S3Uri

        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield S3Store(client, S3Uri(BUCKET, "run-1/"), counter=counted(client))


def stored(store, rel: str) -> bytes:
    """The object's bytes as they lie (not through the store's counters)."""
    if isinstance(store, FolderStore):
        return (store.root / rel).read_bytes()
    return store.client.get_object(Bucket=BUCKET, Key=f"run-1/{rel}")["Body"].read()


def test_small_objects_listing_and_deletion(store):
    store.write_text("qc/stitch/summary.json", "{}\n")
    store.write_bytes("registration/S1.ome.zarr/.zattrs", b"{}")
    assert store.read_text("qc/stitch/summary.json") == "{}\n"
    assert store.list() == {"qc/stitch/summary.json": 3, "registration/S1.ome.zarr/.zattrs": 2}
    assert store.list("registration") == {"registration/S1.ome.zarr/.zattrs": 2}
    assert store.size("qc/stitch/summary.json") == 3 and store.size("qc/nothing.json") is None
    with pytest.raises(MissingObject, match="qc/nothing.json"):
        store.read_bytes("qc/nothing.json")
    store.delete("qc/stitch/summary.json")
    assert not store.exists("qc/stitch/summary.json")
    assert store.counter.written >= 5 and store.counter.read >= 3


def test_ranged_reads_fetch_only_the_tiles_read(store):
    """tifffile parses a tiled TIFF through the store's file object; one tile costs about one tile."""
    image = np.random.default_rng(0).integers(0, 65535, (4, 1024, 1024), dtype=np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, tile=(256, 256), photometric="minisblack")
    store.write_bytes("raw/cycle1.ome.tif", buffer.getvalue())
    before = store.counter.read
    with store.open("raw/cycle1.ome.tif") as f, tifffile.TiffFile(f) as tif:
        page = tif.pages[2]
        f.seek(page.dataoffsets[5])
        tile = page.decode(f.read(page.databytecounts[5]), 5)[0]
    np.testing.assert_array_equal(tile.reshape(256, 256), image[2, 256:512, 256:512])
    fetched = store.counter.read - before
    assert 256 * 256 * 2 <= fetched < image.nbytes / 10  # one tile and the headers, not the file


def test_zarr_chunks_are_written_and_read_one_by_one(store):
    group = zarr.open_group(store.zarr("registration/S1.ome.zarr"), mode="w", zarr_format=2)
    array = group.create_array("0", shape=(3, 512, 512), chunks=(1, 128, 128), dtype="uint16", fill_value=0,
                               chunk_key_encoding={"name": "v2", "separator": "/"})
    data = np.arange(3 * 512 * 512, dtype=np.uint16).reshape(3, 512, 512)
    array[:] = data
    chunks = [rel for rel in store.list("registration/S1.ome.zarr/0") if not rel.rsplit("/", 1)[1].startswith(".")]
    assert len(chunks) == 3 * 4 * 4  # one object per chunk
    before = store.counter.read
    again = zarr.open_group(store.zarr("registration/S1.ome.zarr", read_only=True), mode="r", zarr_format=2)
    np.testing.assert_array_equal(again["0"][1, 100:200, 300:400], data[1, 100:200, 300:400])
    one_chunk = max(store.size(rel) for rel in chunks)
    assert store.counter.read - before <= 4 * one_chunk + 4096  # the 4 chunks touched, and the metadata


def test_a_file_written_with_seeks_is_stored_only_when_finished(store, tmp_path):
    with pytest.raises(RuntimeError), store.local_file("registration/S1.ome.tif", scratch=tmp_path) as path:
        tifffile.imwrite(path, np.zeros((64, 64), np.uint8))
        raise RuntimeError("the job was killed")
    assert not store.exists("registration/S1.ome.tif") and store.list() == {}
    with store.local_file("registration/S1.ome.tif", scratch=tmp_path) as path:
        assert path.name == "S1.ome.tif"  # writers that record their file name see the final one
        tifffile.imwrite(path, np.ones((64, 64), np.uint8))
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(stored(store, "registration/S1.ome.tif"))), 1)
    assert list(store.list()) == ["registration/S1.ome.tif"]


def test_a_jobs_view_records_what_it_writes_and_enforces_the_registry(store, tmp_path):
    store.write_bytes("registration/S1.ome.zarr/.zgroup", b'{"zarr_format": 2}')
    store.write_bytes("overview/index.html", b"<html>")
    known = {rel: {"path": rel, "size": len(stored(store, rel)),
                   "sha256": hashlib.sha256(stored(store, rel)).hexdigest()} for rel in store.list()}
    view = JobView(store, known, readable=lambda rel: rel.startswith("registration/"),
                   writable=lambda rel: rel.startswith("quantification/"), inputs=["registration/*"],
                   outputs=["quantification/*"], scratch=tmp_path)
    assert view.read_bytes("registration/S1.ome.zarr/.zgroup") == b'{"zarr_format": 2}'
    with pytest.raises(UndeclaredAccess, match="overview/index.html: read outside the stage's declared inputs"):
        view.read_bytes("overview/index.html")
    with pytest.raises(UndeclaredAccess, match="registration/x: write outside the stage's declared outputs"):
        view.write_bytes("registration/x", b"x")
    view.write_text("quantification/S1.csv", "CellID\n")
    with view.local_file("quantification/S1.h5ad") as path:
        path.write_bytes(b"HDF5 stand-in")
    assert view.written == {rel: {"path": rel, "size": len(stored(store, rel)),
                                  "sha256": hashlib.sha256(stored(store, rel)).hexdigest()}
                            for rel in ("quantification/S1.csv", "quantification/S1.h5ad")}
    # listing comes from the records and the job's own writes, never an undeclared earlier output
    assert set(view.list()) == {"registration/S1.ome.zarr/.zgroup", "quantification/S1.csv",
                                "quantification/S1.h5ad"}
    # an earlier output changed after its writer recorded it is caught when read whole
    store.write_bytes("registration/S1.ome.zarr/.zgroup", b'{"zarr_format": 3}')
    with pytest.raises(IntegrityError, match="sha256 .* but its completion record says"):
        view.read_bytes("registration/S1.ome.zarr/.zgroup")
    # nothing else exists for the job, whatever lies in the store
    store.write_bytes("registration/stray.txt", b"left by an interrupted attempt")
    with pytest.raises(MissingObject):
        view.read_bytes("registration/stray.txt")
    # ... except below its own outputs, which it replaces as a whole
    store.write_bytes("quantification/old/S0.csv", b"left by an earlier run")
    assert "quantification/old/S0.csv" in view.list("quantification")
    with view.local_folder("quantification") as folder:
        (folder / "S1.csv").write_text("CellID\n")
    assert set(store.list("quantification")) == {"quantification/S1.csv"}
    assert set(view.written) == {"quantification/S1.csv"}


def test_an_interrupted_chunk_writer_resumes_to_the_same_objects(store):
    """A Spot-reclaimed writer leaves some chunks; the retry rewrites them all, to identical objects."""
    data = np.random.default_rng(1).integers(0, 4000, (2, 384, 384), dtype=np.uint16)

    def write(fail_after: int | None = None) -> None:
        group = zarr.open_group(store.zarr("labels.zarr"), mode="a", zarr_format=2)
        array = group.require_array("0", shape=data.shape, chunks=(1, 128, 128), dtype="uint16", fill_value=0,
                                    chunk_key_encoding={"name": "v2", "separator": "/"})
        for n, (c, y) in enumerate((c, y) for c in range(2) for y in range(0, 384, 128)):
            if fail_after is not None and n == fail_after:
                raise KeyboardInterrupt("reclaimed")
            array[c, y:y + 128] = data[c, y:y + 128]

    with pytest.raises(KeyboardInterrupt):
        write(fail_after=3)
    partial = store.list()
    write()
    done = store.list()
    assert set(partial) < set(done)
    np.testing.assert_array_equal(zarr.open_group(store.zarr("labels.zarr"), mode="r")["0"][:], data)
    fresh = FolderStore(store.root.parent / "fresh") if isinstance(store, FolderStore) else None
    if fresh is not None:  # the same chunks, byte for byte, as an uninterrupted writer makes
        group = zarr.open_group(fresh.zarr("labels.zarr"), mode="w", zarr_format=2)
        group.create_array("0", shape=data.shape, chunks=(1, 128, 128), dtype="uint16", fill_value=0,
                           chunk_key_encoding={"name": "v2", "separator": "/"})[:] = data
        assert {rel: stored(fresh, rel) for rel in fresh.list()} == {rel: stored(store, rel) for rel in done}


def test_a_journaled_job_resumes_from_its_last_finished_unit(store):
    """A job killed after some units of work: its retry takes the finished units' objects into its
    record unread (from their journal objects), redoes only the rest, and ends with the record of
    an uninterrupted job."""
    rows = {f"row{n}": f"row {n}\n".encode() * 1000 for n in range(5)}

    def attempt(view: JobView, kill_at: int | None = None) -> list[str]:
        journal, done = Journal(view, "tmp/mosaic/0"), []

        def write(unit: str) -> None:
            if kill_at is not None and len(done) == kill_at:
                view.write_bytes(f"registration/{unit}", b"half")  # cut short mid-unit
                raise KeyboardInterrupt("reclaimed")
            view.write_bytes(f"registration/{unit}", rows[unit])
            done.append(unit)

        for unit in rows:
            journal.run(unit, partial(write, unit))
        return journal.resumed

    def view_of(target) -> JobView:
        return JobView(target, {}, readable=lambda rel: False,
                       writable=lambda rel: rel.startswith(("registration/", "tmp/mosaic/0/")))

    uninterrupted = FolderStore(store.root.parent / "fresh") if isinstance(store, FolderStore) else None
    killed = view_of(store)
    with pytest.raises(KeyboardInterrupt):
        attempt(killed, kill_at=3)
    retry = view_of(store)
    assert attempt(retry) == ["row0", "row1", "row2"]  # the finished units are not written again
    assert stored(store, "registration/row3") == rows["row3"]
    if uninterrupted is not None:
        whole = view_of(uninterrupted)
        assert attempt(whole) == []
        assert retry.written == whole.written  # the same record as an uninterrupted job
    assert {rel: e["size"] for rel, e in retry.written.items() if rel.startswith("registration/")} == {
        f"registration/{unit}": len(data) for unit, data in rows.items()}


def test_a_streamed_object_goes_up_in_parts_hashed_as_written(store, tmp_path):
    from atlas.aws.store import PART_BYTES

    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, 2 * PART_BYTES + 12345, dtype=np.uint8).tobytes()  # 3 parts on S3
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    view = JobView(store, {}, readable=lambda rel: False, writable=lambda rel: rel.startswith("registration/"),
                   scratch=scratch)
    with view.writer("registration/S1.ome.tif") as out:
        for start in range(0, len(data), 1 << 20):
            out.write(data[start:start + (1 << 20)])
        assert out.tell() == len(data) and not store.exists("registration/S1.ome.tif")  # not in place yet
    assert stored(store, "registration/S1.ome.tif") == data
    assert view.written == {"registration/S1.ome.tif": {"path": "registration/S1.ome.tif", "size": len(data),
                                                         "sha256": hashlib.sha256(data).hexdigest()}}
    assert list(store.list()) == ["registration/S1.ome.tif"] and list(scratch.iterdir()) == []  # no local copy
    with store.writer("small.json") as out:  # below one part: a single PUT
        out.write(b"{}")
    assert stored(store, "small.json") == b"{}"


def test_a_failed_streamed_write_leaves_no_object_and_no_pending_upload(store):
    from atlas.aws.store import PART_BYTES

    with pytest.raises(RuntimeError), store.writer("registration/S1.ome.tif") as out:
        out.write(bytes(PART_BYTES + 1))  # one part sent
        out.write(b"more")
        raise RuntimeError("the job was killed")
    assert store.list() == {} and not store.exists("registration/S1.ome.tif")
    if isinstance(store, S3Store):
        assert store.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []  # aborted
    else:
        assert list(store.root.rglob("*")) in ([], [store.root / "registration"])  # no partial file left


def test_a_part_s3_refuses_aborts_the_upload(store, monkeypatch):
    from botocore.exceptions import ClientError

    from atlas.aws.store import PART_BYTES

    if not isinstance(store, S3Store):
        pytest.skip("multipart uploads are S3's")
    sent = store.client.upload_part

    def refuse_the_second(**kw):
        if kw["PartNumber"] == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "we encountered an internal error"}},
                              "UploadPart")
        return sent(**kw)

    monkeypatch.setattr(store.client, "upload_part", refuse_the_second)
    with pytest.raises(ClientError, match="InternalError"), store.writer("registration/S1.ome.tif") as out:
        for _ in range(4):
            out.write(bytes(PART_BYTES))
    assert store.list() == {}
    assert store.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
