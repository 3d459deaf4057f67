"""Minerva Story's ``exhibit.json`` and Minerva Author's ``story.json`` for a rendered overview.

Groups are pre-composited (each group's tiles already carry its channels' colours), which
Minerva Story shows as they are when ``Channels`` is empty and each group has a ``Path``: the
format of exhibits before Minerva moved compositing into the browser, still read by it. With
single-channel layers (``render.channel_layers``) ``Channels`` lists one grey layer per channel
(``Rendered: false``), and Minerva colours and composites them in the browser instead.
``story.json`` holds the same groups with colours and ranges normalised to [0, 1] and the
waypoints in Minerva Author's save format, so an analyst can reopen the slide in Minerva Author.

Coordinates: Minerva's viewport has the image 1 high and ``width / height`` wide (minerva-browser
``to_image_shape``; Minerva Author writes ``Pan: [0.5 * width / height, 0.5]`` for the centre), so
pans, arrows and overlays are pixel positions divided by the image height.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

# The slide's one palette (also the OME-TIFF's and OME-Zarr's channel colours).
from atlas.slide.palette import channel_colors
from atlas.slide.story import StoryGroup, automatic_groups, is_nuclear_stain

OUTLINE_COLOR = "ffff00"
IMAGE_NAME = "i0"
IMAGES_PATH = "images"  # tiles live in <overview>/images/<layer path>/
_MAX_LABEL_DIR = 40
# Minerva's viewport is sized by the browser window; a waypoint's "zoom 1 = the whole image fits"
# is converted for a window this wide per unit of height (16:9).
VIEW_ASPECT = 16 / 9
# A link target without a scheme (relative), or with http(s) or mailto.
SAFE_LINK = re.compile(r"^(?:(?:https?|mailto):|[^:]*(?:[/?#]|$))", re.IGNORECASE)

__all__ = ["Group", "View", "is_nuclear_stain", "label_dir", "make_exhibit", "make_groups", "make_story"]


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


@dataclass(frozen=True)
class View:
    """A waypoint resolved against the rendered image (all positions in full-resolution pixels).

    Attributes
    ----------
    name, description : str
        As authored (description is markdown).
    group : int
        Index of the group shown.
    center : (x, y) float
    zoom : float
        1 = the whole image fits.
    arrows : tuple of ((x, y), text)
    overlays : tuple of (x, y, width, height)
    masks : tuple of str
        Mask layers shown.
    """

    name: str
    description: str
    group: int
    center: tuple[float, float]
    zoom: float
    arrows: tuple[tuple[tuple[float, float], str], ...] = ()
    overlays: tuple[tuple[float, float, float, float], ...] = ()
    masks: tuple[str, ...] = ()


def label_dir(label: str) -> str:
    """A file-name-safe form of a label, as Minerva Author makes it (``"DNA 1"`` -> ``"DNA-1"``)."""
    kept = re.sub(r"[^0-9a-zA-Z _-]", "", label).replace(" ", "-").replace("_", "-")
    return re.sub(r"-+", "-", kept)[:_MAX_LABEL_DIR] or "channel"


def channel_layer_path(channel: int, label: str) -> str:
    """Folder of a channel's own grey tiles, as Minerva Author names single-channel layers
    (``DNA-1_0__DNA-1``)."""
    return f"{label_dir(label)}_{channel}__{label_dir(label)}"


def make_groups(labels: Sequence[str], ranges: Sequence[tuple[float, float]], per_group: int,
                authored: Sequence[StoryGroup] = ()) -> list[Group]:
    """The overview's channel groups: the authored ones (story.yml), else the automatic ones.

    Automatic groups are :func:`atlas.slide.story.automatic_groups` (at most ``per_group``
    channels, a new group at each DNA stain). Authored groups name their channels by marker
    (checked beforehand by :func:`atlas.slide.story.check_story`); their colours, where given,
    replace the slide's palette (:func:`atlas.slide.palette.channel_colors`, also the OME-TIFF's
    and OME-Zarr's channel colours).
    """
    if authored:
        index = {label: c for c, label in enumerate(labels)}
        chosen = [(g.name, [index[label] for label in g.channels], g.colors) for g in authored]
    else:
        chosen = [(name, channels, None) for name, channels in automatic_groups(labels, per_group)]
    palette = channel_colors(labels)
    groups = []
    for name, channels, colors in chosen:
        path = label_dir(name) + "_" + "--".join(f"{c}__{label_dir(labels[c])}" for c in channels)
        groups.append(Group(name, path, tuple(channels), tuple(labels[c] for c in channels),
                            tuple(colors) if colors else tuple(palette[c] for c in channels),
                            tuple(ranges[c] for c in channels)))
    paths = [g.path for g in groups]
    if len(set(paths)) != len(paths):  # names that differ only in characters a path drops
        groups = [replace(g, path=f"{g.path}-{i}") if paths.count(g.path) > 1 else g for i, g in enumerate(groups)]
    return groups


def safe_markdown(text: str) -> str:
    """Markdown for viewers that render it unsanitized (Minerva Story: showdown into innerHTML):
    raw HTML is escaped to text and links other than http(s), mailto and relative ones are dropped.

    The overview page itself sanitizes what it renders (DOMPurify); this protects other viewers of
    exhibit.json.
    """
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    def link(match: re.Match) -> str:
        return match[0] if SAFE_LINK.match(match[2].strip()) else match[1]

    def reference(match: re.Match) -> str:
        return match[0] if SAFE_LINK.match(match[2]) else ""

    text = re.sub(r"\[([^\]]*)\]\(([^)]*)\)", link, text)
    return re.sub(r"(?m)^( {0,3}\[[^\]]+\]:)[ \t]*(\S*).*$", reference, text)


def _viewport(views: Sequence[View], groups: Sequence[Group], masks: Sequence[str], width: int,
              height: int) -> list[dict]:
    """Minerva waypoints of resolved views (image 1 high, see the module doc)."""
    def unit(v: float) -> float:
        return round(v / height, 6)

    home = max(width / height, VIEW_ASPECT)
    return [{"Name": v.name, "Description": safe_markdown(v.description), "Group": groups[v.group].name,
             "Zoom": round(v.zoom / home, 6), "Pan": [unit(v.center[0]), unit(v.center[1])],
             "Arrows": [{"Point": [unit(x), unit(y)], "Text": text, "HideArrow": False, "Angle": 60}
                        for (x, y), text in v.arrows],
             "Overlays": [{"x": unit(x), "y": unit(y), "width": unit(w), "height": unit(h)}
                          for x, y, w, h in v.overlays],
             "Masks": list(masks), "ActiveMasks": [m for m in v.masks if m in masks]}
            for v in views]


def make_exhibit(*, slide_id: str, width: int, height: int, max_level: int, tile_size: int,
                 groups: Sequence[Group], views: Sequence[View], mask: dict | None, pixel_size_um: float | None,
                 header: str, channel_layers: Sequence[dict] = ()) -> dict:
    """Minerva Story configuration (``exhibit.json``) of a rendered overview.

    Parameters
    ----------
    slide_id : str
    width, height : int
        Full-resolution image size in pixels.
    max_level : int
        Index of the coarsest tile level (level 0 is full resolution).
    tile_size : int
        Tile edge in pixels (``Images[].TileSize``; Minerva assumes 1024 without it).
    groups : sequence of Group
    views : sequence of View
        The story's waypoints, in order (at least one).
    mask : dict or None
        ``{"Name", "Path"}`` of the outline layer, or None without segmentation.
    pixel_size_um : float or None
    header : str
        Markdown shown as the story's introduction.
    channel_layers : sequence of dict
        ``{"Name": marker, "Path": folder}`` of each single-channel grey layer (empty: none).

    Returns
    -------
    dict with Minerva's required keys ``Images, Header, Rotation, Layout, Stories, Channels,
    Masks, Groups`` (and ``PixelsPerMicron``, ``DefaultGroup``, ``FirstGroup`` where known).
    """
    masks = [] if mask is None else [{"Name": mask["Name"], "Path": mask["Path"], "Format": "png",
                                      "Colors": [OUTLINE_COLOR], "Channels": [mask["Name"]]}]
    exhibit = {
        "Images": [{"Name": IMAGE_NAME, "Description": slide_id, "Path": IMAGES_PATH,
                    "Width": width, "Height": height, "MaxLevel": max_level, "TileSize": [tile_size, tile_size]}],
        "Header": safe_markdown(header),
        "Rotation": 0,
        "Layout": {"Grid": [[IMAGE_NAME]]},
        "Stories": [{"Name": slide_id, "Description": "",
                     "Waypoints": _viewport(views, groups, [m["Name"] for m in masks], width, height)}],
        "Channels": [{"Rendered": False, "Name": layer["Name"], "Path": layer["Path"]} for layer in channel_layers],
        "Masks": masks,
        "Groups": [{"Name": g.name, "Path": g.path, "Format": "jpg", "Colors": list(g.colors),
                    "Channels": list(g.labels), "Descriptions": [""] * len(g.labels)} for g in groups],
        "DefaultGroup": groups[0].name,
        "FirstGroup": groups[0].name,
    }
    if pixel_size_um:
        exhibit["PixelsPerMicron"] = round(1.0 / pixel_size_um, 6)
    return exhibit


def make_story(*, slide_id: str, groups: Sequence[Group], views: Sequence[View], width: int, height: int,
               dtype_max: float, pixel_size_um: float | None, image_file: str, markers_file: str,
               mask: dict | None) -> dict:
    """Minerva Author's save file (``story.json``): groups with colours and normalised ranges, waypoints.

    Parameters
    ----------
    views : sequence of View
        The waypoints, saved as Minerva Author's (``name, text, group, pan, zoom, arrows, overlays,
        masks``; masks by index into ``masks``).
    width, height : int
        Image size in pixels (pans are in Minerva's units, see the module doc).
    dtype_max : float
        The value that normalises ranges to [0, 1] (65535 for uint16; 1 for float).
    image_file, markers_file : str
        ``in_file`` and ``csv_file``, which Minerva Author's import reads (paths relative to the
        overview folder; Author asks for the image when it is not found there, and takes the
        channel names from the image's OME-XML when the CSV is missing).
    mask : dict or None
        ``{"Name", "Path"}`` of the outline layer; ``"Path"`` here is the cell mask's file.
    """
    masks = [] if mask is None else [{"label": mask["Name"], "path": mask["Path"],
                                      "channels": [{"color": OUTLINE_COLOR, "label": mask["Name"], "opacity": 1,
                                                    "ids": []}]}]
    mask_index = {m["label"]: i for i, m in enumerate(masks)}
    home = max(width / height, VIEW_ASPECT)

    def unit(v: float) -> float:
        return round(v / height, 6)

    return {
        "in_file": image_file,
        "csv_file": markers_file,
        "sample_info": {"name": slide_id, "rotation": 0, "text": "",
                        "pixels_per_micron": round(1.0 / pixel_size_um, 6) if pixel_size_um else 0},
        "groups": [{"label": g.name, "channels": [
            {"color": color, "id": c, "label": label,
             "min": round(low / dtype_max, 6), "max": round(high / dtype_max, 6)}
            for c, label, color, (low, high) in zip(g.channels, g.labels, g.colors, g.ranges, strict=True)]}
            for g in groups],
        "masks": masks,
        "waypoints": [{"name": v.name, "text": safe_markdown(v.description), "group": groups[v.group].name,
                       "pan": [unit(v.center[0]), unit(v.center[1])], "zoom": round(v.zoom / home, 6),
                       "arrows": [{"text": text, "hide": False, "position": [unit(x), unit(y)], "angle": 60}
                                  for (x, y), text in v.arrows],
                       "overlays": [[unit(x), unit(y), unit(w), unit(h)] for x, y, w, h in v.overlays],
                       "masks": [mask_index[m] for m in v.masks if m in mask_index]}
                      for v in views],
    }
