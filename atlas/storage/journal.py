"""Resumable jobs: a long job's finished units of work, kept beside its outputs.

A Spot reclaim kills a job wherever it is; Batch then retries it from the start. A job that
writes its output unit by unit (a chunk row of a pyramid level, a band of a table) runs each
unit through a :class:`Journal`: when the unit has written its objects, a small journal object
``<folder>/<unit>.json`` lists them as written (path, size, sha256). The retry skips every unit
whose journal object is there, taking its objects into its own record unread, and redoes only
the unit that was cut short (its objects are overwritten with the same bytes: stages are
deterministic). The folder is the job's own work folder (an array item's ``item_dir``).
"""
from __future__ import annotations

import json
from collections.abc import Callable

from atlas.storage import JobView, Store, join


class Journal:
    """The finished units of one job, in ``folder`` of its store.

    Parameters
    ----------
    store : Store
        The job's store. On a :class:`JobView` (every job the runners run) units are journaled
        and resumed; on another store they simply run.
    folder : str
        Where the journal objects go, one per unit (the job's own work folder).

    Attributes
    ----------
    resumed : list of str
        The units an earlier attempt had finished, skipped by this one.
    """

    def __init__(self, store: Store, folder: str):
        self.store, self.folder = store, folder.strip("/")
        self.resumed: list[str] = []

    def run(self, unit: str, work: Callable[[], None]) -> None:
        """Run ``work`` for ``unit`` (a name unique in the job) unless an earlier attempt finished it."""
        if not isinstance(self.store, JobView):
            work()
            return
        rel = join(self.folder, f"{unit}.json")
        saved = self.store.resume(rel)
        if saved is not None:
            self.store.adopt(json.loads(saved)["outputs"])
            self.resumed.append(unit)
            return
        before = dict(self.store.written)
        work()
        wrote = [entry for path, entry in sorted(self.store.written.items()) if before.get(path) != entry]
        self.store.write_bytes(rel, json.dumps({"unit": unit, "outputs": wrote}).encode())
