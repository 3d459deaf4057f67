"""``atlas stitch SLIDE -o OUT``: the stitch stage alone, on a local slide folder."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer
from rich.console import Console

from atlas import layout
from atlas.errors import InvalidInput
from atlas.pipeline.local import folder_context
from atlas.slide.convention import check_slide_id
from atlas.stages import get_stage


def stitch(slide: Path = typer.Argument(..., help="slide folder <slide_id>/ (markers.csv, raw/*.ome.tif)"),
           out: Path = typer.Option(..., "-o", "--out", help="results folder (registration/ and qc/stitch/ go here)")
           ) -> None:
    """Stitch the first cycle and register the later ones (ASHLAR); write the Level 2 OME-TIFF + OME-Zarr."""
    from atlas.stages import stitch as stage

    slide = slide.resolve()
    if problems := check_slide_id(slide.name):
        raise InvalidInput(problems)
    out.mkdir(parents=True, exist_ok=True)
    job = get_stage("stitch").jobs()[0]
    console = Console()
    with console.status(f"stitching {slide.name} ..."), tempfile.TemporaryDirectory() as scratch:
        folder_context(slide, out, run_id="local").for_job(job, scratch=Path(scratch)).run(job)
    summary = json.loads((out / stage.QC_DIR / "summary.json").read_text())
    for cycle in summary["cycles"]:
        console.print(f"cycle {cycle['cycle']}: {cycle['aligned_tiles']}/{cycle['tiles']} tiles aligned"
                      + ("" if cycle["included"] else " [red](left out: not registered)[/]"))
    console.print(f"[green]✓[/] {out / layout.registration_tiff(slide.name)}\n"
                  f"[green]✓[/] {out / layout.registration_zarr(slide.name)}\n"
                  f"QC: {out / stage.QC_DIR}")


def register(app: typer.Typer) -> None:
    app.command()(stitch)
