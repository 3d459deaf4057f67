"""Published results for external analysts: list, price, download and lazily read, on their own account.

The results bucket is **requester pays** and lives in **us-east-1** (see docs/external-access.md):
every request must say ``x-amz-request-payer: requester`` (the reader's account pays its requests
and transfer) and reading from inside us-east-1 costs no transfer. Every S3 client this package
uses or is given gets that header on every request (:func:`atlas.aws.s3.requester_pays`).

One module per concern:

- :mod:`~atlas.aws.access.releases` -- :func:`list_published_slides`, :func:`list_releases`,
  :func:`get_release` (the manifest), :func:`parse_levels`, the results client;
- :mod:`~atlas.aws.access.cost` -- :func:`estimate_cost` and the one price table :data:`PRICES`;
- :mod:`~atlas.aws.access.download` -- :func:`download_release` (parallel ranged GETs, resumable,
  sha256-checked);
- :mod:`~atlas.aws.access.lazy` -- :func:`open_zarr` (the Level 2 OME-Zarr as a lazy ``zarr.Array``;
  one GET per chunk touched);
- :mod:`~atlas.aws.access.errors` -- S3 refusals as errors that say how to get access.

The bucket is always given by the caller (the CLI takes ``--bucket`` or env ``ATLAS_RESULTS_BUCKET``).
"""
from atlas.aws.access.cost import (
    GIB,
    PART_SIZE,
    PRICES,
    CostEstimate,
    PriceTable,
    Scenario,
    estimate_cost,
    internet_transfer_usd,
    parts_of,
)
from atlas.aws.access.download import PART_SUFFIX, STATE_SUFFIX, CorruptFile, DownloadResult, download_release
from atlas.aws.access.errors import HOW_TO_GET_ACCESS, AccessError, NotPublished, access_error
from atlas.aws.access.lazy import open_zarr, open_zarr_group, release_store
from atlas.aws.access.releases import (
    DOWNLOAD_THREADS,
    LEVEL_NAMES,
    QC_TOKEN,
    Item,
    PublishedRelease,
    ReleasedFile,
    SlideSummary,
    get_release,
    items,
    latest_run,
    list_published_slides,
    list_releases,
    parse_levels,
    results_bucket,
    results_client,
    select,
)

__all__ = [
    "DOWNLOAD_THREADS", "GIB", "HOW_TO_GET_ACCESS", "LEVEL_NAMES", "PART_SIZE", "PART_SUFFIX", "PRICES", "QC_TOKEN",
    "STATE_SUFFIX", "AccessError", "CorruptFile", "CostEstimate", "DownloadResult", "Item", "NotPublished",
    "PriceTable", "PublishedRelease", "ReleasedFile", "Scenario", "SlideSummary", "access_error", "download_release",
    "estimate_cost", "get_release", "internet_transfer_usd", "items", "latest_run", "list_published_slides",
    "list_releases", "open_zarr", "open_zarr_group", "parse_levels", "parts_of", "release_store", "results_bucket",
    "results_client", "select",
]
