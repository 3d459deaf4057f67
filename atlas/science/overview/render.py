"""Render a whole overview site: contrast, tiles of every group and of the outlines, exhibit, page."""
from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atlas.errors import InvalidInput, Problem
from atlas.science.overview import exhibit as ex
from atlas.science.overview.contrast import auto_contrast, sample_pixels
from atlas.science.overview.site import copy_viewer, find_viewer, viewer_version, write_site
from atlas.science.overview.source import TiffPyramid
from atlas.science.overview.tiles import (
    composite,
    encode_jpeg,
    encode_png,
    outline_rgba,
    outlines,
    tile_grid,
    write_tiles,
)
from atlas.slide.convention import MARKERS

MASK_NAME = "Cell outlines"
MASK_PATH = "cell-outlines"


@dataclass(frozen=True)
class PanelInfo:
    """What the side panel shows beyond the image itself (all optional).

    Attributes
    ----------
    run_id : str or None
    cell_count : int or None
        Rows of the cell feature table.
    qc : dict
        ``{stage: {"summary": {key: scalar}, "files": [paths relative to the results root]}}``
        from ``qc/<stage>/`` (see :func:`atlas.stages.render.qc_panel`).
    data : list of dict
        Result files by data level: ``{"level": int, "path": str (relative to the results root),
        "size": int (bytes), "uri": str or None (where it is published)}``.
    """

    run_id: str | None = None
    cell_count: int | None = None
    qc: dict = field(default_factory=dict)
    data: list = field(default_factory=list)


def _dtype_max(dtype: np.dtype) -> float:
    return float(np.iinfo(dtype).max) if dtype.kind in "iu" else 1.0


def _read_with_margin(labels: TiffPyramid, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Labels of a region plus one pixel on each side (repeating the image edge)."""
    height, width = labels.level_shapes[level]
    ya, yb, xa, xb = max(y0 - 1, 0), min(y1 + 1, height), max(x0 - 1, 0), min(x1 + 1, width)
    region = labels.read(level, [0], ya, yb, xa, xb)[0]
    pad = ((1 - (y0 - ya), 1 - (yb - y1)), (1 - (x0 - xa), 1 - (xb - x1)))
    return np.pad(region, pad, mode="edge")


def render_overview(image_path: str | os.PathLike, out_dir: str | os.PathLike, *, slide_id: str,
                    markers: Sequence[str], mask_path: str | os.PathLike | None = None,
                    panel: PanelInfo | None = None, channels_per_group: int = 4, tile_size: int = 1024,
                    viewer_dir: str | os.PathLike | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Render the Minerva-style overview site of one registered image.

    Parameters
    ----------
    image_path : path
        Registered image, (C, Y, X) pyramidal OME-TIFF (levels not in the file are computed).
    out_dir : path
        The site folder; replaced as a whole when rendering has succeeded.
    slide_id : str
    markers : sequence of str
        Marker name of each channel, in image channel order (markers.csv).
    mask_path : path, optional
        Cell label image of the same Y, X for the outline layer; None renders without it.
    panel : PanelInfo, optional
    channels_per_group : int
    tile_size : int
        Deep-zoom tile edge in pixels (Minerva uses 1024).
    viewer_dir : path, optional
        OpenSeadragon's build folder (default: env ATLAS_VIEWER_DIR, then the repo's npm install).
    progress : callable, optional
        ``progress(done, total)`` in tiles.

    Returns
    -------
    dict : ``{"tiles": int, "groups": int, "levels": int, "mask": bool}``.

    Raises
    ------
    InvalidInput
        Marker count differs from the channel count, the mask does not match the image, or the
        viewer is not installed.
    """
    out_dir = Path(out_dir)
    panel = panel or PanelInfo()
    viewer = find_viewer(viewer_dir)  # fail before the long part
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    try:
        summary = _render(image_path, work, slide_id=slide_id, markers=markers, mask_path=mask_path, panel=panel,
                          channels_per_group=channels_per_group, tile_size=tile_size, viewer=viewer,
                          progress=progress)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    return summary


def _render(image_path: str | os.PathLike, work: Path, *, slide_id: str, markers: Sequence[str],
            mask_path: str | os.PathLike | None, panel: PanelInfo, channels_per_group: int, tile_size: int,
            viewer: Path, progress: Callable[[int, int], None] | None) -> dict:
    with TiffPyramid(image_path, tile_size) as image:
        if len(markers) != image.shape[0]:
            raise InvalidInput(Problem(MARKERS, f"lists {len(markers)} markers but {Path(image_path).name} "
                                       f"has {image.shape[0]} channels",
                                       "list exactly one marker row per channel of the registered image"))
        coarsest = image.level(image.n_levels - 1)
        ranges = [auto_contrast(sample_pixels(plane)) for plane in coarsest]
        groups = ex.make_groups(list(markers), ranges, channels_per_group)
        labels = None
        if mask_path is not None:
            labels = TiffPyramid(mask_path, tile_size, labels=True)
            if labels.shape != (1, *image.shape[1:]):
                labels.close()
                raise InvalidInput(Problem(str(mask_path), f"mask shape {labels.shape} does not match the image "
                                           f"(1, {image.shape[1]}, {image.shape[2]})",
                                           "give the cell mask segmented from this registered image"))
        per_layer = sum(1 for _ in tile_grid(image.level_shapes, tile_size))
        total = per_layer * (len(groups) + (labels is not None))
        done, lock = 0, threading.Lock()

        def tick(n: int) -> None:  # called from the tile threads
            nonlocal done
            with lock:
                done += n
                if progress is not None:
                    progress(done, total)

        try:
            images = work / ex.IMAGES_PATH
            for group in groups:
                def render_group(level: int, y0: int, y1: int, x0: int, x1: int, group=group) -> bytes:
                    return encode_jpeg(composite(image.read(level, group.channels, y0, y1, x0, x1),
                                                 group.ranges, group.colors))
                write_tiles(images / group.path, image.level_shapes, tile_size, "jpg", render_group, progress=tick)
            if labels is not None:
                def render_outline(level: int, y0: int, y1: int, x0: int, x1: int) -> bytes:
                    return encode_png(outline_rgba(outlines(_read_with_margin(labels, level, y0, y1, x0, x1)),
                                                   ex.OUTLINE_COLOR))
                write_tiles(images / MASK_PATH, image.level_shapes, tile_size, "png", render_outline, progress=tick)
        finally:
            if labels is not None:
                labels.close()
        height, width = image.shape[1:]
        pixel_size = image.pixel_size_um
        mask = {"Name": MASK_NAME, "Path": MASK_PATH} if labels is not None else None
        header = _header(slide_id, markers, panel)
        exhibit = ex.make_exhibit(slide_id=slide_id, width=width, height=height, max_level=image.n_levels - 1,
                                  groups=groups, mask=mask, pixel_size_um=pixel_size, header=header)
        story = ex.make_story(slide_id=slide_id, groups=groups, dtype_max=_dtype_max(image.dtype),
                              pixel_size_um=pixel_size)
        dtype = str(image.dtype)
        n_levels = image.n_levels
    (work / "exhibit.json").write_text(json.dumps(exhibit, indent=1) + "\n")
    (work / "story.json").write_text(json.dumps(story, indent=1) + "\n")
    copy_viewer(viewer, work)
    group_of = {c: g.name for g in groups for c in g.channels}
    data = {
        "exhibit": exhibit, "tileSize": tile_size, "viewer": f"OpenSeadragon {viewer_version(viewer)}",
        "panel": {
            "slideId": slide_id, "runId": panel.run_id, "cellCount": panel.cell_count, "qc": panel.qc,
            "data": panel.data,
            "image": {"width": width, "height": height, "channels": len(markers), "dtype": dtype,
                      "pixelSizeUm": pixel_size, "levels": n_levels},
            "markers": [{"channel": c + 1, "name": name, "group": group_of[c]} for c, name in enumerate(markers)],
            "groups": [{"name": g.name, "channels": [
                {"index": c, "name": label, "color": color, "low": round(low, 4), "high": round(high, 4)}
                for c, label, color, (low, high) in zip(g.channels, g.labels, g.colors, g.ranges, strict=True)]}
                for g in groups],
        },
    }
    write_site(work, data, title=f"{slide_id} · Tissue Atlas overview")
    return {"tiles": total, "groups": len(groups), "levels": n_levels, "mask": mask is not None}


def _header(slide_id: str, markers: Sequence[str], panel: PanelInfo) -> str:
    """Markdown introduction of the story: what the slide is, in one paragraph."""
    cells = f" {panel.cell_count:,} segmented cells." if panel.cell_count is not None else ""
    return f"**{slide_id}**: {len(markers)} markers ({', '.join(markers)}).{cells}"
