"""Trigger Lambda: after each catalog write, start the slide's run once it is complete (or mark it INVALID)."""
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer, IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.parser import event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext

from atlas.aws import catalog

settings = catalog.Settings.from_env()
aws = catalog.Aws(settings)
logger, tracer, metrics = Logger(), Tracer(), Metrics(namespace=catalog.METRICS_NAMESPACE)
idempotency = IdempotencyConfig(event_key_jmespath="detail.[slide_id, key, sequencer]",
                                raise_on_no_idempotency_key=True)
persistence = DynamoDBPersistenceLayer(table_name=settings.idempotency_table, boto3_client=aws.dynamodb)
OUTCOME_METRICS = {"started": "RunsStarted", "invalid": "SlidesInvalid"}


@idempotent_function(data_keyword_argument="event", config=idempotency, persistence_store=persistence)
def check_slide(event: catalog.ObjectCatalogedEvent) -> dict:
    result = catalog.check_slide(aws, settings, event.detail.slide_id)
    if result["outcome"] in OUTCOME_METRICS:
        metrics.add_metric(name=OUTCOME_METRICS[result["outcome"]], unit=MetricUnit.Count, value=1)
    return result


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
@event_parser(model=catalog.ObjectCatalogedEvent)
def handler(event: catalog.ObjectCatalogedEvent, context: LambdaContext) -> dict:
    idempotency.register_lambda_context(context)
    result = check_slide(event=event)
    logger.info("slide checked", extra=result)
    return result
