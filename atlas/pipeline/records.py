"""Completion records: what a finished job wrote, as its writer recorded it.

Every job of a run (a plain stage, an array item, a merge: :class:`atlas.stages.Job`) ends by
writing its record at ``qc/provenance/<stage>[.<item>].json`` in the run's results layout (a local
folder, or the run's work prefix in S3), after its outputs::

    {"stage": "segment", "item": 2, "run_id": "...", "started": ..., "finished": ..., "seconds": ...,
     "vcpus": 4, "vcpu_seconds": ..., "instance_type": "c6i.2xlarge",
     "outputs": [{"path": "tmp/segment/tile-00002.tif", "size": 1234, "sha256": "..."}, ...]}

**Intact** means one thing everywhere (local runner, Batch job, rerun, publish): the record is
this run's, and every output it lists is present at the size its writer recorded. The sha256 in
the record is the writer's: nothing re-hashes an output to decide whether work is done. Where a
job reads an output's bytes whole anyway, it checks them against that sha256
(:func:`check_bytes`), so a changed file is caught where it is used.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from atlas.slide.convention import sha256_file
from atlas.stages import CompletionRecord, Job


def file_entry(root: Path, rel: str) -> dict:
    """``{"path", "size", "sha256"}`` of the file ``rel`` below ``root``."""
    path = Path(root) / rel
    return {"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)}


def new_record(job: Job, *, run_id: str, started: float, finished: float, outputs: Iterable[dict],
               instance_type: str = "local") -> dict:
    """The completion record of ``job``: its outputs (``file_entry`` dicts) and what it cost.

    ``vcpu_seconds`` is what Batch bills: the job's vCPUs times its wall time.
    """
    seconds = round(finished - started, 3)
    return {"stage": job.stage.name, "item": job.item, "run_id": run_id, "started": started, "finished": finished,
            "seconds": seconds, "vcpus": job.stage.vcpus, "vcpu_seconds": round(seconds * job.stage.vcpus, 3),
            "instance_type": instance_type, "outputs": sorted(outputs, key=lambda o: o["path"])}


def dumps(record: Mapping) -> bytes:
    """A record's bytes as stored (indented JSON, newline-terminated)."""
    return json.dumps(record, indent=1).encode() + b"\n"


def loads(raw: bytes | None) -> dict | None:
    """A stored record (None stays None: no record)."""
    return None if raw is None else json.loads(raw)


def upstream(rel: str, raw: bytes) -> CompletionRecord:
    """A stored record as a job is given it (content and its own file entry)."""
    return CompletionRecord(json.loads(raw), {"path": rel, "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})


def missing_outputs(record: Mapping, sizes: Mapping[str, int]) -> list[str]:
    """Outputs the record lists that are absent from ``sizes`` (path -> size) or have another size."""
    return [out["path"] for out in record["outputs"] if sizes.get(out["path"]) != out["size"]]


def is_intact(record: Mapping | None, run_id: str, sizes: Mapping[str, int]) -> bool:
    """The one test of finished work: a record of run ``run_id`` whose outputs are all present at
    their recorded sizes (``sizes``: path -> size, from a listing or ``stat``)."""
    return record is not None and record.get("run_id") == run_id and not missing_outputs(record, sizes)


def check_bytes(data: bytes, entry: Mapping) -> str | None:
    """Why ``data`` is not the output ``entry`` (a record's ``{"path", "size", "sha256"}``) describes,
    or None when it is."""
    if len(data) != entry["size"]:
        return f"has {len(data)} bytes but its completion record says {entry['size']}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        return f"has sha256 {digest} but its completion record says {entry['sha256']}"
    return None


def missing_jobs(jobs: Iterable[Job], records: Mapping[str, Mapping | None], run_id: str) -> list[Job]:
    """Those of ``jobs`` without a record of run ``run_id`` in ``records`` (record path -> record)."""
    return [job for job in jobs if (records.get(job.record) or {}).get("run_id") != run_id]
