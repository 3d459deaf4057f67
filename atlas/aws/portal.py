"""The Data Overviews portal: ``index.html`` + ``index.json`` at the root of the overview site.

One page lists every released slide (its latest release): thumbnail, markers, cell count, release
date, the overview link, and per data level its size, ``s3://`` URI and the ``aws s3 cp`` command
(requester pays), with the estimated download cost from the price table ``atlas data cost`` uses.
The page filters by marker or slide in the browser (no server); ``index.json`` carries the same
list for tools (``atlas data ls --index``)::

    {"slides": [{"slide_id", "run_id", "overview", "thumbnail", "markers", "cells", "waypoints",
                 "levels": [{"level", "folder", "name", "files", "bytes", "uri", "command"}],
                 "bytes", "released", "download_cost_usd", "download_cost_in_region_usd"}, ...],
     "generated", "results_bucket", "region", "prices_as_of", "cost_note"}

Slides whose release says ``overview.public: false`` (params.yml, recorded in the release
manifest) are left off.

When: after each release (:func:`atlas.aws.release.release_run`), from what the results bucket
holds, so a rebuild always lists every complete release. Each file is one PUT (readers see the old
or the new file, never a mix); ``index.json`` goes first, ``index.html`` (the same list inlined)
second. Two releases finishing together could each write a list missing the other, so after
writing, the list of releases is read again and the portal rewritten until it is unchanged: the
last writer always leaves a complete portal.
"""
from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Mapping
from importlib import resources
from pathlib import Path, PurePosixPath

from atlas import layout
from atlas.aws import access
from atlas.aws.release import RESULTS_REGION
from atlas.aws.s3 import S3Uri, get_bytes, parallel_map
from atlas.errors import InvalidInput, Problem

INDEX_JSON = "index.json"
PORTAL_PAGE = layout.OVERVIEW_PAGE          # index.html at the site root
PORTAL_ASSETS = ("portal.js", "portal.css")
OVERVIEW_SUMMARY = "summary.json"           # overview/summary.json, written by the render stage
MAX_ROUNDS = 5
TITLE = "Tissue Atlas · Data Overviews"


def level_folders() -> list[tuple[str, int | None]]:
    """(folder, level) of the results layout, by level (auxiliary folders last)."""
    return sorted(layout.LEVELS.items(), key=lambda item: (item[1] is None, item[1] or 0, item[0]))


def copy_command(uri: str, target: str) -> str:
    """The AWS CLI command that downloads a prefix of the requester-pays bucket."""
    return f"aws s3 cp --recursive {uri} {target} --request-payer requester --region {RESULTS_REGION}"


def slide_entry(release: access.PublishedRelease, *, released: str, summary: Mapping | None) -> dict | None:
    """The portal entry of one release; None when its overview is not public.

    Parameters
    ----------
    release : Release
        With its files and manifest (:func:`atlas.aws.access.get_release`).
    released : str
        When it was released (``latest.json``'s ``released``).
    summary : mapping or None
        ``overview/summary.json`` of the release (markers, cells, thumbnail); None when absent.
    """
    manifest = json.loads(release.manifest or b"{}")
    if not manifest.get("params", {}).get("overview", {}).get("public", True):
        return None
    base = f"{release.slide_id}/{release.run_id}/"
    levels = []
    for folder, level in level_folders():
        files = [f for f in release.files if PurePosixPath(f.path).parts[0] == folder]
        if not files:
            continue
        uri = str(release.prefix.join(folder).prefix())
        levels.append({"level": level, "folder": folder, "name": access.LEVEL_NAMES[level], "files": len(files),
                       "bytes": sum(f.size for f in files), "uri": uri,
                       "command": copy_command(uri, f"./{release.slide_id}/{folder}/")})
    scenarios = access.estimate_cost(release).scenarios  # inside us-east-1 first, to the internet last
    summary = summary or {}
    return {
        "slide_id": release.slide_id, "run_id": release.run_id,
        "overview": base + layout.OVERVIEW_PAGE,
        "thumbnail": base + summary["thumbnail"] if summary.get("thumbnail") else None,
        "markers": list(summary.get("markers") or []), "cells": summary.get("cells"),
        "waypoints": summary.get("waypoints"),
        "levels": levels, "bytes": release.size, "files": len(release.files),
        "uri": str(release.prefix), "command": copy_command(str(release.prefix), f"./{release.slide_id}/"),
        "released": released,
        "download_cost_usd": round(scenarios[-1].total_usd, 6),
        "download_cost_in_region_usd": round(scenarios[0].total_usd, 6),
    }


def portal_index(slides: list[dict], *, results_bucket: str, generated: str) -> dict:
    """The ``index.json`` document: the entries sorted by slide id, and what the costs assume."""
    prices = access.PRICES
    return {
        "generated": generated, "results_bucket": results_bucket, "region": RESULTS_REGION,
        "prices_as_of": prices.as_of,
        "cost_note": (f"Downloading the whole release to the internet, at S3 prices in {RESULTS_REGION} of "
                      f"{prices.as_of} (first-tier transfer ${prices.internet_tiers[0][1]}/GB plus "
                      f"${prices.get_per_1000} per 1,000 GET requests, paid by your AWS account: requester "
                      f"pays). Inside {RESULTS_REGION} (EC2, SageMaker, ...) there is no transfer charge, only the "
                      "requests. `atlas data cost SLIDE` prices single levels and other regions."),
        "slides": sorted(slides, key=lambda s: s["slide_id"]),
    }


def portal_files(index: dict) -> dict[str, bytes]:
    """The portal's files: ``index.json``, ``index.html`` (the list inlined) and its script and style."""
    template = resources.files("atlas.science.overview") / "template"
    payload = json.dumps(index, separators=(",", ":")).replace("</", "<\\/")
    html = (template / "portal.html").read_text(encoding="utf-8")
    html = html.replace("{{TITLE}}", TITLE).replace("{{DATA}}", payload)
    files = {INDEX_JSON: json.dumps(index, indent=1).encode() + b"\n", PORTAL_PAGE: html.encode()}
    files.update({name: (template / name).read_bytes() for name in PORTAL_ASSETS})
    return files


def _read_json(s3, bucket: str, key: str) -> dict | None:
    """A JSON object of ours, or None when it is not there (or not JSON: then it is rebuilt)."""
    raw = get_bytes(s3, S3Uri(bucket, key))
    try:
        return json.loads(raw) if raw is not None else None
    except ValueError:
        return None


def build_index(s3, *, results_bucket: str, previous: Mapping | None = None) -> tuple[dict, list[tuple[str, str]]]:
    """The portal index from the results bucket, and the (slide, run) releases it was built from.

    Entries of ``previous`` (the index now on the site) for an unchanged release are reused;
    other releases cost a GET of their manifest and of ``overview/summary.json``.
    """
    latest = access.list_published_slides(bucket=results_bucket, client=s3)
    known = {(s["slide_id"], s["run_id"]): s for s in (previous or {}).get("slides", [])}

    def entry(summary: access.SlideSummary) -> dict | None:
        if (summary.slide_id, summary.run_id) in known:
            return known[(summary.slide_id, summary.run_id)]
        release = access.get_release(summary.slide_id, summary.run_id, bucket=results_bucket, client=s3)
        key = f"{summary.slide_id}/{summary.run_id}/{layout.OVERVIEW}/{OVERVIEW_SUMMARY}"
        card = _read_json(s3, results_bucket, key)
        return slide_entry(release, released=summary.released, summary=card)

    slides = [e for e in parallel_map(entry, latest) if e is not None]
    generated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return portal_index(slides, results_bucket=results_bucket, generated=generated), \
        sorted((s.slide_id, s.run_id) for s in latest)


def publish_portal(s3, *, results_bucket: str, overview_bucket: str) -> dict:
    """Rewrite the portal at the root of ``overview_bucket`` from the releases in ``results_bucket``.

    Returns the index written. See the module doc for why it loops.
    """
    previous = _read_json(s3, overview_bucket, INDEX_JSON)
    for _ in range(MAX_ROUNDS):
        index, releases = build_index(s3, results_bucket=results_bucket, previous=previous)
        files = portal_files(index)
        for name in (INDEX_JSON, PORTAL_PAGE, *PORTAL_ASSETS):
            content_type = {".json": "application/json", ".html": "text/html; charset=utf-8",
                            ".js": "text/javascript", ".css": "text/css"}[PurePosixPath(name).suffix]
            s3.put_object(Bucket=overview_bucket, Key=name, Body=files[name], ContentType=content_type,
                          CacheControl="no-cache")
        now = sorted((s.slide_id, s.run_id) for s in access.list_published_slides(bucket=results_bucket, client=s3))
        if now == releases:
            break
        previous = index
    return index


def read_index(location: str) -> dict:
    """A portal's ``index.json`` from an https:// URL, a local file, or a site folder / URL ending in ``/``.

    Raises
    ------
    InvalidInput
        Not reachable or not a portal index, naming the location and the fix.
    """
    fix = "give the portal's address (https://.../ or .../index.json) or a local copy of its index.json"
    is_url = location.startswith(("https://", "http://"))
    if is_url:
        url = location if location.endswith(".json") else location.rstrip("/") + "/" + INDEX_JSON
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                raw = response.read()
        except OSError as exc:
            raise InvalidInput(Problem(url, f"cannot be read ({exc})", fix)) from exc
        where = url
    else:
        path = Path(location)
        path = path / INDEX_JSON if path.is_dir() else path
        if not path.is_file():
            raise InvalidInput(Problem(str(path), "not found", fix))
        raw, where = path.read_bytes(), str(path)
    try:
        index = json.loads(raw)
        if not isinstance(index, dict) or not isinstance(index.get("slides"), list):
            raise ValueError("no slides list")
    except ValueError as exc:
        raise InvalidInput(Problem(where, f"is not a portal index.json ({exc})", fix)) from exc
    return index
