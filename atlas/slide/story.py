"""Authored stories: the optional ``story.yml`` of a slide (see docs/overview.md).

A story is what the overview shows as a guided tour (Minerva's "Data Exploration"): channel
groups as the author wants them, and waypoints, each a view of the image (centre in µm from the
image's top-left corner, zoom 1 = the whole image fits) with a markdown description, arrows, box
overlays and the mask layers to show::

    groups:                      # optional; default: the automatic groups (Group 1, Group 2, ...)
      - {name: Immune, channels: [DNA_1, CD45, CD3], colors: [ffffff, ff0000, 00ff00]}
    waypoints:
      - name: Immune border
        description: "**CD45** cells gather at the border."
        group: Immune
        center_um: [300, 250]
        zoom: 4
        arrows: [{at_um: [310, 260], text: "immune cells"}]
        overlays: [{box_um: [250, 200, 120, 90]}]     # x, y, width, height in µm
        masks: [Cell outlines]

Everything here is pure: :func:`parse_story` checks the form (YAML, keys, types),
:func:`check_story` checks a parsed story against the slide (markers, groups, image size), and
both report every problem at once, each naming story.yml, the waypoint or group and the fix.
The same checks run in ``atlas validate``, in the catalog and before rendering.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from atlas.errors import InvalidInput, Problem
from atlas.slide.palette import is_nuclear_stain

STORY = "story.yml"
OUTLINES = "Cell outlines"          # the overview's outline layer (made from the cell mask)
MASK_NAMES = (OUTLINES,)
GROUP_NAME = "Group {}"             # automatic groups, numbered from 1 (auto-minerva's names)
COLOR = re.compile(r"#?([0-9a-fA-F]{6})")
# A view narrower than this many image pixels shows nothing more (the page stops zooming at 4
# screen pixels per image pixel): the zoom limit of a waypoint.
MIN_VIEW_PX = 100
SEE_DOCS = "see docs/overview.md (story.yml)"


@dataclass(frozen=True)
class StoryGroup:
    """A channel group of the story: its name, marker names and, optionally, their colours."""

    name: str
    channels: tuple[str, ...]
    colors: tuple[str, ...] | None = None   # 6 hex digits each; None: the slide's palette


@dataclass(frozen=True)
class Arrow:
    """An arrow pointing at ``at_um`` (x, y in µm), labelled with ``text`` (plain text)."""

    at_um: tuple[float, float]
    text: str = ""


@dataclass(frozen=True)
class Overlay:
    """A box drawn over the image: ``box_um`` = (x, y, width, height) in µm."""

    box_um: tuple[float, float, float, float]


@dataclass(frozen=True)
class Waypoint:
    """One stop of the story.

    Attributes
    ----------
    name : str
    description : str
        Markdown (rendered and sanitized by the page).
    group : str or None
        Name of the channel group shown; None: the first group.
    center_um : (x, y) or None
        View centre in µm from the image's top-left corner; None: the image centre.
    zoom : float
        1 = the whole image fits the view; 4 = a quarter of it across.
    arrows, overlays : tuple
    masks : tuple of str
        Mask layers shown (``"Cell outlines"``).
    """

    name: str
    description: str = ""
    group: str | None = None
    center_um: tuple[float, float] | None = None
    zoom: float = 1.0
    arrows: tuple[Arrow, ...] = ()
    overlays: tuple[Overlay, ...] = ()
    masks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Story:
    """A parsed story.yml: authored groups (empty: the automatic ones) and waypoints."""

    groups: tuple[StoryGroup, ...] = ()
    waypoints: tuple[Waypoint, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """The story.yml document of this story (what :func:`parse_story` reads back)."""
        doc: dict[str, Any] = {}
        if self.groups:
            doc["groups"] = [{"name": g.name, "channels": list(g.channels)}
                             | ({"colors": list(g.colors)} if g.colors else {}) for g in self.groups]
        doc["waypoints"] = []
        for w in self.waypoints:
            item: dict[str, Any] = {"name": w.name, "description": w.description}
            if w.group is not None:
                item["group"] = w.group
            if w.center_um is not None:
                item["center_um"] = list(w.center_um)
            item["zoom"] = w.zoom
            if w.arrows:
                item["arrows"] = [{"at_um": list(a.at_um), "text": a.text} for a in w.arrows]
            if w.overlays:
                item["overlays"] = [{"box_um": list(o.box_um)} for o in w.overlays]
            if w.masks:
                item["masks"] = list(w.masks)
            doc["waypoints"].append(item)
        return doc


# ---- automatic groups (the default when story.yml has none) ----------------------------------

def automatic_groups(labels: Sequence[str], per_group: int) -> list[tuple[str, list[int]]]:
    """``[(name, channel indices)]``: consecutive groups of at most ``per_group`` channels, a new
    one starting at each DNA stain.

    auto-minerva cuts fixed groups of four; like Minerva Author's newer grouping, a DNA stain
    (by name: DNA, Hoechst, DAPI) also starts a group, so with markers.csv in cycle order each
    cycle becomes a group with its DNA stain first, as context for its markers.
    """
    if per_group < 1:
        raise ValueError(f"channels per group must be >= 1, got {per_group}")
    chunks: list[list[int]] = []
    for c, label in enumerate(labels):
        if not chunks or len(chunks[-1]) >= per_group or (is_nuclear_stain(label) and chunks[-1]):
            chunks.append([])
        chunks[-1].append(c)
    return [(GROUP_NAME.format(number), channels) for number, channels in enumerate(chunks, start=1)]


# ---- parsing: the form of the file ------------------------------------------------------------

class _Reader:
    """Collects problems while reading one story document."""

    def __init__(self, file: str):
        self.file = file
        self.problems: list[Problem] = []

    def problem(self, where: str, message: str, fix: str) -> None:
        self.problems.append(Problem(self.file, f"{where}: {message}", fix))

    def mapping(self, value: Any, where: str, allowed: Sequence[str], required: Sequence[str] = ()) -> dict | None:
        if not isinstance(value, dict):
            self.problem(where, f"must be a mapping of {', '.join(allowed)}, got {_show(value)}",
                         f"write it as key: value lines ({SEE_DOCS})")
            return None
        for key in value:
            if key not in allowed:
                self.problem(where, f"unknown key {key!r}", f"use only {', '.join(allowed)}")
        for key in required:
            if key not in value:
                self.problem(where, f"missing {key!r}", f"give it a {key}")
        return value

    def text(self, value: Any, where: str, *, required: bool = False) -> str | None:
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or (required and str(value) == ""):
            self.problem(where, f"must be text, got {_show(value)}", "quote it, e.g. \"...\"")
            return None
        return str(value)

    def number(self, value: Any, where: str) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.problem(where, f"must be a number, got {_show(value)}", "give a number, e.g. 250")
            return None
        return float(value)

    def numbers(self, value: Any, where: str, n: int, form: str) -> tuple[float, ...] | None:
        if not isinstance(value, list) or len(value) != n:
            self.problem(where, f"must be {n} numbers {form}, got {_show(value)}", f"write it as {form}")
            return None
        got = [self.number(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return None if any(v is None for v in got) else tuple(got)

    def items(self, value: Any, where: str, form: str) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            self.problem(where, f"must be a list, got {_show(value)}", f"write it as [{form}, ...]")
            return []
        return value

    def names(self, value: Any, where: str) -> tuple[str, ...] | None:
        if not isinstance(value, list) or not value:
            self.problem(where, f"must be a list of names, got {_show(value)}", "write it as [name, name, ...]")
            return None
        got = [self.text(v, f"{where}[{i}]", required=True) for i, v in enumerate(value)]
        return None if any(v is None for v in got) else tuple(got)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def waypoint_label(index: int, name: str | None) -> str:
    """How problems name a waypoint: ``waypoint 2 "Immune border"`` (numbered from 1)."""
    return f"waypoint {index + 1}" + (f" {name!r}" if name else "")


def _read_group(r: _Reader, value: Any, index: int) -> StoryGroup | None:
    where = f"group {index + 1}"
    doc = r.mapping(value, where, ("name", "channels", "colors"), ("name", "channels"))
    if doc is None:
        return None
    name = r.text(doc["name"], f"{where}: name", required=True) if "name" in doc else None
    where = f"group {index + 1}" + (f" {name!r}" if name else "")
    channels = r.names(doc.get("channels"), f"{where}: channels") if "channels" in doc else None
    colors = None
    if doc.get("colors") is not None:
        raw = r.names(doc["colors"], f"{where}: colors")
        if raw is not None:
            matched = [COLOR.fullmatch(str(c)) for c in raw]
            bad = [c for c, m in zip(raw, matched, strict=True) if m is None]
            if bad:
                r.problem(where, f"colors {bad} are not 6-digit hex colours",
                          "write colours as 6 hex digits, e.g. ff0000")
            elif channels is not None and len(raw) != len(channels):
                r.problem(where, f"has {len(channels)} channels but {len(raw)} colors",
                          "give one colour per channel, in the same order (or leave colors out)")
            else:
                colors = tuple(m[1].lower() for m in matched)
    if name is None or channels is None:
        return None
    return StoryGroup(name, channels, colors)


def _read_waypoint(r: _Reader, value: Any, index: int) -> Waypoint | None:
    keys = ("name", "description", "group", "center_um", "zoom", "arrows", "overlays", "masks")
    doc = r.mapping(value, waypoint_label(index, None), keys, ("name",))
    if doc is None:
        return None
    name = r.text(doc["name"], f"{waypoint_label(index, None)}: name", required=True) if "name" in doc else None
    where = waypoint_label(index, name)
    before = len(r.problems)
    description = r.text(doc.get("description"), f"{where}: description") or ""
    group = r.text(doc.get("group"), f"{where}: group")
    center = r.numbers(doc["center_um"], f"{where}: center_um", 2, "[x, y] in µm") if "center_um" in doc else None
    zoom = 1.0
    if "zoom" in doc:
        zoom = r.number(doc["zoom"], f"{where}: zoom")
        if zoom is not None and zoom <= 0:
            r.problem(where, f"zoom {zoom:g} must be above 0", "use 1 for the whole image, 4 for a quarter across")
    arrows = []
    for i, item in enumerate(r.items(doc.get("arrows"), f"{where}: arrows", "{at_um: [x, y], text: ...}")):
        a = r.mapping(item, f"{where}: arrow {i + 1}", ("at_um", "text"), ("at_um",))
        if a is not None and "at_um" in a:
            at = r.numbers(a["at_um"], f"{where}: arrow {i + 1}: at_um", 2, "[x, y] in µm")
            text = r.text(a.get("text"), f"{where}: arrow {i + 1}: text") or ""
            if at is not None:
                arrows.append(Arrow(at, text))
    overlays = []
    for i, item in enumerate(r.items(doc.get("overlays"), f"{where}: overlays", "{box_um: [x, y, width, height]}")):
        o = r.mapping(item, f"{where}: overlay {i + 1}", ("box_um",), ("box_um",))
        if o is not None and "box_um" in o:
            box = r.numbers(o["box_um"], f"{where}: overlay {i + 1}: box_um", 4, "[x, y, width, height] in µm")
            if box is not None and (box[2] <= 0 or box[3] <= 0):
                r.problem(where, f"overlay {i + 1} has width {box[2]:g} and height {box[3]:g}",
                          "give a box with positive width and height")
            elif box is not None:
                overlays.append(Overlay(box))
    masks = r.names(doc["masks"], f"{where}: masks") if doc.get("masks") not in (None, []) else ()
    if name is None or len(r.problems) > before:
        return None
    return Waypoint(name, description, group, center, zoom, tuple(arrows), tuple(overlays), tuple(masks or ()))


def parse_story(text: str, file: str = STORY) -> Story:
    """Parse story.yml text.

    Raises
    ------
    InvalidInput
        With every problem of form found (YAML syntax, unknown keys, wrong types), each naming
        ``file``, the group or waypoint, and the fix.
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInput(Problem(file, f"not valid YAML ({' '.join(str(exc).split())})",
                                   f"fix the YAML syntax at the line it names ({SEE_DOCS})")) from exc
    r = _Reader(file)
    doc = r.mapping(doc if doc is not None else {}, "the file", ("groups", "waypoints"), ("waypoints",))
    if doc is None or r.problems:
        raise InvalidInput(r.problems)
    raw_groups = doc.get("groups") or []
    if not isinstance(raw_groups, list):
        r.problem("groups", f"must be a list of groups, got {_show(raw_groups)}",
                  "write each group as `- {name: ..., channels: [...]}`")
        raw_groups = []
    raw_waypoints = doc.get("waypoints")
    if not isinstance(raw_waypoints, list) or not raw_waypoints:
        r.problem("waypoints", f"must be a list of at least one waypoint, got {_show(raw_waypoints)}",
                  "write each waypoint as `- name: ...` under waypoints:")
        raw_waypoints = []
    groups = [_read_group(r, g, i) for i, g in enumerate(raw_groups)]
    waypoints = [_read_waypoint(r, w, i) for i, w in enumerate(raw_waypoints)]
    if r.problems:
        raise InvalidInput(r.problems)
    return Story(tuple(groups), tuple(waypoints))


# ---- checking against the slide ---------------------------------------------------------------

def group_names(story: Story, markers: Sequence[str], per_group: int) -> list[str]:
    """Names of the slide's channel groups: the story's own, else the automatic ones."""
    if story.groups:
        return [g.name for g in story.groups]
    return [name for name, _ in automatic_groups(markers, per_group)]


def max_zoom(image_px: tuple[int, int]) -> float:
    """The largest useful zoom for an image of (width, height) px: the view still spans
    :data:`MIN_VIEW_PX` image pixels (and zoom 4 is always allowed)."""
    return max(4.0, max(image_px) / MIN_VIEW_PX)


def check_story(story: Story, *, markers: Sequence[str], per_group: int, extent_um: tuple[float, float] | None,
                image_px: tuple[int, int] | None = None, file: str = STORY) -> list[Problem]:
    """Problems of a parsed story against the slide it is for (pure).

    Parameters
    ----------
    story : Story
    markers : sequence of str
        Marker names of the image's channels (markers.csv order).
    per_group : int
        ``render.channels_per_group``: how the automatic groups are cut.
    extent_um : (width, height) or None
        The image's size in µm (None: not known, views are not checked against it).
    image_px : (width, height) or None
        The image's size in pixels, for the zoom limit (None: not checked).
    file : str
        Name of the story file in the messages.
    """
    problems: list[Problem] = []

    def problem(where: str, message: str, fix: str) -> None:
        problems.append(Problem(file, f"{where}: {message}", fix))

    known = set(markers)
    seen: set[str] = set()
    for i, g in enumerate(story.groups):
        where = f"group {i + 1} {g.name!r}"
        if g.name in seen:
            problem(where, "has the same name as an earlier group", "give every group its own name")
        seen.add(g.name)
        unknown = [c for c in g.channels if c not in known]
        if unknown:
            problem(where, f"channel(s) {', '.join(map(repr, unknown))} are not markers of this slide",
                    f"use marker names from markers.csv: {', '.join(markers)}")
        repeated = sorted({c for c in g.channels if g.channels.count(c) > 1})
        if repeated:
            problem(where, f"lists {', '.join(map(repr, repeated))} more than once", "list each channel once")
    names = group_names(story, markers, per_group)
    for i, w in enumerate(story.waypoints):
        where = waypoint_label(i, w.name)
        if w.group is not None and w.group not in names:
            problem(where, f"group {w.group!r} is not a channel group of this slide",
                    f"use one of: {', '.join(names)}" + ("" if story.groups else " (or define groups: in story.yml)"))
        unknown_masks = [m for m in w.masks if m not in MASK_NAMES]
        if unknown_masks:
            problem(where, f"mask(s) {', '.join(map(repr, unknown_masks))} are not layers of the overview",
                    f"use {', '.join(map(repr, MASK_NAMES))} or leave masks out")
        if image_px is not None and w.zoom > max_zoom(image_px):
            problem(where, f"zoom {w.zoom:g} is beyond full resolution for this {image_px[0]} x {image_px[1]} px image",
                    f"use a zoom of at most {max_zoom(image_px):.1f}")
        if extent_um is None:
            continue
        width, height = extent_um
        inside = f"inside the image: x 0 to {width:.0f} µm, y 0 to {height:.0f} µm from its top-left corner"
        points = [("center_um", w.center_um)] + [(f"arrow {k + 1}: at_um", a.at_um) for k, a in enumerate(w.arrows)]
        for what, point in points:
            if point is not None and not (0 <= point[0] <= width and 0 <= point[1] <= height):
                problem(where, f"{what} [{point[0]:g}, {point[1]:g}] is outside the image", f"give a point {inside}")
        for k, o in enumerate(w.overlays):
            x, y, bw, bh = o.box_um
            if x < 0 or y < 0 or x + bw > width or y + bh > height:
                problem(where, f"overlay {k + 1} box_um [{x:g}, {y:g}, {bw:g}, {bh:g}] reaches outside the image",
                        f"give a box {inside}")
    return problems


def validate_story_text(text: str, *, markers: Sequence[str], per_group: int,
                        extent_um: tuple[float, float] | None, image_px: tuple[int, int] | None = None,
                        file: str = STORY) -> Story:
    """:func:`parse_story` then :func:`check_story`; raises InvalidInput with every problem."""
    story = parse_story(text, file)
    problems = check_story(story, markers=markers, per_group=per_group, extent_um=extent_um, image_px=image_px,
                           file=file)
    if problems:
        raise InvalidInput(problems)
    return story


# ---- writing ----------------------------------------------------------------------------------

class _Flow(list):
    """A list written inline (``[300, 250]``)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Flow, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
# multi-line text (descriptions) as literal blocks, as an author would write them
_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v,
                                                             style="|" if "\n" in v else None))


def _inline_short_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _inline_short_lists(v) for k, v in value.items()}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        items = [_inline_short_lists(v) for v in value]
        return _Flow(items) if all(isinstance(v, (int, float, str)) for v in items) else items
    return value


def dump_story(story: Story, header: str = "") -> str:
    """story.yml text of ``story`` (lists of numbers and names inline), after ``header`` comment lines."""
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    body = yaml.dump(_inline_short_lists(story.to_dict()), Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                     width=100, default_flow_style=False)
    return comments + body
