"""``atlas sample DIR``: make a synthetic sample slide of any size and its ground truth."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def sample(out_dir: Path = typer.Argument(..., help="folder that receives <slide_id>/ and <slide_id>.truth/"),
           slide_id: str = typer.Option("sample", help="slide id = name of the slide folder"),
           seed: int = typer.Option(0, help="random seed (0 .. 2**32 - 1); the same seed gives byte-identical files"),
           rows: int = typer.Option(3, help="tile rows (1..64)"),
           cols: int = typer.Option(3, help="tile columns (1..64)"),
           tile_size: int = typer.Option(512, help="tile side (64..4096 px, 0.65 µm each)"),
           overlap: float = typer.Option(0.1, help="nominal overlap of neighbouring tiles (fraction of a tile)"),
           cycles: int = typer.Option(2, help="imaging cycles = raw cycle files (1..20)"),
           channels: int = typer.Option(3, help="channels per cycle, the first a DNA stain (1..8)")) -> None:
    """Make a synthetic multiplexed tissue slide with its truth beside it (default: 3 x 3 tiles of
    512 px, 2 cycles x DNA + 2 markers). Made tile by tile: memory does not grow with the slide.

    The truth folder (true tile positions, nuclei/cell labels, per-cell means) is not part of the slide:
    upload only <slide_id>/. An earlier sample at the same place is replaced. See docs/sample-slide.md.
    """
    from atlas.slide.sample import make_sample  # scikit-image and scipy: loaded only when a sample is made

    console = Console()
    with console.status(f"making the sample slide ({rows} x {cols} tiles, {cycles} cycles x {channels} channels) ..."):
        slide_dir, truth_dir = make_sample(out_dir, slide_id=slide_id, seed=seed, grid=(rows, cols),
                                           tile_size=tile_size, overlap=overlap, cycles=cycles, channels=channels)
    console.print(f"slide: {slide_dir.resolve()}\ntruth: {truth_dir.resolve()}")


def register(app: typer.Typer) -> None:
    app.command()(sample)
