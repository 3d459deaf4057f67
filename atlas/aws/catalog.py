"""The catalog: what arrived in the ingest bucket, when a slide is complete, and what became of its runs.

Three Lambda handlers (``functions/{catalog,trigger,status}``) are thin shells around this module:

``record_object``
    One S3 ``Object Created`` event -> one catalog item per object (size, ETag, version id,
    sequencer, the uploader's sha256), written only if it is newer than what the table holds
    (S3 events arrive at least once and out of order; the sequencer orders events of one key).
    Cycle files get their OME metadata, read with S3 ranged GETs (:class:`atlas.aws.s3.S3RangeFile`).
    Then it emits ``Slide Object Cataloged`` so that the trigger looks at the slide *after* the write.
``check_slide``
    Reads every item of a slide (consistent read). Until ``manifest.json`` is there and every file
    it lists has arrived with its size (and sha256, when the uploader recorded one), the slide is
    COLLECTING and its item lists what is missing. Then the slide is validated
    (:func:`atlas.slide.validate.check_contents`) and flipped COLLECTING -> READY or INVALID with one
    conditional update, so that only one invocation wins; the winner starts the Step Functions
    execution named after the run id (AWS refuses a second execution of that name) or sends the
    INVALID notification listing every problem.
``record_execution_status``
    Step Functions status changes -> RUNNING / SUCCEEDED / FAILED on the run's item (and on the
    slide's item while that run is current), forward only, and a notification when a run ends.

Raw objects are only ever read. Table layout (one table):

==================  =================  ==================================================
pk                  sk                 item
==================  =================  ==================================================
``SLIDE#<id>``      ``SLIDE``          status of the current manifest version
``SLIDE#<id>``      ``OBJECT#<key>``   one per S3 object (full key)
``SLIDE#<id>``      ``RUN#<run_id>``   one per started run, kept forever (run history)
==================  =================  ==================================================
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from functools import cached_property
from typing import Any
from urllib.parse import unquote_plus

import boto3
from boto3.dynamodb.conditions import Attr, Key
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field

from atlas import layout
from atlas.aws.s3 import PRECONDITION_CODES, S3RangeFile, error_code, is_missing, s3_client
from atlas.errors import InvalidInput, Problem
from atlas.slide.convention import MANIFEST, MARKERS, PARAMS, parse_manifest, raw_files, run_id_for

# --- settings: the environment of the three Lambdas (the CDK app builds it with Settings.to_env) ---
ENV_CATALOG_TABLE = "CATALOG_TABLE"
ENV_IDEMPOTENCY_TABLE = "IDEMPOTENCY_TABLE"
ENV_STATE_MACHINE_ARN = "STATE_MACHINE_ARN"
ENV_NOTIFY_TOPIC_ARN = "NOTIFY_TOPIC_ARN"
ENV_WORK_BUCKET = "WORK_BUCKET"
ENV_RESULTS_BUCKET = "RESULTS_BUCKET"
ENV_SERVICE_NAME = "POWERTOOLS_SERVICE_NAME"
ENV_OVERVIEW_SITE_URL = "OVERVIEW_SITE_URL"
SERVICE_NAME = "tissue-atlas"
METRICS_NAMESPACE = "TissueAtlas"

# --- events ---
CATALOG_EVENT_SOURCE = "atlas.catalog"
OBJECT_CATALOGED = "Slide Object Cataloged"
EXECUTION_STATUS_CHANGE = "Step Functions Execution Status Change"
SHA256_METADATA = "sha256"          # x-amz-meta-sha256, set by `atlas upload`
TEXT_LIMIT = 4 << 20                # markers.csv / params.yml / manifest.json are read up to 4 MiB


class Status(StrEnum):
    COLLECTING = "COLLECTING"   # files still arriving (the item lists what is missing)
    READY = "READY"             # complete and valid; the execution was started
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"           # the run failed (cause recorded); raw data kept, a new upload reruns
    INVALID = "INVALID"         # complete but unusable (every problem recorded); nothing was run


# A run's status only moves forward: rank of each state (a redrive starts a new round, see below).
STATUS_RANK = {Status.READY: 1, Status.RUNNING: 2, Status.SUCCEEDED: 3, Status.FAILED: 3}
_SFN_STATUS = {"RUNNING": Status.RUNNING, "SUCCEEDED": Status.SUCCEEDED, "FAILED": Status.FAILED,
               "TIMED_OUT": Status.FAILED, "ABORTED": Status.FAILED}


@dataclass(frozen=True)
class Settings:
    """Where the Lambdas find their resources. ``from_env`` reads, ``to_env`` writes the variables.

    Attributes
    ----------
    catalog_table, idempotency_table : str
        DynamoDB table names.
    state_machine_arn : str
        The pipeline's Step Functions state machine.
    notify_topic_arn : str
        SNS topic told about INVALID slides and finished runs.
    work_bucket : str
        Scratch bucket of the runs (``s3://<work>/<run_id>/``).
    results_bucket : str
        Where publish puts ``<slide_id>/<run_id>/`` (named in notifications).
    service_name : str
        Powertools service name (logs, traces, metrics dimension).
    overview_site_url : str, optional
        ``https://<distribution>/`` of the overview site, where publish copies each run's overview
        (``<slide_id>/<run_id>/index.html``); notifications link there. Without it (the local demo
        has no site) they name the overview in the results bucket.
    """

    catalog_table: str
    idempotency_table: str
    state_machine_arn: str
    notify_topic_arn: str
    work_bucket: str
    results_bucket: str
    service_name: str = SERVICE_NAME
    overview_site_url: str | None = None

    _ENV = {"catalog_table": ENV_CATALOG_TABLE, "idempotency_table": ENV_IDEMPOTENCY_TABLE,
            "state_machine_arn": ENV_STATE_MACHINE_ARN, "notify_topic_arn": ENV_NOTIFY_TOPIC_ARN,
            "work_bucket": ENV_WORK_BUCKET, "results_bucket": ENV_RESULTS_BUCKET, "service_name": ENV_SERVICE_NAME,
            "overview_site_url": ENV_OVERVIEW_SITE_URL}
    _OPTIONAL = ("service_name", "overview_site_url")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Settings from environment variables; RuntimeError naming every missing one."""
        values = {f.name: env.get(cls._ENV[f.name]) for f in fields(cls)}
        missing = [cls._ENV[name] for name, value in values.items() if not value and name not in cls._OPTIONAL]
        if missing:
            raise RuntimeError(f"missing environment variable(s) {', '.join(missing)}; "
                               "the CDK app sets them from atlas.aws.catalog.Settings.to_env()")
        return cls(**{k: v for k, v in values.items() if v})

    def to_env(self) -> dict[str, str]:
        """The Lambda environment carrying these settings (unset optional ones left out)."""
        return {self._ENV[f.name]: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def object_created_pattern(bucket_name: str) -> dict:
    """EventBridge pattern of the ingest bucket's Object Created events (-> catalog handler)."""
    return {"source": ["aws.s3"], "detail-type": ["Object Created"], "detail": {"bucket": {"name": [bucket_name]}}}


def object_cataloged_pattern() -> dict:
    """EventBridge pattern of the catalog's own events (-> trigger handler)."""
    return {"source": [CATALOG_EVENT_SOURCE], "detail-type": [OBJECT_CATALOGED]}


def execution_status_pattern(state_machine_arn: str) -> dict:
    """EventBridge pattern of the pipeline's execution status changes (-> status handler)."""
    return {"source": ["aws.states"], "detail-type": [EXECUTION_STATUS_CHANGE],
            "detail": {"stateMachineArn": [state_machine_arn]}}


# --- typed events (the S3 one is powertools' S3EventNotificationEventBridgeModel) ---
class _EventBridgeEnvelope(BaseModel):
    id: str
    source: str
    detail_type: str = Field(alias="detail-type")
    time: datetime


class ObjectCatalogedDetail(BaseModel):
    """What the catalog tells the trigger: this object of this slide is now in the table."""

    slide_id: str
    bucket: str
    key: str
    sequencer: str


class ObjectCatalogedEvent(_EventBridgeEnvelope):
    detail: ObjectCatalogedDetail


class ExecutionStatusDetail(BaseModel):
    """``detail`` of a Step Functions Execution Status Change event (fields the catalog uses)."""

    execution_arn: str = Field(alias="executionArn")
    state_machine_arn: str = Field(alias="stateMachineArn")
    name: str
    status: str
    input: str | None = None
    output: str | None = None
    error: str | None = None
    cause: str | None = None
    start_date: int | None = Field(None, alias="startDate")
    stop_date: int | None = Field(None, alias="stopDate")
    redrive_count: int = Field(0, alias="redriveCount")


class ExecutionStatusEvent(_EventBridgeEnvelope):
    detail: ExecutionStatusDetail


class Aws:
    """The AWS clients the catalog uses, each made on first use (module-level in a Lambda, so a
    warm function reuses its connections and a cold one builds only the clients it needs)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def s3(self):
        return s3_client()

    @cached_property
    def table(self):
        return boto3.resource("dynamodb").Table(self.settings.catalog_table)

    @cached_property
    def dynamodb(self):
        """Low-level client, e.g. for powertools' idempotency store (one boto3 session for all)."""
        return boto3.client("dynamodb")

    @cached_property
    def sfn(self):
        return boto3.client("stepfunctions")

    @cached_property
    def sns(self):
        return boto3.client("sns")

    @cached_property
    def events(self):
        return boto3.client("events")


# --- item keys (the table layout in the module doc) ---
SLIDE_PK_PREFIX = "SLIDE#"
SLIDE_SK = "SLIDE"
RUN_SK_PREFIX = "RUN#"
OBJECT_SK_PREFIX = "OBJECT#"


def slide_pk(slide_id: str) -> str:
    return f"{SLIDE_PK_PREFIX}{slide_id}"


def slide_id_of(pk: str) -> str:
    """Inverse of :func:`slide_pk`."""
    return pk.removeprefix(SLIDE_PK_PREFIX)


def slide_key(slide_id: str) -> dict[str, str]:
    """Key of the slide's item."""
    return {"pk": slide_pk(slide_id), "sk": SLIDE_SK}


def run_key(slide_id: str, run_id: str) -> dict[str, str]:
    """Key of one run's item."""
    return {"pk": slide_pk(slide_id), "sk": f"{RUN_SK_PREFIX}{run_id}"}


def timestamp() -> str:
    """Now, UTC, ISO 8601 with milliseconds: the time format of every catalog item."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def normalize_sequencer(sequencer: str | None) -> str:
    """S3 sequencers compare as hex numbers: left-pad to a fixed width so strings compare the same way."""
    return (sequencer or "").upper().rjust(32, "0")


def to_dynamo(value: Any) -> Any:
    """JSON-like value with floats as Decimal (what DynamoDB stores)."""
    return json.loads(json.dumps(value), parse_float=Decimal)


def from_dynamo(value: Any) -> Any:
    """DynamoDB value back to plain JSON types (Decimal -> int or float)."""
    return json.loads(json.dumps(value, default=lambda d: int(d) if d == d.to_integral_value() else float(d)))


def _is_conflict(exc: ClientError) -> bool:
    return exc.response["Error"]["Code"] == "ConditionalCheckFailedException"


# --- catalog -----------------------------------------------------------------------------------
def split_key(key: str) -> tuple[str, str] | None:
    """``<slide_id>/<path>`` -> (slide_id, path); None for keys outside any slide prefix."""
    slide_id, sep, path = key.partition("/")
    if not sep or not slide_id or not path or path.endswith("/"):
        return None
    return slide_id, path


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
    item: dict[str, Any] = {"pk": slide_pk(slide_id), "sk": f"{OBJECT_SK_PREFIX}{key}", "bucket": bucket, "key": key,
                            "path": path, "size": size, "etag": etag, "version_id": version_id, "sequencer": seq,
                            "cataloged_at": timestamp()}
    read_version = {"VersionId": version_id} if version_id else {"IfMatch": f'"{etag}"'}
    try:
        head = aws.s3.head_object(Bucket=bucket, Key=key, **read_version)
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
        if not _is_conflict(exc):
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
        emit_cataloged(aws, slide_id=result["slide_id"], bucket=detail.bucket.name, key=key,
                       sequencer=normalize_sequencer(obj.sequencer))
    return result


def emit_cataloged(aws: Aws, *, slide_id: str, bucket: str, key: str, sequencer: str) -> None:
    """Tell the trigger (via EventBridge) that the slide changed; raises if EventBridge refused."""
    detail = ObjectCatalogedDetail(slide_id=slide_id, bucket=bucket, key=key, sequencer=sequencer)
    response = aws.events.put_events(Entries=[{
        "Source": CATALOG_EVENT_SOURCE, "DetailType": OBJECT_CATALOGED, "Detail": detail.model_dump_json(),
        "Resources": [f"arn:aws:s3:::{bucket}/{key}"]}])
    if response.get("FailedEntryCount"):
        raise RuntimeError(f"EventBridge refused the {OBJECT_CATALOGED} event: {response['Entries']}")


# --- trigger -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Manifest:
    item: dict
    data: bytes

    @property
    def version(self) -> str:
        return hashlib.sha256(self.data).hexdigest()[:12]

    @property
    def sequencer(self) -> str:
        return self.item["sequencer"]


def _read_text_object(aws: Aws, item: Mapping) -> bytes:
    """Bytes of a small catalogued object, exactly the version the catalog recorded (first 4 MiB)."""
    if int(item["size"]) == 0:
        return b""  # a ranged GET of an empty object is an error (416)
    read_version = {"VersionId": item["version_id"]} if item.get("version_id") else {"IfMatch": f'"{item["etag"]}"'}
    response = aws.s3.get_object(Bucket=item["bucket"], Key=item["key"], Range=f"bytes=0-{TEXT_LIMIT - 1}",
                                 **read_version)
    return response["Body"].read()


def _query_slide(aws: Aws, slide_id: str) -> list[dict]:
    items, kwargs = [], {"KeyConditionExpression": Key("pk").eq(slide_pk(slide_id)), "ConsistentRead": True}
    while True:
        page = aws.table.query(**kwargs)
        items.extend(page["Items"])
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def missing_files(entries, objects: Mapping[str, Mapping]) -> list[dict]:
    """Manifest entries not (yet) present as listed: ``[{"path", "expected_size", "found_size", "why"}]``."""
    missing = []
    for entry in entries:
        obj = objects.get(entry.path)
        if obj is None:
            why = "not arrived yet"
        elif int(obj["size"]) != entry.size:
            why = f"has {int(obj['size'])} bytes, manifest.json says {entry.size} (a newer upload may be arriving)"
        elif obj.get("sha256") and obj["sha256"] != entry.sha256:
            why = "content (sha256) differs from manifest.json (a newer upload may be arriving)"
        else:
            continue
        missing.append({"path": entry.path, "expected_size": entry.size,
                        "found_size": None if obj is None else int(obj["size"]), "why": why})
    return missing


def _problem_items(problems: list[Problem]) -> list[dict]:
    return [{"file": p.file, "message": p.message, "fix": p.fix} for p in problems]


def _open_manifest_condition(version: str | None, sequencer: str | None):
    """Condition for writing the slide item for a manifest version: never over a newer manifest,
    never over a decision already taken for this version."""
    if sequencer is None:  # no manifest yet: only a fresh or still manifest-less collecting slide
        return Attr("pk").not_exists() | (Attr("status").eq(Status.COLLECTING)
                                          & Attr("manifest_sequencer").not_exists())
    still_collecting = Attr("status").eq(Status.COLLECTING) & (
        Attr("manifest_sequencer").not_exists() | Attr("manifest_sequencer").lte(sequencer))
    newer_version = Attr("manifest_sequencer").lt(sequencer) & Attr("manifest_version").ne(version)
    return Attr("pk").not_exists() | still_collecting | newer_version


def _set_slide(aws: Aws, slide_id: str, condition, values: dict, remove: tuple[str, ...] = ()) -> bool:
    """Conditional update of the slide item; False when the condition did not hold."""
    return _update(aws, slide_key(slide_id), condition, values, remove)


def _update(aws: Aws, key: dict, condition, values: dict, remove: tuple[str, ...] = ()) -> bool:
    """Conditional SET (and REMOVE) of attributes of one item; False when the condition did not hold."""
    names = {f"#{k}": k for k in values} | {f"#{k}": k for k in remove}
    expression = "SET " + ", ".join(f"#{k} = :{k}" for k in values)
    if remove:
        expression += " REMOVE " + ", ".join(f"#{k}" for k in remove)
    try:
        aws.table.update_item(Key=key, UpdateExpression=expression,
                              ExpressionAttributeNames=names,
                              ExpressionAttributeValues={f":{k}": v for k, v in values.items()},
                              ConditionExpression=condition)
    except ClientError as exc:
        if _is_conflict(exc):
            return False
        raise
    return True


_DECISION_FIELDS = ("run_id", "execution_arn", "status_order", "problems", "missing", "cause", "error",
                    "output_uri", "overview_uri", "ignored")


def check_slide(aws: Aws, settings: Settings, slide_id: str) -> dict:
    """Look at everything catalogued for a slide and move it on if it is complete (see module doc).

    Safe to call any number of times, concurrently, in any order: the conditional updates let one
    call decide per manifest version, and the execution name (the run id) is unique per version.

    Returns
    -------
    dict
        ``{"slide_id", "status", "outcome", ...}``; outcome is one of ``collecting``, ``started``,
        ``invalid``, ``decided`` (nothing to do: this version was decided already) or ``stale``
        (a newer manifest was seen meanwhile).
    """
    items = _query_slide(aws, slide_id)
    slide = next((i for i in items if i["sk"] == SLIDE_SK), {})
    objects = {i["path"]: i for i in items if i["sk"].startswith(OBJECT_SK_PREFIX)}
    result = {"slide_id": slide_id}
    if MANIFEST not in objects:
        missing = [{"path": MANIFEST, "expected_size": None, "found_size": None,
                    "why": "not arrived yet (written last by `atlas upload`)"}]
        done = _set_slide(aws, slide_id, _open_manifest_condition(None, None),
                          {"status": Status.COLLECTING, "missing": missing, "updated_at": timestamp(),
                           "files_present": len(objects)})
        return result | {"status": Status.COLLECTING, "outcome": "collecting" if done else "stale"}

    manifest = _Manifest(objects[MANIFEST], _read_text_object(aws, objects[MANIFEST]))
    if slide.get("manifest_version") == manifest.version and slide.get("status") != Status.COLLECTING:
        return result | {"status": slide["status"], "outcome": "decided", "run_id": slide.get("run_id")}
    manifest_text = manifest.data.decode("utf-8", errors="replace")
    version_fields = {"manifest_version": manifest.version, "manifest_sequencer": manifest.sequencer,
                      "updated_at": timestamp()}
    try:
        entries = parse_manifest(manifest_text)
    except InvalidInput:
        entries = None  # complete as far as the uploader is concerned, and broken: validate what is there
    missing = [] if entries is None else missing_files(entries, objects)
    if missing:
        done = _set_slide(aws, slide_id, _open_manifest_condition(manifest.version, manifest.sequencer),
                          {"status": Status.COLLECTING, "missing": missing, "files_expected": len(entries),
                           "files_present": len(entries) - len(missing)} | version_fields,
                          remove=tuple(f for f in _DECISION_FIELDS if f != "missing"))
        return result | {"status": Status.COLLECTING, "outcome": "collecting" if done else "stale",
                         "missing": [m["path"] for m in missing]}

    listed = set(objects) - {MANIFEST} if entries is None else {e.path for e in entries}
    problems = _validate(aws, slide_id, manifest_text, listed, objects)
    if problems:
        return _decide_invalid(aws, settings, slide_id, manifest, problems)
    run_id = run_id_for(slide_id, manifest.data)
    ignored = sorted(set(objects) - listed - {MANIFEST})
    won = _set_slide(aws, slide_id, _open_manifest_condition(manifest.version, manifest.sequencer),
                     {"status": Status.READY, "status_order": STATUS_RANK[Status.READY], "run_id": run_id,
                      "ignored": ignored, "files_expected": len(listed), "files_present": len(listed)} | version_fields,
                     remove=("missing", "problems", "execution_arn", "cause", "error", "output_uri", "overview_uri"))
    if not won:
        # Lost the race, or this is a retry after a crash between the flip and the start: start
        # only if the item says READY for this run without an execution (the start is idempotent).
        current = aws.table.get_item(Key=slide_key(slide_id), ConsistentRead=True)["Item"]
        if current.get("run_id") != run_id or current.get("status") != Status.READY or current.get("execution_arn"):
            return result | {"status": current["status"], "outcome": "decided", "run_id": current.get("run_id")}
    bucket = objects[MANIFEST]["bucket"]
    execution_arn = start_run(aws, settings, slide_id=slide_id, run_id=run_id, ingest_bucket=bucket,
                              manifest_version=manifest.version)
    return result | {"status": Status.READY, "outcome": "started", "run_id": run_id, "execution_arn": execution_arn}


def _validate(aws: Aws, slide_id: str, manifest_text: str, listed: set[str],
              objects: Mapping[str, Mapping]) -> list[Problem]:
    """Every problem of a complete slide, from the catalog (the same checks as `atlas validate`).

    ``listed`` are the manifest's files: objects left from an earlier upload are not part of this
    manifest version and are neither checked nor processed.
    """
    from atlas.slide.validate import check_contents


    def text(name: str) -> str | None:
        if name not in listed:
            return None
        return _read_text_object(aws, objects[name]).decode("utf-8", errors="replace")

    cycles = {}
    for path in raw_files(sorted(listed)):
        obj = objects[path]
        cycles[path] = cycle_metadata_from_item(obj["ome"]) if obj.get("ome") else ValueError(obj.get("ome_error"))
    files = {path: int(objects[path]["size"]) for path in sorted(listed)}
    return check_contents(slide_id=slide_id, files=files, manifest_text=manifest_text, markers_text=text(MARKERS),
                          params_text=text(PARAMS), cycles=cycles)


def _decide_invalid(aws: Aws, settings: Settings, slide_id: str, manifest: _Manifest,
                    problems: list[Problem]) -> dict:
    won = _set_slide(aws, slide_id, _open_manifest_condition(manifest.version, manifest.sequencer),
                     {"status": Status.INVALID, "problems": _problem_items(problems),
                      "manifest_version": manifest.version, "manifest_sequencer": manifest.sequencer,
                      "updated_at": timestamp()},
                     remove=tuple(f for f in _DECISION_FIELDS if f != "problems"))
    if won:
        lines = [f"Slide {slide_id} is INVALID (manifest version {manifest.version}): nothing was processed "
                 "and the uploaded files are kept as they are.", "", f"Problems ({len(problems)}):"]
        lines += [f"  - {p}" for p in problems]
        lines += ["", "Fix them and upload the slide again (`atlas upload`); the new manifest starts a new run."]
        notify(aws, settings, slide_id=slide_id, status=Status.INVALID, lines=lines)
    return {"slide_id": slide_id, "status": Status.INVALID, "outcome": "invalid" if won else "decided",
            "problems": [str(p) for p in problems]}


def execution_input(settings: Settings, *, slide_id: str, run_id: str, ingest_bucket: str) -> dict:
    """The state machine's input (the contract with the stage jobs)."""
    return {"slide_id": slide_id, "run_id": run_id, "slide_uri": f"s3://{ingest_bucket}/{slide_id}/",
            "work_uri": f"s3://{settings.work_bucket}/{run_id}/"}


def start_run(aws: Aws, settings: Settings, *, slide_id: str, run_id: str, ingest_bucket: str,
              manifest_version: str) -> str:
    """StartExecution named ``run_id`` (a duplicate start is refused by AWS) and record the run."""
    payload = execution_input(settings, slide_id=slide_id, run_id=run_id, ingest_bucket=ingest_bucket)
    try:
        arn = aws.sfn.start_execution(stateMachineArn=settings.state_machine_arn, name=run_id,
                                      input=json.dumps(payload, sort_keys=True))["executionArn"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ExecutionAlreadyExists":
            raise
        arn = settings.state_machine_arn.replace(":stateMachine:", ":execution:") + f":{run_id}"
    try:
        aws.table.put_item(Item={**run_key(slide_id, run_id), "run_id": run_id,
                                 "status": Status.READY, "status_order": STATUS_RANK[Status.READY],
                                 "manifest_version": manifest_version, "execution_arn": arn, "input": payload,
                                 "started_at": timestamp()},
                           ConditionExpression=Attr("sk").not_exists())
    except ClientError as exc:
        if not _is_conflict(exc):
            raise
    _set_slide(aws, slide_id, Attr("run_id").eq(run_id), {"execution_arn": arn, "updated_at": timestamp()})
    return arn


# --- status ------------------------------------------------------------------------------------
def results_uri(settings: Settings, slide_id: str, run_id: str) -> str:
    return f"s3://{settings.results_bucket}/{slide_id}/{run_id}/"


def overview_uri(settings: Settings, slide_id: str, run_id: str) -> str:
    """Where people open a run's overview: on the overview site when there is one (the key layout of
    :func:`atlas.aws.release.release_run`), else in the results bucket."""
    if settings.overview_site_url:
        return f"{settings.overview_site_url.rstrip('/')}/{slide_id}/{run_id}/{layout.OVERVIEW_PAGE}"
    return results_uri(settings, slide_id, run_id) + f"{layout.OVERVIEW}/{layout.OVERVIEW_PAGE}"


def record_execution_status(aws: Aws, settings: Settings, detail: ExecutionStatusDetail) -> dict:
    """Apply one Step Functions status change to the run's item (and the slide's, if current).

    Status only moves forward (READY < RUNNING < SUCCEEDED | FAILED; a redrive starts a new
    round), so late or repeated events change nothing. A run that ends is announced once.
    """
    status = _SFN_STATUS.get(detail.status)
    run_id = detail.name
    try:
        slide_id = json.loads(detail.input or "{}")["slide_id"]
    except (ValueError, KeyError):
        slide_id = None
    if status is None or slide_id is None:
        return {"run_id": run_id, "outcome": "ignored", "status": detail.status}
    order = detail.redrive_count * 10 + STATUS_RANK[status]
    values: dict[str, Any] = {"status": status, "status_order": order, "execution_arn": detail.execution_arn,
                              "updated_at": timestamp()}
    if status is Status.SUCCEEDED:
        values["output_uri"] = results_uri(settings, slide_id, run_id)
        values["overview_uri"] = overview_uri(settings, slide_id, run_id)
    if status is Status.FAILED:
        values["error"] = detail.error or detail.status
        values["cause"] = (detail.cause or f"execution {detail.status.lower()}")[:4000]
    if detail.output:
        values["execution_output"] = detail.output[:4000]
    forward = Attr("status_order").not_exists() | Attr("status_order").lt(order)
    if not _update(aws, run_key(slide_id, run_id), forward, values | {"run_id": run_id}):
        return {"slide_id": slide_id, "run_id": run_id, "status": status, "outcome": "stale"}
    slide_values = {k: v for k, v in values.items() if k != "execution_output"}
    current = _set_slide(aws, slide_id, Attr("run_id").eq(run_id) & forward, slide_values)
    if status in (Status.SUCCEEDED, Status.FAILED):
        if status is Status.SUCCEEDED:
            lines = [f"Slide {slide_id}: run {run_id} SUCCEEDED.", f"Results: {values['output_uri']}",
                     f"Overview: {values['overview_uri']}"]
        else:
            lines = [f"Slide {slide_id}: run {run_id} FAILED ({values['error']}).", f"Cause: {values['cause']}", "",
                     "The uploaded files are kept. Fix the input and upload again, or ask ops to rerun "
                     f"(execution {detail.execution_arn})."]
        notify(aws, settings, slide_id=slide_id, status=status, lines=lines)
    return {"slide_id": slide_id, "run_id": run_id, "status": status, "outcome": "recorded",
            "slide_updated": current}


def notify(aws: Aws, settings: Settings, *, slide_id: str, status: Status, lines: list[str]) -> None:
    """One SNS message to the lab (e-mail friendly text; status and slide as message attributes)."""
    aws.sns.publish(TopicArn=settings.notify_topic_arn, Subject=f"[atlas] {slide_id}: {status}"[:100],
                    Message="\n".join(lines),
                    MessageAttributes={"status": {"DataType": "String", "StringValue": str(status)},
                                       "slide_id": {"DataType": "String", "StringValue": slide_id}})
