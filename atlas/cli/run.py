"""``atlas run SLIDE -o OUT``: the whole pipeline locally."""
from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from atlas import layout
from atlas.pipeline.contract import JobError
from atlas.pipeline.local import run_pipeline
from atlas.stages import Stage


def run(slide: Path = typer.Argument(..., help="slide folder <slide_id>/"),
        out: Path = typer.Option(..., "-o", "--out", help="results folder (resumes if it holds a partial run)"),
        run_id: str = typer.Option(None, help="run id (default: <slide_id>-<manifest sha256[:12]>)")) -> None:
    """Run every stage (the stitching stages, segment, quantify, render, publish) locally; completed jobs are
    skipped. Exit codes as ``atlas stage``'s (docs/containers.md): 1 invalid input, 5 a job failed."""
    console = Console()
    status = console.status("starting")

    def on_stage(stage: Stage, event: str) -> None:
        if event == "start":
            status.update(f"[bold]{stage.name}[/] running ...")
        else:
            console.print(f"[green]✓[/] {stage.name}" + (" (already complete)" if event == "skip" else ""))

    try:
        with status:
            manifest = run_pipeline(slide, out, run_id=run_id, on_stage=on_stage, settings=os.environ)
    except JobError as exc:
        from atlas.cli.stage import job_failed  # only on failure: it loads the Batch job's module (boto3)
        raise job_failed(exc) from exc
    console.print(f"results:  {out.resolve()}\nmanifest: {manifest.resolve()}\n"
                  f"overview: {(out / layout.OVERVIEW / layout.OVERVIEW_PAGE).resolve()}")


def register(app: typer.Typer) -> None:
    app.command()(run)
