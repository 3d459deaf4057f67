"""The catalog table: its key schema, item keys, slide states and conditional writes.

One table (and powertools' idempotency table beside it)::

    pk              sk                 item
    SLIDE#<id>      SLIDE              status of the current manifest version
    SLIDE#<id>      OBJECT#<key>       one per S3 object (full key)
    SLIDE#<id>      RUN#<run_id>       one per started run, kept forever (run history)

The CDK app (``infra/catalog.py``) and the local demo create both tables from :data:`CATALOG_TABLE`
and :data:`IDEMPOTENCY_TABLE`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError


@dataclass(frozen=True)
class TableSchema:
    """Key attributes (all strings) of a DynamoDB table, and its TTL attribute."""

    partition_key: str
    sort_key: str | None = None
    ttl_attribute: str | None = None

    def create_table_arguments(self) -> dict:
        """``KeySchema`` and ``AttributeDefinitions`` of DynamoDB's CreateTable."""
        keys = [(self.partition_key, "HASH")] + ([(self.sort_key, "RANGE")] if self.sort_key else [])
        return {"KeySchema": [{"AttributeName": name, "KeyType": kind} for name, kind in keys],
                "AttributeDefinitions": [{"AttributeName": name, "AttributeType": "S"} for name, _ in keys]}


CATALOG_TABLE = TableSchema("pk", "sk")
# powertools' DynamoDBPersistenceLayer defaults: partition key "id", expiry attribute "expiration".
IDEMPOTENCY_TABLE = TableSchema("id", ttl_attribute="expiration")

SLIDE_PK_PREFIX = "SLIDE#"
SLIDE_SK = "SLIDE"
RUN_SK_PREFIX = "RUN#"
OBJECT_SK_PREFIX = "OBJECT#"


class Status(StrEnum):
    COLLECTING = "COLLECTING"   # files still arriving (the item lists what is missing)
    READY = "READY"             # complete and valid; the execution was started
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"           # the run failed (cause recorded); raw data kept, a new upload reruns
    INVALID = "INVALID"         # complete but unusable (every problem recorded); nothing was run


# A run's status only moves forward: rank of each state (a redrive starts a new round).
STATUS_RANK = {Status.READY: 1, Status.RUNNING: 2, Status.SUCCEEDED: 3, Status.FAILED: 3}
ENDED = (Status.SUCCEEDED, Status.FAILED)
_EXECUTION_STATUS = {"RUNNING": Status.RUNNING, "SUCCEEDED": Status.SUCCEEDED, "FAILED": Status.FAILED,
                     "TIMED_OUT": Status.FAILED, "ABORTED": Status.FAILED}
# What a run leaves on the slide item, dropped when the slide gets a new run or decision.
RUN_OUTCOME_FIELDS = ("missing", "problems", "execution_arn", "cause", "error", "output_uri", "overview_uri")


def run_status(execution_status: str) -> Status | None:
    """The run status of a Step Functions execution status (TIMED_OUT, ABORTED -> FAILED); None if unknown."""
    return _EXECUTION_STATUS.get(execution_status)


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


def object_key(slide_id: str, key: str) -> dict[str, str]:
    """Key of one S3 object's item (``key``: the full object key)."""
    return {"pk": slide_pk(slide_id), "sk": f"{OBJECT_SK_PREFIX}{key}"}


def timestamp() -> str:
    """Now, UTC, ISO 8601 with milliseconds: the time format of every catalog item."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def to_dynamo(value: Any) -> Any:
    """JSON-like value with floats as Decimal (what DynamoDB stores)."""
    return json.loads(json.dumps(value), parse_float=Decimal)


def from_dynamo(value: Any) -> Any:
    """DynamoDB value back to plain JSON types (Decimal -> int or float)."""
    return json.loads(json.dumps(value, default=lambda d: int(d) if d == d.to_integral_value() else float(d)))


def is_conflict(exc: ClientError) -> bool:
    """True when a conditional write's condition did not hold."""
    return exc.response["Error"]["Code"] == "ConditionalCheckFailedException"


def update_if(table, key: Mapping[str, str], condition, values: Mapping[str, Any],
              remove: tuple[str, ...] = ()) -> bool:
    """Conditional SET (and REMOVE) of attributes of one item; False when the condition did not hold."""
    names = {f"#{k}": k for k in values} | {f"#{k}": k for k in remove}
    expression = "SET " + ", ".join(f"#{k} = :{k}" for k in values)
    if remove:
        expression += " REMOVE " + ", ".join(f"#{k}" for k in remove)
    try:
        table.update_item(Key=dict(key), UpdateExpression=expression, ExpressionAttributeNames=names,
                          ExpressionAttributeValues={f":{k}": v for k, v in values.items()},
                          ConditionExpression=condition)
    except ClientError as exc:
        if is_conflict(exc):
            return False
        raise
    return True


def query_all(table, **kwargs) -> list[dict]:
    """Every item a Query with ``kwargs`` returns (all pages)."""
    items: list[dict] = []
    while True:
        page = table.query(**kwargs)
        items += page["Items"]
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def slide_items(table, slide_id: str, sk_prefix: str = "") -> list[dict]:
    """The slide's items (consistent read), optionally only those whose sort key starts with ``sk_prefix``."""
    condition = Key("pk").eq(slide_pk(slide_id))
    if sk_prefix:
        condition &= Key("sk").begins_with(sk_prefix)
    return query_all(table, KeyConditionExpression=condition, ConsistentRead=True)
