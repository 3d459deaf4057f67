"""The two stacks and the app: composition only, every resource is made by a construct of ``infra/``.

``<prefix>-results`` (always us-east-1)
    Published results bucket, requester pays, grants to external accounts, its log bucket.
    A stack of its own so the data outlives and is independent of the processing side, and can
    stay put in us-east-1 whatever region processing moves to.
``<prefix>-pipeline`` (the configured region)
    Ingest and work buckets, overview site, catalog, Batch, the state machine, notifications, alarms.
    It finds the results bucket by its fixed name, so no cross-region reference is needed.
"""
from __future__ import annotations

from aws_cdk import App, CfnOutput, Environment, Stack, Tags
from aws_cdk import aws_s3 as s3
from constructs import Construct

from atlas.aws.release import OVERVIEW_BUCKET_ENV, RESULTS_BUCKET_ENV
from atlas.aws.s3 import BUCKET_OWNER_ENV
from infra.access import ResultsAccess
from infra.catalog import Catalog
from infra.compute import BatchCompute, stage_images
from infra.config import AtlasConfig
from infra.monitoring import Alarms, Notifications
from infra.nag import add_checks
from infra.site import OverviewSite
from infra.storage import PipelineStorage, ResultsStorage, results_bucket_name
from infra.workflow import Pipeline


class ResultsStack(Stack):
    """The requester-pays results bucket in us-east-1 (see module docstring)."""

    def __init__(self, scope: Construct, *, config: AtlasConfig) -> None:
        name = config.name("results")
        super().__init__(scope, name, stack_name=name, termination_protection=True,
                         env=Environment(account=config.account, region=config.results_region),
                         description="Tissue Atlas published results: requester-pays bucket with grants")
        self.storage = ResultsStorage(self, "Storage", config=config)
        self.access = ResultsAccess(self, "Access", bucket=self.storage.bucket,
                                    grantee_account_ids=config.grantee_account_ids)
        CfnOutput(self, "ResultsBucketName", value=self.storage.bucket.bucket_name,
                  description="Requester-pays bucket analysts read with --request-payer requester")


class PipelineStack(Stack):
    """Everything that ingests and processes slides (see module docstring)."""

    def __init__(self, scope: Construct, *, config: AtlasConfig) -> None:
        name = config.name("pipeline")
        super().__init__(scope, name, stack_name=name,
                         env=Environment(account=config.account, region=config.region),
                         description="Tissue Atlas ingest and processing: catalog, Batch, Step Functions")
        self.storage = PipelineStorage(self, "Storage", config=config)
        self.site = OverviewSite(self, "Overview", log_bucket=self.storage.log_bucket)
        self.notifications = Notifications(self, "Notifications", config=config)
        results = s3.Bucket.from_bucket_name(self, "ResultsBucket", results_bucket_name(config))

        self.compute = BatchCompute(
            self, "Batch", config=config, images=stage_images(self, config),
            environment={RESULTS_BUCKET_ENV: results.bucket_name, OVERVIEW_BUCKET_ENV: self.site.bucket.bucket_name,
                         BUCKET_OWNER_ENV: self.account},  # every bucket of the app is the deploying account's
            flow_log_bucket=self.storage.log_bucket)
        # Raw data is only read; published results and overviews are only added, never deleted.
        self.compute.grant_buckets(ingest=self.storage.ingest, work=self.storage.work,
                                   publish=[results, self.site.bucket])

        self.pipeline = Pipeline(self, "Pipeline", config=config, jobs=list(self.compute.jobs.values()))
        self.catalog = Catalog(self, "Catalog", config=config, ingest=self.storage.ingest, work=self.storage.work,
                               results_bucket_name=results.bucket_name, overview_site_url=self.site.url,
                               state_machine=self.pipeline.state_machine, topic=self.notifications.topic)
        self.alarms = Alarms(self, "Alarms", topic=self.notifications.topic, state_machine=self.pipeline.state_machine,
                             functions=self.catalog.functions, dead_letter_queues=self.catalog.dead_letter_queues)

        for output, value, description in (
                ("IngestBucketName", self.storage.ingest.bucket_name, "Labs upload slides here (atlas upload)"),
                ("OverviewUrl", self.site.url,
                 "Overview pages: <url><slide_id>/<run_id>/index.html"),
                ("StateMachineArn", self.pipeline.state_machine.state_machine_arn, "One execution per run"),
                ("CatalogTableName", self.catalog.table.table_name, "Slide, object and run status"),
                ("NotificationTopicArn", self.notifications.topic.topic_arn, "Run results and alarms")):
            CfnOutput(self, output, value=value, description=description)


def build_app(app: App, config: AtlasConfig) -> tuple[ResultsStack, PipelineStack]:
    """Add both stacks for ``config`` to ``app``, tag everything and enable the cdk-nag checks."""
    results = ResultsStack(app, config=config)
    pipeline = PipelineStack(app, config=config)
    pipeline.add_stack_dependency(results, "jobs publish into the results bucket")
    for key, value in config.tags.items():
        Tags.of(app).add(key, value)
    add_checks(app)
    return results, pipeline
