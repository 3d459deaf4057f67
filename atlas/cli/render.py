"""``atlas render --image REG.ome.tif [--mask cell.ome.tif] --markers markers.csv -o OUTDIR``."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from atlas.layout import OVERVIEW_PAGE
from atlas.params import RenderParams
from atlas.slide.convention import read_markers


def render(image: Path = typer.Option(..., "--image", exists=True, dir_okay=False,
                                      help="registered (C, Y, X) pyramidal OME-TIFF, e.g. registration/S1.ome.tif"),
           markers: Path = typer.Option(..., "--markers", exists=True, dir_okay=False,
                                        help="markers.csv: one row per image channel, in order"),
           out: Path = typer.Option(..., "-o", "--out", help="overview folder to write (replaced)"),
           mask: Path | None = typer.Option(None, "--mask", exists=True, dir_okay=False,
                                            help="cell label image of the same size, for the outline layer"),
           slide_id: str | None = typer.Option(None, "--slide-id", help="title; default: the image name"),
           channels_per_group: int = typer.Option(RenderParams().channels_per_group, "--channels-per-group", min=1,
                                                  help="channels composited in each group"),
           story: Path | None = typer.Option(None, "--story", exists=True, dir_okay=False,
                                             help="story.yml (groups, waypoints); default: drafted from the image"),
           channel_layers: bool = typer.Option(False, "--channel-layers",
                                               help="also one grey tile layer per channel (Minerva composites them)"),
           ) -> None:
    """Render a Minerva-style overview: deep-zoom tiles per channel group, exhibit.json, index.html."""
    from atlas.science.overview import render_overview
    from atlas.slide.story import parse_story

    names = [m.marker_name for m in read_markers(markers)]
    authored = parse_story(story.read_text(encoding="utf-8"), story.name) if story else None
    title = slide_id or image.name.removesuffix(".tif").removesuffix(".tiff").removesuffix(".ome")
    console = Console()
    columns = (TextColumn("rendering tiles"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("tiles", total=None)
        result = render_overview(image, out, slide_id=title, markers=names, mask_path=mask,
                                 channels_per_group=channels_per_group, story=authored,
                                 channel_layers=channel_layers,
                                 progress=lambda done, total: progress.update(task, completed=done, total=total))
    console.print(f"[green]✓[/] {result['tiles']} tiles, {result['groups']} group(s), {result['levels']} levels, "
                  f"{result['waypoints']} waypoints ({'drafted' if result['drafted'] else 'authored'})"
                  + ("" if result["mask"] else " (no outline layer)") + f" in {out}")
    console.print(f"view: python -m http.server -d {out} 8000, then open http://localhost:8000/ "
                  f"(or open {out / OVERVIEW_PAGE} directly)")


def register(app: typer.Typer) -> None:
    app.command()(render)
