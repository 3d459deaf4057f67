"""Stage ``segment`` (array): nucleus and cell masks of the registered image, Level 3.

Item ``index`` of ``count`` segments its share of the tiles of the nucleus channel
(``segment.channel``) of ``registration/<slide>.ome.zarr``, reading only the chunks of that channel
its tiles touch (:func:`job_tiles`: a grid whose tiles split evenly by pixels read over the items),
and writes each tile's kept instances to ``tile-<n>.tif`` in the stage's item folder (the
registry's ``item_dir``). ``merge`` paints them into a chunked, compressed label array in the job's
scratch, renumbers them and grows nuclei into cells by ``segment.expand_um`` block by block (never
the whole slide in memory or mapped), and writes, chunk by chunk,

- ``segmentation/<engine>-<slide>/nuclei.ome.tif`` and ``cell.ome.tif``: pyramidal uint32 label
  OME-TIFFs, cell ``i`` contains nucleus ``i`` (MCMICRO's names);
- ``labels/nuclei`` and ``labels/cell`` in ``registration/<slide>.ome.zarr`` (NGFF labels);
- ``qc/segment/overlay.png`` (whole slide), ``qc/segment/overlay-detail.png`` (full resolution,
  densest tile) and ``qc/segment/summary.json``.

The science is :mod:`atlas.science.segmentation`; this module is file I/O, shared with ``atlas segment``.
"""
from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import zarr
from PIL import Image
from skimage.segmentation import find_boundaries

from atlas import layout
from atlas.errors import InvalidInput, Problem
from atlas.science.imageio import open_tiff
from atlas.science.pyramid import write_ome_tiff_pyramid, write_zarr_labels
from atlas.science.segmentation import Engine, EngineSettings
from atlas.science.segmentation.tiling import (
    TileResult,
    calibration_sample,
    job_tiles,
    merge_tiles,
    segment_tile,
    tile_grid,
    working_view,
)
from atlas.slide import htan
from atlas.slide.ome import parse_ome_xml
from atlas.stages import StageContext
from atlas.storage import Store

log = logging.getLogger(__name__)

QC_DIR = f"{layout.QC}/segment"
MASKS = ("nuclei", "cell")
OVERVIEW_MAX_SIDE = 1024
DETAIL_SIDE = 512
MERGE_BLOCK = 4096  # px: the merge renumbers and grows cells in blocks of about this side (whole chunks)
NUCLEUS_COLOR = (0, 255, 0)
CELL_COLOR = (255, 0, 255)


@dataclass(frozen=True)
class NucleusChannel:
    """The nucleus channel of an image, read lazily.

    Attributes
    ----------
    plane : (Y, X) array-like
        Full-resolution pixels, read tile by tile.
    pixel_size_um : float or None
        OME PhysicalSizeX (None when the file has none).
    index : int
        Channel index in the file.
    channel_names : tuple of str
    levels : tuple of (Y_k, X_k) array-like
        The pyramid levels of the channel the image has, full resolution first (level k halves
        level k - 1, sizes rounded up); just ``(plane,)`` for a file without a pyramid.
    """

    plane: object
    pixel_size_um: float | None
    index: int
    channel_names: tuple[str, ...]
    levels: tuple = ()


class _Plane:
    """One (Y, X) plane of an N-D zarr array, sliceable as ``plane[rows, cols]``."""

    def __init__(self, array, prefix: tuple[int, ...]):
        self.array, self.prefix = array, prefix
        self.shape = tuple(array.shape[-2:])
        self.dtype = array.dtype

    def __getitem__(self, key):
        return self.array[self.prefix + tuple(key)]


def select_channel(channel: int | str, names: tuple[str, ...], file: str) -> int:
    """Index of ``channel`` (an index, a digit string or a marker name) among ``names``."""
    listing = ", ".join(f"{i}={n}" for i, n in enumerate(names))
    if isinstance(channel, str) and channel in names:
        return names.index(channel)
    if isinstance(channel, int) or channel.isdigit():
        index = int(channel)
        if 0 <= index < len(names):
            return index
        raise InvalidInput(Problem(file, f"channel index {index} does not exist; channels are {listing}",
                                   "give a channel index or a marker name from that list"))
    raise InvalidInput(Problem(file, f"no channel named {channel!r}; channels are {listing}",
                               "give a channel index or a marker name from that list"))


@contextmanager
def open_channel(path: Path, channel: int | str) -> Iterator[NucleusChannel]:
    """Open the nucleus channel of a 2-D TIFF or a (C, Y, X) (OME-)TIFF, full resolution, lazily.

    Raises
    ------
    InvalidInput
        Unreadable file, more than one non-channel dimension beside Y and X (z-stacks, time
        series, RGB), or an unknown channel.
    """
    fix = "give a 2-D image or a multi-channel (C, Y, X) OME-TIFF, e.g. one plane or a maximum projection"
    with open_tiff(path, fix) as tif:
        series = tif.series[0]
        extra = [(axis, n) for axis, n in zip(series.axes[:-2], series.shape[:-2], strict=True) if n > 1]
        if not series.axes.endswith("YX") or len(extra) > 1 or (extra and extra[0][0] != "C"):
            raise InvalidInput(Problem(str(path), f"is not a 2-D image: axes {series.axes}, shape {series.shape}", fix))
        pixel_size, names = None, ()
        if tif.is_ome:
            meta = parse_ome_xml(tif.ome_metadata)
            pixel_size, names = meta.pixel_size_um, meta.channel_names
        n_channels = extra[0][1] if extra else 1
        if len(names) != n_channels:
            names = tuple(f"Channel {i}" for i in range(n_channels))
        index = select_channel(channel, names, str(path))
        prefix = tuple(index if axis == "C" else 0 for axis in series.axes[:-2])
        with series.aszarr(level=0) as store:
            plane = _Plane(zarr.open_array(store, mode="r"), prefix)
            yield NucleusChannel(plane, pixel_size, index, names, (plane,))


def zarr_channel(work: Store, rel: str, channel: int | str) -> NucleusChannel:
    """The nucleus channel of an OME-Zarr (NGFF 0.4, as :func:`write_ome_zarr` writes it) in ``work``.

    Only metadata is read here; indexing the planes reads the chunks touched.

    Raises
    ------
    InvalidInput
        No image at ``rel`` (stitch has not run), or an unknown channel.
    """
    try:
        group = zarr.open_group(work.zarr(rel, read_only=True), mode="r", zarr_format=2)
        multiscales = group.attrs["multiscales"][0]
    except (FileNotFoundError, KeyError) as exc:
        raise InvalidInput(Problem(rel, "registered image is missing", "run the stitch stage first")) from exc
    names = tuple(c["label"] for c in group.attrs["omero"]["channels"])
    index = select_channel(channel, names, rel)
    levels = tuple(_Plane(group[d["path"]], (index,)) for d in multiscales["datasets"])
    pixel_size = multiscales["datasets"][0]["coordinateTransformations"][0]["scale"][-1]
    return NucleusChannel(levels[0], pixel_size, index, names, levels)


def _nucleus_channel(ctx: StageContext) -> NucleusChannel:
    return zarr_channel(ctx.work, layout.registration_zarr(ctx.slide_id), ctx.params.segment.channel)


def _tile_rel(ctx: StageContext, n: int) -> str:
    """Where the items put tile ``n``'s instances (the registry's item folder of the stage)."""
    return f"{ctx.job.stage.item_dir}/tile-{n:05d}.tif"


def _engine(ctx: StageContext) -> Engine:
    return (ctx.engine or EngineSettings("classical")).make()


def run_item(ctx: StageContext, index: int, count: int) -> None:
    """Segment item ``index``'s share of the tiles (of ``count`` items) and write each one's kept instances."""
    p = ctx.params.segment
    source = _nucleus_channel(ctx)
    engine, view = working_view(source.plane, _engine(ctx), source.pixel_size_um)
    calibration = engine.calibrate(calibration_sample(view))
    tiles, shares = job_tiles(view.native_shape, p.tile_size, p.overlap, count)
    for n in shares[index]:
        result = segment_tile(view, tiles[n], engine, calibration, p.overlap)
        description = {"box": result.box, "core": tiles[n], "engine": engine.name, "calibration": calibration}
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, result.labels, compression="zlib", description=json.dumps(description), metadata=None)
        ctx.work.write_bytes(_tile_rel(ctx, n), buffer.getvalue())
        log.info("segment tile %d/%d: %d nuclei", n + 1, len(tiles), result.count)


def _read_tile(data: bytes) -> tuple[TileResult, dict]:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        description = json.loads(tif.pages[0].description)
        return TileResult(tuple(description["box"]), tif.asarray()), description


def _tile_results(work: Store, rels: list[str], tiles: list, engine_name: str, counts: list[int],
                  first: list[dict]) -> Iterator[TileResult]:
    """The items' tile results in tile order, checked against the current tiling; counts appended to
    ``counts``, the first tile's description to ``first``."""
    missing = [n for n, rel in enumerate(rels) if not work.exists(rel)]
    if missing:
        raise InvalidInput(Problem(rels[missing[0]], f"{len(missing)} of {len(tiles)} tiles are missing "
                                   f"(e.g. tile {missing[0]})", "rerun the segment items before the merge"))
    for rel, core in zip(rels, tiles, strict=True):
        result, description = _read_tile(work.read_bytes(rel))
        if (description["engine"], tuple(description["core"])) != (engine_name, core):
            raise InvalidInput(Problem(rel, f"was made by engine {description['engine']} for "
                                       f"tile {description['core']}, not {engine_name} for {core}",
                                       "rerun the segment items with the current parameters"))
        counts.append(result.count)
        first[:] = first or [description]
        yield result


def _median_area_um2(labels, n_ids: int, pixel_size_um: float, block: int) -> float | None:
    """Median instance area (µm², 2 decimals) of a label image read block by block."""
    if not n_ids:
        return None
    areas = np.zeros(n_ids + 1, dtype=np.int64)
    for y0, y1, x0, x1 in tile_grid(labels.shape, block):
        areas += np.bincount(np.asarray(labels[y0:y1, x0:x1]).ravel(), minlength=n_ids + 1)
    return round(float(np.median(areas[1:])) * pixel_size_um ** 2, 2)


def _scratch_labels(scratch: Path, name: str, shape: tuple[int, int], chunk: int) -> zarr.Array:
    """A zero-filled (Y, X) uint32 label array in the job's scratch, chunked and compressed (labels
    compress well, so a whole slide's takes a few percent of its raw size on disk)."""
    return zarr.create_array(store=str(scratch / f"{name}.zarr"), shape=shape, chunks=(chunk, chunk),
                             dtype=np.uint32, fill_value=0, compressors=zarr.codecs.ZstdCodec(level=1))


def merge(ctx: StageContext) -> None:
    """Join the items' tiles into whole-slide nucleus and cell masks and write every output.

    The tiles are painted into a chunked label array in scratch, then renumbered and grown into
    cells block by block (:func:`merge_tiles`); the masks are written from those arrays chunk by
    chunk: nothing holds or maps the whole slide."""
    p = ctx.params.segment
    engine = _engine(ctx)
    source = _nucleus_channel(ctx)
    shape = tuple(source.plane.shape)
    tiles, _ = job_tiles(shape, p.tile_size, p.overlap, ctx.job.count)
    pixel_size = source.pixel_size_um or engine.pixel_size_um
    chunk = ctx.params.stitch.tile_size
    scratch = Path(ctx.scratch)
    canvas = _scratch_labels(scratch, "painted", shape, chunk)
    masks = {name: _scratch_labels(scratch, name, shape, chunk) for name in MASKS}
    counts: list[int] = []
    first: list[dict] = []
    results = _tile_results(ctx.work, [_tile_rel(ctx, n) for n in range(len(tiles))], tiles, engine.name, counts,
                            first)
    n_nuclei = merge_tiles(results, canvas, masks["nuclei"], masks["cell"], p.expand_um / pixel_size,
                           block=chunk * max(1, MERGE_BLOCK // chunk))
    write_masks(ctx, engine.name, masks, pixel_size)
    write_qc(ctx.work, source, masks, tiles[int(np.argmax(counts))])
    summary = {"engine": engine.name, "channel": source.channel_names[source.index],
               "pixel_size_um": pixel_size,
               "working_pixel_size_um": engine.scaled_for(source.pixel_size_um).pixel_size_um,
               "calibration": first[0]["calibration"], "tiles": len(tiles),
               "tile_size": p.tile_size, "overlap": p.overlap, "expand_um": p.expand_um, "nuclei": n_nuclei,
               "median_nucleus_area_um2": _median_area_um2(masks["nuclei"], n_nuclei, pixel_size, p.tile_size),
               "masks": {m: layout.mask_path(ctx.slide_id, engine.name, m) for m in MASKS}}
    ctx.work.write_text(f"{QC_DIR}/summary.json", json.dumps(summary, indent=1) + "\n")
    ctx.work.write_text(layout.htan_table("ImagingLevel3Segmentation"),
                        htan.table_text(htan.segmentation_rows(ctx.slide_id, engine.name, n_nuclei)))


def write_masks(ctx: StageContext, engine: str, masks: dict, pixel_size_um: float) -> None:
    """Label OME-TIFF pyramids in the results layout, and the labels in the slide's OME-Zarr if present."""
    zarr_rel = layout.registration_zarr(ctx.slide_id)
    with_zarr = ctx.work.exists(f"{zarr_rel}/.zattrs")
    for name, labels in masks.items():
        with ctx.work.local_file(layout.mask_path(ctx.slide_id, engine, name)) as path:
            write_ome_tiff_pyramid(path, labels, channel_names=[name], pixel_size_um=pixel_size_um,
                                   tile_size=ctx.params.stitch.tile_size, labels=True, workers=ctx.vcpus)
        if with_zarr:
            write_zarr_labels(ctx.work.zarr(zarr_rel), name, labels)


def write_qc(work: Store, source: NucleusChannel, masks: dict, detail_tile: tuple[int, int, int, int]) -> None:
    """Outline overlays: the whole image (nuclei, from the pyramid level that fits
    :data:`OVERVIEW_MAX_SIDE`) and a full-resolution crop of ``detail_tile`` (nuclei and cells)."""
    height, width = source.plane.shape
    level = min(max(0, math.ceil(math.log2(max(height, width) / OVERVIEW_MAX_SIDE))), len(source.levels) - 1)
    step = 2 ** level
    overview = np.asarray(source.levels[level][:, :])
    nuclei = np.asarray(masks["nuclei"][::step, ::step])
    _save(work, f"{QC_DIR}/overlay.png", _overlay(overview, {NUCLEUS_COLOR: nuclei}))
    y0, y1, x0, x1 = detail_tile
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    top = max(0, min(cy - DETAIL_SIDE // 2, height - DETAIL_SIDE))
    left = max(0, min(cx - DETAIL_SIDE // 2, width - DETAIL_SIDE))
    box = (slice(top, top + DETAIL_SIDE), slice(left, left + DETAIL_SIDE))
    outlines = {CELL_COLOR: np.asarray(masks["cell"][box]), NUCLEUS_COLOR: np.asarray(masks["nuclei"][box])}
    _save(work, f"{QC_DIR}/overlay-detail.png", _overlay(np.asarray(source.plane[box]), outlines))


def _save(work: Store, rel: str, image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    work.write_bytes(rel, buffer.getvalue())


def _overlay(image: np.ndarray, outlines: dict) -> Image.Image:
    """Grey image (0.5-99.5 percentile stretch) with the outlines of each label image in its colour."""
    values = image.astype(np.float32)
    lo, hi = np.percentile(values, (0.5, 99.5))
    grey = (np.clip((values - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for color, labels in outlines.items():
        rgb[find_boundaries(labels, mode="inner")] = color
    return Image.fromarray(rgb)

