"""Minerva Story's ``exhibit.json`` and Minerva Author's ``story.json`` for a rendered overview.

Groups are pre-composited (each group's tiles already carry its channels' colours), which
Minerva Story shows as they are when ``Channels`` is empty and each group has a ``Path``: the
format of exhibits before Minerva moved compositing into the browser, still read by it.
``story.json`` holds the same groups with colours and ranges normalised to [0, 1] (Minerva
Author's save file), so an analyst can reopen the slide in Minerva Author and re-render it.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# The slide's one palette (also the OME-TIFF's and OME-Zarr's channel colours).
from atlas.slide.palette import channel_colors, is_nuclear_stain

OUTLINE_COLOR = "ffff00"
IMAGE_NAME = "i0"
IMAGES_PATH = "images"  # tiles live in <overview>/images/<layer path>/
_MAX_LABEL_DIR = 40


@dataclass(frozen=True)
class Group:
    """A channel group of the overview.

    Attributes
    ----------
    name : str
        Shown in the group switcher and used by waypoints.
    path : str
        Folder of its tiles below ``images/``, in Minerva's ``<group>_<id>__<label>--...`` form.
    channels : tuple of int
        0-based channel indices in the image.
    labels : tuple of str
        Marker names of those channels.
    colors : tuple of str
        6-hex-digit colour of each channel.
    ranges : tuple of (float, float)
        Display range of each channel in image units.
    """

    name: str
    path: str
    channels: tuple[int, ...]
    labels: tuple[str, ...]
    colors: tuple[str, ...]
    ranges: tuple[tuple[float, float], ...]


def label_dir(label: str) -> str:
    """A file-name-safe form of a label, as Minerva Author makes it (``"DNA 1"`` -> ``"DNA-1"``)."""
    kept = re.sub(r"[^0-9a-zA-Z _-]", "", label).replace(" ", "-").replace("_", "-")
    return re.sub(r"-+", "-", kept)[:_MAX_LABEL_DIR] or "channel"


def make_groups(labels: Sequence[str], ranges: Sequence[tuple[float, float]], per_group: int) -> list[Group]:
    """Consecutive groups of at most ``per_group`` channels, a new one starting at each DNA stain.

    auto-minerva cuts fixed groups of four; like Minerva Author's newer grouping, a DNA stain
    (by name: DNA, Hoechst, DAPI) also starts a group, so with markers.csv in cycle order each
    cycle becomes a group with its DNA stain first, shown white, as context for its markers.
    Colours are the slide's palette (:func:`atlas.slide.palette.channel_colors`).
    """
    if per_group < 1:
        raise ValueError(f"channels per group must be >= 1, got {per_group}")
    chunks: list[list[int]] = []
    for c, label in enumerate(labels):
        if not chunks or len(chunks[-1]) >= per_group or (is_nuclear_stain(label) and chunks[-1]):
            chunks.append([])
        chunks[-1].append(c)
    colors = channel_colors(labels)
    groups = []
    for number, channels in enumerate(chunks, start=1):
        name = f"Group {number}"
        path = label_dir(name) + "_" + "--".join(f"{c}__{label_dir(labels[c])}" for c in channels)
        groups.append(Group(name, path, tuple(channels), tuple(labels[c] for c in channels),
                            tuple(colors[c] for c in channels),
                            tuple(ranges[c] for c in channels)))
    return groups


def make_exhibit(*, slide_id: str, width: int, height: int, max_level: int, groups: Sequence[Group],
                 mask: dict | None, pixel_size_um: float | None, header: str) -> dict:
    """Minerva Story configuration (``exhibit.json``) of a rendered overview.

    Parameters
    ----------
    slide_id : str
    width, height : int
        Full-resolution image size in pixels.
    max_level : int
        Index of the coarsest tile level (level 0 is full resolution).
    groups : sequence of Group
    mask : dict or None
        ``{"Name", "Path"}`` of the outline layer, or None without segmentation.
    pixel_size_um : float or None
    header : str
        Markdown shown as the story's introduction.

    Returns
    -------
    dict with Minerva's required keys ``Images, Header, Rotation, Layout, Stories, Channels,
    Masks, Groups`` (and ``PixelsPerMicron``, ``DefaultGroup``, ``FirstGroup`` where known).
    """
    masks = [] if mask is None else [{"Name": mask["Name"], "Path": mask["Path"], "Format": "png",
                                      "Colors": [OUTLINE_COLOR], "Channels": [mask["Name"]]}]
    # Viewport coordinates: the image is 1 wide and height/width tall; show it whole, centred.
    waypoint = {"Name": slide_id, "Description": header, "Group": groups[0].name,
                "Zoom": round(min(1.0, width / height), 6), "Pan": [0.5, round(0.5 * height / width, 6)],
                "Arrows": [], "Overlays": [], "Masks": [m["Name"] for m in masks], "ActiveMasks": []}
    exhibit = {
        "Images": [{"Name": IMAGE_NAME, "Description": slide_id, "Path": IMAGES_PATH,
                    "Width": width, "Height": height, "MaxLevel": max_level}],
        "Header": header,
        "Rotation": 0,
        "Layout": {"Grid": [[IMAGE_NAME]]},
        "Stories": [{"Name": slide_id, "Description": "", "Waypoints": [waypoint]}],
        "Channels": [],
        "Masks": masks,
        "Groups": [{"Name": g.name, "Path": g.path, "Format": "jpg", "Colors": list(g.colors),
                    "Channels": list(g.labels), "Descriptions": [""] * len(g.labels)} for g in groups],
        "DefaultGroup": groups[0].name,
        "FirstGroup": groups[0].name,
    }
    if pixel_size_um:
        exhibit["PixelsPerMicron"] = round(1.0 / pixel_size_um, 6)
    return exhibit


def make_story(*, slide_id: str, groups: Sequence[Group], dtype_max: float, pixel_size_um: float | None) -> dict:
    """Minerva Author's save file (``story.json``): groups with colours and normalised ranges.

    ``dtype_max`` is the value that normalises ranges to [0, 1] (65535 for uint16; 1 for float).
    """
    return {
        "sample_info": {"name": slide_id, "rotation": 0, "text": "",
                        "pixels_per_micron": round(1.0 / pixel_size_um, 6) if pixel_size_um else None},
        "groups": [{"label": g.name, "channels": [
            {"color": color, "id": c, "label": label,
             "min": round(low / dtype_max, 6), "max": round(high / dtype_max, 6)}
            for c, label, color, (low, high) in zip(g.channels, g.labels, g.colors, g.ranges, strict=True)]}
            for g in groups],
        "waypoints": [],
    }
