"""The local event-driven demo: the deployed system's code paths, with AWS emulated on localhost.

``atlas demo`` starts the AWS APIs emulated by moto on a free localhost port and builds what the
CDK app deploys, in miniature: the ingest bucket (versioned, EventBridge notifications on), the work
and results buckets, the catalog and idempotency tables, the notification topic, the state machine
(only its StartExecution bookkeeping is used) and the EventBridge rules -- tables and rules from the
definitions the CDK app uses too (:mod:`atlas.aws.catalog`). Lambdas are replaced by a poller: the
rules deliver to one SQS queue, and every message is handed to the real handler in ``functions/``
that the rule would invoke. Step Functions + Batch are replaced by
:func:`localcloud.executor.execute_run` (the registry's stages as ``atlas stage`` processes against
the emulated S3), framed by real-shaped Step Functions status-change events.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import boto3

from atlas import layout
from atlas.aws import catalog
from localcloud.s3ranges import serve_byte_ranges

REGION = "us-east-1"
ACCOUNT = "123456789012"
FUNCTIONS_DIR = Path(__file__).resolve().parent.parent / "functions"
HANDLERS = catalog.HANDLERS
# Environment of the handlers in the demo: no X-Ray daemon, no CloudWatch, quiet logs.
POWERTOOLS_LOCAL_ENV = {"POWERTOOLS_TRACE_DISABLED": "1", "POWERTOOLS_METRICS_DISABLED": "1",
                        "POWERTOOLS_LOG_LEVEL": "WARNING"}


@contextmanager
def moto_server() -> Iterator[str]:
    """Run moto's server (every AWS API it emulates) on a free localhost port, serving ranged GETs
    without copying whole objects (:mod:`localcloud.s3ranges`); yields its URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    serve_byte_ranges()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def local_aws_env(endpoint: str) -> dict[str, str]:
    """Environment that points boto3 (here and in subprocesses) at the emulated APIs."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}


def load_handler(name: str) -> ModuleType:
    """Import ``functions/<name>/handler.py`` afresh (it reads its settings from the environment)."""
    path = FUNCTIONS_DIR / name / "handler.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the demo from a checkout of the project "
                                "(pip install -e .), which has the functions/ folder")
    spec = importlib.util.spec_from_file_location(f"atlas_function_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class LambdaContext:
    """Stand-in for the Lambda runtime's context object (what powertools reads from it)."""

    function_name: str
    memory_limit_in_mb: int = 1024
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    timeout_s: float = 900.0
    started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return int(max(0.0, self.timeout_s - (time.monotonic() - self.started)) * 1000)


def execution_status_event(execution: dict, status: str, *, error: str | None = None, cause: str | None = None,
                           output: str | None = None) -> dict:
    """A Step Functions Execution Status Change event as EventBridge delivers it.

    Parameters
    ----------
    execution : dict
        ``DescribeExecution`` response of the execution.
    status : {"RUNNING", "SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"}
    """
    now = datetime.now(UTC)
    start = execution["startDate"]
    ended = status != "RUNNING"
    return {
        "version": "0", "id": str(uuid.uuid4()), "detail-type": catalog.EXECUTION_STATUS_CHANGE,
        "source": "aws.states", "account": ACCOUNT, "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "region": REGION,
        "resources": [execution["executionArn"]],
        "detail": {
            "executionArn": execution["executionArn"], "stateMachineArn": execution["stateMachineArn"],
            "name": execution["name"], "status": status,
            "startDate": int(start.timestamp() * 1000), "stopDate": int(now.timestamp() * 1000) if ended else None,
            "input": execution["input"], "output": output, "inputDetails": {"included": True},
            "outputDetails": {"included": True} if output is not None else None,
            "error": error, "cause": cause, "redriveCount": 0, "redriveDate": None,
            "redriveStatus": "NOT_REDRIVABLE" if status in ("RUNNING", "SUCCEEDED") else "REDRIVABLE",
            "redriveStatusReason": "Execution is RUNNING and cannot be redriven" if status == "RUNNING" else None,
        },
    }


@dataclass
class LocalCloud:
    """The deployed resources, emulated: create them with :meth:`create`, then :meth:`pump` events."""

    settings: catalog.Settings
    ingest_bucket: str
    events_queue_url: str
    notify_queue_url: str
    patterns: dict[str, dict]
    site_bucket: str = ""  # the overview site (CloudFront's origin when deployed): overviews + the portal
    handlers: dict[str, ModuleType] = field(default_factory=dict)
    delivered: list[tuple[str, dict, dict]] = field(default_factory=list)  # (handler, event, result)
    _sequence: int = 0
    _started: set[str] = field(default_factory=set)

    @classmethod
    def create(cls, prefix: str = "atlas-demo") -> LocalCloud:
        """Create every resource (boto3 defaults: the environment says where the APIs are)."""
        s3, ddb, sqs, sns = (boto3.client(n, region_name=REGION) for n in ("s3", "dynamodb", "sqs", "sns"))
        events, sfn = boto3.client("events", region_name=REGION), boto3.client("stepfunctions", region_name=REGION)
        ingest, work, results, site = f"{prefix}-ingest", f"{prefix}-work", f"{prefix}-results", f"{prefix}-site"
        for bucket in (ingest, work, results, site):
            s3.create_bucket(Bucket=bucket)
        s3.put_bucket_versioning(Bucket=ingest, VersioningConfiguration={"Status": "Enabled"})
        s3.put_bucket_notification_configuration(Bucket=ingest,
                                                 NotificationConfiguration={"EventBridgeConfiguration": {}})
        for name, schema in (("catalog", catalog.CATALOG_TABLE), ("idempotency", catalog.IDEMPOTENCY_TABLE)):
            ddb.create_table(TableName=f"{prefix}-{name}", BillingMode="PAY_PER_REQUEST",
                             **schema.create_table_arguments())
        topic = sns.create_topic(Name=f"{prefix}-notify")["TopicArn"]
        notify_queue = sqs.create_queue(QueueName=f"{prefix}-notify-inbox")["QueueUrl"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=_queue_arn(sqs, notify_queue))
        machine = sfn.create_state_machine(
            name=f"{prefix}-pipeline", roleArn=f"arn:aws:iam::{ACCOUNT}:role/{prefix}-pipeline",
            definition=json.dumps({"StartAt": "Stages", "States": {"Stages": {"Type": "Pass", "End": True}}}),
        )["stateMachineArn"]
        events_queue = sqs.create_queue(QueueName=f"{prefix}-events")["QueueUrl"]
        patterns = catalog.event_patterns(ingest_bucket=ingest, state_machine_arn=machine)
        for name, pattern in patterns.items():  # the deployed rules, each delivering to the poller's queue
            events.put_rule(Name=f"{prefix}-{name}", EventPattern=json.dumps(pattern), State="ENABLED")
            events.put_targets(Rule=f"{prefix}-{name}",
                               Targets=[{"Id": "poller", "Arn": _queue_arn(sqs, events_queue)}])
        settings = catalog.Settings(catalog_table=f"{prefix}-catalog", idempotency_table=f"{prefix}-idempotency",
                                    state_machine_arn=machine, notify_topic_arn=topic, ingest_bucket=ingest,
                                    work_bucket=work, results_bucket=results, bucket_owner=ACCOUNT)
        return cls(settings=settings, ingest_bucket=ingest, events_queue_url=events_queue,
                   notify_queue_url=notify_queue, patterns=patterns, site_bucket=site)

    def load_handlers(self) -> None:
        """Set the Lambdas' environment in this process and import the three handlers."""
        os.environ.update(self.settings.to_env())
        for key, value in POWERTOOLS_LOCAL_ENV.items():
            os.environ.setdefault(key, value)
        self.handlers = {name: load_handler(name) for name in HANDLERS}

    def invoke(self, name: str, event: dict) -> dict:
        """Call one handler as Lambda would (the event as EventBridge delivers it)."""
        result = self.handlers[name].handler(event, LambdaContext(function_name=f"atlas-{name}"))
        self.delivered.append((name, event, result))
        return result

    def route(self, event: dict) -> str:
        """Which handler the deployed rules send an event to (EventBridge's matching, as moto implements it)."""
        from moto.events.models import EventPattern

        for name, pattern in self.patterns.items():
            if EventPattern.load(json.dumps(pattern)).matches_event(event):
                return name
        raise ValueError(f"no rule matches the event of source {event.get('source')!r}, detail-type "
                         f"{event.get('detail-type')!r}: the rules are atlas.aws.catalog.event_patterns()")

    def as_delivered(self, event: dict) -> dict:
        """An event moto 5.2 delivered, as AWS sends it: with the ``account`` field (moto leaves it
        out), and for S3 events ``etag`` (moto: ``eTag``), an ISO time (moto: a number) and a
        sequencer that grows per event (moto sends one constant value for all)."""
        event = {"account": ACCOUNT} | event
        if event.get("source") != "aws.s3":
            return event
        self._sequence += 1
        obj = dict(event["detail"]["object"])
        obj["etag"] = obj.pop("eTag", obj.get("etag"))
        obj["sequencer"] = f"{self._sequence:018X}"
        time_ = event["time"]
        if isinstance(time_, (int, float)):
            time_ = datetime.fromtimestamp(time_, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return event | {"time": time_, "detail": event["detail"] | {"object": obj}}

    def receive(self, wait_s: float = 0) -> list[dict]:
        """Take up to 10 events off the rules' queue, as AWS would deliver them to the Lambdas."""
        sqs = boto3.client("sqs", region_name=REGION)
        messages = sqs.receive_message(QueueUrl=self.events_queue_url, MaxNumberOfMessages=10,
                                       WaitTimeSeconds=int(wait_s)).get("Messages", [])
        for message in messages:
            sqs.delete_message(QueueUrl=self.events_queue_url, ReceiptHandle=message["ReceiptHandle"])
        return [self.as_delivered(json.loads(m["Body"])) for m in messages]

    def pump(self, *, on_execution: Callable[[str], None] | None = None, on_event=None, wait_s: float = 1,
             idle_polls: int = 2) -> None:
        """Deliver queued events to their handlers until the queue stays empty and no new execution
        was started; each new execution is handed to ``on_execution(execution_arn)`` first."""
        idle = 0
        while idle < idle_polls:
            events = self.receive(wait_s)
            for event in events:
                name = self.route(event)
                result = self.invoke(name, event)
                if on_event is not None:
                    on_event(name, event, result)
            new = [arn for arn in self.executions() if arn not in self._started]
            for arn in new:
                self._started.add(arn)
                if on_execution is not None:
                    on_execution(arn)
            idle = 0 if events or new else idle + 1

    def executions(self) -> list[str]:
        sfn = boto3.client("stepfunctions", region_name=REGION)
        listed = sfn.list_executions(stateMachineArn=self.settings.state_machine_arn)["executions"]
        return sorted(e["executionArn"] for e in listed)

    def run_execution(self, execution_arn: str, env: dict[str, str]) -> tuple[dict, list]:
        """Run an execution's stages locally, telling the status handler as Step Functions would.

        Returns the status handler's last result and the jobs run (:class:`localcloud.executor.StepResult`,
        empty when a job failed).
        """
        from atlas.aws.release import OVERVIEW_BUCKET_ENV, RESULTS_BUCKET_ENV
        from atlas.aws.s3 import BUCKET_OWNER_ENV
        from localcloud.executor import StageJobFailed, execute_run

        sfn = boto3.client("stepfunctions", region_name=REGION)
        execution = sfn.describe_execution(executionArn=execution_arn)
        payload = json.loads(execution["input"])
        self.invoke("status", execution_status_event(execution, "RUNNING"))
        try:
            steps = execute_run(payload["slide_uri"], payload["work_uri"], payload["run_id"],
                                env=env | {RESULTS_BUCKET_ENV: self.settings.results_bucket,
                                           OVERVIEW_BUCKET_ENV: self.site_bucket,
                                           BUCKET_OWNER_ENV: self.settings.bucket_owner},
                                sizes=payload.get("sizes"))
        except StageJobFailed as exc:
            error = exc.exit_code.name if exc.exit_code is not None else "States.TaskFailed"
            event = execution_status_event(execution, "FAILED", error=error, cause=str(exc))
            return self.invoke("status", event), []
        output = json.dumps({"results_uri": catalog.results_uri(self.settings, payload["slide_id"], payload["run_id"])})
        return self.invoke("status", execution_status_event(execution, "SUCCEEDED", output=output)), steps

    def slide_record(self, slide_id: str, sk: str = catalog.SLIDE_SK) -> dict:
        """A catalog item of the slide (``SLIDE``, ``RUN#<run_id>``, ``OBJECT#<key>``) in plain JSON types."""
        table = boto3.resource("dynamodb", region_name=REGION).Table(self.settings.catalog_table)
        return catalog.from_dynamo(table.get_item(Key={"pk": catalog.slide_pk(slide_id), "sk": sk}).get("Item", {}))

    def notifications(self) -> list[dict]:
        """Messages the topic sent so far (``Subject``, ``Message``), oldest first; consumes them."""
        sqs = boto3.client("sqs", region_name=REGION)
        found = []
        while messages := sqs.receive_message(QueueUrl=self.notify_queue_url, MaxNumberOfMessages=10,
                                              WaitTimeSeconds=0).get("Messages", []):
            for message in messages:
                found.append(json.loads(message["Body"]))
                sqs.delete_message(QueueUrl=self.notify_queue_url, ReceiptHandle=message["ReceiptHandle"])
        return found


def _queue_arn(sqs, queue_url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def download_prefix(bucket: str, prefix: str, target: Path) -> list[Path]:
    """Copy every object under ``s3://bucket/prefix`` to ``target`` (same relative paths)."""
    s3 = boto3.client("s3", region_name=REGION)
    written = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            path = target / obj["Key"][len(prefix):]
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(path))
            written.append(path)
    return written


JOBS_FILE = "jobs.json"  # in the demo's output folder: the jobs of the last execution


def write_jobs(path: Path, steps, work_bucket: str, run_id: str) -> None:
    """``[{"job", "stage", "item", "merge", "seconds", "cpu_seconds", "peak_rss_bytes", "record"}, ...]``: the
    jobs run (:class:`localcloud.executor.StepResult`) in order, each with its completion record from
    the run's work prefix (what it read, wrote and held as scratch; None where it left none)."""
    s3 = boto3.client("s3", region_name=REGION)

    def record(step) -> dict | None:
        key = f"{run_id}/{layout.completion_record(step.stage, step.item)}"
        try:
            return json.loads(s3.get_object(Bucket=work_bucket, Key=key)["Body"].read())
        except s3.exceptions.NoSuchKey:
            return None

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"job": s.label, "stage": s.stage, "item": s.item, "merge": s.merge,
                                 "seconds": round(s.seconds, 3), "cpu_seconds": round(s.cpu_seconds, 3),
                                 "peak_rss_bytes": s.peak_rss_bytes, "record": record(s)} for s in steps],
                               indent=1) + "\n")


@dataclass(frozen=True)
class DemoResult:
    """Where the demo left things.

    Attributes
    ----------
    slide_dir : Path
        The slide that was uploaded (the made sample, or the folder given).
    record : dict
        The slide's catalog item at the end.
    results_dir : Path or None
        The downloaded copy of the run's results (None when the run did not succeed).
    overview : Path or None
        ``results_dir/overview/index.html``.
    notifications : list of dict
        What the lab was told (SNS message envelopes).
    portal : Path or None
        ``<out>/site/index.html``: the overview site as published (the portal, each overview below it).
    steps : tuple of localcloud.executor.StepResult
        The jobs the run's execution ran, in order (each its own process), with their time and peak RSS.
    """

    slide_dir: Path
    record: dict
    results_dir: Path | None
    overview: Path | None
    notifications: list[dict]
    portal: Path | None = None
    steps: tuple = ()


def run_demo(out_dir: Path, *, slide_dir: Path | None = None, say: Callable[[str], None] = print,
             progress=None) -> DemoResult:
    """Upload a slide (default: make the sample slide) to the emulated ingest bucket and let the events run it.

    Parameters
    ----------
    out_dir : Path
        Receives ``sample/<slide_id>/`` (the made sample, when no ``slide_dir`` is given), ``jobs.json``
        (each job of the run: its time, its process's peak RSS and CPU time, its completion record:
        :func:`write_jobs`),
        ``results/<slide_id>/<run_id>/`` (a copy of the published results) and ``site/`` (a copy of
        the overview site: the portal's ``index.html`` and ``index.json``, each overview at
        ``<slide_id>/<run_id>/``).
    slide_dir : Path, optional
        A slide folder to upload instead of the sample (its name is the slide id), e.g. one made by
        ``atlas sample DIR --rows R --cols C``; it is validated before anything is uploaded.
    say : callable
        Gets one line per step.
    progress : rich.progress.Progress, optional
        Shows the upload.
    """
    from atlas.aws.upload import upload_slide
    from atlas.slide.sample import make_sample

    out_dir = Path(out_dir)
    if slide_dir is None:
        say("making the sample slide ...")
        slide_dir, _truth = make_sample(out_dir / "sample")
    ran: list = []
    saved = dict(os.environ)
    with moto_server() as endpoint:
        aws_env = local_aws_env(endpoint)
        os.environ.pop("AWS_PROFILE", None)
        os.environ.update(aws_env)
        try:
            say(f"AWS APIs emulated at {endpoint} (moto)")
            cloud = LocalCloud.create()
            cloud.load_handlers()
            uploaded = upload_slide(slide_dir, f"s3://{cloud.ingest_bucket}/", progress=progress)
            say(f"uploaded {len(uploaded.uploaded)} files to s3://{cloud.ingest_bucket}/{uploaded.slide_id}/, "
                "manifest.json last")

            def on_event(name: str, event: dict, result: dict) -> None:
                if name == "catalog":
                    say(f"  catalog  {result.get('key')}: {result['outcome']}")
                elif name == "trigger" and result["outcome"] not in ("decided", "stale"):
                    detail = result.get("run_id") or ", ".join(result.get("missing", [])) or ""
                    say(f"  trigger  {result['slide_id']}: {result['status']} ({result['outcome']}) {detail}")

            def on_execution(arn: str) -> None:
                say(f"  execution {arn.rsplit(':', 1)[-1]} started: running the stages as `atlas stage` jobs ...")
                result, steps = cloud.run_execution(arn, aws_env)
                ran.extend(steps)
                write_jobs(out_dir / JOBS_FILE, steps, cloud.settings.work_bucket, arn.rsplit(":", 1)[-1])
                for step in steps:
                    say(f"    job  {step.label:<16} {step.seconds:6.1f} s  {step.peak_rss_bytes / 2**20:7.0f} MiB")
                say(f"  status   {result.get('run_id')}: {result['status']}")

            cloud.pump(on_execution=on_execution, on_event=on_event)
            record = cloud.slide_record(uploaded.slide_id)
            notes = cloud.notifications()
            results_dir = overview = portal = None
            if record.get("status") == catalog.Status.SUCCEEDED:
                results_dir = out_dir / "results" / uploaded.slide_id / record["run_id"]
                download_prefix(cloud.settings.results_bucket, f"{uploaded.slide_id}/{record['run_id']}/",
                                results_dir)
                overview = results_dir / layout.OVERVIEW / layout.OVERVIEW_PAGE
                download_prefix(cloud.site_bucket, "", out_dir / "site")
                portal = out_dir / "site" / layout.OVERVIEW_PAGE
            return DemoResult(slide_dir, record, results_dir, overview, notes, portal, tuple(ran))
        finally:
            os.environ.clear()
            os.environ.update(saved)
