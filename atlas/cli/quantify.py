"""``atlas quantify --image REG.ome.tif --mask cell.ome.tif [--mask nuclei.ome.tif ...] --markers markers.csv -o OUT``.

A drop-in for MCQuant (``mcquant --image --masks --channel_names --output``): the same CSV
columns and file names, plus each table as Parquet and AnnData ``.h5ad``.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from atlas import layout
from atlas.errors import InvalidInput, Problem
from atlas.slide.convention import read_marker_names

TIFF_SUFFIXES = (".tif", ".tiff", ".btf")


def image_stem(path: Path) -> str:
    """MCQuant's image name: the file name without ``.tif``/``.tiff`` and a trailing ``.ome``."""
    name = path.name
    for suffix in TIFF_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.removesuffix(".ome")


def _import_in_background(*modules: str) -> threading.Thread:
    """Import ``modules`` in a thread, while the main thread measures (numpy releases the GIL).

    Measuring needs numpy and tifffile alone; the table (pandas) and its writers (pyarrow; anndata
    with zarr, h5py and scipy.sparse) take ~0.8 s of a fresh process's CPU to import. The main
    thread imports nothing that these import meanwhile, so the two never wait on each other's
    import locks. A failed import is left for the main thread's own import to report."""
    def load() -> None:
        for module in modules:
            with contextlib.suppress(ImportError):
                importlib.import_module(module)

    thread = threading.Thread(target=load, name="import-writers")
    thread.start()
    return thread


def _reuse_freed_memory() -> None:
    """Have glibc keep freed memory (blocks up to 256 MB, up to 1 GB at the heap's top) for reuse.

    Measuring allocates per strip a few arrays of tens of MB and frees them; by default glibc
    returns such memory to the kernel, which zeroes fresh pages on the next strip's first touch:
    a third fewer page faults and ~0.3 s less CPU on the benchmark's slide, for a peak ~120 MB
    higher. A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3   # glibc's <malloc.h>
    libc.mallopt(m_mmap_threshold, 256 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


def quantify(image: Path = typer.Option(..., "--image", exists=True, dir_okay=False,
                                        help="registered (C, Y, X) OME-TIFF, e.g. registration/S1.ome.tif"),
             masks: list[Path] = typer.Option(..., "--mask", exists=True, dir_okay=False,
                                              help="label image (repeat for several); its name before the "
                                                   "first '.' names the table, e.g. cell.ome.tif -> cell"),
             markers: Path = typer.Option(..., "--markers", exists=True, dir_okay=False,
                                          help="markers.csv: marker_name per image channel, in order"),
             out: Path = typer.Option(..., "-o", "--out", file_okay=False, help="folder for the tables"),
             slide_id: str | None = typer.Option(None, "--slide-id", help="default: the image name"),
             engine: str | None = typer.Option(None, "--engine",
                                               help="segmentation method: names tables <slide>--<engine>_<mask> "
                                                    "as MCMICRO does (default: <slide>_<mask>, as mcquant)")) -> None:
    """Single-cell feature tables, MCQuant-compatible: CSV, Parquet and AnnData .h5ad per mask."""
    _reuse_freed_memory()
    preload = _import_in_background("anndata", "pyarrow.csv", "pyarrow.parquet")   # pandas comes with anndata
    from atlas.science.quantification import MORPHOLOGY_COLUMNS
    from atlas.stages.quantify import quantify_files, table_summary, write_table

    if engine is not None and ("-" in engine or not engine):
        raise typer.BadParameter("engine names contain no '-' (MCMICRO splits folder names on it)",
                                 param_hint="--engine")
    names, remove = read_marker_names(markers)
    slide = slide_id or image_stem(image)
    mask_paths = {p.name.split(".")[0]: p for p in masks}
    if len(mask_paths) != len(masks):
        raise InvalidInput(Problem(", ".join(map(str, masks)), "two masks have the same name before the first '.'",
                                   "rename them, e.g. cell.ome.tif and nuclei.ome.tif"))
    console = Console()
    columns = (TextColumn("quantifying"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("rows", total=None)
        tables, shape = quantify_files(image, mask_paths, names, remove, markers_path=markers,
                                       progress=lambda done, total: progress.update(task, completed=done, total=total))
    preload.join()
    for mask, table in tables.items():
        name = Path(layout.table_path(slide, engine, mask)).name if engine else f"{slide}_{mask}.csv"
        write_table(table, out / name, {"slide_id": slide, "engine": engine or "", "mask": mask, "image": image.name})
        figures = table_summary(table, shape)
        console.print(f"[green]✓[/] {out / name} (+ .parquet, .h5ad): {figures['cells']} cells, "
                      f"{table.shape[1] - 1 - len(MORPHOLOGY_COLUMNS)} markers, "
                      f"{figures['coverage']:.1%} of the image in cells")


def register(app: typer.Typer) -> None:
    app.command()(quantify)
