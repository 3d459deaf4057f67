"""The job contract's outcomes, shared by the local runner and the Batch job: exit codes and errors.

``atlas stage`` exits with an :class:`ExitCode`; the local runner raises the same errors, so a
missing upstream stage or a changed output reads the same wherever a run happens.
"""
from __future__ import annotations

from enum import IntEnum

from atlas.stages import Job


class ExitCode(IntEnum):
    """Exit status of ``atlas stage``; Batch retry strategies can match on these.

    Only ``STORAGE_ERROR`` is worth an automatic retry (throttling, network); the others need a
    person: fix the upload (``INVALID_INPUT``), run the missing stage (``UPSTREAM_INCOMPLETE``),
    redo the stage whose outputs changed (``CORRUPT_WORK``), fix the code or resources
    (``STAGE_FAILED``) or the job definition (``MISCONFIGURED``).
    """

    OK = 0
    INVALID_INPUT = 1
    USAGE = 2  # click's own code for bad command-line arguments
    UPSTREAM_INCOMPLETE = 3
    CORRUPT_WORK = 4
    STAGE_FAILED = 5
    STORAGE_ERROR = 6
    MISCONFIGURED = 7


class JobError(Exception):
    """A stage job that cannot go on; ``exit_code`` says which kind of failure it is."""

    exit_code = ExitCode.STAGE_FAILED


class UpstreamIncomplete(JobError):
    """An earlier stage (or array item) of this run has no complete completion record."""

    exit_code = ExitCode.UPSTREAM_INCOMPLETE


class CorruptWork(JobError):
    """An earlier stage's output in the work prefix does not match its completion record."""

    exit_code = ExitCode.CORRUPT_WORK


class StageFailed(JobError):
    """The stage function itself raised (its traceback is chained)."""

    exit_code = ExitCode.STAGE_FAILED


class BadJobArguments(JobError, ValueError):
    """The stage name, array index / merge or a URI given to the job is not valid."""

    exit_code = ExitCode.USAGE


class Misconfigured(JobError):
    """The job's environment lacks a setting it needs."""

    exit_code = ExitCode.MISCONFIGURED


class UndeclaredOutput(JobError):
    """The stage wrote (or read) where the registry does not declare it may (a bug in the stage)."""

    exit_code = ExitCode.STAGE_FAILED


def upstream_incomplete(job: Job, missing: list[Job], run_id: str, where: str) -> UpstreamIncomplete:
    """The error of a job started before the jobs it builds on finished."""
    return UpstreamIncomplete(
        f"{job.label} of run {run_id} needs {', '.join(j.label for j in missing)} to be complete first: there is "
        f"no completion record of this run for them in {where} -- fix: run those jobs first (the state machine "
        "runs each stage after those it builds on); if one of them ran, its log says why it failed (a failed job "
        "writes no record)")


def corrupt_output(path: str, stage: str, why: str, where: str, record: str) -> CorruptWork:
    """The error of an earlier output that is not what its writer recorded.

    ``where`` is the run's results layout (folder or S3 prefix), ``record`` the path of the
    completion record that lists the output.
    """
    return CorruptWork(f"{path}: output of stage {stage} in {where} {why} -- fix: delete {where}{record} and "
                       "rerun the run to redo that stage")


def undeclared_outputs(job: Job, paths: list[str], action: str = "write") -> UndeclaredOutput:
    """The error of a stage that wrote (``action="write"``) or read (``"read"``) where the registry
    does not let it."""
    if action == "write":
        declared, kind = job.stage.writes(job), "outputs"
    else:
        declared, kind = job.stage.inputs, "inputs"
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    return UndeclaredOutput(f"{job.label} {'wrote' if action == 'write' else 'read'} {shown}, outside its declared "
                            f"{kind} ({', '.join(declared) or 'none'}) -- fix: keep to the declared {kind}, or "
                            f"declare the new {kind} in the stage registry (atlas/stages/__init__.py)")
