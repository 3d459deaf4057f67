"""Catalog Lambda: S3 Object Created (EventBridge) -> one catalog item per object, OME metadata by ranged reads."""
import os

from atlas.aws import catalog
from atlas.aws.catalog.lambdas import CatalogFunction

# S3 delivers at least once: each object version (key + version id + sequencer) is handled once.
KEY = "detail.[bucket.name, object.key, object.version_id, object.sequencer]"
function = CatalogFunction(os.environ, idempotency_key=KEY)


def catalog_object(event: catalog.ObjectCreatedEvent) -> dict:
    result = catalog.catalog_event(function.aws, event.detail)
    function.count(f"Objects{result['outcome'].title()}")
    if result.get("ome_bytes_read"):
        function.count("OmeBytesRead", result["ome_bytes_read"], unit="Bytes")
    return result


handler = function.handler(catalog.ObjectCreatedEvent, catalog_object, "object event handled")
