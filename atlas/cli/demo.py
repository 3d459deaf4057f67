"""``atlas demo [-o OUT]``: the whole system locally, event-driven, AWS emulated on localhost."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from atlas.aws import catalog


def demo(out: Path = typer.Option(Path("out/demo"), "-o", "--out",
                                  help="folder for the sample slide and the downloaded results"),
         slide: Path = typer.Option(None, "--slide", exists=True, file_okay=False,
                                    help="a slide folder to run instead of the built-in sample (e.g. one made by "
                                         "`atlas sample DIR --rows R --cols C`)")) -> None:
    """Make the sample slide (or take --slide), upload it, and let the real Lambda handlers and the stage
    jobs process it. Each job runs as its own process; OUT/jobs.json lists them with time and peak memory."""
    from localcloud.demo import run_demo  # the harness runs from a checkout only: not needed by other verbs

    console = Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console, transient=True) as progress:
        result = run_demo(out, slide_dir=slide, progress=progress,
                          say=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    record = result.record
    console.print(f"\nslide {catalog.slide_id_of(record.get('pk', ''))}: [bold]{record.get('status')}[/] "
                  f"(run {record.get('run_id', '-')})")
    for note in result.notifications:
        console.print(f"[dim]notification: {escape(note.get('Subject', ''))}[/]\n{escape(note.get('Message', ''))}")
    if result.overview is None:
        for problem in record.get("problems", []):
            console.print(f"[red]{escape(problem['file'])}[/]: {escape(problem['message'])} "
                          f"-- fix: {escape(problem['fix'])}")
        if record.get("cause"):
            console.print(f"[red]cause:[/] {escape(record['cause'])}")
        raise typer.Exit(1)
    # soft_wrap: the paths stay on one line each, whatever the terminal width (copy-paste, scripts)
    console.print(f"results:  {result.results_dir.resolve()}\noverview: {result.overview.resolve()}\n"
                  f"portal:   {result.portal.resolve()}", soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(demo)
