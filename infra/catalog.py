"""The catalog: DynamoDB tables, the three Lambdas of ``functions/`` and the EventBridge rules feeding them.

::

    ingest bucket  -- S3 Object Created -------------------> catalog Lambda  (records the object)
    catalog Lambda -- "Slide Object Cataloged" (atlas.aws.catalog) -> trigger Lambda (starts the run once complete)
    state machine  -- Execution Status Change ---------------> status Lambda  (run status, notification)

Table keys, event patterns, environment names and the service name come from :mod:`atlas.aws.catalog`
(which the local demo builds from too), so the handlers, the demo and this app cannot drift apart.
Each Lambda has a dead-letter queue that receives both the events EventBridge could not deliver and
the invocations that failed after Lambda's retries.
"""
from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from atlas.aws import catalog
from atlas.aws.ops import RERUN_PREFIX
from atlas.slide.convention import PARAMS, SLIDE_MANIFEST
from infra.bundling import ARCHITECTURE, RUNTIME, lambda_code
from infra.config import AtlasConfig
from infra.nag import S3_READ_ACTIONS, acknowledge, acknowledge_wildcards, managed_policy_finding


@dataclass(frozen=True)
class _Handler:
    """One Lambda of ``functions/``: its memory (MiB), timeout and reserved concurrency.

    Reserved concurrency caps each function (DynamoDB, S3 and Step Functions see a bounded load, and
    a burst of uploads cannot take the account's whole Lambda concurrency) and guarantees it that
    much; invocations over the cap are throttled and retried by Lambda's async queue, not lost.
    """

    memory_mib: int
    timeout: Duration
    reserved_concurrency: int


def _key(name: str | None) -> dynamodb.Attribute | None:
    return dynamodb.Attribute(name=name, type=dynamodb.AttributeType.STRING) if name else None


def _event_pattern(pattern: dict) -> events.EventPattern:
    return events.EventPattern(source=pattern.get("source"), detail_type=pattern.get("detail-type"),
                               detail=pattern.get("detail"))


class Catalog(Construct):
    """Tables, Lambdas, rules and dead-letter queues of the catalog.

    Attributes
    ----------
    table : dynamodb.Table
        ``pk``/``sk`` items per slide, object and run (see :mod:`atlas.aws.catalog`).
    idempotency_table : dynamodb.Table
        powertools idempotency records (expire by TTL).
    functions : dict of str to lambda_.Function
        ``catalog``, ``trigger``, ``status``.
    dead_letter_queues : dict of str to sqs.Queue
        One per function.
    """

    def __init__(self, scope: Construct, id: str, *, config: AtlasConfig, ingest: s3.IBucket, work: s3.IBucket,
                 results_bucket_name: str, overview_site_url: str, state_machine: sfn.IStateMachine,
                 topic: sns.ITopic) -> None:
        super().__init__(scope, id)
        self.table = dynamodb.Table(
            self, "Table", table_name=config.name("catalog"),
            partition_key=_key(catalog.CATALOG_TABLE.partition_key), sort_key=_key(catalog.CATALOG_TABLE.sort_key),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True),
            deletion_protection=True, removal_policy=RemovalPolicy.RETAIN)
        self.idempotency_table = dynamodb.Table(
            self, "IdempotencyTable",
            partition_key=_key(catalog.IDEMPOTENCY_TABLE.partition_key),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            time_to_live_attribute=catalog.IDEMPOTENCY_TABLE.ttl_attribute,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True),
            removal_policy=RemovalPolicy.DESTROY)  # short-lived dedup records, nothing to keep

        settings = catalog.Settings(
            catalog_table=self.table.table_name, idempotency_table=self.idempotency_table.table_name,
            state_machine_arn=state_machine.state_machine_arn, notify_topic_arn=topic.topic_arn,
            ingest_bucket=ingest.bucket_name, work_bucket=work.bucket_name, results_bucket=results_bucket_name,
            bucket_owner=Stack.of(self).account, overview_site_url=overview_site_url)
        handlers = {
            # Reads OME-XML of cycle files by ranged GETs: memory for tifffile's parse, not for pixels.
            "catalog": _Handler(1024, Duration.minutes(1), 20),
            # Reads every item of the slide and validates it.
            "trigger": _Handler(1024, Duration.minutes(2), 10),
            "status": _Handler(256, Duration.seconds(30), 5),
        }
        patterns = catalog.event_patterns(ingest_bucket=ingest.bucket_name,
                                          state_machine_arn=state_machine.state_machine_arn)
        code = lambda_code()
        self.functions: dict[str, lambda_.Function] = {}
        self.dead_letter_queues: dict[str, sqs.Queue] = {}
        for name, spec in handlers.items():
            title = name.capitalize()
            queue = sqs.Queue(self, f"{title}DeadLetters", enforce_ssl=True,
                              encryption=sqs.QueueEncryption.SQS_MANAGED, retention_period=Duration.days(14))
            function = lambda_.Function(
                self, f"{title}Function", code=code, handler=f"functions.{name}.handler.handler", runtime=RUNTIME,
                architecture=ARCHITECTURE, memory_size=spec.memory_mib, timeout=spec.timeout,
                environment=settings.to_env(), tracing=lambda_.Tracing.ACTIVE, dead_letter_queue=queue,
                reserved_concurrent_executions=spec.reserved_concurrency,
                logging_format=lambda_.LoggingFormat.JSON,
                log_group=logs.LogGroup(self, f"{title}Logs", retention=config.log_retention,
                                        removal_policy=RemovalPolicy.RETAIN))
            acknowledge(function, managed_policy_finding("service-role/AWSLambdaBasicExecutionRole"),
                        "The AWS managed policy only lets the function write its own CloudWatch logs.")
            acknowledge_wildcards(function, "X-Ray's PutTraceSegments/PutTelemetryRecords have no resource-level "
                                  "permissions (active tracing).", resources=["*"])
            acknowledge(function, "AwsSolutions-L1",
                        f"{RUNTIME.name} is the newest runtime within the Pythons the project supports and "
                        "tests (pyproject requires-python < 3.14).")
            events.Rule(self, f"{title}Rule", event_pattern=_event_pattern(patterns[name]),
                        description=f"-> {name} Lambda",
                        targets=[targets.LambdaFunction(function, dead_letter_queue=queue, retry_attempts=8,
                                                        max_event_age=Duration.hours(6))])
            self.table.grant_read_write_data(function)
            self.idempotency_table.grant_read_write_data(function)
            self.functions[name] = function
            self.dead_letter_queues[name] = queue

        for name in ("catalog", "trigger"):  # ranged reads of cycle files; manifest, markers, params
            ingest.grant_read(self.functions[name])
            acknowledge_wildcards(self.functions[name], "Reads objects of any slide in the ingest bucket; the "
                                  "actions are CDK's read-only grant_read set on that bucket.",
                                  actions=S3_READ_ACTIONS, resources=[ingest.arn_for_objects("*")])
        # status: is a succeeded run's overview public? The slide's manifest and params, where the run read
        # them (the upload, or a rerun's params copy in the work bucket).
        slide_files = [(bucket, f"{prefix}*/{name}") for bucket, prefix in ((ingest, ""), (work, f"{RERUN_PREFIX}/"))
                       for name in (SLIDE_MANIFEST, PARAMS)]
        for bucket, pattern in slide_files:
            bucket.grant_read(self.functions["status"], pattern)
        acknowledge_wildcards(self.functions["status"], "Reads the manifest.json and params.yml of any slide (and "
                              "rerun copy); the actions are CDK's read-only grant_read set.", actions=S3_READ_ACTIONS,
                              resources=[bucket.arn_for_objects(pattern) for bucket, pattern in slide_files])
        default_bus = events.EventBus.from_event_bus_name(self, "DefaultBus", "default")
        default_bus.grant_put_events_to(self.functions["catalog"])  # "Slide Object Cataloged"
        state_machine.grant_start_execution(self.functions["trigger"])
        for name in ("trigger", "status"):
            topic.grant_publish(self.functions[name])
            acknowledge_wildcards(self.functions[name], "kms:GenerateDataKey* on the topic's own key only, which "
                                  "SNS needs to encrypt a published message.", actions=["kms:GenerateDataKey*"])
