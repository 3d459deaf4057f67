"""Record the AWS calls each component makes, and what IAM authorizes each call as.

Test tooling for the IAM sufficiency check (tests/infra/test_iam_sufficiency.py), never shipped.

Recording uses botocore's event hooks: every client made while recording is on gets a
``before-parameter-build`` handler (it runs after ``provide-client-params``, so it sees parameters
that other hooks add, such as ``ExpectedBucketOwner``). Each call is appended as one JSON line
(component, service, operation, region, parameters) to the file named by ``ATLAS_AWS_CALLS``.
Which component made it: the ``component`` context variable in this process (the harness sets it
around a Lambda handler's invocation), or ``job:<stage>`` in an ``atlas stage`` process, where
``localcloud/recording/sitecustomize.py`` switches recording on at start-up.

:func:`iam_requests` turns a call into the IAM (action, resource ARN) pairs AWS authorizes it as
(the Service Authorization Reference; e.g. S3's HeadObject is s3:GetObject, ListObjectsV2 is
s3:ListBucket on the bucket, CopyObject is s3:GetObject on the source and s3:PutObject on the target).
An operation not in the table is returned as unmapped, so the check fails until someone maps it.
"""
from __future__ import annotations

import contextvars
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CALLS_ENV = "ATLAS_AWS_CALLS"

component: contextvars.ContextVar[str | None] = contextvars.ContextVar("component", default=None)
_lock = threading.Lock()
_installed = False

# botocore service name -> IAM service prefix, where they differ
IAM_PREFIX = {"stepfunctions": "states"}


@dataclass(frozen=True)
class Call:
    """One recorded API call."""

    component: str | None
    service: str
    operation: str
    region: str
    params: dict


def _job_component() -> str | None:
    """``job:<stage>`` in an ``atlas stage NAME ...`` process."""
    argv = sys.argv
    if "stage" in argv[:-1]:
        return f"job:{argv[argv.index('stage') + 1]}"
    return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else f"<{type(value).__name__}>"


def install(path: str | Path) -> None:
    """Record every call of every botocore client made from now on in this process to ``path``."""
    global _installed
    import botocore.session

    os.environ[CALLS_ENV] = str(path)
    if _installed:
        return
    _installed = True
    create_client = botocore.session.Session.create_client

    def create_recording_client(self, *args, **kwargs):
        client = create_client(self, *args, **kwargs)
        region = client.meta.region_name

        def record(params, model, **_):
            target = os.environ.get(CALLS_ENV)
            if not target:
                return
            call = {"component": component.get() or _job_component(), "service": model.service_model.service_name,
                    "operation": model.name, "region": region, "params": _json_safe(params)}
            with _lock, open(target, "a") as sink:
                sink.write(json.dumps(call) + "\n")

        client.meta.events.register("before-parameter-build", record)
        return client

    botocore.session.Session.create_client = create_recording_client


def read_calls(path: str | Path) -> list[Call]:
    """The calls recorded in ``path``, in order."""
    return [Call(**json.loads(line)) for line in Path(path).read_text().splitlines() if line]


# --- what IAM authorizes a call as ---------------------------------------------------------------
_S3_OBJECT = {"GetObject": "s3:GetObject", "HeadObject": "s3:GetObject", "PutObject": "s3:PutObject",
              "CreateMultipartUpload": "s3:PutObject", "UploadPart": "s3:PutObject",
              "CompleteMultipartUpload": "s3:PutObject", "AbortMultipartUpload": "s3:AbortMultipartUpload",
              "DeleteObject": "s3:DeleteObject", "GetObjectTagging": "s3:GetObjectTagging",
              "ListParts": "s3:ListMultipartUploadParts"}
_S3_VERSIONED = {"s3:GetObject": "s3:GetObjectVersion", "s3:DeleteObject": "s3:DeleteObjectVersion",
                 "s3:GetObjectTagging": "s3:GetObjectVersionTagging"}
_S3_BUCKET = {"ListObjectsV2": "s3:ListBucket", "ListObjects": "s3:ListBucket", "HeadBucket": "s3:ListBucket",
              "ListObjectVersions": "s3:ListBucketVersions", "ListMultipartUploads": "s3:ListBucketMultipartUploads",
              "GetBucketRequestPayment": "s3:GetBucketRequestPayment", "GetBucketPolicy": "s3:GetBucketPolicy",
              "GetPublicAccessBlock": "s3:GetBucketPublicAccessBlock", "GetBucketLocation": "s3:GetBucketLocation"}
_DYNAMODB_TABLE = ("GetItem", "PutItem", "UpdateItem", "DeleteItem", "Query", "Scan", "DescribeTable")
_TRANSACT = {"Put": "dynamodb:PutItem", "Update": "dynamodb:UpdateItem", "Delete": "dynamodb:DeleteItem",
             "ConditionCheck": "dynamodb:ConditionCheckItem", "Get": "dynamodb:GetItem"}


def iam_requests(call: Call, account: str) -> list[tuple[str, str]] | None:
    """The (IAM action, resource ARN) pairs ``call`` is authorized as; None when the operation is unmapped."""
    p, op, region = call.params, call.operation, call.region
    if call.service == "s3":
        bucket = f"arn:aws:s3:::{p.get('Bucket')}"
        if op in ("CopyObject", "UploadPartCopy"):
            source = p["CopySource"]
            if isinstance(source, str):
                source_bucket, _, source_key = source.lstrip("/").partition("/")
                source = {"Bucket": source_bucket, "Key": source_key.split("?versionId=")[0]}
            read = "s3:GetObjectVersion" if source.get("VersionId") else "s3:GetObject"
            return [(read, f"arn:aws:s3:::{source['Bucket']}/{source['Key']}"), ("s3:PutObject", f"{bucket}/{p['Key']}")]  # noqa: E501
        if op in _S3_OBJECT:
            action = _S3_OBJECT[op]
            action = _S3_VERSIONED.get(action, action) if p.get("VersionId") else action
            return [(action, f"{bucket}/{p['Key']}")]
        if op == "DeleteObjects":
            return [("s3:DeleteObject", f"{bucket}/{o['Key']}") for o in p["Delete"]["Objects"]]
        if op in _S3_BUCKET:
            return [(_S3_BUCKET[op], bucket)]
        return None
    if call.service == "dynamodb":
        def table(name: str) -> str:
            return f"arn:aws:dynamodb:{region}:{account}:table/{name}"
        if op in _DYNAMODB_TABLE:
            return [(f"dynamodb:{op}", table(p["TableName"]))]
        if op in ("BatchGetItem", "BatchWriteItem"):
            return [(f"dynamodb:{op}", table(name)) for name in p["RequestItems"]]
        if op in ("TransactWriteItems", "TransactGetItems"):
            return [(_TRANSACT[kind], table(item[kind]["TableName"])) for item in p["TransactItems"] for kind in item]
        return None
    if call.service == "stepfunctions":
        arn = {"StartExecution": "stateMachineArn", "ListExecutions": "stateMachineArn",
               "DescribeStateMachine": "stateMachineArn", "DescribeExecution": "executionArn",
               "StopExecution": "executionArn", "RedriveExecution": "executionArn"}.get(op)
        return [(f"states:{op}", p[arn])] if arn else None
    if call.service == "sns" and op == "Publish":
        return [("sns:Publish", p["TopicArn"])]
    if call.service == "events" and op == "PutEvents":
        buses = {e.get("EventBusName") or "default" for e in p["Entries"]}
        return [("events:PutEvents", bus if bus.startswith("arn:") else f"arn:aws:events:{region}:{account}:event-bus/{bus}")  # noqa: E501
                for bus in sorted(buses)]
    return None
