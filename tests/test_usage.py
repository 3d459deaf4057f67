"""What a job's completion record says it used, measured in the process that ran it."""
from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys

import pytest

MIB = 2 ** 20

# Two jobs in one process (the local runner): the first leaves 200 MB freed but kept in glibc's heap
# (told to serve blocks below 256 MB from the heap and keep up to 1 GB, as `atlas quantify` does; small
# live arrays between the blocks), the second allocates nothing.
TWO_JOBS = """
import ctypes, json, sys, tempfile
import numpy as np
from atlas.pipeline.usage import JobUsage
from atlas.storage import IoCounter

libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 256 << 20)   # M_MMAP_THRESHOLD
libc.mallopt(-1, 1 << 30)     # M_TRIM_THRESHOLD

def first():
    blocks = []
    for _ in range(25):
        blocks.append(np.ones(8 << 20, np.uint8))
        pins.append(np.ones(1000))
    del blocks

pins = []
peaks = []
for job in (first, lambda: None):
    with tempfile.TemporaryDirectory() as scratch, JobUsage(scratch, IoCounter()) as usage:
        job()
    peaks.append(usage.figures["peak_rss_bytes"])
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not (ctypes.util.find_library("c") or "").startswith("libc.so.6")
                    or not sys.platform.startswith("linux"), reason="glibc's heap on Linux")
def test_a_job_does_not_carry_the_memory_an_earlier_job_of_the_process_freed():
    ran = subprocess.run([sys.executable, "-c", TWO_JOBS], capture_output=True, text=True, check=True)
    first, second = json.loads(ran.stdout)
    assert first - second > 150 * MIB, (first / MIB, second / MIB)
