"""Catalog Lambda: S3 Object Created (EventBridge) -> one catalog item per object, OME metadata by ranged reads."""
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer, IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.parser import event_parser
from aws_lambda_powertools.utilities.parser.models import S3EventNotificationEventBridgeModel
from aws_lambda_powertools.utilities.typing import LambdaContext

from atlas.aws import catalog

settings = catalog.Settings.from_env()
aws = catalog.Aws(settings)
logger, tracer, metrics = Logger(), Tracer(), Metrics(namespace=catalog.METRICS_NAMESPACE)
# S3 delivers at least once: each object version (key + version id + sequencer) is handled once.
idempotency = IdempotencyConfig(
    event_key_jmespath="detail.[bucket.name, object.key, object.version_id, object.sequencer]",
    raise_on_no_idempotency_key=True)
persistence = DynamoDBPersistenceLayer(table_name=settings.idempotency_table, boto3_client=aws.dynamodb)


@idempotent_function(data_keyword_argument="event", config=idempotency, persistence_store=persistence)
def catalog_object(event: S3EventNotificationEventBridgeModel) -> dict:
    result = catalog.catalog_event(aws, event.detail)
    metrics.add_metric(name=f"Objects{result['outcome'].title()}", unit=MetricUnit.Count, value=1)
    if result.get("ome_bytes_read"):
        metrics.add_metric(name="OmeBytesRead", unit=MetricUnit.Bytes, value=result["ome_bytes_read"])
    return result


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
@event_parser(model=S3EventNotificationEventBridgeModel)
def handler(event: S3EventNotificationEventBridgeModel, context: LambdaContext) -> dict:
    idempotency.register_lambda_context(context)
    result = catalog_object(event=event)
    logger.info("object event handled", extra=result)
    return result
