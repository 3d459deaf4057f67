"""The raw cycles as the stitching stages read them (``illuminate``, ``align``, ``mosaic``).

Reads ``raw/*.ome.tif`` (one per cycle, see :mod:`atlas.slide.ome`) and ``markers.csv`` of the
slide through the slide store, tiles by byte ranges; the illumination profiles of a cycle
(``illumination/<slide>-cycle-NN-{ffp,dfp}.tif``, MCMICRO's names) through the work store.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import tifffile

from atlas import layout
from atlas.errors import InvalidInput, Problem
from atlas.science.illumination import correct
from atlas.science.stitch import TileSet
from atlas.slide.convention import MARKERS, RAW, RAW_SUFFIXES, Marker, parse_markers
from atlas.slide.ome import CycleMetadata, read_cycle_metadata
from atlas.slide.validate import check_cycles
from atlas.stages import StageContext
from atlas.storage import MissingObject, Store

QC_DIR = f"{layout.QC}/stitch"
ALIGNMENT = f"{layout.WORK}/align/alignment.json"  # where align leaves the tiles' placements for mosaic


def cycle_files(slide: Store) -> list[str]:
    """The slide's cycle files (slide-relative paths) in cycle order (sorted by name)."""
    return sorted(rel for rel in slide.list(RAW) if rel.lower().endswith(RAW_SUFFIXES))


def read_cycles(slide: Store, names: list[str]) -> dict[str, CycleMetadata | Exception]:
    """OME metadata of each cycle file (header bytes only, by ranged reads), or the error reading it raised."""
    cycles: dict[str, CycleMetadata | Exception] = {}
    for name in names:
        try:
            with slide.open(name) as source:
                cycles[name] = read_cycle_metadata(source)
        except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
            cycles[name] = exc
    return cycles


def checked_cycles(ctx: StageContext) -> tuple[list[Marker], list[str], list[CycleMetadata]]:
    """The slide's markers, cycle files and their metadata, checked against each other (InvalidInput)."""
    try:
        markers = parse_markers(ctx.slide.read_text(MARKERS))
    except MissingObject as exc:
        raise InvalidInput(Problem(MARKERS, f"not found in {ctx.slide.uri}",
                                   "add markers.csv (channel_number,cycle_number,marker_name; one row per channel)")
                           ) from exc
    files = cycle_files(ctx.slide)
    cycles = read_cycles(ctx.slide, files)
    if problems := check_cycles(markers, cycles, ctx.params.stitch.align_channel):
        raise InvalidInput(problems)
    return markers, files, [cycles[name] for name in files]


def illumination_paths(slide_id: str, cycle: int) -> tuple[str, str]:
    """MCMICRO's flat- and dark-field profile names of a cycle, e.g. ``illumination/S1-cycle-01-ffp.tif``."""
    stem = f"{layout.ILLUMINATION}/{slide_id}-cycle-{cycle:02d}"
    return f"{stem}-ffp.tif", f"{stem}-dfp.tif"


def tiff_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, photometric="minisblack")
    return buffer.getvalue()


def open_cycle(stack: contextlib.ExitStack, ctx: StageContext, name: str, meta: CycleMetadata,
               cycle: int) -> TileSet:
    """Cycle ``cycle`` (1-based) as a TileSet read by byte ranges from the slide store; with
    ``stitch.illumination``, its tiles shading-corrected by the cycle's profiles (written by the
    illuminate stage)."""
    params = ctx.params.stitch
    tif = stack.enter_context(tifffile.TiffFile(stack.enter_context(ctx.slide.open(name)), _multifile=False))
    tif.filehandle.set_lock(True)  # threads read the first cycle's tiles at once: each seek + read whole
    series = tif.series
    if len(series) != meta.n_tiles:
        raise InvalidInput(Problem(name, f"OME-XML lists {meta.n_tiles} tiles but the file holds "
                                   f"{len(series)} series", "re-export the cycle file"))

    def read_tile(t: int, c: int) -> np.ndarray:
        return series[t].pages[c].asarray()

    if params.illumination:
        flat, dark = (tifffile.imread(io.BytesIO(ctx.work.read_bytes(rel)))
                      for rel in illumination_paths(ctx.slide_id, cycle))
        raw_tile = read_tile

        def read_tile(t: int, c: int) -> np.ndarray:
            return correct(raw_tile(t, c), flat[c], dark[c])

    return TileSet(read_tile, meta.positions_um, meta.tile_shape, meta.n_channels, meta.dtype,
                   meta.pixel_size_um, flip_x=params.flip_x, flip_y=params.flip_y)


def write_json(store: Store, rel: str, doc: dict) -> None:
    store.write_text(rel, json.dumps(doc, indent=1, allow_nan=False) + "\n")
