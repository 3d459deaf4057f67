"""``atlas import fiji TileConfiguration.txt -o SLIDE``: a Fiji tile set as a slide."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress

from atlas.slide.fiji import import_fiji

import_app = typer.Typer(help="Pack tile sets from other tools into the slide convention.", no_args_is_help=True)


@import_app.command("fiji")
def fiji(config: Path = typer.Argument(..., help="Fiji Grid/Collection TileConfiguration.txt (tiles in its folder)"),
         out: Path = typer.Option(..., "-o", "--out", help="slide folder to create; its name is the slide id"),
         marker: list[str] = typer.Option(None, "--marker", help="marker name of each tile channel, in order "
                                          "(repeat per channel; default DNA_1 for one-channel tiles)"),
         pixel_size: float = typer.Option(None, "--pixel-size",
                                          help="pixel size in µm (default: the tiles' calibration)")) -> None:
    """Import the tiles listed in a Fiji tile configuration as a one-cycle slide (positions = the listed (x, y))."""
    console = Console()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("reading tiles", total=None)
        slide = import_fiji(config, out, markers=marker or None, pixel_size_um=pixel_size,
                            on_tile=lambda done, total: progress.update(task, completed=done, total=total))
    console.print(f"slide: {slide.resolve()}\ncheck it with: atlas validate {slide}")


def register(app: typer.Typer) -> None:
    app.add_typer(import_app, name="import")
