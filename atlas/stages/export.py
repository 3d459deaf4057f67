"""Stage ``export``: the registered image as a pyramidal OME-TIFF, ``registration/<slide>.ome.tif``, and
the release's HTAN ImagingLevel2 / ImagingLevel3Channels tables of it (:mod:`atlas.slide.htan`).

Streams every level of ``registration/<slide>.ome.zarr`` chunk by chunk into the TIFF writer,
which writes the file front to back straight to its place (:meth:`atlas.storage.Store.writer`: an
S3 multipart upload on Batch), so scratch holds one channel's compressed tiles (about 1/C of the
file, not the file) and memory a few upload parts. It needs only the mosaic's zarr, so it can run
beside segmentation. The writer is :func:`atlas.science.pyramid.write_ome_tiff_pyramid` (layout:
:mod:`atlas.science.tiffstream`); the HTAN rows read the written file's header back by ranged reads.
"""
from __future__ import annotations

import json

import zarr

from atlas import layout
from atlas.science.pyramid import write_ome_tiff_pyramid
from atlas.slide import htan
from atlas.slide.convention import MARKERS, parse_markers
from atlas.stages import StageContext
from atlas.stages.cycles import ALIGNMENT


def run(ctx: StageContext) -> None:
    """Write the pyramidal OME-TIFF from the OME-Zarr's levels (the same pixels, the same pyramid)."""
    group = zarr.open_group(ctx.work.zarr(layout.registration_zarr(ctx.slide_id), read_only=True), mode="r",
                            zarr_format=2)
    multiscales = group.attrs["multiscales"][0]
    levels = [group[d["path"]] for d in multiscales["datasets"]]
    channels = [c["label"] for c in group.attrs["omero"]["channels"]]
    pixel_size = multiscales["datasets"][0]["coordinateTransformations"][0]["scale"][-1]
    files = json.loads(ctx.work.read_text(ALIGNMENT))["files"]
    markers = parse_markers(ctx.slide.read_text(MARKERS))
    rel = layout.registration_tiff(ctx.slide_id)
    with ctx.work.writer(rel) as out:
        write_ome_tiff_pyramid(rel, levels[0], subresolutions=levels[1:], channel_names=channels,
                               pixel_size_um=pixel_size, tile_size=levels[0].chunks[-1], workers=ctx.vcpus,
                               sink=out, scratch=ctx.scratch, on_scratch=ctx.work.counter.note_local_file)
    with ctx.work.open(rel) as image:
        htan_tables = htan.level2_rows(image, ctx.slide_id, [f"{ctx.slide_id}/{name}" for name in files], markers)
    for component, rows in htan_tables.items():
        ctx.work.write_text(layout.htan_table(component), htan.table_text(rows))
