"""The local stand-in for Step Functions + Batch: every registry stage as ``atlas stage`` processes.

Each job is the same ``atlas stage`` command the Batch job definitions run (:mod:`atlas.aws.job`),
with the array index in the environment as Batch sets it.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from atlas.aws.job import ARRAY_INDEX_ENV
from atlas.pipeline.contract import ExitCode
from atlas.stages import Job, run_jobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """One ``atlas stage`` process run by :func:`execute_run`."""

    stage: str
    item: int | None
    merge: bool
    seconds: float
    output: str


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


def stage_command(job: Job, *, slide_uri: str, work_uri: str, run_id: str) -> list[str]:
    """The command line of one job: the image's ``atlas`` entrypoint with the job's arguments (array
    index from env, as in Batch)."""
    return [sys.executable, "-m", "atlas", *job.argv(slide_uri=slide_uri, work_uri=work_uri, run_id=run_id)]


def execute_run(slide_uri: str, work_uri: str, run_id: str, *, env: Mapping[str, str]) -> list[StepResult]:
    """Run every registry stage as ``atlas stage`` processes in order, as Step Functions + Batch would.

    Array stages run item by item (index in ``AWS_BATCH_JOB_ARRAY_INDEX``, as Batch sets it), then
    ``--merge``. Completed jobs skip themselves, so calling this again resumes an interrupted run.

    Parameters
    ----------
    slide_uri, work_uri, run_id : str
        As for :func:`run_stage_job`.
    env : mapping
        Variables added to this process's environment for the jobs, e.g. ``AWS_ENDPOINT_URL`` of the
        emulated AWS APIs and ``ATLAS_RESULTS_BUCKET``.

    Returns
    -------
    list of StepResult
        One per job, in order; ``output`` holds its log (it says when the job skipped itself).

    Raises
    ------
    StageJobFailed
        The first job that failed; later stages are not started.
    """
    base = {k: v for k, v in {**os.environ, **env}.items() if k != ARRAY_INDEX_ENV}
    steps: list[StepResult] = []

    for job in run_jobs():
        job_env = base if job.item is None else {**base, ARRAY_INDEX_ENV: str(job.item)}
        t0 = time.perf_counter()
        proc = subprocess.run(stage_command(job, slide_uri=slide_uri, work_uri=work_uri, run_id=run_id),
                              env=job_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        if proc.returncode != 0:
            raise StageJobFailed(job.label, proc.returncode, proc.stdout)
        steps.append(StepResult(job.stage.name, job.item, job.merge, time.perf_counter() - t0, proc.stdout))
        log.info("%s done in %.1f s", job.label, steps[-1].seconds)
    return steps
