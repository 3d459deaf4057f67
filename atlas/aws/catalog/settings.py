"""Where the catalog Lambdas find their resources, and the AWS clients they use."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cached_property

import boto3

from atlas.aws.s3 import expect_bucket_owner, is_account_id, s3_client

ENV_CATALOG_TABLE = "CATALOG_TABLE"
ENV_IDEMPOTENCY_TABLE = "IDEMPOTENCY_TABLE"
ENV_STATE_MACHINE_ARN = "STATE_MACHINE_ARN"
ENV_NOTIFY_TOPIC_ARN = "NOTIFY_TOPIC_ARN"
ENV_INGEST_BUCKET = "INGEST_BUCKET"
ENV_WORK_BUCKET = "WORK_BUCKET"
ENV_RESULTS_BUCKET = "RESULTS_BUCKET"
ENV_BUCKET_OWNER = "BUCKET_OWNER"
ENV_SERVICE_NAME = "POWERTOOLS_SERVICE_NAME"
ENV_OVERVIEW_SITE_URL = "OVERVIEW_SITE_URL"
SERVICE_NAME = "tissue-atlas"
METRICS_NAMESPACE = "TissueAtlas"


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
    ingest_bucket : str
        Where labs upload slides (the catalog reads them there).
    work_bucket : str
        Scratch bucket of the runs (``s3://<work>/<run_id>/``).
    results_bucket : str
        Where publish puts ``<slide_id>/<run_id>/`` (named in notifications).
    bucket_owner : str
        The AWS account owning those three buckets: every S3 request of the Lambdas to them carries
        it as ``ExpectedBucketOwner`` (:func:`atlas.aws.s3.expect_bucket_owner`).
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
    ingest_bucket: str
    work_bucket: str
    results_bucket: str
    bucket_owner: str
    service_name: str = SERVICE_NAME
    overview_site_url: str | None = None

    _ENV = {"catalog_table": ENV_CATALOG_TABLE, "idempotency_table": ENV_IDEMPOTENCY_TABLE,
            "state_machine_arn": ENV_STATE_MACHINE_ARN, "notify_topic_arn": ENV_NOTIFY_TOPIC_ARN,
            "ingest_bucket": ENV_INGEST_BUCKET, "work_bucket": ENV_WORK_BUCKET, "results_bucket": ENV_RESULTS_BUCKET,
            "bucket_owner": ENV_BUCKET_OWNER, "service_name": ENV_SERVICE_NAME,
            "overview_site_url": ENV_OVERVIEW_SITE_URL}
    _OPTIONAL = ("service_name", "overview_site_url")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Settings from a Lambda's environment (the handler passes ``os.environ``).

        Raises
        ------
        RuntimeError
            Naming every missing variable, or a bucket owner that is not an account id.
        """
        values = {f.name: env.get(cls._ENV[f.name]) for f in fields(cls)}
        missing = [cls._ENV[name] for name, value in values.items() if not value and name not in cls._OPTIONAL]
        if missing:
            raise RuntimeError(f"missing environment variable(s) {', '.join(missing)}; the CDK app "
                               "(infra/catalog.py) sets them from atlas.aws.catalog.Settings.to_env(): redeploy "
                               "the stack, or set them by hand when running a handler outside Lambda")
        if not is_account_id(values["bucket_owner"]):
            raise RuntimeError(f"{ENV_BUCKET_OWNER}={values['bucket_owner']!r} is not an AWS account id (12 digits); "
                               "the CDK app sets the deploying account: redeploy the stack")
        return cls(**{k: v for k, v in values.items() if v})

    def to_env(self) -> dict[str, str]:
        """The Lambda environment carrying these settings (unset optional ones left out)."""
        return {self._ENV[f.name]: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


class Aws:
    """The AWS clients the catalog uses, each made on first use (module-level in a Lambda, so a
    warm function reuses its connections and a cold one builds only the clients it needs)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def s3(self):
        """Every request to the ingest, work and results buckets names their owner."""
        settings = self.settings
        return expect_bucket_owner(s3_client(), settings.bucket_owner,
                                   (settings.ingest_bucket, settings.work_bucket, settings.results_bucket))

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
