"""Recording arriving objects: one catalog item per S3 object version, OME metadata by ranged reads.

S3 events arrive at least once and out of order; the sequencer orders events of one key, so an item
is written only if its event is newer than what the table holds. Cycle files get their OME metadata
read with S3 ranged GETs (:class:`atlas.aws.s3.S3RangeFile`), never the whole file. Raw objects are
only ever read.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus

from boto3.dynamodb.conditions import Attr
from botocore.exceptions import ClientError

from atlas.aws.catalog.events import emit_cataloged
from atlas.aws.catalog.settings import Aws
from atlas.aws.catalog.table import from_dynamo, is_conflict, object_key, timestamp, to_dynamo
from atlas.aws.s3 import PRECONDITION_CODES, S3RangeFile, error_code, is_missing
from atlas.slide.convention import raw_files

SHA256_METADATA = "sha256"          # x-amz-meta-sha256, set by `atlas upload`
TEXT_LIMIT = 4 << 20                # markers.csv / params.yml / manifest.json are read up to 4 MiB


def split_key(key: str) -> tuple[str, str] | None:
    """``<slide_id>/<path>`` -> (slide_id, path); None for keys outside any slide prefix."""
    slide_id, sep, path = key.partition("/")
    if not sep or not slide_id or not path or path.endswith("/"):
        return None
    return slide_id, path


def normalize_sequencer(sequencer: str | None) -> str:
    """S3 sequencers compare as hex numbers: left-pad to a fixed width so strings compare the same way."""
    return (sequencer or "").upper().rjust(32, "0")


def version_condition(version_id: str | None, etag: str) -> dict[str, str]:
    """Request arguments that read exactly the catalogued object: its version, else its ETag."""
    return {"VersionId": version_id} if version_id else {"IfMatch": etag if etag.startswith('"') else f'"{etag}"'}


def cycle_metadata_item(meta) -> dict:
    """A :class:`atlas.slide.ome.CycleMetadata` as a catalog attribute (positions in µm, (y, x))."""
    return to_dynamo({"series": meta.n_tiles, "tile_shape": list(meta.tile_shape), "n_channels": meta.n_channels,
                      "dtype": meta.dtype, "channel_names": list(meta.channel_names),
                      "pixel_size_um": meta.pixel_size_um,
                      "positions_um": None if meta.positions_um is None else meta.positions_um.tolist()})


def cycle_metadata_from_item(item: Mapping):
    """Inverse of :func:`cycle_metadata_item`."""
    import numpy as np

    from atlas.slide.ome import CycleMetadata

    ome = from_dynamo(item)
    return CycleMetadata(n_tiles=ome["series"], tile_shape=tuple(ome["tile_shape"]), n_channels=ome["n_channels"],
                         dtype=ome["dtype"], channel_names=tuple(ome["channel_names"]),
                         pixel_size_um=ome["pixel_size_um"],
                         positions_um=None if ome["positions_um"] is None else np.array(ome["positions_um"], float))


def read_remote_cycle_metadata(s3, bucket: str, key: str, *, size: int, version_id: str | None, etag: str | None):
    """OME metadata of a cycle file on S3 by ranged reads.

    Returns
    -------
    meta : CycleMetadata or None
    error : str or None
        Why the file is not a readable OME-TIFF (then ``meta`` is None).
    bytes_fetched : int
    """
    from atlas.slide.ome import read_cycle_metadata

    fh = S3RangeFile(s3, bucket, key, version_id=version_id, etag=etag, size=size)
    try:
        return read_cycle_metadata(fh), None, fh.bytes_fetched
    except ClientError:
        raise  # S3 trouble is transient: let the Lambda retry
    except Exception as exc:  # noqa: BLE001 - any parser failure means "not a readable OME-TIFF"
        return None, f"{exc.__class__.__name__}: {exc}", fh.bytes_fetched


def read_text_object(s3, item: Mapping) -> bytes:
    """Bytes of a small catalogued object, exactly the version the catalog recorded (first 4 MiB)."""
    if int(item["size"]) == 0:
        return b""  # a ranged GET of an empty object is an error (416)
    response = s3.get_object(Bucket=item["bucket"], Key=item["key"], Range=f"bytes=0-{TEXT_LIMIT - 1}",
                             **version_condition(item.get("version_id"), item["etag"]))
    return response["Body"].read()


def record_object(aws: Aws, *, bucket: str, key: str, size: int, etag: str, version_id: str | None,
                  sequencer: str) -> dict:
    """Catalog one created object (conditional write: only a newer event replaces an item).

    Parameters
    ----------
    key : str
        Object key as S3 stores it (URL-decoded).
    size : int
        Bytes.
    sequencer : str
        The event's sequencer (hex; orders events of the same key).

    Returns
    -------
    dict
        ``{"slide_id", "key", "outcome"}`` with outcome ``recorded``, ``stale`` (a newer or the
        same event was recorded before), ``superseded`` (the object was replaced while being read)
        or ``ignored`` (not under a slide prefix).
    """
    parts = split_key(key)
    if parts is None:
        return {"slide_id": None, "key": key, "outcome": "ignored"}
    slide_id, path = parts
    seq = normalize_sequencer(sequencer)
    item: dict[str, Any] = {**object_key(slide_id, key), "bucket": bucket, "key": key, "path": path, "size": size,
                            "etag": etag, "version_id": version_id, "sequencer": seq, "cataloged_at": timestamp()}
    try:
        head = aws.s3.head_object(Bucket=bucket, Key=key, **version_condition(version_id, etag))
    except ClientError as exc:
        if is_missing(exc) or error_code(exc) in PRECONDITION_CODES:
            return {"slide_id": slide_id, "key": key, "outcome": "superseded"}
        raise
    if sha := head.get("Metadata", {}).get(SHA256_METADATA):
        item["sha256"] = sha.lower()
    if path in raw_files([path]):
        meta, error, fetched = read_remote_cycle_metadata(aws.s3, bucket, key, size=size, version_id=version_id,
                                                          etag=etag)
        item.update(ome=cycle_metadata_item(meta) if meta else None, ome_error=error, ome_bytes_read=fetched)
    try:
        aws.table.put_item(Item=item, ConditionExpression=Attr("sk").not_exists() | Attr("sequencer").lt(seq))
    except ClientError as exc:
        if not is_conflict(exc):
            raise
        return {"slide_id": slide_id, "key": key, "outcome": "stale"}
    return {"slide_id": slide_id, "key": key, "outcome": "recorded", "ome_bytes_read": item.get("ome_bytes_read")}


def catalog_event(aws: Aws, detail) -> dict:
    """Handle one S3 Object Created event (powertools' ``S3EventNotificationEventBridgeDetailModel``).

    Records the object and, unless the event is irrelevant or superseded, tells the trigger. A
    ``stale`` outcome is announced again on purpose: a retry after a crash between the write and the
    announcement must not leave the slide unchecked.
    """
    obj = detail.object
    key = unquote_plus(obj.key)  # S3 event keys are URL-encoded
    result = record_object(aws, bucket=detail.bucket.name, key=key, size=int(obj.size or 0), etag=obj.etag,
                           version_id=obj.version_id, sequencer=obj.sequencer or "")
    if result["outcome"] in ("recorded", "stale"):
        emit_cataloged(aws.events, slide_id=result["slide_id"], bucket=detail.bucket.name, key=key,
                       sequencer=normalize_sequencer(obj.sequencer))
    return result
