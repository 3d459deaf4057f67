"""Level 2 / Level 3 image writers: pyramidal OME-TIFF and OME-Zarr (NGFF 0.4), in bounded memory.

Both writers take a ``(C, Y, X)`` array-like (numpy array, zarr array, memmap, or anything that
supports ``image[c, y0:y1, x0:x1]`` and has ``shape`` and ``dtype``) and read it one block of
``tile_size`` x ``tile_size`` pixels at a time (row-major, channel by channel), so peak memory is
a few tiles, never a whole channel plane.

Pyramid levels halve the previous level (rounding sizes up) until the longest side fits in one
tile, like ASHLAR's writer. Intensity images are reduced by the mean of each 2 x 2 block
(rounded to the input dtype); integer label images (``labels=True``) by taking every second
pixel (``[::2, ::2]``), so labels are never averaged into ids that do not exist.

Metadata, the same in both formats: the image is named (OME ``Image@Name``, NGFF
``multiscales[].name`` / ``omero.name``: the slide id), channels carry their marker names and the
slide's colours (:func:`atlas.slide.palette.channel_colors`, also the overview's), and nothing
records a date: no TIFF ``DateTime``, no OME ``AcquisitionDate`` (MITI's rule for patient-derived
images), whatever the raw files carried.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numcodecs
import numpy as np
import tifffile
import zarr

from atlas.science.tiffstream import Sink, stream_ome_tiff
from atlas.slide.palette import channel_colors, ome_color

NGFF_VERSION = "0.4"
# Percentiles of the lowest pyramid level used as the default contrast window of each channel.
WINDOW_PERCENTILES = (0.5, 99.9)
_ZARR_COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)


class ArrayLike(Protocol):
    shape: tuple[int, ...]
    dtype: Any

    def __getitem__(self, key: Any) -> Any: ...


class _AsCYX:
    """A 2-D (Y, X) array-like seen as (1, Y, X), without reading it."""

    def __init__(self, image: ArrayLike):
        self.image, self.shape, self.dtype = image, (1, *image.shape), np.dtype(image.dtype)

    def __getitem__(self, key: tuple) -> np.ndarray:
        if not isinstance(key, tuple) or len(key) != 3 or not isinstance(key[0], (int, np.integer)) or key[0] != 0:
            raise IndexError(f"index as image[0, rows, cols], got {key!r}")
        return np.asarray(self.image[key[1:]])


def _as_cyx(image: ArrayLike) -> ArrayLike:
    if len(image.shape) == 2:
        return _AsCYX(image)
    if len(image.shape) != 3:
        raise ValueError(f"image must be (C, Y, X) or (Y, X), got shape {tuple(image.shape)}")
    return image


def level_shapes(shape_yx: tuple[int, int], tile_size: int) -> list[tuple[int, int]]:
    """(Y, X) of every pyramid level, full resolution first.

    Each level halves the previous one (sizes rounded up) until the longest side is at most
    ``tile_size``; an image that fits in one tile has a single level.
    """
    shapes = [tuple(int(s) for s in shape_yx)]
    while max(shapes[-1]) > tile_size:
        shapes.append(tuple(math.ceil(s / 2) for s in shapes[-1]))
    return shapes


def downsample(plane: np.ndarray, *, labels: bool = False) -> np.ndarray:
    """Halve a (Y, X) plane.

    Parameters
    ----------
    plane : (Y, X) ndarray
    labels : bool
        True for integer label images: nearest neighbour (every second pixel). False: mean of
        each 2 x 2 block, rounded to the input dtype; an odd last row/column is averaged with
        itself (edge replicate), so borders are not darkened.

    Returns
    -------
    (ceil(Y/2), ceil(X/2)) ndarray of the same dtype.
    """
    if labels:
        return np.ascontiguousarray(plane[::2, ::2])
    h, w = plane.shape
    if h % 2 or w % 2:
        plane = np.pad(plane, ((0, h % 2), (0, w % 2)), mode="edge")
    acc = plane[0::2, 0::2].astype(np.float32)
    acc += plane[1::2, 0::2]
    acc += plane[0::2, 1::2]
    acc += plane[1::2, 1::2]
    acc *= 0.25
    if np.issubdtype(plane.dtype, np.integer):
        np.rint(acc, out=acc)
    return acc.astype(plane.dtype)


def _blocks(image: ArrayLike, c: int, size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(y, x, block) of channel ``c`` in row-major blocks of ``size`` x ``size`` pixels."""
    for y in range(0, image.shape[1], size):
        for x in range(0, image.shape[2], size):
            yield y, x, np.asarray(image[c, y:y + size, x:x + size])


def _downsample_into(src: ArrayLike, dst: ArrayLike, *, labels: bool, size: int) -> None:
    """Fill ``dst`` (C, ceil(Y/2), ceil(X/2)) with the halved ``src``, one ``size``-pixel output block at a time."""
    for c in range(src.shape[0]):
        for y, x, block in _blocks(src, c, 2 * size):
            half = downsample(block, labels=labels)
            dst[c, y // 2:y // 2 + half.shape[0], x // 2:x // 2 + half.shape[1]] = half


def _copy_into(src: ArrayLike, dst: ArrayLike, size: int) -> None:
    for c in range(src.shape[0]):
        for y, x, block in _blocks(src, c, size):
            dst[c, y:y + block.shape[0], x:x + block.shape[1]] = block


def _create_level(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: Any,
                  tile_size: int) -> zarr.Array:
    return group.create_array(name, shape=shape, chunks=(1, tile_size, tile_size), dtype=dtype,
                              compressors=_ZARR_COMPRESSOR, fill_value=0,
                              chunk_key_encoding={"name": "v2", "separator": "/"})


def _build_levels(group: zarr.Group, image: ArrayLike, first: int, *, labels: bool,
                  tile_size: int) -> list[zarr.Array]:
    """Write levels ``first..`` of ``image``'s pyramid as arrays "<k>" of ``group``, each from the
    one before (level ``first - 1`` is ``image`` itself when ``first == 1``)."""
    shapes = level_shapes(image.shape[1:], tile_size)
    levels, src = [], image
    for k in range(first, len(shapes)):
        dst = _create_level(group, str(k), (image.shape[0], *shapes[k]), image.dtype, tile_size)
        _downsample_into(src, dst, labels=labels, size=tile_size)
        levels.append(dst)
        src = dst
    return levels


def _ome_uuid(path: Path, shape: tuple[int, ...], channel_names: Sequence[str]) -> str:
    # Deterministic, so the same inputs give byte-identical files.
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'atlas:{path.name}:{shape}:{list(channel_names)}')}"


def image_name(path: str | os.PathLike) -> str:
    """An image's name from its file name: ``registration/S1.ome.tif`` -> ``S1`` (the slide id)."""
    name = Path(path).name
    for suffix in (".ome.tif", ".ome.tiff", ".ome.zarr"):
        name = name.removesuffix(suffix)
    return name


def ome_tiff_description(path: str | os.PathLike, shape: tuple[int, int, int], dtype: Any, *,
                         channel_names: Sequence[str], pixel_size_um: float) -> str:
    """The OME-XML of a (C, Y, X) OME-TIFF (tifffile's :class:`tifffile.OmeXml`): ``Image@Name`` is
    :func:`image_name` of ``path``, channels named and coloured, a UUID from the inputs, no dates."""
    metadata = {"axes": "CYX", "UUID": _ome_uuid(Path(path), shape, channel_names), "Name": image_name(path),
                "Creator": "tissue-atlas",
                "Channel": {"Name": list(channel_names),
                            "Color": [ome_color(c) for c in channel_colors(channel_names)]},
                "PhysicalSizeX": pixel_size_um, "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": pixel_size_um, "PhysicalSizeYUnit": "µm"}
    ome = tifffile.OmeXml(**metadata)
    ome.addimage(np.dtype(dtype), shape, (shape[0], 1, 1, shape[1], shape[2], 1), **metadata)
    return ome.tostring(declaration=True)


def write_ome_tiff_pyramid(path: str | os.PathLike, image: ArrayLike, *, channel_names: Sequence[str],
                           pixel_size_um: float, tile_size: int = 1024, labels: bool = False,
                           subresolutions: Sequence[ArrayLike] | None = None, workers: int | None = None,
                           sink: Sink | None = None, scratch: str | os.PathLike | None = None,
                           on_scratch: Callable[[int], None] | None = None) -> int:
    """Write a tiled, compressed, pyramidal OME-TIFF (pyramid in SubIFDs), tile by tile, front to back.

    Parameters
    ----------
    path : path
        Output ``.ome.tif`` (BigTIFF); with ``sink``, only the file's name (its relative path in a store).
    image : (C, Y, X) or (Y, X) array-like
        uint8/uint16/float intensities, or integer labels (e.g. uint32) with ``labels=True``.
        Read one ``tile_size`` block at a time.
    channel_names : sequence of str
        One OME ``Channel@Name`` per channel; ``Channel@Color`` from
        :func:`atlas.slide.palette.channel_colors` of them. The OME ``Image@Name`` is
        :func:`image_name` of ``path`` (the slide id for ``registration/<slide>.ome.tif``).
    pixel_size_um : float
        Physical pixel size in µm (square pixels), written as PhysicalSizeX/Y and TIFF resolution.
    tile_size : int
        TIFF tile size in pixels (a multiple of 16).
    labels : bool
        Integer label image: downsample by nearest neighbour instead of the mean.
    subresolutions : sequence of (C, Y_k, X_k) array-like, optional
        Levels 1.. already computed (e.g. the datasets of :func:`write_ome_zarr`), shaped as
        :func:`level_shapes` says. Computed here (in a temporary zarr store in ``scratch``, default
        next to ``path``) when None.
    workers : int, optional
        Threads reading and encoding tiles (the job's vCPUs); default the host's CPU count.
    sink : object with ``write(bytes)``, optional
        Where the bytes go, in order (e.g. :meth:`atlas.storage.Store.writer`), instead of ``path``.
    scratch : path, optional
        Folder for the per-channel tile buffer (and computed levels); default next to ``path``, or
        the system's temporary folder with ``sink``.
    on_scratch : callable, optional
        Called with the tile buffer's bytes after each channel (:func:`atlas.science.tiffstream.stream_ome_tiff`).

    Returns
    -------
    int
        Bytes written.

    Notes
    -----
    Written by :func:`atlas.science.tiffstream.stream_ome_tiff`, never seeking back (so it can go
    straight into an S3 multipart upload): memory a few tiles per worker, scratch one channel's
    compressed pyramid. Compression: Deflate with horizontal predictor, as ASHLAR writes; readable
    by Bio-Formats, QuPath, napari (tifffile). No TIFF ``DateTime`` tag and no OME
    ``AcquisitionDate`` are written.
    """
    image = _as_cyx(image)
    if len(channel_names) != image.shape[0]:
        raise ValueError(f"{len(channel_names)} channel names for {image.shape[0]} channels")
    if tile_size % 16:
        raise ValueError(f"tile_size must be a multiple of 16, got {tile_size}")
    shapes = level_shapes(image.shape[1:], tile_size)
    if scratch is None and sink is None:
        scratch = Path(path).parent
    tmp = None
    if subresolutions is None:
        tmp = tempfile.mkdtemp(prefix=".pyramid-", dir=scratch)
        subresolutions = _build_levels(zarr.open_group(tmp, mode="w", zarr_format=2), image, 1,
                                       labels=labels, tile_size=tile_size)
    try:
        got = [tuple(level.shape[1:]) for level in subresolutions]
        if got != shapes[1:]:
            raise ValueError(f"subresolutions have shapes {got}, expected {shapes[1:]}")
        description = ome_tiff_description(path, tuple(image.shape), image.dtype, channel_names=channel_names,
                                           pixel_size_um=pixel_size_um)
        with contextlib.ExitStack() as stack:
            out = sink if sink is not None else stack.enter_context(open(path, "wb"))
            return stream_ome_tiff(out, [image, *subresolutions], description=description, tile_size=tile_size,
                                   per_cm=1e4 / pixel_size_um, workers=workers or os.cpu_count() or 1,
                                   scratch=scratch, on_scratch=on_scratch)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def contrast_windows(level: ArrayLike, percentiles: tuple[float, float] = WINDOW_PERCENTILES
                     ) -> list[tuple[float, float]]:
    """Display window (start, end) of each channel: percentiles of a (small) pyramid level.

    Parameters
    ----------
    level : (C, Y, X) array-like
        Usually the lowest-resolution level (read whole).
    percentiles : (low, high)
        In percent.

    Returns
    -------
    list of (float, float), one per channel, in the image's intensity units; end > start.
    """
    windows = []
    for c in range(level.shape[0]):
        lo, hi = np.percentile(np.asarray(level[c]), percentiles)
        windows.append((float(lo), float(max(hi, lo + 1))))
    return windows


def _multiscales(name: str, n_levels: int, pixel_size_um: float, *, labels: bool) -> list[dict]:
    """NGFF 0.4 ``multiscales``, with the recommended ``name``, ``type`` and ``metadata`` (how levels were made)."""
    method = {"type": "nearest" if labels else "mean",
              "metadata": {"method": f"{__name__}.downsample", "kwargs": {"labels": labels},
                           "description": "every second pixel of the level above (label ids are never averaged)"
                           if labels else "mean of each 2 x 2 block of the level above, rounded to the dtype"}}
    return [{
        "version": NGFF_VERSION, "name": name, **method,
        "axes": [{"name": "c", "type": "channel"},
                 {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, pixel_size_um * 2 ** k, pixel_size_um * 2 ** k]}]}
            for k in range(n_levels)],
    }]


def write_ome_zarr(path: str | os.PathLike | zarr.abc.store.Store, image: ArrayLike, *, channel_names: Sequence[str],
                   pixel_size_um: float, tile_size: int = 1024, name: str | None = None) -> list[zarr.Array]:
    """Write an OME-Zarr (NGFF 0.4, zarr v2 on disk) multiscale image, block by block.

    Parameters
    ----------
    path : path or zarr store
        Output ``.ome.zarr`` directory (replaced if it exists), or a zarr 3 store for it (e.g. over
        S3: chunks are put one at a time).
    image : (C, Y, X) or (Y, X) array-like
        Intensities; read one ``tile_size`` block at a time.
    channel_names : sequence of str
        ``omero.channels[].label``; ``omero.channels[].color`` from
        :func:`atlas.slide.palette.channel_colors` of them.
    pixel_size_um : float
        Pixel size in µm; level k has scale ``pixel_size_um * 2**k`` (axes c, y, x; unit micrometer).
    tile_size : int
        Chunk size (1, tile_size, tile_size); the pyramid stops when a level fits in one chunk.
    name : str, optional
        The image's name in the metadata (``multiscales[].name``, ``omero.name``: the slide id);
        default :func:`image_name` of ``path``.

    Returns
    -------
    list of zarr.Array
        The levels, full resolution first (pass ``levels[1:]`` as ``subresolutions`` to
        :func:`write_ome_tiff_pyramid` to reuse them).

    Notes
    -----
    ``omero.channels[].window`` holds the dtype range (min/max) and a default display range
    (start/end) from :func:`contrast_windows` of the lowest level. Chunks are Blosc-zstd with
    bit shuffle, "/"-nested keys as NGFF 0.4 prescribes.
    """
    image = _as_cyx(image)
    if len(channel_names) != image.shape[0]:
        raise ValueError(f"{len(channel_names)} channel names for {image.shape[0]} channels")
    if isinstance(path, (str, os.PathLike)):
        path = Path(path)
        name = name or image_name(path)
        if path.exists():
            shutil.rmtree(path)
    elif name is None:
        raise ValueError("give the image's name with a zarr store")
    group, levels = create_ome_zarr(path, tuple(image.shape), image.dtype, tile_size)
    for c in range(image.shape[0]):
        for k in range(len(levels)):
            for row in range(level_rows(levels[k], tile_size)):
                write_level_row(levels, k, c, row, tile_size, read=lambda ys, xs, c=c: image[c, ys, xs])
    describe_ome_zarr(group, levels, channel_names=channel_names, pixel_size_um=pixel_size_um, name=name)
    return levels


def create_ome_zarr(path: str | os.PathLike | zarr.abc.store.Store, shape: tuple[int, int, int], dtype: Any,
                    tile_size: int) -> tuple[zarr.Group, list[zarr.Array]]:
    """An empty OME-Zarr hierarchy: the group and its pyramid levels' arrays ("0", "1", ...; chunks
    (1, tile_size, tile_size), Blosc-zstd), without data or image metadata. Writers then fill the
    levels channel by channel and row by row (:func:`write_level_row`), possibly in several
    processes, and :func:`describe_ome_zarr` adds the NGFF metadata last."""
    group = zarr.open_group(path, mode="w", zarr_format=2)
    levels = [_create_level(group, str(k), (shape[0], *yx), dtype, tile_size)
              for k, yx in enumerate(level_shapes(shape[1:], tile_size))]
    return group, levels


def level_rows(level: ArrayLike, tile_size: int) -> int:
    """Rows of chunks of a pyramid level (the units :func:`write_level_row` writes)."""
    return math.ceil(level.shape[1] / tile_size)


def write_level_row(levels: Sequence[zarr.Array], k: int, c: int, row: int, tile_size: int, *,
                    read: Callable[[slice, slice], np.ndarray] | None = None, labels: bool = False) -> None:
    """Write chunk row ``row`` of channel ``c`` of level ``k``: level 0 from ``read(rows, cols)`` (the
    full-resolution pixels of channel ``c`` in those slices), a smaller level by halving the two chunk
    rows of level ``k - 1`` that it covers, which must be written already. Each chunk is written
    once, whole; rows and channels are independent, so writers may split them between them."""
    y0, y1 = row * tile_size, min((row + 1) * tile_size, levels[k].shape[1])
    width = levels[k].shape[2]
    for x in range(0, width, tile_size):
        x1 = min(x + tile_size, width)
        if k == 0:
            block = np.asarray(read(slice(y0, y1), slice(x, x1)))
        else:
            block = downsample(np.asarray(levels[k - 1][c, 2 * y0:2 * y1, 2 * x:2 * x1]), labels=labels)
        levels[k][c, y0:y1, x:x1] = block


def describe_ome_zarr(group: zarr.Group, levels: Sequence[zarr.Array], *, channel_names: Sequence[str],
                      pixel_size_um: float, name: str) -> None:
    """Add the NGFF 0.4 image metadata (multiscales, omero with display windows from the smallest
    level) to an OME-Zarr whose levels are written."""
    dtype = np.dtype(levels[0].dtype)
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    colors = channel_colors(channel_names)
    channels = [{"label": label, "color": color, "active": True, "coefficient": 1.0, "family": "linear",
                 "inverted": False,
                 "window": {"min": float(info.min) if info else start, "max": float(info.max) if info else end,
                            "start": start, "end": end}}
                for label, color, (start, end) in zip(channel_names, colors, contrast_windows(levels[-1]),
                                                      strict=True)]
    group.attrs.update({"multiscales": _multiscales(name, len(levels), pixel_size_um, labels=False),
                        "omero": {"name": name, "version": NGFF_VERSION,
                                  "channels": channels, "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0}}})


def write_zarr_labels(zarr_path: str | os.PathLike | zarr.abc.store.Store, name: str, labels: ArrayLike
                      ) -> list[zarr.Array]:
    """Add an NGFF 0.4 label image to an OME-Zarr written by :func:`write_ome_zarr`.

    Parameters
    ----------
    zarr_path : path or zarr store
        The image's ``.ome.zarr`` directory, or a zarr 3 store for it.
    name : str
        Label image name, e.g. ``"cell"`` or ``"nuclei"``; replaces one of the same name.
    labels : (Y, X) or (1, Y, X) integer array-like
        Same Y, X as the image; read block by block.

    Returns
    -------
    list of zarr.Array
        Levels ``labels/<name>/0..`` of shape (1, Y_k, X_k), as many as the image has, each
        downsampled by nearest neighbour; same axes and scales as the image.
    """
    root = zarr.open_group(Path(zarr_path) if isinstance(zarr_path, (str, os.PathLike)) else zarr_path,
                           mode="r+", zarr_format=2)
    image_ms = root.attrs["multiscales"][0]
    base_shape = root[image_ms["datasets"][0]["path"]].shape
    labels = _as_cyx(labels)
    if labels.shape[0] != 1 or tuple(labels.shape[1:]) != tuple(base_shape[1:]):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match image (Y, X) {tuple(base_shape[1:])}")
    if np.dtype(labels.dtype).kind not in "iu":
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    tile_size = root[image_ms["datasets"][0]["path"]].chunks[-1]
    group_names = list(root["labels"].attrs.get("labels", [])) if "labels" in root else []
    labels_group = root.require_group("labels")
    if name in labels_group:
        del labels_group[name]
    group = labels_group.create_group(name)
    n_levels = len(image_ms["datasets"])
    base = _create_level(group, "0", tuple(labels.shape), labels.dtype, tile_size)
    _copy_into(labels, base, size=tile_size)
    levels = [base]
    for k in range(1, n_levels):
        shape = (1, *[math.ceil(s / 2) for s in levels[-1].shape[1:]])
        dst = _create_level(group, str(k), shape, labels.dtype, tile_size)
        _downsample_into(levels[-1], dst, labels=True, size=tile_size)
        levels.append(dst)
    pixel_size = image_ms["datasets"][0]["coordinateTransformations"][0]["scale"][-1]
    group.attrs.update({"multiscales": _multiscales(name, n_levels, pixel_size, labels=True),
                        "image-label": {"version": NGFF_VERSION, "source": {"image": "../../"}}})
    labels_group.attrs["labels"] = [*[n for n in group_names if n != name], name]
    return levels

