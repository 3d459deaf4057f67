"""Starting a run: the slide item flips to READY for a run id, the run gets its item, the execution starts.

Used by the trigger (a complete, valid upload) and by ``atlas rerun`` (:mod:`atlas.aws.ops`) alike.
The execution is named after the run id, so AWS refuses a second start of the same run: every step is
safe to repeat after a crash.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from boto3.dynamodb.conditions import Attr
from botocore.exceptions import ClientError

from atlas.aws.catalog.table import (
    RUN_OUTCOME_FIELDS,
    STATUS_RANK,
    Status,
    is_conflict,
    run_key,
    slide_key,
    timestamp,
    update_if,
)


def execution_input(*, slide_id: str, run_id: str, slide_uri: str, work_bucket: str) -> dict[str, str]:
    """The state machine's input (the contract with the stage jobs): the slide and the run's work prefix."""
    return {"slide_id": slide_id, "run_id": run_id, "slide_uri": slide_uri, "work_uri": f"s3://{work_bucket}/{run_id}/"}


def mark_ready(table, slide_id: str, run_id: str, condition, values: Mapping[str, Any] | None = None) -> bool:
    """Flip the slide item to READY for ``run_id`` (if ``condition`` holds), dropping what the last
    run or decision left (execution, error, results, problems). False when the condition did not hold."""
    ready = {"status": Status.READY, "status_order": STATUS_RANK[Status.READY], "run_id": run_id,
             "updated_at": timestamp()}
    return update_if(table, slide_key(slide_id), condition, ready | dict(values or {}), remove=RUN_OUTCOME_FIELDS)


def start_run(table, sfn, state_machine_arn: str, *, payload: Mapping[str, str],
              run_fields: Mapping[str, Any] | None = None) -> str:
    """Record the run (its ``RUN#`` item, once), start its execution and note the ARN; returns the ARN.

    Parameters
    ----------
    table : DynamoDB Table
        The catalog table; the slide item must already be READY for ``payload["run_id"]``.
    sfn : boto3 Step Functions client
    state_machine_arn : str
    payload : mapping
        The execution input (:func:`execution_input`).
    run_fields : mapping
        More attributes of the run item (``manifest_version``, ``rerun_of``, ...).

    Raises
    ------
    botocore.exceptions.ClientError
        StartExecution failed (other than "already exists": then this run is running already).
    """
    slide_id, run_id = payload["slide_id"], payload["run_id"]
    try:
        table.put_item(Item={**run_key(slide_id, run_id), "run_id": run_id, "status": Status.READY,
                             "status_order": STATUS_RANK[Status.READY], "input": dict(payload),
                             "started_at": timestamp(), **(run_fields or {})},
                       ConditionExpression=Attr("sk").not_exists())
    except ClientError as exc:
        if not is_conflict(exc):
            raise
    try:
        arn = sfn.start_execution(stateMachineArn=state_machine_arn, name=run_id,
                                  input=json.dumps(dict(payload), sort_keys=True))["executionArn"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ExecutionAlreadyExists":
            raise
        arn = state_machine_arn.replace(":stateMachine:", ":execution:") + f":{run_id}"
    for key in (run_key(slide_id, run_id), slide_key(slide_id)):
        update_if(table, key, Attr("run_id").eq(run_id), {"execution_arn": arn, "updated_at": timestamp()})
    return arn
