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
import json
from pathlib import Path

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
from atlas.slide.convention import MARKERS, RAW, RAW_SUFFIXES, read_markers
from atlas.slide.ome import CycleMetadata
from atlas.slide.validate import check_cycles, read_cycles
from atlas.stages import StageContext

QC_DIR = f"{layout.QC}/stitch"
QC_PNG_MAX_SIDE = 1024


def cycle_files(slide_dir: Path) -> list[Path]:
    """The slide's cycle files in cycle order (sorted by name)."""
    raw = Path(slide_dir) / RAW
    return sorted(p for p in raw.iterdir() if p.is_file() and p.name.lower().endswith(RAW_SUFFIXES)) \
        if raw.is_dir() else []


def illumination_paths(slide_id: str, cycle: int) -> tuple[str, str]:
    """MCMICRO's flat- and dark-field profile names of a cycle, e.g. ``illumination/S1-cycle-01-ffp.tif``."""
    stem = f"{layout.ILLUMINATION}/{slide_id}-cycle-{cycle:02d}"
    return f"{stem}-ffp.tif", f"{stem}-dfp.tif"


def _open_cycle(stack: contextlib.ExitStack, path: Path, meta: CycleMetadata, params, name: str,
                profiles: tuple[Path, Path] | None = None) -> TileSet:
    """The cycle's tiles as a TileSet; with ``profiles`` (ffp, dfp paths), shading-corrected tiles
    whose (C, Y, X) flat and dark fields are estimated from this cycle and written there."""
    tif = stack.enter_context(tifffile.TiffFile(path))
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
        for out, image in zip(profiles, (flat, dark), strict=True):
            out.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(out, image, photometric="minisblack")

        def read_tile(t: int, c: int) -> np.ndarray:
            return correct(raw_tile(t, c), flat[c], dark[c])

    return TileSet(read_tile, meta.positions_um, meta.tile_shape, meta.n_channels, meta.dtype,
                   meta.pixel_size_um, flip_x=params.flip_x, flip_y=params.flip_y)


def run(ctx: StageContext) -> None:
    """Stitch and register the slide's cycles; write the Level 2 image and QC."""
    params = ctx.params.stitch
    # The writers hand zarr one chunk at a time: its thread pool would only add per-thread malloc
    # arenas (tens of MiB of RSS), no speed. Takes effect when this process has not used zarr yet.
    zarr.config.set({"threading.max_workers": 1})
    slide_dir, out_dir = Path(ctx.slide_dir), Path(ctx.out_dir)

    def rel(path: Path) -> str:
        return path.relative_to(slide_dir).as_posix()

    if not (slide_dir / MARKERS).is_file():
        raise InvalidInput(Problem(MARKERS, f"not found in {slide_dir}",
                                   "add markers.csv (channel_number,cycle_number,marker_name; one row per channel)"))
    markers = read_markers(slide_dir / MARKERS)
    files = cycle_files(slide_dir)
    cycles = read_cycles(slide_dir, [rel(path) for path in files])
    if problems := check_cycles(markers, cycles, params.align_channel):
        raise InvalidInput(problems)
    metas = [cycles[rel(path)] for path in files]
    qc_dir = out_dir / QC_DIR
    qc_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        cycles = [_open_cycle(stack, path, meta, params, rel(path),
                              [out_dir / p for p in illumination_paths(ctx.slide_id, k)]
                              if params.illumination else None)
                  for k, (path, meta) in enumerate(zip(files, metas, strict=True), start=1)]
        alignments = align_cycles(cycles, channel=params.align_channel, max_shift_um=params.maximum_shift_um,
                                  filter_sigma=params.filter_sigma)
        failed = [k for k, a in enumerate(alignments) if not a.registered]
        keep = [k for k in range(len(cycles)) if k not in failed]
        names_by_cycle = [[m.marker_name for m in markers if m.cycle_number == k + 1] for k in range(len(cycles))]
        write_tile_qc(qc_dir, files, alignments, rel)
        summary = qc_summary(ctx.slide_id, files, metas, alignments, names_by_cycle, keep, rel)
        if failed and not params.skip_failed_cycles:
            summary["status"] = "failed"
            _write_json(qc_dir / "summary.json", summary)
            raise InvalidInput([Problem(rel(files[k]), f"cycle {k + 1} could not be registered to cycle 1 "
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
        tiff_path = out_dir / layout.registration_tiff(ctx.slide_id)
        zarr_path = out_dir / layout.registration_zarr(ctx.slide_id)
        tiff_path.parent.mkdir(parents=True, exist_ok=True)
        levels = write_ome_zarr(zarr_path, mosaic, channel_names=channel_names, pixel_size_um=pixel_size,
                                tile_size=params.tile_size)
    write_ome_tiff_pyramid(tiff_path, levels[0], subresolutions=levels[1:], channel_names=channel_names,
                           pixel_size_um=pixel_size, tile_size=params.tile_size)
    write_mosaic_png(qc_dir / "mosaic.png", levels, alignments[0], metas[0].tile_shape)
    for component, rows in htan.level2_rows(tiff_path, ctx.slide_id, [f"{ctx.slide_id}/{rel(path)}" for path in files],
                                            markers).items():
        htan.write_table(out_dir, component, rows)
    summary["status"] = "ok"
    _write_json(qc_dir / "summary.json", summary)


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def write_tile_qc(qc_dir: Path, files: list[Path], alignments: list[CycleAlignment], rel) -> None:
    """``tiles.csv`` (one row per tile per cycle) and ``edges.csv`` (first cycle's tile pairs)."""
    with open(qc_dir / "tiles.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["cycle", "file", "tile", "nominal_y_px", "nominal_x_px", "y_px", "x_px",
                         "placed_y_px", "placed_x_px", "shift_y_px", "shift_x_px", "error", "aligned"])
        for k, (path, a) in enumerate(zip(files, alignments, strict=True), start=1):
            for t in range(len(a.positions)):
                writer.writerow([k, rel(path), t, *(f"{v:.3f}" for v in (*a.nominal[t], *a.positions[t])),
                                 *a.placement[t], *(f"{v:.3f}" for v in a.shifts[t]),
                                 f"{a.errors[t]:.4f}" if np.isfinite(a.errors[t]) else "",
                                 str(bool(a.aligned[t])).lower()])
    with open(qc_dir / "edges.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tile1", "tile2", "shift_y_px", "shift_x_px", "error", "accepted"])
        for e in alignments[0].edges:
            writer.writerow([e["tile1"], e["tile2"], f"{e['shift_y']:.3f}", f"{e['shift_x']:.3f}",
                             f"{e['error']:.4f}" if np.isfinite(e["error"]) else "", str(e["accepted"]).lower()])


def qc_summary(slide_id: str, files: list[Path], metas: list[CycleMetadata], alignments: list[CycleAlignment],
               names_by_cycle: list[list[str]], keep: list[int], rel) -> dict:
    """The JSON summary of the stage: per cycle tile counts, failures, errors and offsets."""
    from ashlar import __version__ as ashlar_version
    cycles = []
    for k, (path, meta, a) in enumerate(zip(files, metas, alignments, strict=True)):
        finite = a.errors[np.isfinite(a.errors)]
        cycles.append({
            "cycle": k + 1, "file": rel(path), "tiles": meta.n_tiles, "channels": names_by_cycle[k],
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


def write_mosaic_png(path: Path, levels, alignment: CycleAlignment, tile_shape: tuple[int, int]) -> None:
    """Low-resolution picture of the first channel with tile outlines: green = aligned from image
    content, red = placed from the stage position only."""
    level = next((k for k, lvl in enumerate(levels) if max(lvl.shape[1:]) <= QC_PNG_MAX_SIDE), len(levels) - 1)
    scale = 2 ** level
    rgb = Image.fromarray(thumbnail_uint8(np.asarray(levels[level][0]))).convert("RGB")
    draw = ImageDraw.Draw(rgb)
    for (y, x), ok in zip(alignment.placement, alignment.aligned, strict=True):
        box = [x / scale, y / scale, (x + tile_shape[1]) / scale - 1, (y + tile_shape[0]) / scale - 1]
        draw.rectangle(box, outline=(0, 160, 0) if ok else (220, 0, 0))
    rgb.save(path, optimize=False)
