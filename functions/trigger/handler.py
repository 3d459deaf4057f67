"""Trigger Lambda: after each catalog write, start the slide's run once it is complete (or mark it INVALID)."""
import os

from atlas.aws import catalog
from atlas.aws.catalog.lambdas import CatalogFunction

function = CatalogFunction(os.environ, idempotency_key="detail.[slide_id, key, sequencer]")
OUTCOME_METRICS = {"started": "RunsStarted", "invalid": "SlidesInvalid"}


def check_slide(event: catalog.ObjectCatalogedEvent) -> dict:
    result = catalog.check_slide(function.aws, function.settings, event.detail.slide_id)
    if result["outcome"] in OUTCOME_METRICS:
        function.count(OUTCOME_METRICS[result["outcome"]])
    return result


handler = function.handler(catalog.ObjectCatalogedEvent, check_slide, "slide checked")
