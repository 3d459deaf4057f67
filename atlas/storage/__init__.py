"""One storage layer for a run's data, wherever it lies: a folder locally, an S3 prefix in the cloud.

A :class:`Store` is a tree of objects named by relative POSIX paths (``registration/S1.ome.zarr/0/0/0/0``).
Stages do all their I/O through the stores in their context (``ctx.slide``, ``ctx.work``), so the
same stage code runs on a local folder (:class:`FolderStore`), on S3 (``atlas.aws.store.S3Store``,
injected by the Batch job; stages never import it) and on the emulated S3 of the demo. What a
stage gets:

- **small objects** whole: :meth:`Store.read_bytes` / :meth:`Store.write_bytes` (tables, JSON, PNG);
- **byte ranges**: :meth:`Store.open` is a seekable read-only file object that fetches only the
  ranges read (tifffile parses OME-TIFF headers and reads tiles or strips through it);
- **chunks**: :meth:`Store.zarr` is a zarr 3 store (:mod:`atlas.storage.zarrstore`) for an OME-Zarr below a
  path, so a reader fetches only the chunks it indexes and a writer puts chunk by chunk;
- **large objects streamed** front to back: :meth:`Store.writer` is a sequential file object that
  puts the object in place when the block ends without error (S3: a multipart upload, parts sent
  as they fill; a folder: a file beside its place, then renamed), hashing as it goes, so scratch
  and memory hold a few parts, never the object (the pyramidal OME-TIFF, :mod:`atlas.science.tiffstream`);
- **files written with seeks** (HDF5, masks): :meth:`Store.local_file` gives a
  local path and puts the finished file in place when the block ends without error; and
  :meth:`Store.local_folder` does the same for a folder of files (the overview site).

Every store counts the bytes it moves (:class:`IoCounter`): the folder store counts file bytes,
the S3 store every request's body through a botocore event hook on its client.

:class:`JobView` is a store as one job of the pipeline sees its run: it may read only what the
job declared as inputs and the earlier jobs recorded (listing and sizes come from their completion
records, not from requests), every whole object it reads is checked against the size and sha256
its writer recorded, it may write only the job's declared outputs, and it records the size and
sha256 of every object it writes, which is what the job's completion record lists.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

PARTIAL = ".partial"  # suffix of a local file being written, not yet in place (never listed)


class MissingObject(FileNotFoundError):
    """No object at ``path`` (relative to the store); ``where`` is its full location."""

    def __init__(self, path: str, where: str):
        self.path, self.where = path, where
        super().__init__(f"{path}: no such object at {where}")


class UndeclaredAccess(PermissionError):
    """A job read or wrote ``path``, which its stage does not declare (a bug in the stage)."""

    def __init__(self, path: str, action: str, declared: Iterable[str]):
        self.path, self.action, self.declared = path, action, tuple(declared)
        super().__init__(f"{path}: {action} outside the stage's declared "
                         f"{'outputs' if action == 'write' else 'inputs'} ({', '.join(self.declared)})")


class IntegrityError(OSError):
    """An object read whole is not what its writer recorded (size or sha256)."""

    def __init__(self, path: str, where: str, why: str):
        self.path, self.where, self.why = path, where, why
        super().__init__(f"{path} at {where} {why}")


def join(*parts: str) -> str:
    """Relative paths joined with ``/`` (empty parts dropped): ``join("a/", "b")`` -> ``"a/b"``."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def sha256_entry(rel: str, data: bytes) -> dict:
    """``{"path", "size", "sha256"}`` of bytes about to be stored at ``rel``."""
    return {"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_entry(rel: str, path: Path) -> dict:
    """``{"path", "size", "sha256"}`` of a local file about to be stored at ``rel``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": rel, "size": Path(path).stat().st_size, "sha256": digest.hexdigest()}


class IoCounter:
    """Bytes a job moved through its stores (thread-safe)."""

    def __init__(self) -> None:
        self._read = 0
        self._written = 0
        self.largest_local_file = 0  # bytes of the largest file written locally and then stored
        self._lock = threading.Lock()

    @property
    def read(self) -> int:
        return self._read

    @property
    def written(self) -> int:
        return self._written

    def add(self, *, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self._read += read
            self._written += written

    def note_local_file(self, size: int) -> None:
        """A whole file of ``size`` bytes sat in scratch before it was stored: scratch held at least that."""
        with self._lock:
            self.largest_local_file = max(self.largest_local_file, size)

    def take_largest_local_file(self) -> int:
        """The largest file noted since the last call (jobs of one counter run one after the other)."""
        with self._lock:
            largest, self.largest_local_file = self.largest_local_file, 0
        return largest


class ObjectWriter(io.RawIOBase):
    """One object written front to back (:meth:`Store.writer`): size and sha256 of what passed.

    Subclasses send the bytes (``_send``) and put the object in place (``_commit``) or drop it (``_abort``).
    """

    def __init__(self, rel: str):
        super().__init__()
        self.rel, self.size = rel, 0
        self._digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self._digest.update(data)
        self.size += len(data)
        self._send(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def entry(self) -> dict:
        """``{"path", "size", "sha256"}`` of the bytes written so far."""
        return {"path": self.rel, "size": self.size, "sha256": self._digest.hexdigest()}

    @abstractmethod
    def _send(self, data: memoryview) -> None: ...

    @abstractmethod
    def _commit(self) -> None: ...

    @abstractmethod
    def _abort(self) -> None: ...


class Store(ABC):
    """A tree of objects by relative path. Subclasses give the primitives (``_get``, ``_put``, ...).

    Attributes
    ----------
    uri : str
        Where it is, for messages (a folder path or ``s3://bucket/prefix/``).
    counter : IoCounter
    """

    uri: str
    counter: IoCounter

    # --- primitives ------------------------------------------------------------------------------
    @abstractmethod
    def _get(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of an object (all when both are None); MissingObject if absent."""

    @abstractmethod
    def _put(self, rel: str, data: bytes) -> None:
        """Store ``data`` at ``rel`` (replacing it), atomically: readers see the old or the new bytes."""

    @abstractmethod
    def _put_file(self, rel: str, path: Path) -> None:
        """Store the finished local file ``path`` at ``rel`` (it may be moved or removed afterwards)."""

    @abstractmethod
    def _delete(self, rel: str) -> None:
        """Remove the object at ``rel`` (no error when absent)."""

    @abstractmethod
    def _list(self, prefix: str) -> dict[str, int]:
        """Relative path -> size of every object below the folder ``prefix`` ("" = all)."""

    @abstractmethod
    def _open(self, rel: str) -> BinaryIO:
        """A seekable, read-only binary file object over the object at ``rel`` (ranged reads)."""

    @abstractmethod
    def _local_path(self, rel: str, scratch: Path | None) -> Path:
        """A local path, named as ``rel`` is, in a fresh folder of its own (removed after
        :meth:`_put_file`), where a file meant for ``rel`` can be written."""

    @abstractmethod
    def _writer(self, rel: str) -> ObjectWriter:
        """A sequential writer of the object at ``rel`` (in place only after its ``_commit``)."""

    def _size(self, rel: str) -> int | None:
        return self._list(rel).get(rel) if rel else None

    # --- reading ---------------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        """The whole object at ``rel``; MissingObject if there is none."""
        return self._get(rel)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open(self, rel: str) -> BinaryIO:
        """Seekable read-only file object; reads fetch only the bytes read (plus a small read-ahead)."""
        return self._open(rel)

    def size(self, rel: str) -> int | None:
        """Size of the object at ``rel``, or None when there is none."""
        return self._size(rel)

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def list(self, prefix: str = "") -> dict[str, int]:
        """Relative path -> size of every object below the folder ``prefix`` ("" = the whole store)."""
        return self._list(prefix.strip("/"))

    # --- writing ---------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        self._put(rel, bytes(data))

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def delete(self, rel: str) -> None:
        self._delete(rel)

    @contextmanager
    def writer(self, rel: str) -> Iterator[ObjectWriter]:
        """A sequential, write-only file object for ``rel``: the object is put in place when the block
        ends cleanly, and nothing is (no partial object, no pending upload) if it raises. Its
        ``entry()`` is the object's ``{"path", "size", "sha256"}``, computed from the bytes written."""
        out = self._writer(rel)
        try:
            yield out
            out._commit()
        except BaseException:
            out._abort()
            raise

    @contextmanager
    def local_file(self, rel: str, *, scratch: Path | None = None) -> Iterator[Path]:
        """A local path to write ``rel`` with seeks (TIFF, HDF5); stored when the block ends cleanly.

        ``scratch`` is where the file is written when the store is not a local folder (default: the
        system's temporary folder). Nothing is stored if the block raises.
        """
        path = self._local_path(rel, scratch)
        try:
            yield path
            if scratch is not None and path.is_relative_to(scratch):  # not a folder store's in-place file
                self.counter.note_local_file(path.stat().st_size)
            self._put_file(rel, path)
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)

    @contextmanager
    def local_folder(self, rel: str, *, scratch: Path | None = None) -> Iterator[Path]:
        """A local, empty folder whose files are stored below ``rel`` when the block ends cleanly.

        What was below ``rel`` before and is not written again is removed, so the folder is
        replaced as a whole.
        """
        folder = Path(tempfile.mkdtemp(prefix=".folder-", dir=scratch))
        try:
            yield folder
            before = set(self.list(rel))
            written = set()
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                target = join(rel, path.relative_to(folder).as_posix())
                self._put_file(target, path)
                written.add(target)
            for stale in sorted(before - written):
                self._delete(stale)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def zarr(self, rel: str = "", *, read_only: bool = False):
        """A zarr 3 store (:class:`atlas.storage.zarrstore.ZarrStore`) for the zarr hierarchy at ``rel``
        (e.g. ``registration/S1.ome.zarr``)."""
        from atlas.storage.zarrstore import ZarrStore

        return ZarrStore(self, rel, read_only=read_only)


class FolderStore(Store):
    """A local folder as a store. Writes are atomic (temporary file, then rename).

    Parameters
    ----------
    root : path
    counter : IoCounter, optional
        Counts the bytes read and written (a new one by default).
    """

    def __init__(self, root: str | os.PathLike, *, counter: IoCounter | None = None):
        self.root = Path(root)
        self.uri = f"{self.root}/"
        self.counter = counter or IoCounter()

    def __repr__(self) -> str:
        return f"FolderStore({str(self.root)!r})"

    def path(self, rel: str) -> Path:
        """The local path of ``rel``."""
        return self.root / rel if rel else self.root

    def _get(self, rel, start=None, end=None):
        try:
            with open(self.path(rel), "rb") as f:
                if start:
                    f.seek(start)
                data = f.read() if end is None else f.read(max(0, end - (start or 0)))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise MissingObject(rel, self.uri) from exc
        self.counter.add(read=len(data))
        return data

    def _put(self, rel, data):
        target = self.path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL, dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        self.counter.add(written=len(data))

    def _writer(self, rel):
        return _FolderWriter(rel, self.path(rel), self.counter)

    def _put_file(self, rel, path):
        target = self.path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)  # a rename when on the same file system (local_file's folder is)
        self.counter.add(written=target.stat().st_size)

    def _delete(self, rel):
        self.path(rel).unlink(missing_ok=True)

    def _list(self, prefix):
        base = self.path(prefix)
        if base.is_file():
            return {prefix: base.stat().st_size}
        if not base.is_dir():
            return {}
        return {p.relative_to(self.root).as_posix(): p.stat().st_size for p in base.rglob("*")
                if p.is_file() and not any(part.endswith(PARTIAL) for part in p.relative_to(self.root).parts)}

    def _size(self, rel):
        path = self.path(rel)
        return path.stat().st_size if path.is_file() else None

    def _open(self, rel):
        try:
            return _CountingReader(open(self.path(rel), "rb"), self.counter)
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise MissingObject(rel, self.uri) from exc

    def _local_path(self, rel, scratch):
        # written beside its final place (in a hidden folder, under its own name, which writers may
        # record), so the rename into place is atomic
        target = self.path(rel)
        folder = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}{PARTIAL}")
        folder.mkdir(parents=True, exist_ok=True)
        return folder / target.name


class _FolderWriter(ObjectWriter):
    """A file written beside its place (hidden, never listed), renamed into place on commit."""

    def __init__(self, rel: str, target: Path, counter: IoCounter):
        super().__init__(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL, dir=target.parent)
        self._file, self._tmp, self._target, self._counter = os.fdopen(fd, "wb"), tmp, target, counter

    def _send(self, data):
        self._file.write(data)
        self._counter.add(written=len(data))

    def _commit(self):
        self._file.close()
        os.replace(self._tmp, self._target)

    def _abort(self):
        self._file.close()
        Path(self._tmp).unlink(missing_ok=True)


class _CountingReader(io.RawIOBase):
    """A local binary file that adds the bytes read to an :class:`IoCounter`."""

    def __init__(self, raw: BinaryIO, counter: IoCounter):
        super().__init__()
        self._raw, self._counter = raw, counter
        self.name = raw.name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        self._counter.add(read=n or 0)
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class JobView(Store):
    """A store as one job sees its run: declared, recorded reads; declared, recorded writes.

    Parameters
    ----------
    inner : Store
        The run's results layout (folder or S3 prefix).
    known : mapping of str to dict
        What earlier jobs recorded: path -> ``{"path", "size", "sha256"}``. Only these exist for the
        job (besides what it writes itself); listings and sizes come from here, without requests.
    readable : callable
        ``readable(path)``: may the job read this earlier output? (its declared inputs)
    writable : callable
        ``writable(path)``: may the job write here? (its declared outputs)
    inputs, outputs : sequence of str
        The declared patterns, for error messages.
    scratch : Path, optional
        Where :meth:`local_file` writes when ``inner`` is not a folder.

    Attributes
    ----------
    written : dict of str to dict
        Path -> ``{"path", "size", "sha256"}`` of every object the job wrote (deleted ones removed).
    """

    def __init__(self, inner: Store, known: Mapping[str, Mapping[str, Any]], *, readable: Callable[[str], bool],
                 writable: Callable[[str], bool], inputs: Iterable[str] = (), outputs: Iterable[str] = (),
                 scratch: Path | None = None):
        self.inner, self.uri, self.counter = inner, inner.uri, inner.counter
        self.known = {rel: dict(entry) for rel, entry in known.items()}
        self._readable, self._writable = readable, writable
        self._inputs, self._outputs = tuple(inputs), tuple(outputs)
        self._scratch = scratch
        self.written: dict[str, dict] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"JobView({self.inner!r})"

    def _entry(self, rel: str) -> dict | None:
        """What the job may read at ``rel`` (None: nothing there); UndeclaredAccess for an earlier
        output that is not one of its declared inputs."""
        with self._lock:
            entry = self.written.get(rel)
            if entry is not None:
                return entry
            entry = self.known.get(rel)
        if entry is not None and not self._readable(rel):
            raise UndeclaredAccess(rel, "read", self._inputs)
        return entry

    def _readable_entry(self, rel: str) -> dict:
        entry = self._entry(rel)
        if entry is None:
            raise MissingObject(rel, self.uri)
        return entry

    def _get(self, rel, start=None, end=None):
        entry = self._readable_entry(rel)
        data = self.inner._get(rel, start, end)
        if start is None and end is None and rel not in self.written:
            recorded = sha256_entry(rel, data)
            if recorded["size"] != entry["size"]:
                raise IntegrityError(rel, self.uri, f"has {recorded['size']} bytes but its completion record says "
                                     f"{entry['size']}")
            if recorded["sha256"] != entry["sha256"]:
                raise IntegrityError(rel, self.uri, f"has sha256 {recorded['sha256']} but its completion record "
                                     f"says {entry['sha256']}")
        return data

    def _check_write(self, rel: str) -> None:
        if not self._writable(rel):
            raise UndeclaredAccess(rel, "write", self._outputs)

    def _put(self, rel, data):
        self._check_write(rel)
        entry = sha256_entry(rel, data)
        self.inner._put(rel, data)
        with self._lock:
            self.written[rel] = entry

    def _put_file(self, rel, path):
        self._check_write(rel)
        entry = file_entry(rel, path)
        self.inner._put_file(rel, path)
        with self._lock:
            self.written[rel] = entry

    def _writer(self, rel):
        self._check_write(rel)
        return self.inner._writer(rel)

    @contextmanager
    def writer(self, rel: str) -> Iterator[ObjectWriter]:
        with super().writer(rel) as out:
            yield out
        with self._lock:
            self.written[rel] = out.entry()

    def _delete(self, rel):
        self._check_write(rel)
        self.inner._delete(rel)
        with self._lock:
            self.written.pop(rel, None)
            self.known.pop(rel, None)

    def _list(self, prefix):
        with self._lock:
            sizes = {r: e["size"] for r, e in {**{r: e for r, e in self.known.items() if self._readable(r)},
                                               **self.written}.items()}
        below = prefix.rstrip("/") + "/" if prefix else ""
        if prefix and self._writable(below + "-"):
            # below its own outputs the job also sees what lies there unrecorded (left by an earlier
            # attempt or run), so that replacing a folder, e.g. a zarr hierarchy, clears it
            sizes = {**{r: n for r, n in self.inner._list(prefix).items() if self._writable(r)}, **sizes}
        return {rel: n for rel, n in sorted(sizes.items()) if rel == prefix or rel.startswith(below)}

    def _size(self, rel):
        entry = self._entry(rel)
        return None if entry is None else entry["size"]

    def _open(self, rel):
        self._readable_entry(rel)
        return self.inner._open(rel)

    def _local_path(self, rel, scratch):
        self._check_write(rel)
        return self.inner._local_path(rel, scratch or self._scratch)

    def local_file(self, rel: str, *, scratch: Path | None = None):
        return super().local_file(rel, scratch=scratch or self._scratch)

    def resume(self, rel: str) -> bytes | None:
        """An object an earlier attempt of this job left at ``rel`` (one of its outputs, unrecorded
        since the attempt never finished), now recorded as written by this job; None when absent."""
        self._check_write(rel)
        try:
            data = self.inner._get(rel)
        except MissingObject:
            return None
        with self._lock:
            self.written[rel] = sha256_entry(rel, data)
        return data

    def adopt(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Record objects an earlier attempt of this job wrote (``{"path", "size", "sha256"}`` as it
        recorded them) as written by this job, without reading them: a resumed job lists them."""
        entries = [dict(e) for e in entries]
        for entry in entries:
            self._check_write(entry["path"])
        with self._lock:
            self.written.update((e["path"], e) for e in entries)

    def local_folder(self, rel: str, *, scratch: Path | None = None):
        return super().local_folder(rel, scratch=scratch or self._scratch)
