"""Execution status and notification: what became of a run, and telling the lab.

Step Functions status changes move the run's item (and the slide's, while that run is current)
forward only: READY < RUNNING < SUCCEEDED | FAILED, a redrive starting a new round, so late or
repeated events change nothing. A run that ends, and a slide found INVALID, are announced once on
the SNS topic.
"""
from __future__ import annotations

import json
from typing import Any

from boto3.dynamodb.conditions import Attr

from atlas import layout
from atlas.aws.catalog.events import ExecutionStatusDetail
from atlas.aws.catalog.settings import Aws, Settings
from atlas.aws.catalog.table import STATUS_RANK, Status, run_key, run_status, slide_key, timestamp, update_if

TEXT_ATTRIBUTE_LIMIT = 4000   # characters of an execution's cause/output kept on the items


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

    Returns
    -------
    dict
        ``{"slide_id", "run_id", "status", "outcome"}``, outcome ``recorded``, ``stale`` (an equal or
        later status was recorded before) or ``ignored`` (not a run of the catalog).
    """
    status, run_id = run_status(detail.status), detail.name
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
        values["cause"] = (detail.cause or f"execution {detail.status.lower()}")[:TEXT_ATTRIBUTE_LIMIT]
    forward = Attr("status_order").not_exists() | Attr("status_order").lt(order)
    output = {"execution_output": detail.output[:TEXT_ATTRIBUTE_LIMIT]} if detail.output else {}
    if not update_if(aws.table, run_key(slide_id, run_id), forward, values | output | {"run_id": run_id}):
        return {"slide_id": slide_id, "run_id": run_id, "status": status, "outcome": "stale"}
    current = update_if(aws.table, slide_key(slide_id), Attr("run_id").eq(run_id) & forward, values)
    if status in (Status.SUCCEEDED, Status.FAILED):
        notify(aws, settings, slide_id=slide_id, status=status, lines=_run_ended(slide_id, run_id, values, detail))
    return {"slide_id": slide_id, "run_id": run_id, "status": status, "outcome": "recorded",
            "slide_updated": current}


def _run_ended(slide_id: str, run_id: str, values: dict, detail: ExecutionStatusDetail) -> list[str]:
    if values["status"] is Status.SUCCEEDED:
        return [f"Slide {slide_id}: run {run_id} SUCCEEDED.", f"Results: {values['output_uri']}",
                f"Overview: {values['overview_uri']}"]
    return [f"Slide {slide_id}: run {run_id} FAILED ({values['error']}).", f"Cause: {values['cause']}", "",
            "The uploaded files are kept. Fix the input and upload again, or ask ops to rerun "
            f"(execution {detail.execution_arn})."]


def notify(aws: Aws, settings: Settings, *, slide_id: str, status: Status, lines: list[str]) -> None:
    """One SNS message to the lab (e-mail friendly text; status and slide as message attributes)."""
    aws.sns.publish(TopicArn=settings.notify_topic_arn, Subject=f"[atlas] {slide_id}: {status}"[:100],
                    Message="\n".join(lines),
                    MessageAttributes={"status": {"DataType": "String", "StringValue": str(status)},
                                       "slide_id": {"DataType": "String", "StringValue": slide_id}})
