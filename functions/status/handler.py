"""Status Lambda: Step Functions execution status changes -> run and slide status.

Sends a notification when a run ends.
"""
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer, IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.parser import event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext

from atlas.aws import catalog

settings = catalog.Settings.from_env()
aws = catalog.Aws(settings)
logger, tracer, metrics = Logger(), Tracer(), Metrics(namespace=catalog.METRICS_NAMESPACE)
idempotency = IdempotencyConfig(event_key_jmespath="detail.[execution_arn, status, redrive_count]",
                                raise_on_no_idempotency_key=True)
persistence = DynamoDBPersistenceLayer(table_name=settings.idempotency_table, boto3_client=aws.dynamodb)


@idempotent_function(data_keyword_argument="event", config=idempotency, persistence_store=persistence)
def record_status(event: catalog.ExecutionStatusEvent) -> dict:
    result = catalog.record_execution_status(aws, settings, event.detail)
    if result["outcome"] == "recorded" and result["status"] in (catalog.Status.SUCCEEDED, catalog.Status.FAILED):
        metrics.add_metric(name=f"Runs{result['status'].title()}", unit=MetricUnit.Count, value=1)
    return result


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
@event_parser(model=catalog.ExecutionStatusEvent)
def handler(event: catalog.ExecutionStatusEvent, context: LambdaContext) -> dict:
    idempotency.register_lambda_context(context)
    result = record_status(event=event)
    logger.info("execution status recorded", extra=result)
    return result
