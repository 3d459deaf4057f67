"""The local Step Functions + Batch stand-in measures each job as its own process."""
from __future__ import annotations

import sys

from localcloud.executor import run_process

MIB = 2 ** 20


def test_a_jobs_peak_memory_is_its_own_not_its_parents():
    """A child's rusage would start from the RSS of the process that forked it (the demo, with moto in it):
    the figure must be the child's own peak, whatever the parent holds."""
    held = bytearray(400 * MIB)  # the parent's memory: touched, resident
    held[:: 4096] = b"\x01" * len(held[:: 4096])
    # the child holds 150 MiB for half a second (the sampler reads it every 50 ms), then exits
    child = ("import time; block = bytearray(150 * 2**20); block[::4096] = b'\\x01' * len(block[::4096]); "
             "time.sleep(0.5); print('ok')")
    ran = run_process([sys.executable, "-c", child], {})
    assert (ran.returncode, ran.output.strip()) == (0, "ok")
    assert 150 * MIB <= ran.peak_rss_bytes < 300 * MIB, ran.peak_rss_bytes / MIB
    assert 0 < ran.cpu_seconds < 30
    assert held[0] == 1


def test_a_failing_job_reports_its_exit_code_and_output():
    ran = run_process([sys.executable, "-c", "import sys; print('bad input'); sys.exit(3)"], {})
    assert (ran.returncode, ran.output.strip()) == (3, "bad input")
