"""Stage ``mosaic``: the registered image's OME-Zarr, written chunk by chunk, an array over the channels.

Item ``i`` of ``n`` writes the registered image's channels ``i, i + n, ...`` into the levels that
the align stage created in ``registration/<slide>.ome.zarr``: level 0 assembled from its cycle's
tiles (that channel's planes, read by byte ranges, a few tile rows at a time:
:class:`atlas.science.stitch.MosaicImage`), then
each smaller level from the one before, chunk row by chunk row. Every chunk row is a unit of a
:class:`atlas.storage.journal.Journal` in the item's work folder, so an item cut short (a Spot
reclaim) resumes from its last finished row. The merge adds the NGFF metadata (display windows
from the smallest level) and ``qc/stitch/mosaic.png``.
"""
from __future__ import annotations

import contextlib
import io
import json
from functools import partial

import numpy as np
import zarr
from PIL import Image, ImageDraw

from atlas import layout
from atlas.science.pyramid import describe_ome_zarr, level_rows, write_level_row
from atlas.science.stitch import MosaicImage, thumbnail_uint8
from atlas.slide.ome import read_cycle_metadata
from atlas.stages import StageContext
from atlas.stages.cycles import ALIGNMENT, QC_DIR, open_cycle
from atlas.storage.journal import Journal

QC_PNG_MAX_SIDE = 1024


def _levels(ctx: StageContext, mode: str) -> tuple[zarr.Group, list[zarr.Array]]:
    group = zarr.open_group(ctx.work.zarr(layout.registration_zarr(ctx.slide_id), read_only=mode == "r"),
                            mode=mode, zarr_format=2)
    names = sorted((k for k in group.array_keys() if k.isdigit()), key=int)
    return group, [group[k] for k in names]


def run_item(ctx: StageContext, index: int, count: int) -> None:
    """Write every level of the registered image's channels ``index, index + count, ...``."""
    alignment = json.loads(ctx.work.read_text(ALIGNMENT))
    tile_size = ctx.params.stitch.tile_size
    _, levels = _levels(ctx, "r+")
    journal = Journal(ctx.work, f"{ctx.job.stage.item_dir}/{index}")
    offsets = np.cumsum([0, *alignment["channels_per_cycle"]])
    for c in range(index, int(offsets[-1]), count):
        j = int(np.searchsorted(offsets, c, side="right")) - 1  # the kept cycle the channel comes from
        cycle = alignment["cycles"][j]
        name = alignment["files"][cycle - 1]
        with contextlib.ExitStack() as stack:
            meta = read_cycle_metadata(stack.enter_context(ctx.slide.open(name)))
            image = MosaicImage([open_cycle(stack, ctx, name, meta, cycle)], [np.asarray(alignment["placements"][j])],
                                tuple(alignment["shape"]))
            own = c - int(offsets[j])
            for k in range(len(levels)):
                for row in range(level_rows(levels[k], tile_size)):
                    journal.run(f"c{c}-level{k}-row{row}", partial(
                        write_level_row, levels, k, c, row, tile_size,
                        read=lambda ys, xs, own=own, image=image: image[own, ys, xs]))


def merge(ctx: StageContext) -> None:
    """The NGFF metadata of the written image, and the QC picture of the first cycle's tiles."""
    alignment = json.loads(ctx.work.read_text(ALIGNMENT))
    group, levels = _levels(ctx, "r+")
    describe_ome_zarr(group, levels, channel_names=alignment["channels"], pixel_size_um=alignment["pixel_size_um"],
                      name=ctx.slide_id)
    ctx.work.write_bytes(f"{QC_DIR}/mosaic.png", mosaic_png(levels, np.asarray(alignment["placements"][0]),
                                                            np.asarray(alignment["aligned"]),
                                                            tuple(alignment["tile_shape"])))


def mosaic_png(levels, placement: np.ndarray, aligned: np.ndarray, tile_shape: tuple[int, int]) -> bytes:
    """Low-resolution picture (PNG bytes) of the first channel with tile outlines: green = aligned
    from image content, red = placed from the stage position only."""
    level = next((k for k, lvl in enumerate(levels) if max(lvl.shape[1:]) <= QC_PNG_MAX_SIDE), len(levels) - 1)
    scale = 2 ** level
    rgb = Image.fromarray(thumbnail_uint8(np.asarray(levels[level][0]))).convert("RGB")
    draw = ImageDraw.Draw(rgb)
    for (y, x), ok in zip(placement, aligned, strict=True):
        box = [x / scale, y / scale, (x + tile_shape[1]) / scale - 1, (y + tile_shape[0]) / scale - 1]
        draw.rectangle(box, outline=(0, 160, 0) if ok else (220, 0, 0))
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
