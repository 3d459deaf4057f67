"""``atlas status [SLIDE]`` and ``atlas rerun SLIDE``: for ops, against the deployed catalog and state machine."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from atlas.aws import catalog, ops
from atlas.cli.data import usd
from atlas.slide.convention import PARAMS
from atlas.slide.story import STORY
from atlas.stages import STAGES

TABLE = typer.Option(None, "--table", envvar=catalog.ENV_CATALOG_TABLE, show_envvar=True,
                     help="catalog table (the pipeline stack's CatalogTableName output)")
STATE_STYLE = {"done": "green", "reused": "cyan", "running": "yellow", "failed": "red", "pending": "dim",
               "SUCCEEDED": "green", "RUNNING": "yellow", "READY": "yellow", "FAILED": "red", "INVALID": "red",
               "COLLECTING": "dim"}


def styled(text: str | None) -> str:
    return f"[{STATE_STYLE.get(text, 'default')}]{text}[/]" if text else "-"


def cost(x: float | None) -> str:
    return "?" if x is None else usd(x)


def status(slide: str = typer.Argument(None, help="slide id (default: every slide)"), table: str = TABLE) -> None:
    """Where a slide is: catalog state, current stage, errors, run id and compute cost so far (or all slides)."""
    console = Console()
    catalog_table = ops.catalog_table(table)
    if slide is None:
        slides = ops.list_catalog_slides(catalog_table)
        overview = Table("slide", "status", "run", "updated", "problem", title=f"catalog {catalog_table.name}")
        for s in slides:
            problem = s.get("error") or (f"{len(s['problems'])} problem(s)" if s.get("problems") else "") or (
                f"{len(s['missing'])} file(s) missing" if s.get("missing") else "")
            overview.add_row(s["slide_id"], styled(s.get("status")), s.get("run_id") or "-", s.get("updated_at", ""),
                             problem)
        console.print(overview if slides else "no slides in the catalog yet")
        return
    st = ops.slide_status(slide, table=catalog_table)
    console.print(f"[bold]{st.slide_id}[/]: {styled(st.status)}  run {st.run_id or '-'}"
                  + (f"  (execution {styled(st.execution_status)})" if st.execution_status else ""))
    if st.current_jobs:  # one per parallel branch running
        console.print(f"current stage{'s' if len(st.current_jobs) > 1 else ''}: [bold]{', '.join(st.current_jobs)}[/]")
    if st.execution_arn:
        console.print(f"execution: {st.execution_arn}", highlight=False)
    if st.stages and st.run_id:
        stages = Table("stage", "state", "items", "time", "vCPU-h", "instance", "cost (on-demand)")
        for p in st.stages:
            stages.add_row(p.stage, styled(p.state), f"{p.items_done}/{p.items}" if p.items else "",
                           f"{p.seconds / 60:.1f} min" if p.seconds else "",
                           f"{p.vcpu_seconds / 3600:.2f}" if p.vcpu_seconds else "", ", ".join(p.instance_types),
                           cost(p.cost_usd) if p.state in ("done", "reused") or p.vcpu_seconds else "")
        console.print(stages)
        console.print(f"compute cost so far: [bold]{usd(st.cost_usd)}[/]"
                      + ("" if st.cost_complete else " (plus jobs on instance types without a price)")
                      + f" -- on-demand prices of {ops.COMPUTE_PRICES.as_of}; Spot costs less")
    for problem in st.problems:
        console.print(f"[red]problem:[/] {problem['file']}: {problem['message']} -- fix: {problem['fix']}",
                      highlight=False)
    for missing in st.missing:
        console.print(f"[yellow]missing:[/] {missing['path']}: {missing.get('why', '')}", highlight=False)
    if st.error or st.cause:
        console.print(f"[red]error:[/] {st.error}\n[red]cause:[/] {st.cause}", highlight=False)
        stage = ops.job_stage(st.current_stage) if st.current_stage else None
        console.print(f"raw data is kept; after fixing the cause: atlas rerun {slide}"
                      + (f" --from {stage.name}" if stage else ""))
    if st.results_uri:
        console.print(f"results: {st.results_uri}\noverview: {st.overview_uri}", highlight=False)
    if st.work_uri:
        console.print(f"work: {st.work_uri}", highlight=False)
    if len(st.runs) > 1:
        history = Table("run", "status", "started", "rerun of", title="runs")
        for run in st.runs:
            history.add_row(run["run_id"], styled(run.get("status")), run.get("started_at", ""),
                            run.get("rerun_of", "") + (f" --from {run['from_stage']}" if run.get("rerun_of") else ""))
        console.print(history)


def rerun(slide: str = typer.Argument(..., help="slide id"),
          from_stage: str = typer.Option(None, "--from", help="first stage to redo; earlier outputs are reused "
                                                               f"({', '.join(s.name for s in STAGES)})"),
          params: Path = typer.Option(None, "--params", exists=True, dir_okay=False,
                                      help="params.yml to use instead of the slide's"),
          story: Path = typer.Option(None, "--story", exists=True, dir_okay=False,
                                     help="story.yml to use instead of the slide's (e.g. from `atlas story draft`, "
                                          "edited); with --from render only the overview is redone"),
          table: str = TABLE) -> None:
    """Run a slide again under a new run id (the earlier run and its results are kept)."""
    console = Console()
    started = ops.rerun(slide, table=ops.catalog_table(table), from_stage=from_stage,
                        params_text=params.read_text() if params else None,
                        params_file=str(params) if params else PARAMS,
                        story_text=story.read_text(encoding="utf-8") if story else None,
                        story_file=str(story) if story else STORY)
    console.print(f"[green]✓[/] started run [bold]{started.run_id}[/] (rerun of {started.previous_run_id})")
    if started.reused:
        console.print(f"reused from {started.previous_run_id}: {', '.join(started.reused)}")
    if started.params_override or started.story_override:
        used = [str(f) for f, on in ((params, started.params_override), (story, started.story_override)) if on]
        console.print(f"with {' and '.join(used)} (slide copy at {started.slide_uri})", highlight=False)
    console.print(f"execution: {started.execution_arn}\nwatch it: atlas status {slide}\n"
                  f"run {started.previous_run_id} and its results are kept", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(status)
    app.command()(rerun)
