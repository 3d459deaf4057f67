"""Execution status and notification: what became of a run, and telling the lab.

Step Functions status changes move the run's item (and the slide's, while that run is current)
forward only: READY < RUNNING < SUCCEEDED | FAILED, a redrive starting a new round, so late or
repeated events change nothing. A run that ends, and a slide found INVALID, are announced once on
the SNS topic. A succeeded run's overview is linked on the public overview site only when the run
published it there (``overview.public`` in the slide's params.yml, true by default); otherwise its
copy in the results bucket is named.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from boto3.dynamodb.conditions import Attr
from botocore.exceptions import ClientError

from atlas import layout
from atlas.aws.catalog.events import ExecutionStatusDetail
from atlas.aws.catalog.settings import Aws, Settings
from atlas.aws.catalog.table import STATUS_RANK, Status, run_key, run_status, slide_key, timestamp, update_if
from atlas.aws.s3 import S3Uri, get_bytes
from atlas.errors import InvalidInput
from atlas.params import parse_params
from atlas.slide.convention import PARAMS, SLIDE_MANIFEST, parse_manifest

log = logging.getLogger(__name__)

TEXT_ATTRIBUTE_LIMIT = 4000   # characters of an execution's cause/output kept on the items


def results_uri(settings: Settings, slide_id: str, run_id: str) -> str:
    return f"s3://{settings.results_bucket}/{slide_id}/{run_id}/"


def overview_uri(settings: Settings, slide_id: str, run_id: str, *, public: bool) -> str:
    """Where people open a run's overview: on the overview site when there is one and the run's
    overview is ``public`` (the key layout of :func:`atlas.aws.release.release_run`), else in the
    results bucket (which every release holds it in)."""
    if settings.overview_site_url and public:
        return f"{settings.overview_site_url.rstrip('/')}/{slide_id}/{run_id}/{layout.OVERVIEW_PAGE}"
    return results_uri(settings, slide_id, run_id) + f"{layout.OVERVIEW}/{layout.OVERVIEW_PAGE}"


def overview_is_public(s3, slide_uri: str) -> bool:
    """Whether a run published its overview on the public site: what the slide's params.yml says
    (``overview.public``, true by default), read where the run read the slide (its execution input's
    ``slide_uri``; a params override's copy for a rerun) and as its manifest.json lists it, as the
    publish job does. False when the slide cannot be read any more, so a link never points at a
    page that was not published.
    """
    slide = S3Uri.parse(slide_uri).prefix()
    try:
        manifest = get_bytes(s3, slide.join(SLIDE_MANIFEST))
        listed = manifest is not None and any(e.path == PARAMS for e in parse_manifest(manifest.decode("utf-8")))
        params = get_bytes(s3, slide.join(PARAMS)) if listed else None
        if manifest is None or (listed and params is None):
            gone = slide.join(SLIDE_MANIFEST if manifest is None else PARAMS)
            log.warning("%s is gone: naming the overview in the results bucket", gone)
            return False
        return parse_params(params.decode("utf-8") if params is not None else None).overview.public
    except (ClientError, InvalidInput, ValueError) as exc:  # ValueError: not UTF-8
        log.warning("cannot read the params of %s (%s): naming the overview in the results bucket", slide, exc)
        return False


def _overview(aws: Aws, settings: Settings, slide_id: str, run_id: str, execution_input: dict) -> str:
    """The link to a succeeded run's overview (the slide is read only when there is a site to link)."""
    slide_uri = execution_input.get("slide_uri")
    public = bool(settings.overview_site_url and slide_uri) and overview_is_public(aws.s3, slide_uri)
    return overview_uri(settings, slide_id, run_id, public=public)


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
        execution_input = json.loads(detail.input or "{}")
        slide_id = execution_input["slide_id"]
    except (ValueError, KeyError, TypeError):
        slide_id = None
    if status is None or slide_id is None:
        return {"run_id": run_id, "outcome": "ignored", "status": detail.status}
    order = detail.redrive_count * 10 + STATUS_RANK[status]
    values: dict[str, Any] = {"status": status, "status_order": order, "execution_arn": detail.execution_arn,
                              "updated_at": timestamp()}
    if status is Status.SUCCEEDED:
        values["output_uri"] = results_uri(settings, slide_id, run_id)
        values["overview_uri"] = _overview(aws, settings, slide_id, run_id, execution_input)
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
