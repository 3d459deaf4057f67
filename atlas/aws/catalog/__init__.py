"""The catalog: what arrived in the ingest bucket, when a slide is complete, and what became of its runs.

Three Lambda handlers (``functions/{catalog,trigger,status}``) are thin shells around this package,
one module per concern:

- :mod:`~atlas.aws.catalog.objects` -- ``catalog``: one S3 Object Created event -> one catalog item
  per object (size, ETag, version id, sequencer, the uploader's sha256, the OME metadata of cycle
  files by ranged reads), then ``Slide Object Cataloged`` so the trigger looks after the write;
- :mod:`~atlas.aws.catalog.trigger` -- ``trigger``: is the slide complete and valid? then exactly one
  run (:mod:`~atlas.aws.catalog.runs`, shared with ``atlas rerun``), else INVALID with every problem;
- :mod:`~atlas.aws.catalog.status` -- ``status``: Step Functions status changes -> run and slide
  status, forward only, and the notification when a run ends;
- :mod:`~atlas.aws.catalog.table` (key schema, item keys, states), :mod:`~atlas.aws.catalog.events`
  (event patterns and models), :mod:`~atlas.aws.catalog.settings` (the Lambdas' environment),
  :mod:`~atlas.aws.catalog.lambdas` (the handlers' shared powertools setup).

The CDK app (``infra/catalog.py``) and the local demo (``localcloud/demo.py``) build tables, rules
and environment from the same definitions, so they cannot drift apart. The names below are the
package's API.
"""
from atlas.aws.catalog.events import (
    CATALOG_EVENT_SOURCE,
    EXECUTION_STATUS_CHANGE,
    HANDLERS,
    OBJECT_CATALOGED,
    ExecutionStatusDetail,
    ExecutionStatusEvent,
    ObjectCatalogedDetail,
    ObjectCatalogedEvent,
    ObjectCreatedEvent,
    event_patterns,
)
from atlas.aws.catalog.objects import SHA256_METADATA, catalog_event, cycle_metadata_from_item, record_object
from atlas.aws.catalog.runs import execution_input, mark_ready, start_run
from atlas.aws.catalog.settings import (
    ENV_BUCKET_OWNER,
    ENV_CATALOG_TABLE,
    ENV_IDEMPOTENCY_TABLE,
    ENV_INGEST_BUCKET,
    ENV_NOTIFY_TOPIC_ARN,
    ENV_OVERVIEW_SITE_URL,
    ENV_RESULTS_BUCKET,
    ENV_SERVICE_NAME,
    ENV_STATE_MACHINE_ARN,
    ENV_WORK_BUCKET,
    METRICS_NAMESPACE,
    SERVICE_NAME,
    Aws,
    Settings,
)
from atlas.aws.catalog.status import overview_uri, record_execution_status, results_uri
from atlas.aws.catalog.table import (
    CATALOG_TABLE,
    ENDED,
    IDEMPOTENCY_TABLE,
    RUN_SK_PREFIX,
    SLIDE_SK,
    STATUS_RANK,
    Status,
    TableSchema,
    from_dynamo,
    run_key,
    run_status,
    slide_id_of,
    slide_items,
    slide_key,
    slide_pk,
    timestamp,
    to_dynamo,
)
from atlas.aws.catalog.trigger import check_slide

__all__ = [
    "CATALOG_EVENT_SOURCE", "CATALOG_TABLE", "ENDED", "ENV_BUCKET_OWNER", "ENV_CATALOG_TABLE", "ENV_IDEMPOTENCY_TABLE",
    "ENV_INGEST_BUCKET",
    "ENV_NOTIFY_TOPIC_ARN", "ENV_OVERVIEW_SITE_URL", "ENV_RESULTS_BUCKET", "ENV_SERVICE_NAME",
    "ENV_STATE_MACHINE_ARN", "ENV_WORK_BUCKET", "EXECUTION_STATUS_CHANGE", "HANDLERS", "IDEMPOTENCY_TABLE",
    "METRICS_NAMESPACE", "OBJECT_CATALOGED", "RUN_SK_PREFIX", "SERVICE_NAME", "SHA256_METADATA", "SLIDE_SK",
    "STATUS_RANK", "Aws", "ExecutionStatusDetail", "ExecutionStatusEvent", "ObjectCatalogedDetail",
    "ObjectCatalogedEvent", "ObjectCreatedEvent", "Settings", "Status", "TableSchema", "catalog_event", "check_slide",
    "cycle_metadata_from_item", "event_patterns", "execution_input", "from_dynamo", "mark_ready", "overview_uri",
    "record_execution_status", "record_object", "results_uri", "run_key", "run_status", "slide_id_of",
    "slide_items", "slide_key", "slide_pk", "start_run", "timestamp", "to_dynamo",
]
