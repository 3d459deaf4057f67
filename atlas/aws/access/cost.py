"""What reading a release costs the requester: the price table and the estimate of ``atlas data cost``."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from atlas.aws.access.releases import PublishedRelease, select
from atlas.aws.release import RESULTS_REGION
from atlas.errors import InvalidInput, Problem

PART_SIZE = 8 * 2**20                   # bytes per ranged GET of a download
GIB = 2**30                             # AWS bills transfer per "GB" of 2**30 bytes


@dataclass(frozen=True)
class PriceTable:
    """What a requester pays to read a requester-pays bucket in us-east-1 (USD, before tax).

    Attributes
    ----------
    as_of, source : str
        When the prices were taken, and from where.
    get_per_1000 : float
        GET, HEAD and all other read requests (S3 Standard and Intelligent-Tiering, same price).
    list_per_1000 : float
        LIST requests (each lists up to 1,000 keys).
    internet_tiers : tuple of (float, float)
        Data transfer out to the internet: (tier size in GB per month, price per GB), in order.
    same_region_per_gb : float
        Transfer to AWS services in us-east-1 (EC2, SageMaker, Lambda, ...).
    other_region_per_gb : float
        Transfer from us-east-1 to another AWS region, unless listed in ``region_per_gb``.
    region_per_gb : mapping of str to float
        Inter-region prices that differ from ``other_region_per_gb``.
    nat_gateway_per_gb : float
        NAT gateway data processing in us-east-1, paid when an instance reaches S3 through a NAT
        gateway instead of a (free) S3 gateway endpoint.
    """

    as_of: str
    source: str
    get_per_1000: float
    list_per_1000: float
    internet_tiers: tuple[tuple[float, float], ...]
    same_region_per_gb: float
    other_region_per_gb: float
    region_per_gb: Mapping[str, float]
    nat_gateway_per_gb: float


# The one price table. Update all values together, with the date, from the pages named in source.
PRICES = PriceTable(
    as_of="2025-06-01",
    source="https://aws.amazon.com/s3/pricing/ (Requests & data retrievals; Data transfer), S3 Standard, "
           "US East (N. Virginia); NAT: https://aws.amazon.com/vpc/pricing/",
    get_per_1000=0.0004,
    list_per_1000=0.005,
    internet_tiers=((10 * 1024, 0.09), (40 * 1024, 0.085), (100 * 1024, 0.07), (math.inf, 0.05)),
    same_region_per_gb=0.0,
    other_region_per_gb=0.02,
    region_per_gb={"us-east-2": 0.01},
    nat_gateway_per_gb=0.045,
)


def parts_of(size: int, part_size: int = PART_SIZE) -> int:
    """Ranged GETs needed for a file of ``size`` bytes (an empty file needs none)."""
    return math.ceil(size / part_size)


def internet_transfer_usd(n_bytes: int, prices: PriceTable = PRICES) -> float:
    """Transfer out to the internet, tier by tier (as if nothing else was transferred this month)."""
    gb, usd = n_bytes / GIB, 0.0
    for tier_gb, per_gb in prices.internet_tiers:
        take = min(gb, tier_gb)
        usd += take * per_gb
        gb -= take
        if gb <= 0:
            break
    return usd


@dataclass(frozen=True)
class Scenario:
    """Cost of one way of reading."""

    where: str
    transfer_usd: float
    request_usd: float

    @property
    def total_usd(self) -> float:
        return self.transfer_usd + self.request_usd


@dataclass(frozen=True)
class CostEstimate:
    """What downloading part of a release costs the requester.

    Attributes
    ----------
    release : PublishedRelease
    levels : frozenset or None
        Levels priced (None: all files).
    files, bytes, get_requests : int
        Files, their bytes and the ranged GETs of ``atlas data get`` (parts of ``part_size``; the
        manifest GET included).
    scenarios : list of Scenario
        Inside us-east-1, from another AWS region, to the internet.
    assumptions : list of str
    prices : PriceTable
    """

    release: PublishedRelease
    levels: frozenset[int | None] | None
    files: int
    bytes: int
    get_requests: int
    scenarios: list[Scenario]
    assumptions: list[str]
    prices: PriceTable


def _region_ok(region: str) -> bool:
    return re.fullmatch(r"[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d", region) is not None


def estimate_cost(release: PublishedRelease, levels: frozenset[int | None] | None = None, *,
                  from_region: str | None = None, part_size: int = PART_SIZE,
                  prices: PriceTable = PRICES) -> CostEstimate:
    """Requester-pays cost of downloading the files of ``levels`` of ``release`` (bytes x prices).

    Parameters
    ----------
    release : PublishedRelease
        With its files (:func:`get_release`).
    levels : frozenset or None
        From :func:`parse_levels`; None prices every file.
    from_region : str, optional
        The AWS region you would download into; priced as the "another region" scenario (the
        us-east-1 scenario when it is us-east-1). Default: a typical other region.
    part_size : int
        Bytes per ranged GET (as ``atlas data get`` uses).
    prices : PriceTable
    """
    if from_region is not None and not _region_ok(from_region):
        raise InvalidInput(Problem("--from-region", f"{from_region!r} is not an AWS region name",
                                   "use a region such as us-east-1 or eu-west-1"))
    chosen = select(release.files, levels)
    n_bytes = sum(f.size for f in chosen)
    gets = sum(parts_of(f.size, part_size) for f in chosen) + 1  # + the manifest
    request_usd = gets / 1000 * prices.get_per_1000
    gb = n_bytes / GIB
    other = from_region if from_region not in (None, RESULTS_REGION) else None
    other_rate = prices.region_per_gb.get(other, prices.other_region_per_gb)
    scenarios = [Scenario(f"inside {RESULTS_REGION} (EC2, SageMaker, ... in {RESULTS_REGION})",
                          gb * prices.same_region_per_gb, request_usd)]
    if from_region != RESULTS_REGION:
        scenarios.append(Scenario(f"from {other}" if other else "from another AWS region",
                                  gb * other_rate, request_usd))
    scenarios.append(Scenario("to the internet (your laptop, another cloud)",
                              internet_transfer_usd(n_bytes, prices), request_usd))
    regional = ", ".join(f"{r} ${p}/GB" for r, p in prices.region_per_gb.items())
    assumptions = [
        f"prices of S3 in {RESULTS_REGION} as of {prices.as_of} (USD, before tax), from {prices.source}",
        "you (the requester) pay requests and transfer; the data team pays storage",
        (f"GB = 2^30 bytes; {gets:,} GET requests = the files in {part_size // 2**20} MiB ranged parts plus the "
         f"manifest, at ${prices.get_per_1000} per 1,000; retries and re-fetched parts add requests"),
        (f"inside {RESULTS_REGION}: no transfer charge; reach S3 through a VPC gateway endpoint (free), not a NAT "
         f"gateway (+${prices.nat_gateway_per_gb}/GB)"),
        f"another region: ${prices.other_region_per_gb}/GB ({regional})",
        "internet: tiered per month over all your account's transfer out ("
        + ", ".join(f"${p}/GB" for _, p in prices.internet_tiers)
        + "); priced as if nothing else left your account this month, without the 100 GB/month free allowance",
        (f"listing (`atlas data ls`) costs ${prices.list_per_1000} per 1,000 LIST requests; lazy reads "
         "(`atlas data open`) cost one GET per chunk read and transfer only those chunks"),
    ]
    return CostEstimate(release, levels, len(chosen), n_bytes, gets, scenarios, assumptions, prices)
