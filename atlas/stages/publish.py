"""Stage ``publish``: the run's results released, an array over the results' objects, the manifest last.

The file list comes from the completion records the jobs are given (``ctx.records``): each file's
size and sha256 as its writer recorded them, so publishing reads no output back. Item ``i`` of
``n`` copies its share of the files (:func:`share`: a deterministic split balanced by bytes and
objects) through the context's :class:`Publisher` -- in the cloud a server-side copy to the
requester-pays results bucket (:class:`atlas.aws.release.S3Publisher`); a local run has none and
releases nothing. It copies in batches of :data:`COPY_BATCH`, each a journal unit named by its
files' paths and sha256 and by where it goes (:class:`atlas.storage.journal.Journal`), so an item
cut short (a Spot reclaim) skips on its retry every batch already copied with the same sha256 to the
same place and copies the rest.

The merge writes ``manifest.json`` and then, through the publisher, makes the release visible: the
manifest copied last, then what names it as the slide's latest release (:meth:`Publisher.finish`).
A release whose items or merge failed therefore shows no manifest: readers never see it.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import platform
from collections.abc import Mapping, Sequence
from functools import partial
from importlib import metadata
from pathlib import PurePosixPath
from typing import Protocol

from atlas import layout
from atlas.stages import STAGES, CompletionRecord, StageContext
from atlas.storage.journal import Journal

SOFTWARE = ("tissue-atlas", "ashlar", "numpy", "scipy", "scikit-image", "tifffile", "zarr", "onnxruntime",
            "pandas", "anndata")
COPY_BATCH = 1000           # files per journal unit of an item
OBJECT_COST_BYTES = 8 << 20  # what one copy request costs an item, in bytes copied (~30 ms at ~250 MB/s)


class Publisher(Protocol):
    """Where a run is released (the Batch job gives its publishing jobs one: ``ctx.publisher``).

    ``destination`` names where the copies go (buckets, prefix): it is part of every journal unit's
    name, so a rerun releasing the same work elsewhere copies again.
    """

    destination: str

    def copy(self, files: Sequence[Mapping]) -> None:
        """Copy ``files`` (manifest entries: path, size, sha256, level) from the run's work to the release."""

    def finish(self, manifest: Mapping) -> None:
        """Make the release visible, every file being in place: its manifest, then what names it latest."""


def software_versions() -> dict[str, str]:
    """Versions of the packages that shape the results (absent ones are left out)."""
    versions = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _run_records(ctx: StageContext) -> list[CompletionRecord]:
    """The completion records of this run the job was given, in the order their jobs ran; the publish
    stage's own items' records (its merge gets them) are not part of the release."""
    order = {stage.name: k for k, stage in enumerate(STAGES)}
    own = ctx.job.stage.name if ctx.job is not None else None
    return sorted((r for r in ctx.records.values() if r.doc.get("run_id") == ctx.run_id and r.doc["stage"] != own),
                  key=lambda r: (order[r.doc["stage"]], -1 if r.doc["item"] is None else r.doc["item"]))


def run_outputs(ctx: StageContext) -> list[dict]:
    """Every file of the run's results layout as its writer recorded it (``{"path", "size", "sha256"}``):
    the outputs listed by the completion records of this run (a later writer of a path wins) and
    the records themselves; the array items' work files are not results."""
    records = _run_records(ctx)
    files = {out["path"]: out for record in records for out in record.doc["outputs"]}
    files.update({record.entry["path"]: record.entry for record in records})
    return [{k: f[k] for k in ("path", "size", "sha256")} for rel, f in sorted(files.items())
            if PurePosixPath(rel).parts[0] in layout.LEVELS]


def released_files(ctx: StageContext) -> list[dict]:
    """The manifest's ``files``: :func:`run_outputs` with each one's MITI level and HTAN component."""
    return [{**entry, "level": layout.level_of(entry["path"]), "component": layout.component_of(entry["path"])}
            for entry in run_outputs(ctx)]


def build_manifest(ctx: StageContext) -> dict:
    """The results manifest: run id, software, parameters, per-stage cost, each file's size/sha256, MITI
    level and HTAN component.

    Built from the completion records alone: no output is read back to hash it.
    """
    stages = [{k: r.doc[k] for k in ("stage", "item", "seconds", "vcpus", "vcpu_seconds", "instance_type")}
              for r in _run_records(ctx)]
    return {"slide_id": ctx.slide_id, "run_id": ctx.run_id, "software": software_versions(),
            "params": ctx.params.to_dict(), "stages": stages, "files": released_files(ctx)}


def share(files: Sequence[Mapping], index: int, count: int) -> list[Mapping]:
    """Item ``index``'s share of ``files`` among ``count`` items, in path order.

    Largest first, each file goes to the item with the least work so far (bytes plus
    :data:`OBJECT_COST_BYTES` per file; ties to the lower index): every item gets the same shares
    from the same list, the shares are disjoint and cover it, and a large object (the OME-TIFF)
    does not land on an item already busy with others.
    """
    load = [(0, item) for item in range(count)]
    mine = []
    for k in sorted(range(len(files)), key=lambda k: (-files[k]["size"], files[k]["path"])):
        work, item = heapq.heappop(load)
        if item == index:
            mine.append(files[k])
        heapq.heappush(load, (work + files[k]["size"] + OBJECT_COST_BYTES, item))
    return sorted(mine, key=lambda f: f["path"])


def batch_unit(start: int, batch: Sequence[Mapping], destination: str) -> str:
    """Journal unit of a batch of files: its place in the share and a digest of where it goes and of
    its files' paths and sha256."""
    digest = hashlib.sha256("".join([f"{destination}\n", *(f"{f['path']}\0{f['sha256']}\n" for f in batch)])
                            .encode()).hexdigest()
    return f"{start:08d}-{digest[:16]}"


def run_item(ctx: StageContext, index: int, count: int) -> None:
    """Copy files ``share(files, index, count)`` to the release, batch by batch (nothing for a local run)."""
    if ctx.publisher is None:
        return
    files = share(released_files(ctx), index, count)
    journal = Journal(ctx.work, f"{ctx.job.stage.item_dir}/{index}")
    for start in range(0, len(files), COPY_BATCH):
        batch = files[start:start + COPY_BATCH]
        journal.run(batch_unit(start, batch, ctx.publisher.destination), partial(ctx.publisher.copy, batch))


def merge(ctx: StageContext) -> None:
    """Write ``manifest.json`` at the root of the results layout; then, when the run is published, make
    the release (which the items copied) visible."""
    manifest = build_manifest(ctx)
    ctx.work.write_text(layout.MANIFEST, json.dumps(manifest, indent=1) + "\n")
    if ctx.publisher is not None:
        ctx.publisher.finish(manifest)
