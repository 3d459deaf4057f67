"""The local Step Functions + Batch stand-in measures each job as its own process and applies its sizes."""
from __future__ import annotations

import signal
import sys

from atlas.stages import JobSizes, SlideSize, execution_sizes, get_stage
from localcloud.executor import over_limits, run_process, stage_command

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


def test_a_runs_peak_memory_counts_its_child_processes():
    """``atlas run`` runs each job in a process of its own: the run's figure is its processes
    together (each one's own peak summed), not the runner's alone."""
    child = ("block = bytearray(150 * 2**20); block[::4096] = b'\\x01' * len(block[::4096]); "
             "import time; time.sleep(0.5)")
    parent = (f"import subprocess, sys; held = bytearray(100 * 2**20); held[::4096] = b'\\x01' * len(held[::4096]); "
              f"subprocess.run([sys.executable, '-c', {child!r}], check=True); print('ok')")
    ran = run_process([sys.executable, "-c", parent], {})
    assert (ran.returncode, ran.output.strip()) == (0, "ok")
    assert 250 * MIB <= ran.peak_rss_bytes < 450 * MIB, ran.peak_rss_bytes / MIB


def test_a_failing_job_reports_its_exit_code_and_output():
    ran = run_process([sys.executable, "-c", "import sys; print('bad input'); sys.exit(3)"], {})
    assert (ran.returncode, ran.output.strip()) == (3, "bad input")


def test_a_job_past_its_memory_request_is_killed_as_batch_kills_it():
    """Batch's memory request is a hard limit: the executor applies the execution input's ``memory_mib``."""
    child = "block = bytearray(300 * 2**20); block[::4096] = b'\\x01' * len(block[::4096]); import time; time.sleep(5)"
    ran = run_process([sys.executable, "-c", child], {}, JobSizes(items=0, vcpus=1, memory_mib=100, timeout_s=60))
    assert ran.returncode == -signal.SIGKILL
    assert "OutOfMemoryError: Container killed due to memory usage" in ran.output
    assert ran.peak_rss_bytes > 100 * MIB


def test_a_job_past_its_timeout_is_killed_as_batch_ends_its_attempt():
    ran = run_process([sys.executable, "-c", "import time; time.sleep(30)"], {},
                      JobSizes(items=0, vcpus=1, memory_mib=1024, timeout_s=1))
    assert ran.returncode == -signal.SIGKILL
    assert "Job attempt duration exceeded timeout (1 s)" in ran.output


def test_within_its_request_a_job_runs_to_its_end():
    assert over_limits(JobSizes(items=0, vcpus=2, memory_mib=1024, timeout_s=60), 1023 * MIB, 59.0) == ""
    ran = run_process([sys.executable, "-c", "print('ok')"], {}, JobSizes(items=0, vcpus=1, memory_mib=1024,
                                                                          timeout_s=60))
    assert (ran.returncode, ran.output.strip()) == (0, "ok")


def test_each_job_gets_its_sizes_from_the_execution_input():
    """The command carries the job's vCPUs as Step Functions passes them (--vcpus), the array's size as --items."""
    sizes = execution_sizes(SlideSize(tiles=1000, cycles=10, channels=40, tile_shape=(2048, 2048)))
    merge = get_stage("segment").jobs(sizes["segment"]["items"])[-1]
    argv = stage_command(merge, slide_uri="s3://i/S1/", work_uri="s3://w/r/", run_id="r",
                         vcpus=sizes["segment-merge"]["vcpus"])
    assert argv[-5:] == ["--merge", "--items", "42", "--vcpus", "4"]
