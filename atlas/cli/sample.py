"""``atlas sample DIR``: make the synthetic sample slide and its ground truth."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def sample(out_dir: Path = typer.Argument(..., help="folder that receives <slide_id>/ and <slide_id>.truth/"),
           slide_id: str = typer.Option("sample", help="slide id = name of the slide folder"),
           seed: int = typer.Option(0, help="random seed; the same seed gives byte-identical files"),
           rows: int = typer.Option(3, help="tile rows"),
           cols: int = typer.Option(3, help="tile columns"),
           tile_size: int = typer.Option(512, help="tile side (px, 0.65 µm each)"),
           overlap: float = typer.Option(0.1,
                                         help="nominal overlap of neighbouring tiles (fraction of a tile)")) -> None:
    """Make a synthetic multiplexed tissue slide (2 cycles x DNA + 2 markers) with its truth beside it.

    The truth folder (true tile positions, nuclei/cell labels, per-cell means) is not part of the slide:
    upload only <slide_id>/. An earlier sample at the same place is replaced. See docs/sample-slide.md.
    """
    from atlas.slide.sample import make_sample  # scikit-image and scipy: loaded only when a sample is made

    console = Console()
    with console.status("making the sample slide ..."):
        slide_dir, truth_dir = make_sample(out_dir, slide_id=slide_id, seed=seed, grid=(rows, cols),
                                           tile_size=tile_size, overlap=overlap)
    console.print(f"slide: {slide_dir.resolve()}\ntruth: {truth_dir.resolve()}")


def register(app: typer.Typer) -> None:
    app.command()(sample)
