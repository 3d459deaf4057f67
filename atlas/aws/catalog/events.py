"""The events the catalog Lambdas take and send: EventBridge patterns (one per handler) and typed models.

::

    ingest bucket  -- S3 Object Created ----------------------> catalog handler (records the object)
    catalog        -- "Slide Object Cataloged" (atlas.catalog) -> trigger handler (starts the run once complete)
    state machine  -- Execution Status Change ------------------> status handler  (run status, notification)

:func:`event_patterns` is the one routing table: the CDK app builds its EventBridge rules from it and
the local demo creates the same rules in the emulator and dispatches by them.
"""
from __future__ import annotations

from aws_lambda_powertools.utilities.parser.models import EventBridgeModel, S3EventNotificationEventBridgeModel
from pydantic import BaseModel, Field

CATALOG_EVENT_SOURCE = "atlas.catalog"
OBJECT_CATALOGED = "Slide Object Cataloged"
OBJECT_CREATED = "Object Created"
EXECUTION_STATUS_CHANGE = "Step Functions Execution Status Change"


CATALOG, TRIGGER, STATUS = "catalog", "trigger", "status"  # the handlers, functions/<name>/handler.py
HANDLERS = (CATALOG, TRIGGER, STATUS)


def event_patterns(*, ingest_bucket: str, state_machine_arn: str) -> dict[str, dict]:
    """Handler name -> the EventBridge pattern of the events it gets (one rule each)."""
    return {
        CATALOG: {"source": ["aws.s3"], "detail-type": [OBJECT_CREATED],
                    "detail": {"bucket": {"name": [ingest_bucket]}}},
        TRIGGER: {"source": [CATALOG_EVENT_SOURCE], "detail-type": [OBJECT_CATALOGED]},
        STATUS: {"source": ["aws.states"], "detail-type": [EXECUTION_STATUS_CHANGE],
                   "detail": {"stateMachineArn": [state_machine_arn]}},
    }


ObjectCreatedEvent = S3EventNotificationEventBridgeModel  # S3's Object Created, as EventBridge delivers it


class ObjectCatalogedDetail(BaseModel):
    """What the catalog tells the trigger: this object of this slide is now in the table."""

    slide_id: str
    bucket: str
    key: str
    sequencer: str


class ObjectCatalogedEvent(EventBridgeModel):
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


class ExecutionStatusEvent(EventBridgeModel):
    detail: ExecutionStatusDetail


def emit_cataloged(events, *, slide_id: str, bucket: str, key: str, sequencer: str) -> None:
    """Tell the trigger (via EventBridge's default bus) that the slide changed.

    Raises
    ------
    RuntimeError
        EventBridge refused the event; the Lambda's retry sends it again.
    """
    detail = ObjectCatalogedDetail(slide_id=slide_id, bucket=bucket, key=key, sequencer=sequencer)
    response = events.put_events(Entries=[{
        "Source": CATALOG_EVENT_SOURCE, "DetailType": OBJECT_CATALOGED, "Detail": detail.model_dump_json(),
        "Resources": [f"arn:aws:s3:::{bucket}/{key}"]}])
    if response.get("FailedEntryCount"):
        entry = response["Entries"][0]
        raise RuntimeError(
            f"EventBridge refused the {OBJECT_CATALOGED} event of s3://{bucket}/{key} "
            f"({entry.get('ErrorCode')}: {entry.get('ErrorMessage')}); the object is recorded and this event is "
            "retried by Lambda, then kept in the catalog function's dead-letter queue. If it persists, check the "
            "function's events:PutEvents permission on the default bus and the PutEvents quota, then redrive the "
            "dead-letter queue")
