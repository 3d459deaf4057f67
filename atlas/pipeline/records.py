"""Completion records: what a finished job wrote, as its writer recorded it, and what it used.

Every job of a run (a plain stage, an array item, a merge: :class:`atlas.stages.Job`) ends by
writing its record at ``qc/provenance/<stage>[.<item>].json`` in the run's results layout (a local
folder, or the run's work prefix in S3), after its outputs::

    {"stage": "segment", "item": 2, "run_id": "...", "started": ..., "finished": ..., "seconds": ...,
     "vcpus": 4, "vcpu_seconds": ..., "instance_type": "c6i.2xlarge", "peak_rss_bytes": ...,
     "scratch_peak_bytes": ..., "s3_bytes_read": ..., "s3_bytes_written": ..., "cpu_seconds": ...,
     "outputs": [{"path": "tmp/segment/tile-00002.tif", "size": 1234, "sha256": "..."}, ...]}

The outputs' sizes and sha256 are what the job's store computed from the bytes as it wrote them
(:class:`atlas.storage.JobView`); nothing reads an output back to hash it.

**Intact** means one thing everywhere (local runner, Batch job, rerun, publish): the record is
this run's, and every output it lists is present at the size its writer recorded (a listing or a
``stat``; :func:`is_intact`). Whenever a later job reads an output whole (a table, a zarr chunk), its
store checks the bytes against the recorded sha256, so a changed output is caught where it is used.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

from atlas.stages import CompletionRecord, Job, final_jobs, upstream_jobs
from atlas.storage import MissingObject, Store

FEW_OUTPUTS = 64


def new_record(job: Job, *, run_id: str, started: float, finished: float, outputs: Iterable[Mapping],
               instance_type: str = "local", usage: Mapping[str, int] | None = None, vcpus: int | None = None) -> dict:
    """The completion record of ``job``: its outputs (``{"path", "size", "sha256"}``) and its cost.

    ``vcpu_seconds`` is what Batch bills: the job's vCPUs (``vcpus``, what the run gave it; default
    the registry's) times its wall time. ``usage`` adds what :class:`atlas.pipeline.usage.JobUsage`
    measured (peak RSS, scratch, bytes moved, CPU time).
    """
    seconds = round(finished - started, 3)
    vcpus = vcpus or job.stage.vcpus
    count = {"count": job.count} if job.stage.array_size else {}  # how many items the array ran
    return {"stage": job.stage.name, "item": job.item, **count, "run_id": run_id, "started": started,
            "finished": finished,
            "seconds": seconds, "vcpus": vcpus, "vcpu_seconds": round(seconds * vcpus, 3),
            "instance_type": instance_type, **(usage or {}),
            "outputs": sorted(({"path": o["path"], "size": o["size"], "sha256": o["sha256"]} for o in outputs),
                              key=lambda o: o["path"])}


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


def missing_jobs(jobs: Iterable[Job], records: Mapping[str, Mapping | None], run_id: str) -> list[Job]:
    """Those of ``jobs`` without a record of run ``run_id`` in ``records`` (record path -> record)."""
    return [job for job in jobs if (records.get(job.record) or {}).get("run_id") != run_id]


def read_raw(store: Store, job: Job) -> bytes | None:
    """The stored bytes of ``job``'s record in a run's store, or None."""
    try:
        return store.read_bytes(job.record)
    except MissingObject:
        return None


def finished_record(store: Store, job: Job, run_id: str) -> dict | None:
    """``job``'s record when its work in ``store`` is intact for run ``run_id`` (:func:`is_intact`), else None."""
    record = loads(read_raw(store, job))
    if record is None or record.get("run_id") != run_id:
        return None
    paths = {o["path"] for o in record["outputs"]}
    # a few outputs: one size request each; many (zarr chunks): one listing of the run
    sizes = {rel: store.size(rel) for rel in paths} if len(paths) <= FEW_OUTPUTS else store.list()
    return record if is_intact(record, run_id, {k: v for k, v in sizes.items() if v is not None}) else None


def write_record(store: Store, job: Job, record: Mapping) -> None:
    """Store ``job``'s record, the last thing a job writes."""
    store.write_bytes(job.record, dumps(record))


def upstream_records(store: Store, job: Job, run_id: str
                     ) -> tuple[dict[str, CompletionRecord], list[Job], dict[str, CompletionRecord]]:
    """The records of run ``run_id`` that ``job`` builds on (:func:`atlas.stages.upstream_jobs`) in ``store``.

    Returns
    -------
    found : dict of str to CompletionRecord
        By record path.
    missing : list of Job
        Upstream jobs without a record of this run.
    changed : dict of str to CompletionRecord
        Output path -> the record listing it, for outputs absent or not at their recorded size.
    """
    finals = final_jobs(job)
    raws = {j.record: read_raw(store, j) for j in finals}
    counts = {j.stage.name: loads(raws[j.record]).get("count", j.count) for j in finals
              if j.merge and raws[j.record] is not None}  # an array may have run with another size
    wanted = upstream_jobs(job, counts)
    raws.update({j.record: read_raw(store, j) for j in wanted if j.record not in raws})
    found = {rel: upstream(rel, raw) for rel, raw in raws.items() if raw is not None}
    missing = missing_jobs(wanted, {rel: r.doc for rel, r in found.items()}, run_id)
    sizes = store.list() if found else {}
    changed = {path: record for record in found.values() if record.doc.get("run_id") == run_id
               for path in missing_outputs(record.doc, sizes)}
    return found, missing, changed


def recorded_outputs(records: Iterable[CompletionRecord]) -> dict[str, dict]:
    """path -> ``{"path", "size", "sha256", "record", "stage"}`` of every output the records list
    (a later record of the same path wins: pass them in run order)."""
    return {out["path"]: {**out, "record": r.entry["path"], "stage": r.doc["stage"]}
            for r in records for out in r.doc["outputs"]}
