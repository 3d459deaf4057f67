"""Downloading a release: parallel ranged GETs, resumable at any point, every file checked against its sha256."""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from botocore.exceptions import ClientError

from atlas import layout
from atlas.aws.access.cost import PART_SIZE, parts_of
from atlas.aws.access.errors import AccessError, NotPublished, access_errors
from atlas.aws.access.releases import DOWNLOAD_THREADS, PublishedRelease, ReleasedFile, results_client, select
from atlas.aws.s3 import PRECONDITION_CODES, S3Uri, error_code, is_missing, requester_pays
from atlas.errors import Problem
from atlas.slide.convention import sha256_file

PART_SUFFIX, STATE_SUFFIX = ".part", ".part.json"


@dataclass(frozen=True)
class CorruptFile:
    """A downloaded file whose sha256 differs from the release manifest (not kept)."""

    path: str
    expected_sha256: str
    actual_sha256: str
    size: int


@dataclass
class DownloadResult:
    """What :func:`download_release` did.

    Attributes
    ----------
    target : Path
        ``<dir>/<slide_id>/<run_id>/``, the release layout (manifest.json included).
    fetched : list of str
        Files downloaded now (fully or the rest of a partial download) and verified.
    resumed : list of str
        Of those, the ones continued from an interrupted download.
    verified : list of str
        Files already complete on disk, checked against the manifest's sha256 and kept.
    corrupt : list of CorruptFile
        Files whose content does not match the manifest: reported, removed, never renamed into place.
    requests : int
        Ranged GETs whose parts were written (manifest not counted).
    bytes_fetched : int
    """

    target: Path
    fetched: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    corrupt: list[CorruptFile] = field(default_factory=list)
    requests: int = 0
    bytes_fetched: int = 0


class _PartialFile:
    """One file being downloaded: ``<name>.part`` (written at part offsets) and ``<name>.part.json``
    (the object's ETag and the parts already written), so an interrupted download resumes.

    ``generation`` changes when the object turns out to have changed between parts: writes of
    parts fetched for an older generation are dropped.
    """

    def __init__(self, entry: ReleasedFile, final: Path, part_size: int):
        self.entry, self.final, self.part_size = entry, final, part_size
        self.data = final.with_name(final.name + PART_SUFFIX)
        self.state = final.with_name(final.name + STATE_SUFFIX)
        self.count = parts_of(entry.size, part_size)
        self.lock = threading.Lock()
        self.etag: str | None = None
        self.done: set[int] = set()
        self.generation = 0
        self.outstanding = 0  # fetches submitted and not yet collected (main thread only)
        self.file = None

    def open(self) -> bool:
        """Open for writing; True when a partial download of the same object is continued."""
        self.final.parent.mkdir(parents=True, exist_ok=True)
        state = self._read_state()
        resumed = bool(state and self.data.is_file() and self.data.stat().st_size == self.entry.size
                       and state.get("size") == self.entry.size and state.get("part_size") == self.part_size
                       and state.get("sha256") == self.entry.sha256 and state.get("done"))
        if resumed:
            self.etag, self.done = state["etag"], set(state["done"])
        else:
            self.state.unlink(missing_ok=True)
        if not resumed:
            self.data.write_bytes(b"")
        self.file = open(self.data, "r+b")  # noqa: SIM115 - open across parts, closed by close()
        if not resumed:
            self.file.truncate(self.entry.size)
        return resumed

    def _read_state(self) -> dict | None:
        try:
            return json.loads(self.state.read_text())
        except (OSError, ValueError):
            return None

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.done]

    def byte_range(self, index: int) -> tuple[int, int]:
        """First and last byte (inclusive) of part ``index``."""
        start = index * self.part_size
        return start, min(self.entry.size, start + self.part_size) - 1

    def bytes_done(self) -> int:
        """Bytes of the parts already written."""
        return sum(self.byte_range(i)[1] - self.byte_range(i)[0] + 1 for i in self.done)

    def write(self, index: int, data: bytes, etag: str, generation: int) -> bool:
        """Write one part at its offset, then record it; False (nothing written) for a stale generation."""
        with self.lock:
            if generation != self.generation:
                return False
            self.file.seek(index * self.part_size)
            self.file.write(data)
            self.file.flush()
            self.etag = self.etag or etag
            self.done.add(index)
            tmp = self.state.with_name(self.state.name + ".tmp")
            tmp.write_text(json.dumps({"etag": self.etag, "size": self.entry.size, "part_size": self.part_size,
                                       "sha256": self.entry.sha256, "done": sorted(self.done)}))
            os.replace(tmp, self.state)
            return True

    def restart(self) -> None:
        """Forget every part: the object changed since they were fetched."""
        with self.lock:
            self.generation += 1
            self.etag, self.done = None, set()
            self.state.unlink(missing_ok=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def finish(self) -> str | None:
        """Verify and move into place; the actual sha256 when it differs from the manifest (file removed)."""
        self.close()
        digest = sha256_file(self.data)
        self.state.unlink(missing_ok=True)
        if digest != self.entry.sha256:
            self.data.unlink(missing_ok=True)
            return digest
        os.replace(self.data, self.final)
        return None


class _Changed(Exception):
    """The object changed between parts of one download (its ETag no longer matches)."""


class _Meter:
    """Requests and bytes fetched, across threads, and the progress bar's one task (bytes)."""

    def __init__(self, progress, description: str, total: int):
        self.progress = progress
        self.task = progress.add_task(description, total=total) if progress is not None else None
        self.lock, self.requests, self.bytes = threading.Lock(), 0, 0

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def fetched(self, n: int) -> None:
        with self.lock:
            self.requests += 1
            self.bytes += n
        self.advance(n)


def download_release(release: PublishedRelease, out_dir: Path | str, *,
                     levels: frozenset[int | None] | None = None, client=None, part_size: int = PART_SIZE,
                     threads: int = DOWNLOAD_THREADS, progress=None) -> DownloadResult:
    """Download the files of ``levels`` of a release into ``out_dir/<slide_id>/<run_id>/``, verified.

    Every file is fetched in ranged GETs of ``part_size`` bytes, on ``threads`` threads across and
    within files. Each part is written at its offset into ``<name>.part`` and recorded in
    ``<name>.part.json`` with the object's ETag, so a download interrupted at any point (network,
    Ctrl-C, a crash) continues with the missing parts when called again. Parts after the first
    are fetched with ``If-Match`` on that ETag, so parts of two object versions are never mixed (a
    changed object is fetched again from the start, once). A finished file's sha256 must equal
    the manifest's before it is renamed into place; files already in place are re-verified, not
    fetched again.

    Parameters
    ----------
    release : PublishedRelease
        With its files (:func:`get_release`).
    out_dir : path
    levels : frozenset or None
        From :func:`parse_levels`; None downloads every file.
    client : botocore S3 client, optional
        Default :func:`results_client`; the request-payer header is added to a given client too.
    part_size : int
        Bytes per ranged GET.
    threads : int
        Parallel requests.
    progress : rich.progress.Progress, optional
        Gets one task counting bytes (files already complete count at once).

    Returns
    -------
    DownloadResult
        ``corrupt`` lists files whose content differs from the manifest (tampered with or damaged):
        they are removed, never left in place.

    Raises
    ------
    AccessError
        S3 refused (no access, wrong region, ...); the parts already written are kept for the next call.
    """
    client = requester_pays(client) if client is not None else results_client()
    root = Path(out_dir) / release.slide_id / release.run_id
    root.mkdir(parents=True, exist_ok=True)
    (root / layout.MANIFEST).write_bytes(release.manifest)
    chosen = select(release.files, levels)
    result = DownloadResult(root)
    meter = _Meter(progress, f"{release.slide_id} {release.run_id}", sum(f.size for f in chosen))
    pending = [_PartialFile(entry, root / entry.path, part_size) for entry in chosen
               if not _in_place(root / entry.path, entry, result, meter)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        _Transfer(pool, client, release.prefix, result, meter).run(pending)
    return result


def _in_place(final: Path, entry: ReleasedFile, result: DownloadResult, meter: _Meter) -> bool:
    """True (recorded as verified) when the file is complete on disk; otherwise it is removed."""
    if final.is_file() and final.stat().st_size == entry.size and sha256_file(final) == entry.sha256:
        result.verified.append(entry.path)
        meter.advance(entry.size)
        return True
    final.unlink(missing_ok=True)
    return False


class _Transfer:
    """The downloads of one call: each file's parts scheduled on the pool, collected as they finish.

    A file's first part is fetched alone (it fixes the ETag the other parts must match), then the
    rest together, then the file is verified and moved into place. A file whose object changed
    between parts restarts once; the parts still in flight for the old version are dropped.
    """

    def __init__(self, pool: ThreadPoolExecutor, client, prefix: S3Uri, result: DownloadResult, meter: _Meter):
        self.pool, self.client, self.prefix, self.result, self.meter = pool, client, prefix, result, meter
        self.futures: dict[Future, tuple[str, _PartialFile, int]] = {}  # -> (kind, file, generation)
        self.restarts: set[str] = set()

    def run(self, pending: list[_PartialFile]) -> None:
        try:
            for partial in pending:
                if partial.open():
                    self.result.resumed.append(partial.entry.path)
                    self.meter.advance(partial.bytes_done())
                self.schedule(partial)
            while self.futures:
                done, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
                for future in done:
                    self.collect(future)
        finally:
            for future in self.futures:
                future.cancel()
            wait(list(self.futures))
            for partial in pending:
                partial.close()
            self.result.requests, self.result.bytes_fetched = self.meter.requests, self.meter.bytes

    def schedule(self, partial: _PartialFile) -> None:
        """Next step of a file: its first part (which fixes the ETag), the rest, or verification."""
        missing = partial.missing()
        if not missing:
            self.futures[self.pool.submit(self.finish, partial)] = ("finish", partial, partial.generation)
            return
        for index in missing[:1] if partial.etag is None else missing:
            kind = "first" if partial.etag is None else "part"
            self.futures[self.pool.submit(self.fetch, partial, index, partial.generation)] = \
                (kind, partial, partial.generation)
            partial.outstanding += 1

    def collect(self, future: Future) -> None:
        """Take one finished fetch (or verification) and schedule what follows from it."""
        kind, partial, generation = self.futures.pop(future)
        if kind == "finish":
            future.result()
            return
        partial.outstanding -= 1
        try:
            future.result()
        except _Changed:
            if generation == partial.generation:  # the first report of this change
                if partial.entry.path in self.restarts:
                    raise AccessError(Problem(str(self.prefix.join(partial.entry.path)),
                                              "the object keeps changing while it is downloaded",
                                              "retry later; if it persists, tell the data team")) from None
                self.restarts.add(partial.entry.path)
                partial.restart()
        # the first part fixed the ETag: fetch the rest; otherwise go on once nothing is in flight
        # (after a restart, the stale fetches drain first)
        if (kind == "first" and generation == partial.generation) or partial.outstanding == 0:
            self.schedule(partial)

    def fetch(self, partial: _PartialFile, index: int, generation: int) -> None:
        """One ranged GET, written at its offset (``If-Match`` the file's ETag once known)."""
        start, end = partial.byte_range(index)
        uri = self.prefix.join(partial.entry.path)
        condition = {"IfMatch": partial.etag} if partial.etag else {}
        with access_errors(uri):
            try:
                response = self.client.get_object(Bucket=uri.bucket, Key=uri.key, Range=f"bytes={start}-{end}",
                                                   **condition)
            except ClientError as exc:
                if error_code(exc) in PRECONDITION_CODES:
                    raise _Changed(partial.entry.path) from exc
                if is_missing(exc):
                    raise NotPublished(Problem(str(uri), "listed in the release manifest but missing from the "
                                                         "bucket", "tell the data team; the other files are not "
                                                                   "affected")) from exc
                raise
            data = response["Body"].read()
        if len(data) != end - start + 1:
            raise AccessError(Problem(str(uri), f"asked for bytes {start}-{end}, got {len(data)} (the connection "
                                                "ended early)", "run the same download again: it resumes with the "
                                                                "missing parts"))
        if partial.write(index, data, response["ETag"], generation):
            self.meter.fetched(len(data))

    def finish(self, partial: _PartialFile) -> None:
        actual = partial.finish()
        if actual is None:
            self.result.fetched.append(partial.entry.path)
        else:
            self.result.corrupt.append(CorruptFile(partial.entry.path, partial.entry.sha256, actual,
                                                   partial.entry.size))
