"""The local stand-in for Step Functions + Batch: every registry stage as ``atlas stage`` processes.

Each job is the same ``atlas stage`` command the Batch job definitions run (:mod:`atlas.aws.job`),
with the array index in the environment as Batch sets it, and the resources the execution input
gives it applied as Batch applies them: its vCPUs passed as ``--vcpus``, the process killed when it
runs past its timeout or its peak memory passes its request. The jobs run in the shape the state
machine runs them (:func:`atlas.stages.flow.flow`); the branches of a parallel step run one after
another here, so a run's jobs are recorded in registry order.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import NamedTuple

from atlas.aws.job import ARRAY_INDEX_ENV
from atlas.pipeline.contract import ExitCode
from atlas.stages import Job, JobSizes, Stage, items_in, run_sizes
from atlas.stages.flow import Flow, flow

log = logging.getLogger(__name__)
RSS_SAMPLE_S = 0.05  # how often a job's peak memory is read


@dataclass(frozen=True)
class StepResult:
    """One ``atlas stage`` process run by :func:`execute_run`."""

    stage: str
    item: int | None
    merge: bool
    seconds: float
    output: str
    peak_rss_bytes: int = 0  # the process's peak resident memory (:func:`run_process`)
    cpu_seconds: float = 0.0
    sizes: JobSizes | None = None  # the resources it was given (vCPUs, memory and timeout applied)

    @property
    def label(self) -> str:
        """``stage``, ``stage[item]`` or ``stage merge``."""
        return self.stage + ("" if self.item is None else f"[{self.item}]") + (" merge" if self.merge else "")


class StageJobFailed(RuntimeError):
    """An ``atlas stage`` process exited non-zero; ``exit_code`` is its :class:`ExitCode` where known."""

    def __init__(self, step: str, returncode: int, output: str):
        self.step, self.returncode, self.output = step, returncode, output
        try:
            self.exit_code: ExitCode | None = ExitCode(returncode)
        except ValueError:
            self.exit_code = None
        kind = self.exit_code.name if self.exit_code is not None else f"signal/exit {returncode}"
        tail = "\n".join(output.strip().splitlines()[-20:])
        super().__init__(f"stage job {step} failed ({kind}):\n{tail}")


def stage_command(job: Job, *, slide_uri: str, work_uri: str, run_id: str, vcpus: int | None = None) -> list[str]:
    """The command line of one job: the image's ``atlas`` entrypoint with the job's arguments (array
    index from env, as in Batch; the array's size and the job's vCPUs as Step Functions passes them)."""
    return [sys.executable, "-m", "atlas", *job.argv(slide_uri=slide_uri, work_uri=work_uri, run_id=run_id,
                                                     items=job.count or None, vcpus=vcpus)]


def _vm_hwm(pid: int) -> int:
    """Peak resident memory (VmHWM, bytes) of a running process, from /proc; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """The live processes below ``pid`` (children, theirs, ...), from ``/proc/<pid>/task/*/children``."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def peak_rss(pid: int) -> int:
    """Peak resident memory (bytes) of a running process and its descendants: each one's own peak
    (VmHWM) summed over those alive now; 0 once it is gone.

    An upper bound of what they held together: a page shared by several (a forked child's
    libraries) counts in each, and the peaks need not have been at the same time. For one process
    (a Batch job) it is its VmHWM; for ``atlas run``, the runner, its fork server and the job
    running (:mod:`atlas.pipeline.local`)."""
    return sum(_vm_hwm(p) for p in [pid, *descendants(pid)])


class ProcessRun(NamedTuple):
    """A finished process: exit code, stdout and stderr together, peak RSS (bytes), CPU time (s)."""

    returncode: int
    output: str
    peak_rss_bytes: int
    cpu_seconds: float


def run_process(argv: list[str], env: Mapping[str, str], limits: JobSizes | None = None) -> ProcessRun:
    """Run a command to its end and measure it; with ``limits``, kill it as Batch ends a job.

    The peak memory is :func:`peak_rss` of the process and its descendants, read every
    :data:`RSS_SAMPLE_S` while it runs (its last fraction of a second is not seen), not its rusage:
    a child's ``ru_maxrss`` starts from the RSS of the parent it was forked from, here the demo with
    its emulated AWS. The CPU time (user + system, the children it waited for included) is its
    rusage. ``limits``: the process is killed (SIGKILL,
    the reason appended to its output) once its peak memory passes ``memory_mib`` (Batch's hard
    container limit) or it has run ``timeout_s`` (Batch's attempt duration).
    """
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, killed = 0, ""
    done = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        nonlocal peak, killed
        while not done.wait(RSS_SAMPLE_S):
            peak = max(peak, peak_rss(proc.pid))
            if limits is not None and not killed and (reason := over_limits(limits, peak, time.monotonic() - started)):
                killed = reason
                proc.kill()

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    with proc.stdout:
        output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    return ProcessRun(proc.returncode, output + (f"\n{killed}\n" if killed else ""), peak,
                      usage.ru_utime + usage.ru_stime)


def over_limits(limits: JobSizes, peak_rss_bytes: int, seconds: float) -> str:
    """Why Batch would end a job at this point ('' while it is within its request), in Batch's words."""
    if peak_rss_bytes > limits.memory_mib * 2 ** 20:
        return (f"OutOfMemoryError: Container killed due to memory usage ({peak_rss_bytes / 2 ** 20:.0f} MiB "
                f"over its {limits.memory_mib} MiB)")
    if seconds > limits.timeout_s:
        return f"Job attempt duration exceeded timeout ({limits.timeout_s} s)"
    return ""


def execute_run(slide_uri: str, work_uri: str, run_id: str, *, env: Mapping[str, str],
                sizes: Mapping[str, Mapping[str, int]] | None = None) -> list[StepResult]:
    """Run every registry stage as ``atlas stage`` processes, as Step Functions + Batch would.

    The stages run in the state machine's shape (:func:`atlas.stages.flow.flow`), the branches of a
    parallel step one after another. Array stages run item by item (index in
    ``AWS_BATCH_JOB_ARRAY_INDEX``, as Batch sets it), then ``--merge``. Completed jobs skip
    themselves, so calling this again resumes an interrupted run. Each job is its own process, as
    each is its own container on Batch: its peak memory is its own.

    Parameters
    ----------
    slide_uri, work_uri, run_id : str
        As for :func:`run_stage_job`.
    env : mapping
        Variables added to this process's environment for the jobs, e.g. ``AWS_ENDPOINT_URL`` of the
        emulated AWS APIs and ``ATLAS_RESULTS_BUCKET``.
    sizes : mapping, optional
        The execution input's ``sizes`` (:func:`atlas.stages.execution_sizes`), applied as the state
        machine applies them: each array stage runs as many items as it says, each job gets its
        ``vcpus`` (``--vcpus``) and is killed past its ``memory_mib`` or ``timeout_s``
        (:func:`run_process`); default the registry's.

    Returns
    -------
    list of StepResult
        One per job, in order, each with the sizes it was given; ``output`` holds its log (it says
        when the job skipped itself).

    Raises
    ------
    StageJobFailed
        The first job that failed; later stages are not started.
    """
    base = {k: v for k, v in {**os.environ, **env}.items() if k != ARRAY_INDEX_ENV}
    given = {**{name: asdict(s) for name, s in run_sizes(None).items()}, **(sizes or {})}
    steps: list[StepResult] = []

    def run_stage(stage: Stage) -> None:
        for job in stage.jobs(items_in(given, stage)):
            limits = JobSizes(**{k: int(v) for k, v in given[job.name].items()})
            job_env = base if job.item is None else {**base, ARRAY_INDEX_ENV: str(job.item)}
            t0 = time.perf_counter()
            ran = run_process(stage_command(job, slide_uri=slide_uri, work_uri=work_uri, run_id=run_id,
                                            vcpus=limits.vcpus), job_env, limits)
            if ran.returncode != 0:
                raise StageJobFailed(job.label, ran.returncode, ran.output)
            steps.append(StepResult(job.stage.name, job.item, job.merge, time.perf_counter() - t0, ran.output,
                                    ran.peak_rss_bytes, ran.cpu_seconds, limits))
            log.info("%s done in %.1f s", job.label, steps[-1].seconds)

    def run_steps(flow_steps: Flow) -> None:
        for step in flow_steps:
            if isinstance(step, Stage):
                run_stage(step)
            else:  # a Parallel state: Step Functions runs the branches side by side, here one by one
                for branch in step:
                    run_steps(branch)

    run_steps(flow())
    return steps
