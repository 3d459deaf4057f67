"""Stage ``export``: the registered image as a pyramidal OME-TIFF, ``registration/<slide>.ome.tif``.

Streams every level of ``registration/<slide>.ome.zarr`` chunk by chunk into the TIFF writer (a
file written with seeks: in the job's scratch, then stored whole). It needs only the mosaic's
zarr, so it can run beside segmentation. The writer is
:func:`atlas.science.pyramid.write_ome_tiff_pyramid`.
"""
from __future__ import annotations

import zarr

from atlas import layout
from atlas.science.pyramid import write_ome_tiff_pyramid
from atlas.stages import StageContext


def run(ctx: StageContext) -> None:
    """Write the pyramidal OME-TIFF from the OME-Zarr's levels (the same pixels, the same pyramid)."""
    group = zarr.open_group(ctx.work.zarr(layout.registration_zarr(ctx.slide_id), read_only=True), mode="r",
                            zarr_format=2)
    multiscales = group.attrs["multiscales"][0]
    levels = [group[d["path"]] for d in multiscales["datasets"]]
    channels = [c["label"] for c in group.attrs["omero"]["channels"]]
    pixel_size = multiscales["datasets"][0]["coordinateTransformations"][0]["scale"][-1]
    with ctx.work.local_file(layout.registration_tiff(ctx.slide_id)) as path:
        write_ome_tiff_pyramid(path, levels[0], subresolutions=levels[1:], channel_names=channels,
                               pixel_size_um=pixel_size, tile_size=levels[0].chunks[-1], workers=ctx.vcpus)
