"""What the three catalog Lambdas share: settings from their environment, clients, powertools, idempotency.

A handler module (``functions/<name>/handler.py``) makes one :class:`CatalogFunction` at import (a
cold start), passing ``os.environ``, and gets its entry point from :meth:`CatalogFunction.handler`:
parse the event model -> the library call, once per idempotency key -> log and return its result.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer, IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.parser import event_parser
from pydantic import BaseModel

from atlas.aws.catalog.settings import METRICS_NAMESPACE, Aws, Settings


class CatalogFunction:
    """One catalog Lambda: its settings and clients, powertools' Logger/Tracer/Metrics and idempotency.

    Parameters
    ----------
    env : mapping
        The Lambda's environment (``os.environ``), read once (:meth:`Settings.from_env`).
    idempotency_key : str
        JMESPath into the event of what makes two deliveries the same event (EventBridge delivers
        at least once); its records live in the idempotency table.
    """

    def __init__(self, env: Mapping[str, str], *, idempotency_key: str):
        self.settings = Settings.from_env(env)
        self.aws = Aws(self.settings)
        self.logger, self.tracer = Logger(), Tracer()
        self.metrics = Metrics(namespace=METRICS_NAMESPACE)
        self.idempotency = IdempotencyConfig(event_key_jmespath=idempotency_key, raise_on_no_idempotency_key=True)
        self.persistence = DynamoDBPersistenceLayer(table_name=self.settings.idempotency_table,
                                                    boto3_client=self.aws.dynamodb)

    def count(self, name: str, value: float = 1, unit: MetricUnit = MetricUnit.Count) -> None:
        """Add one CloudWatch metric (flushed when the invocation ends)."""
        self.metrics.add_metric(name=name, unit=unit, value=value)

    def handler(self, model: type[BaseModel], work: Callable[..., dict], message: str) -> Callable:
        """The Lambda entry point: ``work(event=<model>)`` once per idempotency key, its result logged.

        ``work`` is a module-level function of the handler module (its name keys the idempotency
        records); a repeated delivery gets the first result back without running it again.
        """
        once = idempotent_function(data_keyword_argument="event", config=self.idempotency,
                                   persistence_store=self.persistence)(work)

        @self.logger.inject_lambda_context
        @self.tracer.capture_lambda_handler
        @self.metrics.log_metrics
        @event_parser(model=model)
        def handler(event: BaseModel, context) -> dict:
            self.idempotency.register_lambda_context(context)
            result = once(event=event)
            self.logger.info(message, extra=result)
            return result

        return handler
