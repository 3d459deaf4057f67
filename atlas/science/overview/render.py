"""Render a whole overview site: contrast, tiles of every group and of the outlines, exhibit, page."""
from __future__ import annotations

import json
import math
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
from atlas.science.overview.source import TiffPyramid, ZarrPyramid
from atlas.science.overview.story import CellTable, draft_story, resolve_views
from atlas.science.overview.tiles import (
    TileLayer,
    composite,
    encode_jpeg,
    encode_png,
    outline_rgba,
    outlines,
    render_tiles,
    tile_paths,
    tile_units,
)
from atlas.slide.convention import MARKERS
from atlas.slide.palette import channel_colors
from atlas.slide.story import OUTLINES, STORY, Story, check_story

MASK_NAME = OUTLINES
MASK_PATH = "cell-outlines"
SUMMARY = "summary.json"   # the overview's facts for the portal (atlas.aws.portal)


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
        "size": int (bytes) or None (not known yet), "uri": str or None (where it is published)}``.
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


def render_overview(image_path: str | os.PathLike | ZarrPyramid, out_dir: str | os.PathLike, *, slide_id: str,
                    markers: Sequence[str], mask_path: str | os.PathLike | ZarrPyramid | None = None,
                    panel: PanelInfo | None = None, channels_per_group: int = 4, tile_size: int = 1024,
                    story: Story | None = None, cells: CellTable | None = None, channel_layers: bool = False,
                    viewer_dir: str | os.PathLike | None = None, workers: int | None = None,
                    story_files: tuple[str, str | None] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Render the Minerva-style overview site of one registered image.

    Parameters
    ----------
    image_path : path or ZarrPyramid
        Registered image, (C, Y, X) pyramidal OME-TIFF (levels not in the file are computed), or
        an OME-Zarr's pyramid (e.g. over S3, read chunk by chunk).
    out_dir : path
        The site folder; replaced as a whole when rendering has succeeded.
    slide_id : str
    markers : sequence of str
        Marker name of each channel, in image channel order (markers.csv).
    mask_path : path or ZarrPyramid, optional
        Cell label image of the same Y, X for the outline layer; None renders without it.
    panel : PanelInfo, optional
    channels_per_group : int
        Channels per automatic group (when the story has no groups).
    tile_size : int
        Deep-zoom tile edge in pixels (Minerva uses 1024).
    story : Story, optional
        The authored story (story.yml), checked against the image first; None drafts one from
        ``cells`` (or, without them, from the image; see :mod:`atlas.science.overview.story`).
    cells : CellTable, optional
        The cell table the drafted story is made from.
    channel_layers : bool
        Also render each channel alone as grey tiles, listed in exhibit.json's ``Channels``, so a
        viewer can toggle and recolour channels.
    viewer_dir : path, optional
        OpenSeadragon's build folder (default: env ATLAS_VIEWER_DIR, then the repo's npm install).
    workers : int, optional
        Threads rendering tiles (the job's vCPUs); default the host's CPU count.
    story_files : (str, str or None), optional
        The image's and the mask's files relative to ``out_dir``, named in story.json (Minerva
        Author opens them); default the paths given, which must then be paths.
    progress : callable, optional
        ``progress(done, total)`` in tiles.

    Returns
    -------
    dict : ``{"tiles": int, "groups": int, "levels": int, "mask": bool, "waypoints": int,
    "drafted": bool}``.

    Raises
    ------
    InvalidInput
        Marker count differs from the channel count, the mask does not match the image, the
        story does not fit the slide (naming story.yml and the waypoint), or the viewer is not
        installed.
    """
    out_dir = Path(out_dir)
    panel = panel or PanelInfo()
    viewer = find_viewer(viewer_dir)  # fail before the long part
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    try:
        summary = _render(image_path, work, slide_id=slide_id, markers=markers, mask_path=mask_path, panel=panel,
                          channels_per_group=channels_per_group, tile_size=tile_size, story=story, cells=cells,
                          channel_layers=channel_layers, viewer=viewer, workers=workers,
                          files=story_files or (_relative(image_path, out_dir),
                                                _relative(mask_path, out_dir) if mask_path is not None else None),
                          progress=progress)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    return summary


def prepare_groups(image: TiffPyramid, markers: Sequence[str], channels_per_group: int,
                   story: Story | None) -> tuple[list[ex.Group], np.ndarray]:
    """Display ranges from the coarsest level and the overview's groups (the story's, else automatic).

    Returns the groups and the coarsest level, (C, y, x).

    Raises
    ------
    InvalidInput
        The marker count differs from the image's channel count.
    """
    if len(markers) != image.shape[0]:
        raise InvalidInput(Problem(MARKERS, f"lists {len(markers)} markers but {image.name} "
                                   f"has {image.shape[0]} channels",
                                   "list exactly one marker row per channel of the registered image"))
    coarsest = image.level(image.n_levels - 1)
    ranges = [auto_contrast(sample_pixels(plane)) for plane in coarsest]
    return ex.make_groups(list(markers), ranges, channels_per_group, story.groups if story else ()), coarsest


def header_text(slide_id: str, markers: Sequence[str], cell_count: int | None) -> str:
    """Markdown introduction of the story: what the slide is, in one paragraph."""
    from atlas.science.overview.story import md_escape

    cells = f" {cell_count:,} segmented cells." if cell_count is not None else ""
    return f"**{md_escape(slide_id)}**: {len(markers)} markers ({', '.join(map(md_escape, markers))}).{cells}"


def draft_for_image(image: TiffPyramid, markers: Sequence[str], *, channels_per_group: int,
                    cells: CellTable | None, header: str) -> Story:
    """The story render drafts for this image when the slide has no story.yml (``atlas story draft``)."""
    groups, coarsest = prepare_groups(image, markers, channels_per_group, None)
    height, width = image.shape[1:]
    return draft_story(groups=groups, width=width, height=height, pixel_size_um=image.pixel_size_um,
                       header=header, cells=cells, planes=coarsest)


@dataclass(frozen=True)
class _Plan:
    """What the overview will show: groups, the story's views, channel layers and their ranges."""

    groups: list[ex.Group]
    views: list[ex.View]
    header: str
    drafted: bool
    layers: list[dict]
    ranges: list[tuple[float, float]]


@dataclass(frozen=True)
class Layers:
    """The overview's image layers, whatever its story's views: groups, channel layers, display ranges.

    Attributes
    ----------
    groups : list of exhibit.Group
    channels : list of dict
        Channel layers (``render.channel_layers``): ``{"Name", "Path", "channel"}``; empty without.
    ranges : list of (float, float)
        Display range of every channel of the image.
    coarsest : (C, y, x) ndarray
        The smallest pyramid level, the ranges' sample.
    """

    groups: list[ex.Group]
    channels: list[dict]
    ranges: list[tuple[float, float]]
    coarsest: np.ndarray


def plan_layers(image: TiffPyramid | ZarrPyramid, markers: Sequence[str], *, channels_per_group: int,
                story: Story | None, channel_layers: bool) -> Layers:
    """Check the authored story against the image, and make the overview's layers (the story's
    groups, else automatic ones of ``channels_per_group``): the same for every job that renders
    a share of the overview.

    Raises
    ------
    InvalidInput
        The marker count differs from the channel count, or the story does not fit the slide.
    """
    height, width = image.shape[1:]
    pixel_size = image.pixel_size_um
    if story is not None:
        problems = check_story(story, markers=markers, per_group=channels_per_group,
                               extent_um=(width * (pixel_size or 1.0), height * (pixel_size or 1.0)),
                               image_px=(width, height), file=STORY)
        if problems:
            raise InvalidInput(problems)
    groups, coarsest = prepare_groups(image, markers, channels_per_group, story)
    channels = [{"Name": name, "Path": ex.channel_layer_path(c, name), "channel": c}
                for c, name in enumerate(markers)] if channel_layers else []
    return Layers(groups, channels, _channel_ranges(groups, len(markers), coarsest), coarsest)


def _plan(image: TiffPyramid | ZarrPyramid, markers: Sequence[str], *, slide_id: str, cell_count: int | None,
          channels_per_group: int, story: Story | None, cells: CellTable | None, channel_layers: bool) -> _Plan:
    """Check the authored story against the image (or draft one), make the groups and the views."""
    height, width = image.shape[1:]
    layers = plan_layers(image, markers, channels_per_group=channels_per_group, story=story,
                         channel_layers=channel_layers)
    header = header_text(slide_id, markers, cell_count)
    drafted = story is None
    if drafted:
        story = draft_story(groups=layers.groups, width=width, height=height, pixel_size_um=image.pixel_size_um,
                            header=header, cells=cells, planes=layers.coarsest)
    views = resolve_views(story, layers.groups, width=width, height=height, pixel_size_um=image.pixel_size_um)
    return _Plan(layers.groups, views, header, drafted, layers.channels, layers.ranges)


def _pyramid(source, tile_size: int, *, labels: bool = False):
    """A path opened as a TiffPyramid; a pyramid object as it is."""
    return TiffPyramid(source, tile_size, labels=labels) if isinstance(source, (str, os.PathLike)) else source


def open_mask(mask_path, tile_size: int, image) -> TiffPyramid | ZarrPyramid | None:
    """The cell mask's pyramid (from a path or as given), checked to match the image; None without a mask."""
    if mask_path is None:
        return None
    labels = _pyramid(mask_path, tile_size, labels=True)
    if labels.shape != (1, *image.shape[1:]):
        labels.close()
        where = str(mask_path) if isinstance(mask_path, (str, os.PathLike)) else labels.name
        raise InvalidInput(Problem(where, f"mask shape {labels.shape} does not match the image "
                                   f"(1, {image.shape[1]}, {image.shape[2]})",
                                   "give the cell mask segmented from this registered image"))
    return labels


def tile_layers(image: TiffPyramid | ZarrPyramid, labels: TiffPyramid | ZarrPyramid | None,
                groups: Sequence[ex.Group], channels: Sequence[dict], ranges: Sequence[tuple[float, float]]
                ) -> list[TileLayer]:
    """The overview's deep-zoom layers in a fixed order: the ``groups`` (colour composites), the
    ``channels`` layers (grey, in their display ``ranges``), the cell outlines (when there are
    ``labels``). Each tile reads only its layer's channels in its region."""
    out = []
    for group in groups:
        def render_group(level: int, y0: int, y1: int, x0: int, x1: int, group=group) -> bytes:
            return encode_jpeg(composite(image.read(level, group.channels, y0, y1, x0, x1), group.ranges, group.colors))
        out.append(TileLayer(group.path, "jpg", render_group))
    for layer in channels:
        def render_channel(level: int, y0: int, y1: int, x0: int, x1: int, c=layer["channel"]) -> bytes:
            return encode_jpeg(composite(image.read(level, [c], y0, y1, x0, x1), [ranges[c]], ["ffffff"]))
        out.append(TileLayer(layer["Path"], "jpg", render_channel))
    if labels is not None:
        def render_outline(level: int, y0: int, y1: int, x0: int, x1: int) -> bytes:
            return encode_png(outline_rgba(outlines(_read_with_margin(labels, level, y0, y1, x0, x1)),
                                           ex.OUTLINE_COLOR))
        out.append(TileLayer(MASK_PATH, "png", render_outline))
    return out


def _write_tiles(image, labels, plan: _Plan, images: Path, tile_size: int, workers: int | None,
                 progress: Callable[[int, int], None] | None) -> int:
    """Every tile of every layer into the folder ``images``; returns the number of tiles."""
    layers = tile_layers(image, labels, plan.groups, plan.layers, plan.ranges)
    units = tile_units(len(layers), image.level_shapes, tile_size)
    total = sum(math.ceil(image.level_shapes[u.level][1] / tile_size) for u in units)
    done, lock = 0, threading.Lock()

    def write(rel: str, data: bytes) -> None:  # called from the tile threads
        nonlocal done
        path = images / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        with lock:
            done += 1
            if progress is not None:
                progress(done, total)

    return render_tiles(layers, units, image.level_shapes, tile_size, write, workers=workers)


def _page_data(plan: _Plan, exhibit: dict, panel: PanelInfo, image: dict, markers: Sequence[str], *,
               slide_id: str, tile_size: int, viewer: Path) -> dict:
    """What index.html inlines: the exhibit, the story's views in pixels, channel layers and the panel."""
    group_of: dict[int, list[str]] = {}
    color_of: dict[int, str] = {}   # a channel layer starts in its colour in the first group showing it
    palette = channel_colors(markers)  # else in the slide's palette colour
    for g in plan.groups:
        for c, color in zip(g.channels, g.colors, strict=True):
            group_of.setdefault(c, []).append(g.name)
            color_of.setdefault(c, color)
    return {
        "exhibit": exhibit, "tileSize": tile_size, "viewer": f"OpenSeadragon {viewer_version(viewer)}",
        "story": {"drafted": plan.drafted, "waypoints": [
            {"name": v.name, "description": v.description, "group": v.group, "center": list(v.center),
             "zoom": v.zoom, "arrows": [{"at": list(at), "text": text} for at, text in v.arrows],
             "overlays": [list(box) for box in v.overlays], "outlines": MASK_NAME in v.masks} for v in plan.views]},
        "channelLayers": [{"name": layer["Name"], "path": layer["Path"], "channel": layer["channel"],
                           "color": color_of.get(layer["channel"], palette[layer["channel"]])}
                          for layer in plan.layers],
        "panel": {
            "slideId": slide_id, "runId": panel.run_id, "cellCount": panel.cell_count, "qc": panel.qc,
            "data": panel.data, "image": image,
            "markers": [{"channel": c + 1, "name": name, "group": ", ".join(group_of.get(c, []))}
                        for c, name in enumerate(markers)],
            "groups": [{"name": g.name, "channels": [
                {"index": c, "name": label, "color": color, "low": round(low, 4), "high": round(high, 4)}
                for c, label, color, (low, high) in zip(g.channels, g.labels, g.colors, g.ranges, strict=True)]}
                for g in plan.groups],
        },
    }


def _render(image_path, work: Path, *, slide_id: str, markers: Sequence[str], mask_path, panel: PanelInfo,
            channels_per_group: int, tile_size: int, story: Story | None, cells: CellTable | None,
            channel_layers: bool, viewer: Path, workers: int | None, files: tuple[str, str | None],
            progress: Callable[[int, int], None] | None) -> dict:
    with _pyramid(image_path, tile_size) as image:
        plan = _plan(image, markers, slide_id=slide_id, cell_count=panel.cell_count,
                     channels_per_group=channels_per_group, story=story, cells=cells, channel_layers=channel_layers)
        labels = open_mask(mask_path, tile_size, image)
        try:
            total = _write_tiles(image, labels, plan, work / ex.IMAGES_PATH, tile_size, workers, progress)
        finally:
            if labels is not None:
                labels.close()
        summary = _write_site(image, work, plan, slide_id=slide_id, markers=markers, mask=labels is not None,
                              panel=panel, tile_size=tile_size, viewer=viewer, files=files)
    return {"tiles": total, **summary}


def render_site(image: ZarrPyramid, out_dir: str | os.PathLike, *, slide_id: str, markers: Sequence[str],
                mask: bool, panel: PanelInfo, channels_per_group: int, tile_size: int, story: Story | None,
                cells: CellTable | None, channel_layers: bool, viewer_dir: str | os.PathLike | None,
                story_files: tuple[str, str | None]) -> dict:
    """Everything of the overview but its tiles (:func:`tile_layers`, rendered apart, e.g. by the items
    of an array job): exhibit.json, story.json, summary.json, index.html and the viewer, into the
    existing folder ``out_dir``. The arguments are those of :func:`render_overview`; ``mask``: the
    overview has the cell-outline layer.

    Returns
    -------
    dict : ``{"groups", "levels", "mask", "waypoints", "drafted"}`` as :func:`render_overview`'s, and
    ``"tile_paths"``: every tile file of the overview, relative to ``out_dir``.
    """
    viewer = find_viewer(viewer_dir)
    plan = _plan(image, markers, slide_id=slide_id, cell_count=panel.cell_count, channels_per_group=channels_per_group,
                 story=story, cells=cells, channel_layers=channel_layers)
    summary = _write_site(image, Path(out_dir), plan, slide_id=slide_id, markers=markers, mask=mask, panel=panel,
                          tile_size=tile_size, viewer=viewer, files=story_files)
    layers = ([(g.path, "jpg") for g in plan.groups] + [(layer["Path"], "jpg") for layer in plan.layers]
              + ([(MASK_PATH, "png")] if mask else []))
    paths = tile_paths(layers, image.level_shapes, tile_size)
    return {**summary, "tile_paths": [f"{ex.IMAGES_PATH}/{path}" for path in paths]}


def _write_site(image, work: Path, plan: _Plan, *, slide_id: str, markers: Sequence[str], mask: bool,
                panel: PanelInfo, tile_size: int, viewer: Path, files: tuple[str, str | None]) -> dict:
    """exhibit.json, story.json, the page with the viewer, and summary.json, into ``work``."""
    height, width = image.shape[1:]
    pixel_size = image.pixel_size_um
    layer = {"Name": MASK_NAME, "Path": MASK_PATH} if mask else None
    exhibit = ex.make_exhibit(slide_id=slide_id, width=width, height=height, max_level=image.n_levels - 1,
                              tile_size=tile_size, groups=plan.groups, views=plan.views, mask=layer,
                              pixel_size_um=pixel_size, header=plan.header, channel_layers=plan.layers)
    author = ex.make_story(slide_id=slide_id, groups=plan.groups, views=plan.views, width=width, height=height,
                           dtype_max=_dtype_max(image.dtype), pixel_size_um=pixel_size,
                           image_file=files[0], markers_file=f"../{MARKERS}",
                           mask={"Name": MASK_NAME, "Path": files[1]} if mask else None)
    facts = {"width": width, "height": height, "channels": len(markers), "dtype": str(image.dtype),
             "pixelSizeUm": pixel_size, "levels": image.n_levels}
    (work / "exhibit.json").write_text(json.dumps(exhibit, indent=1) + "\n")
    (work / "story.json").write_text(json.dumps(author, indent=1) + "\n")
    copy_viewer(viewer, work)
    write_site(work, _page_data(plan, exhibit, panel, facts, markers, slide_id=slide_id, tile_size=tile_size,
                                viewer=viewer), title=f"{slide_id} · Tissue Atlas overview")
    summary = {"slide_id": slide_id, "run_id": panel.run_id, "markers": list(markers), "cells": panel.cell_count,
               "width": width, "height": height, "pixel_size_um": pixel_size, "waypoints": len(plan.views),
               "thumbnail": f"{ex.IMAGES_PATH}/{plan.groups[0].path}/{facts['levels'] - 1}_0_0.jpg",
               "drafted": plan.drafted}
    (work / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    return {"groups": len(plan.groups), "levels": facts["levels"], "mask": mask, "waypoints": len(plan.views),
            "drafted": plan.drafted}


def _channel_ranges(groups: Sequence[ex.Group], n_channels: int, coarsest: np.ndarray) -> list[tuple[float, float]]:
    """Display range of every channel: as in its group, or (in no group) from the coarsest level."""
    ranges: dict[int, tuple[float, float]] = {c: r for g in groups for c, r in zip(g.channels, g.ranges, strict=True)}
    return [ranges[c] if c in ranges else auto_contrast(sample_pixels(coarsest[c])) for c in range(n_channels)]


def _relative(path: str | os.PathLike, site: Path) -> str:
    """``path`` relative to the overview folder ``site``."""
    return Path(os.path.relpath(Path(path).resolve(), site.resolve())).as_posix()
