"""Status Lambda: Step Functions status changes -> run and slide status; a notification when a run ends."""
import os

from atlas.aws import catalog
from atlas.aws.catalog.lambdas import CatalogFunction

function = CatalogFunction(os.environ, idempotency_key="detail.[execution_arn, status, redrive_count]")


def record_status(event: catalog.ExecutionStatusEvent) -> dict:
    result = catalog.record_execution_status(function.aws, function.settings, event.detail)
    if result["outcome"] == "recorded" and result["status"] in catalog.ENDED:
        function.count(f"Runs{result['status'].title()}")
    return result


handler = function.handler(catalog.ExecutionStatusEvent, record_status, "execution status recorded")
