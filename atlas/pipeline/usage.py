"""What one job used: peak memory, peak scratch disk, bytes moved through its stores.

These go into every completion record (:func:`atlas.pipeline.records.new_record`) so that ops and
``benchmarks/scale.py`` see what each job of a run cost, measured the same way locally and on Batch.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import sys
import threading
from pathlib import Path

from atlas.storage import IoCounter

SAMPLE_SECONDS = 0.2  # how often the scratch folder is measured


def _vm_hwm() -> int | None:
    """Peak resident set size of this process (bytes) since the last reset, from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Start measuring the peak RSS afresh (Linux >= 4.0: ``5`` into /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_freed_memory() -> None:
    """Give the memory freed by earlier jobs of this process back to the kernel before measuring a job.

    Where jobs share a process (a test, :func:`atlas.pipeline.local.run_local_job` called in turn),
    glibc keeps large freed blocks in its heap once its mmap threshold has risen (up to 32 MB), so
    without this every job's peak RSS would carry what the jobs before it freed (at 1,024 tiles the
    quantify items measured ~0.5-0.8 GB of segment's freed memory); Arrow's pool likewise, where a
    job used it. A Batch job, and a job of ``atlas run``, is a process of its own, where this changes
    nothing. glibc's part is a no-op where libc is not glibc.
    """
    gc.collect()
    if "pyarrow" in sys.modules:   # Arrow's own pool (mimalloc or jemalloc) keeps what tables freed
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def folder_bytes(folder: Path) -> int:
    """Bytes of the files below ``folder`` (what they occupy, as allocated blocks)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue  # removed while walking
            total += min(st.st_size, st.st_blocks * 512) if st.st_blocks else st.st_size
    return total


class JobUsage:
    """Measures one job while it runs (a context manager).

    Parameters
    ----------
    scratch : Path
        The job's scratch folder; sampled every :data:`SAMPLE_SECONDS` for its peak size.
    counter : IoCounter
        The counter of the job's stores; the bytes moved while measuring are reported.

    Attributes after the block
    --------------------------
    figures : dict
        ``peak_rss_bytes`` (the process's peak RSS during the job where /proc allows a reset, else
        its lifetime peak), ``scratch_peak_bytes``, ``s3_bytes_read``, ``s3_bytes_written`` (bytes
        through the job's stores: S3 requests on Batch, file bytes in a local run), ``cpu_seconds``
        (user + system time of all the process's threads during the job; against ``vcpu_seconds``
        it says how well the job used what it was given).
    """

    def __init__(self, scratch: Path, counter: IoCounter):
        self.scratch, self.counter = Path(scratch), counter
        self.figures: dict[str, int] = {}
        self._peak_scratch = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="scratch-sampler", daemon=True)

    def _sample(self) -> None:
        while True:
            self._peak_scratch = max(self._peak_scratch, folder_bytes(self.scratch))
            if self._stop.wait(SAMPLE_SECONDS):
                return

    def __enter__(self) -> JobUsage:
        _release_freed_memory()
        self._reset = _reset_peak_rss()
        self._read0, self._written0 = self.counter.read, self.counter.written
        self._cpu0 = _cpu_seconds()
        self.counter.take_largest_local_file()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        # the sampler may miss a file that lived between two samples; the stores know the largest
        self._peak_scratch = max(self._peak_scratch, folder_bytes(self.scratch),
                                 self.counter.take_largest_local_file())
        hwm = _vm_hwm() if self._reset else None
        peak = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.figures = {"peak_rss_bytes": int(peak), "scratch_peak_bytes": int(self._peak_scratch),
                        "s3_bytes_read": self.counter.read - self._read0,
                        "s3_bytes_written": self.counter.written - self._written0,
                        "cpu_seconds": round(_cpu_seconds() - self._cpu0, 3)}
