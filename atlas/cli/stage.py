"""``atlas stage NAME``: the Batch job entrypoint, one stage of one run, S3 in and S3 out."""
from __future__ import annotations

import logging
import os
import traceback

import typer
from botocore.exceptions import BotoCoreError, ClientError

from atlas.aws.job import ARRAY_INDEX_ENV, run_stage_job
from atlas.errors import InvalidInput
from atlas.pipeline.contract import ExitCode, JobError, StageFailed
from atlas.stages import STAGES, get_stage


def job_failed(exc: JobError) -> typer.Exit:
    """Report a job's failure on stderr (a failed stage's traceback first, for ops; then one line
    naming the job and the fix) and the exit with its code (:class:`ExitCode`)."""
    if isinstance(exc, StageFailed):
        traceback.print_exception(exc.__cause__ or exc)
    typer.secho(f"error: {exc}", fg="red", err=True)
    return typer.Exit(int(exc.exit_code))


def stage(name: str = typer.Argument(..., help=f"stage: {', '.join(s.name for s in STAGES)}"),
          slide_uri: str = typer.Option(..., help="s3://<ingest>/<slide_id>/ (the slide, manifest.json included)"),
          work_uri: str = typer.Option(..., help="s3://<work>/<run_id>/ (this run's outputs, stage by stage)"),
          run_id: str = typer.Option(..., help="run id (also the Step Functions execution name)"),
          array_index: int = typer.Option(None, help=f"item of an array stage (default: env {ARRAY_INDEX_ENV})"),
          merge: bool = typer.Option(False, "--merge", help="the merge step of an array stage"),
          items: int = typer.Option(None, help="items of an array stage's array in this run [default: the "
                                    "registry's]"),
          vcpus: int = typer.Option(None, help="vCPUs the job got in this run; its thread pools follow them "
                                    "[default: the registry's]")) -> None:
    """Run one stage of a run as a Batch job, reading and writing S3 where the data lies; record it last.

    Skips itself when this run's completion record for the stage is already complete. Exit codes: 0 ok,
    1 invalid input, 2 usage, 3 upstream incomplete, 4 corrupt work, 5 stage failed, 6 storage error
    (worth a retry), 7 misconfigured (docs/containers.md).
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("atlas").setLevel(logging.INFO)
    try:
        spec = get_stage(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="NAME") from exc
    if array_index is None and spec.array_size and not merge and os.environ.get(ARRAY_INDEX_ENV):
        array_index = int(os.environ[ARRAY_INDEX_ENV])
    try:
        result = run_stage_job(name, slide_uri=slide_uri, work_uri=work_uri, run_id=run_id,
                               array_index=array_index, merge=merge, items=items, vcpus=vcpus)
    except JobError as exc:
        raise job_failed(exc) from exc
    except (BotoCoreError, ClientError) as exc:
        typer.secho(f"error: S3 request failed, worth a retry: {exc}", fg="red", err=True)
        raise typer.Exit(int(ExitCode.STORAGE_ERROR)) from exc
    except InvalidInput:
        raise  # printed file by file by the CLI, exit 1
    except Exception as exc:  # a bug in the job wrapper itself: keep its traceback in the job log
        traceback.print_exception(exc)
        raise typer.Exit(int(ExitCode.STAGE_FAILED)) from exc
    where = f"{result.stage}" + ("" if result.item is None else f" item {result.item}")
    typer.echo(f"{where}: " + ("already complete, skipped" if result.skipped else
                               f"done, {len(result.record['outputs'])} outputs recorded"))


def register(app: typer.Typer) -> None:
    app.command()(stage)
