"""Stage ``align``: the first cycle's tiles aligned to each other, every later cycle registered to it.

Reads only the alignment channel (``stitch.align_channel``) of each cycle's tiles, by byte ranges,
keeping a few tile rows of the first cycle in memory (:class:`atlas.science.stitch.TileCache`); the
first cycle's tile pairs, then the later cycles, are registered in threads (the job's vCPUs). Writes
``qc/stitch/`` (``tiles.csv``, ``edges.csv``, ``summary.json``), the placements the mosaic stage
writes the image from (``tmp/align/alignment.json``), and the empty OME-Zarr hierarchy of the
registered image (``registration/<slide>.ome.zarr``: its pyramid levels' arrays, whose chunks the
mosaic items fill). A cycle that does not register fails the stage, naming it, unless
``stitch.skip_failed_cycles`` leaves it out. The science is
:func:`atlas.science.stitch.align_cycles`.
"""
from __future__ import annotations

import contextlib
import csv
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from atlas import layout
from atlas.errors import InvalidInput, Problem
from atlas.science.pyramid import create_ome_zarr
from atlas.science.stitch import CycleAlignment, align_cycles, mosaic_shape
from atlas.slide.ome import CycleMetadata
from atlas.stages import StageContext
from atlas.stages.cycles import ALIGNMENT, QC_DIR, checked_cycles, open_cycle, write_json
from atlas.storage import Store


def run(ctx: StageContext) -> None:
    """Align and register the slide's cycles; write the QC, the placements and the empty OME-Zarr."""
    params = ctx.params.stitch
    markers, files, metas = checked_cycles(ctx)
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(ctx.vcpus) as pool:
        # each cycle file's IFDs are read by its own ranged reads (one small GET per tile channel on
        # S3): the cycles' at once, not one file after another
        cycles = list(pool.map(lambda k: open_cycle(stack, ctx, files[k], metas[k], k + 1), range(len(files))))
        alignments = align_cycles(cycles, channel=params.align_channel, max_shift_um=params.maximum_shift_um,
                                  filter_sigma=params.filter_sigma, workers=ctx.vcpus)
    failed = [k for k, a in enumerate(alignments) if not a.registered]
    keep = [k for k in range(len(cycles)) if k not in failed]
    names_by_cycle = [[m.marker_name for m in markers if m.cycle_number == k + 1] for k in range(len(cycles))]
    write_tile_qc(ctx.work, files, alignments)
    summary = qc_summary(ctx.slide_id, files, metas, alignments, names_by_cycle, keep)
    if failed and not params.skip_failed_cycles:
        summary["status"] = "failed"
        write_json(ctx.work, f"{QC_DIR}/summary.json", summary)
        raise InvalidInput([Problem(files[k], f"cycle {k + 1} could not be registered to cycle 1 "
                                    f"({int(alignments[k].aligned.sum())} of {len(alignments[k].aligned)} tiles "
                                    f"registered; see {QC_DIR}/tiles.csv)",
                                    "check that the file belongs to this slide and its alignment channel "
                                    "(stitch.align_channel) shows the DNA stain; or set "
                                    "stitch.skip_failed_cycles: true to leave it out")
                            for k in failed])
    shape = mosaic_shape(alignments[0], metas[0].tile_shape)
    channels = [name for k in keep for name in names_by_cycle[k]]
    zarr_rel = layout.registration_zarr(ctx.slide_id)
    create_ome_zarr(ctx.work.zarr(zarr_rel), (len(channels), *shape), np.dtype(metas[0].dtype), params.tile_size)
    ctx.work.delete(f"{zarr_rel}/.zattrs")  # the image's metadata is the mosaic merge's, once the pixels are written
    write_json(ctx.work, ALIGNMENT, {
        "files": files, "cycles": [k + 1 for k in keep], "channels": channels, "shape": list(shape),
        "channels_per_cycle": [metas[k].n_channels for k in keep],
        "tile_shape": list(metas[0].tile_shape), "pixel_size_um": metas[0].pixel_size_um,
        "placements": [alignments[k].placement.tolist() for k in keep],
        "aligned": [bool(a) for a in alignments[0].aligned]})
    summary["status"] = "ok"
    write_json(ctx.work, f"{QC_DIR}/summary.json", summary)


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


