"""Exactly once under concurrent delivery: Lambda runs handlers in parallel, so the same events
arrive at the same time from many threads, against the emulator's server (real HTTP, real races
between conditional writes)."""
from __future__ import annotations

import logging
import random
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from aws_lambda_powertools.utilities.idempotency.exceptions import IdempotencyAlreadyInProgressError
from moto.server import ThreadedMotoServer

from localcloud.demo import execution_status_event, local_aws_env

THREADS = 16
COPIES = 100


@pytest.fixture
def cloud(monkeypatch, wire_cloud):
    """LocalCloud on moto's server (instead of the in-process mock of conftest's ``cloud``)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        for key, value in local_aws_env(f"http://{host}:{port}").items():
            monkeypatch.setenv(key, value)
        yield wire_cloud(f"c{uuid.uuid4().hex[:8]}")  # the server's state outlives it
    finally:
        server.stop()


def deliver_concurrently(ingest, events: list[dict]) -> int:
    """Every event COPIES times, shuffled, from THREADS threads; the catalog's own events (twice each)
    join the pool until none are left. A copy that finds its twin still in progress fails, as in
    AWS, and goes back to the pool (Lambda retries a failed asynchronous invocation). Returns how
    many such retries there were."""
    pending = [e for e in events for _ in range(COPIES)]
    random.Random(17).shuffle(pending)
    lock = threading.Lock()
    retries = []

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                event = pending.pop()
            try:
                ingest.deliver(event)
            except IdempotencyAlreadyInProgressError:
                with lock:
                    retries.append(event)
                    pending.insert(0, event)

    while pending:
        with ThreadPoolExecutor(THREADS) as pool:
            for future in [pool.submit(worker) for _ in range(THREADS)]:
                future.result()
        while emitted := ingest.cloud.receive():
            pending.extend(e for e in emitted for _ in range(2))
        random.Random(len(pending)).shuffle(pending)
    return len(retries)


def test_two_slides_each_event_100_times_from_16_threads_start_one_run_each(cloud, ingest, sample_slide):
    events = ingest.put_folder(sample_slide, "left") + ingest.put_folder(sample_slide, "right")
    retried = deliver_concurrently(ingest, events)
    assert retried > 0  # the copies did race: some found their twin in progress

    executions = cloud.executions()
    assert sorted(arn.rsplit(":", 1)[-1].rsplit("-", 1)[0] for arn in executions) == ["left", "right"]
    for slide in ("left", "right"):
        record = cloud.slide_record(slide)
        assert record["status"] == "READY" and record["execution_arn"] in executions
        table = boto3.resource("dynamodb").Table(cloud.settings.catalog_table)
        items = table.query(KeyConditionExpression="pk = :pk", ExpressionAttributeValues={":pk": f"SLIDE#{slide}"})
        objects = [i["sk"] for i in items["Items"] if i["sk"].startswith("OBJECT#")]
        uploaded = [e["detail"]["object"]["key"] for e in events if e["detail"]["object"]["key"].startswith(slide + "/")]  # noqa: E501
        assert len(objects) == len(uploaded) == len(set(uploaded))  # no lost catalog record


def test_a_slide_uploaded_again_while_its_run_is_running_gets_its_own_run(cloud, ingest, sample_slide, slide_copy):
    ingest.upload_and_settle(sample_slide)
    (first,) = cloud.executions()
    execution = boto3.client("stepfunctions").describe_execution(executionArn=first)
    ingest.deliver(execution_status_event(execution, "RUNNING"))
    first_run = cloud.slide_record("sample")["run_id"]
    assert cloud.slide_record("sample", f"RUN#{first_run}")["status"] == "RUNNING"

    # the lab uploads a changed slide (new params.yml, so a new manifest) while the first run runs
    (slide_copy / "params.yml").write_text("segment:\n  expand_um: 3.0\n")
    deliver_concurrently(ingest, ingest.put_folder(slide_copy, "sample"))

    executions = cloud.executions()
    assert len(executions) == 2 and first in executions
    record = cloud.slide_record("sample")
    assert record["run_id"] != first_run and record["status"] == "READY"
    assert cloud.slide_record("sample", f"RUN#{first_run}")["status"] == "RUNNING"  # the first run is untouched
    # and its end is still recorded on its own run
    ingest.deliver(execution_status_event(execution, "SUCCEEDED"))
    assert cloud.slide_record("sample", f"RUN#{first_run}")["status"] == "SUCCEEDED"
    assert cloud.slide_record("sample")["run_id"] == record["run_id"]
