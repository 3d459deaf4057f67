"""Stage ``stitch``: raw cycle files -> Level 2 registered image (OME-TIFF + OME-Zarr) and QC.

Reads ``raw/*.ome.tif`` (one per cycle, see :mod:`atlas.slide.ome`) and ``markers.csv`` of the
slide; writes ``registration/<slide>.ome.tif``, ``registration/<slide>.ome.zarr``, with
``stitch.illumination`` the per-cycle flat/dark fields ``illumination/<slide>-cycle-NN-{ffp,dfp}.tif``
(applied to every tile before alignment and stitching), and ``qc/stitch/`` (``tiles.csv``,
``edges.csv``, ``mosaic.png``, ``summary.json``). The science lives in :mod:`atlas.science.stitch`;
this module is the file I/O.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json

import numpy as np
import tifffile
import zarr
from PIL import Image, ImageDraw

from atlas import layout
from atlas.errors import InvalidInput, Problem
from atlas.science.illumination import correct, estimate_flatfield
from atlas.science.pyramid import write_ome_tiff_pyramid, write_ome_zarr
from atlas.science.stitch import (
    CycleAlignment,
    MosaicImage,
    TileSet,
    align_cycles,
    mosaic_shape,
    thumbnail_uint8,
)
from atlas.slide import htan
from atlas.slide.convention import MARKERS, RAW, RAW_SUFFIXES, parse_markers
from atlas.slide.ome import CycleMetadata, read_cycle_metadata
from atlas.slide.validate import check_cycles
from atlas.stages import StageContext
from atlas.storage import MissingObject, Store

QC_DIR = f"{layout.QC}/stitch"
QC_PNG_MAX_SIDE = 1024


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


def illumination_paths(slide_id: str, cycle: int) -> tuple[str, str]:
    """MCMICRO's flat- and dark-field profile names of a cycle, e.g. ``illumination/S1-cycle-01-ffp.tif``."""
    stem = f"{layout.ILLUMINATION}/{slide_id}-cycle-{cycle:02d}"
    return f"{stem}-ffp.tif", f"{stem}-dfp.tif"


def _open_cycle(stack: contextlib.ExitStack, ctx: StageContext, name: str, meta: CycleMetadata,
                profiles: tuple[str, str] | None = None) -> TileSet:
    """The cycle's tiles as a TileSet read by byte ranges from the slide store; with ``profiles``
    (ffp, dfp paths in the results), shading-corrected tiles whose (C, Y, X) flat and dark fields are
    estimated from this cycle and written there."""
    params = ctx.params.stitch
    tif = stack.enter_context(tifffile.TiffFile(stack.enter_context(ctx.slide.open(name)), _multifile=False))
    series = tif.series
    if len(series) != meta.n_tiles:
        raise InvalidInput(Problem(name, f"OME-XML lists {meta.n_tiles} tiles but the file holds "
                                   f"{len(series)} series", "re-export the cycle file"))

    def raw_tile(t: int, c: int) -> np.ndarray:
        return series[t].pages[c].asarray()

    if profiles is None:
        read_tile = raw_tile
    else:
        fields = [estimate_flatfield(raw_tile(t, c) for t in range(meta.n_tiles)) for c in range(meta.n_channels)]
        flat, dark = (np.stack(f) for f in zip(*fields, strict=True))
        for rel, image in zip(profiles, (flat, dark), strict=True):
            ctx.work.write_bytes(rel, _tiff_bytes(image))

        def read_tile(t: int, c: int) -> np.ndarray:
            return correct(raw_tile(t, c), flat[c], dark[c])

    return TileSet(read_tile, meta.positions_um, meta.tile_shape, meta.n_channels, meta.dtype,
                   meta.pixel_size_um, flip_x=params.flip_x, flip_y=params.flip_y)


def _tiff_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, photometric="minisblack")
    return buffer.getvalue()


def run(ctx: StageContext) -> None:
    """Stitch and register the slide's cycles; write the Level 2 image and QC."""
    params = ctx.params.stitch
    # The writers hand zarr one chunk at a time: its thread pool would only add per-thread malloc
    # arenas (tens of MiB of RSS), no speed. Takes effect when this process has not used zarr yet.
    zarr.config.set({"threading.max_workers": 1})
    try:
        markers = parse_markers(ctx.slide.read_text(MARKERS))
    except MissingObject as exc:
        raise InvalidInput(Problem(MARKERS, f"not found in {ctx.slide.uri}",
                                   "add markers.csv (channel_number,cycle_number,marker_name; one row per channel)")
                           ) from exc
    files = cycle_files(ctx.slide)
    cycles = read_cycles(ctx.slide, files)
    if problems := check_cycles(markers, cycles, params.align_channel):
        raise InvalidInput(problems)
    metas = [cycles[name] for name in files]
    with contextlib.ExitStack() as stack:
        cycles = [_open_cycle(stack, ctx, name, meta,
                              illumination_paths(ctx.slide_id, k) if params.illumination else None)
                  for k, (name, meta) in enumerate(zip(files, metas, strict=True), start=1)]
        alignments = align_cycles(cycles, channel=params.align_channel, max_shift_um=params.maximum_shift_um,
                                  filter_sigma=params.filter_sigma)
        failed = [k for k, a in enumerate(alignments) if not a.registered]
        keep = [k for k in range(len(cycles)) if k not in failed]
        names_by_cycle = [[m.marker_name for m in markers if m.cycle_number == k + 1] for k in range(len(cycles))]
        write_tile_qc(ctx.work, files, alignments)
        summary = qc_summary(ctx.slide_id, files, metas, alignments, names_by_cycle, keep)
        if failed and not params.skip_failed_cycles:
            summary["status"] = "failed"
            _write_json(ctx.work, f"{QC_DIR}/summary.json", summary)
            raise InvalidInput([Problem(files[k], f"cycle {k + 1} could not be registered to cycle 1 "
                                        f"({int(alignments[k].aligned.sum())} of {len(alignments[k].aligned)} tiles "
                                        f"registered; see {QC_DIR}/tiles.csv)",
                                        "check that the file belongs to this slide and its alignment channel "
                                        "(stitch.align_channel) shows the DNA stain; or set "
                                        "stitch.skip_failed_cycles: true to leave it out")
                                for k in failed])
        shape = mosaic_shape(alignments[0], metas[0].tile_shape)
        mosaic = MosaicImage([cycles[k] for k in keep], [alignments[k] for k in keep], shape)
        channel_names = [name for k in keep for name in names_by_cycle[k]]
        pixel_size = metas[0].pixel_size_um
        zarr_rel = layout.registration_zarr(ctx.slide_id)
        levels = write_ome_zarr(ctx.work.zarr(zarr_rel), mosaic, channel_names=channel_names, pixel_size_um=pixel_size,
                                tile_size=params.tile_size, name=ctx.slide_id)
    with ctx.work.local_file(layout.registration_tiff(ctx.slide_id)) as tiff_path:
        write_ome_tiff_pyramid(tiff_path, levels[0], subresolutions=levels[1:], channel_names=channel_names,
                               pixel_size_um=pixel_size, tile_size=params.tile_size, workers=ctx.vcpus)
        htan_tables = htan.level2_rows(tiff_path, ctx.slide_id, [f"{ctx.slide_id}/{name}" for name in files], markers)
    ctx.work.write_bytes(f"{QC_DIR}/mosaic.png", mosaic_png(levels, alignments[0], metas[0].tile_shape))
    for component, rows in htan_tables.items():
        ctx.work.write_text(layout.htan_table(component), htan.table_text(rows))
    summary["status"] = "ok"
    _write_json(ctx.work, f"{QC_DIR}/summary.json", summary)


def _write_json(store: Store, rel: str, doc: dict) -> None:
    store.write_text(rel, json.dumps(doc, indent=1, allow_nan=False) + "\n")


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def write_tile_qc(work: Store, files: list[str], alignments: list[CycleAlignment]) -> None:
    """``tiles.csv`` (one row per tile per cycle) and ``edges.csv`` (first cycle's tile pairs) in qc/stitch/."""
    tiles = io.StringIO(newline="")
    writer = csv.writer(tiles)
    writer.writerow(["cycle", "file", "tile", "nominal_y_px", "nominal_x_px", "y_px", "x_px",
                     "placed_y_px", "placed_x_px", "shift_y_px", "shift_x_px", "error", "aligned"])
    for k, (name, a) in enumerate(zip(files, alignments, strict=True), start=1):
        for t in range(len(a.positions)):
            writer.writerow([k, name, t, *(f"{v:.3f}" for v in (*a.nominal[t], *a.positions[t])),
                             *a.placement[t], *(f"{v:.3f}" for v in a.shifts[t]),
                             f"{a.errors[t]:.4f}" if np.isfinite(a.errors[t]) else "",
                             str(bool(a.aligned[t])).lower()])
    work.write_text(f"{QC_DIR}/tiles.csv", tiles.getvalue())
    edges = io.StringIO(newline="")
    writer = csv.writer(edges)
    writer.writerow(["tile1", "tile2", "shift_y_px", "shift_x_px", "error", "accepted"])
    for e in alignments[0].edges:
        writer.writerow([e["tile1"], e["tile2"], f"{e['shift_y']:.3f}", f"{e['shift_x']:.3f}",
                         f"{e['error']:.4f}" if np.isfinite(e["error"]) else "", str(e["accepted"]).lower()])
    work.write_text(f"{QC_DIR}/edges.csv", edges.getvalue())


def qc_summary(slide_id: str, files: list[str], metas: list[CycleMetadata], alignments: list[CycleAlignment],
               names_by_cycle: list[list[str]], keep: list[int]) -> dict:
    """The JSON summary of the stage: per cycle tile counts, failures, errors and offsets."""
    from ashlar import __version__ as ashlar_version
    cycles = []
    for k, (name, meta, a) in enumerate(zip(files, metas, alignments, strict=True)):
        finite = a.errors[np.isfinite(a.errors)]
        cycles.append({
            "cycle": k + 1, "file": name, "tiles": meta.n_tiles, "channels": names_by_cycle[k],
            "registered": bool(a.registered), "included": k in keep,
            "aligned_tiles": int(a.aligned.sum()), "failed_tiles": [int(t) for t in np.flatnonzero(~a.aligned)],
            "median_error": _finite(np.median(finite)) if finite.size else None,
            "median_abs_shift_px": [float(v) for v in np.median(np.abs(a.shifts[a.aligned]), axis=0)]
            if a.aligned.any() else None,
            "offset_px": [float(v) for v in a.offset], "warnings": sorted(set(a.warnings)),
        })
    return {"slide_id": slide_id, "aligner": f"ashlar {ashlar_version}",
            "pixel_size_um": metas[0].pixel_size_um, "tile_shape": list(metas[0].tile_shape),
            "mosaic_shape": list(mosaic_shape(alignments[0], metas[0].tile_shape)),
            "channels": [n for k in keep for n in names_by_cycle[k]],
            "dropped_cycles": [k + 1 for k in range(len(files)) if k not in keep], "cycles": cycles}


def mosaic_png(levels, alignment: CycleAlignment, tile_shape: tuple[int, int]) -> bytes:
    """Low-resolution picture (PNG bytes) of the first channel with tile outlines: green = aligned
    from image content, red = placed from the stage position only."""
    level = next((k for k, lvl in enumerate(levels) if max(lvl.shape[1:]) <= QC_PNG_MAX_SIDE), len(levels) - 1)
    scale = 2 ** level
    rgb = Image.fromarray(thumbnail_uint8(np.asarray(levels[level][0]))).convert("RGB")
    draw = ImageDraw.Draw(rgb)
    for (y, x), ok in zip(alignment.placement, alignment.aligned, strict=True):
        box = [x / scale, y / scale, (x + tile_shape[1]) / scale - 1, (y + tile_shape[0]) / scale - 1]
        draw.rectangle(box, outline=(0, 160, 0) if ok else (220, 0, 0))
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
