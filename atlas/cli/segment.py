"""``atlas segment IMAGE -o nuclei.tif``: nucleus (and cell) masks of one image, offline."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress

from atlas.errors import InvalidInput, Problem
from atlas.params import SegmentParams
from atlas.science.segmentation import AUTO, ENGINES, EngineSettings
from atlas.science.segmentation.tiling import expand_to_cells, segment_image
from atlas.science.segmentation.unet import SHA256_ENV, WEIGHTS_ENV

DEFAULTS = SegmentParams()


def segment(image: Path = typer.Argument(..., help="2-D TIFF, or multi-channel (C, Y, X) OME-TIFF", exists=True,
                                         dir_okay=False),
            out: Path = typer.Option(..., "-o", "--out", help="nucleus mask: pyramidal uint32 label OME-TIFF"),
            engine: str = typer.Option(AUTO, help=f"{AUTO} (unet when weights are configured) | {' | '.join(ENGINES)}"),
            weights: str = typer.Option(None, help=f"U-Net ONNX weights, path or s3:// URI [default: ${WEIGHTS_ENV}]"),
            weights_sha256: str = typer.Option(None, help=f"expected sha256 of the weights [default: ${SHA256_ENV}]"),
            channel: str = typer.Option("0", help="nucleus channel: index or marker (OME channel) name"),
            pixel_size: float = typer.Option(None, help="pixel size in µm [default: OME PhysicalSizeX, else the "
                                             "engine's working scale, 0.65 µm]"),
            cell_out: Path = typer.Option(None, help="also write cell masks (nuclei grown by --expand-um) here"),
            expand_um: float = typer.Option(DEFAULTS.expand_um, help="nucleus -> cell growth (µm)"),
            tile_size: int = typer.Option(DEFAULTS.tile_size, help="tile size (px); memory stays bounded by it"),
            overlap: int = typer.Option(DEFAULTS.overlap, help="tile overlap (px), larger than a nucleus"),
            ) -> None:
    """Segment nuclei (classical or U-Net engine) tile by tile; optionally grow them into cells."""
    from atlas.science.pyramid import write_ome_tiff_pyramid
    from atlas.stages.segment import open_channel

    if pixel_size is not None and not pixel_size > 0:
        raise InvalidInput(Problem("--pixel-size", f"must be positive, got {pixel_size}", "give the pixel size in µm"))
    engine_ = EngineSettings.resolve(engine, os.environ, weights=weights, weights_sha256=weights_sha256).make()
    console = Console(stderr=True)
    with open_channel(image, channel) as source, tempfile.TemporaryDirectory(dir=out.parent.resolve()) as scratch:
        size = pixel_size or source.pixel_size_um
        if size is None:
            console.print(f"[yellow]{image.name} has no pixel size; assuming {engine_.pixel_size_um} µm "
                          "(give --pixel-size)[/]")
        nuclei = np.lib.format.open_memmap(Path(scratch) / "nuclei.npy", mode="w+", dtype=np.uint32,
                                           shape=source.plane.shape)
        n_tiles = math.ceil(nuclei.shape[0] / tile_size) * math.ceil(nuclei.shape[1] / tile_size)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"{engine_.name}: {image.name}", total=n_tiles)
            segment_image(source.plane, engine_, pixel_size_um=size, tile_size=tile_size, overlap=overlap,
                          out=nuclei, on_tile=lambda: progress.advance(task))
        size = size or engine_.pixel_size_um
        masks = {"nuclei": (out, nuclei)}
        if cell_out:
            cells = np.lib.format.open_memmap(Path(scratch) / "cell.npy", mode="w+", dtype=np.uint32,
                                              shape=nuclei.shape)
            expand_to_cells(nuclei, cells, expand_um / size)
            masks["cell"] = (cell_out, cells)
        for name, (path, labels) in masks.items():
            write_ome_tiff_pyramid(path, labels, channel_names=[name], pixel_size_um=size, labels=True)
            console.print(f"[green]✓[/] {path}")
        n_nuclei = int(max((int(nuclei[y:y + tile_size].max(initial=0)) for y in range(0, nuclei.shape[0], tile_size)),
                           default=0))
        del nuclei, masks
    console.print(f"{n_nuclei} nuclei in channel {source.channel_names[source.index]!r} "
                  f"({engine_.name} engine, {size} µm/px)")


def register(app: typer.Typer) -> None:
    app.command()(segment)
