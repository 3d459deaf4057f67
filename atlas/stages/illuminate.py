"""Stage ``illuminate``: each cycle's flat- and dark-field profiles, an array over the cycles.

With ``stitch.illumination`` (params.yml), item ``i`` of ``n`` estimates the profiles of cycles
``i, i + n, ...`` from their tiles (read one at a time by byte ranges) and writes
``illumination/<slide>-cycle-NN-{ffp,dfp}.tif`` ((C, Y, X) float32, MCMICRO's names); the align
and mosaic stages correct every tile with them. Without it the items write nothing. The science
is :func:`atlas.science.illumination.estimate_flatfield`.
"""
from __future__ import annotations

import contextlib

import numpy as np
import tifffile

from atlas.science.illumination import estimate_flatfield
from atlas.stages import StageContext
from atlas.stages.cycles import cycle_files, illumination_paths, read_cycles, tiff_bytes


def run_item(ctx: StageContext, index: int, count: int) -> None:
    """Profiles of cycles ``index, index + count, ...`` (when the slide asks for them)."""
    if not ctx.params.stitch.illumination:
        return
    files = cycle_files(ctx.slide)
    metas = read_cycles(ctx.slide, files)
    for k in range(index, len(files), count):
        meta = metas[files[k]]
        if isinstance(meta, Exception):  # align reports every unreadable cycle, with its fix
            continue
        with contextlib.ExitStack() as stack:
            series = stack.enter_context(tifffile.TiffFile(stack.enter_context(ctx.slide.open(files[k])),
                                                           _multifile=False)).series
            fields = [estimate_flatfield(series[t].pages[c].asarray() for t in range(meta.n_tiles))
                      for c in range(meta.n_channels)]
        flat, dark = (np.stack(f) for f in zip(*fields, strict=True))
        for rel, image in zip(illumination_paths(ctx.slide_id, k + 1), (flat, dark), strict=True):
            ctx.work.write_bytes(rel, tiff_bytes(image))


def merge(ctx: StageContext) -> None:
    """Nothing to gather: the items wrote the profiles in place."""
