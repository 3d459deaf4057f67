"""The slide's channel colours: one palette, used by every view of the slide.

The OME-TIFF's ``Channel@Color``, the OME-Zarr ``omero`` block and the overview's channel groups
all take their colours from :func:`channel_colors`, so a marker has the same colour in QuPath,
napari, a Vizarr/Avivator view of the OME-Zarr and the Minerva-style overview.

The rule follows auto-minerva's colours (white, then red, green, blue, magenta, yellow, cyan):
a nuclear stain (DNA, Hoechst, DAPI) is white, as context for the markers around it; the other
markers take the six saturated colours in turn, in channel order. The overview groups consecutive
channels (a new group at each nuclear stain), so up to six markers of a group never share a colour.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

NUCLEAR_STAIN = re.compile(r"dna|hoechst|dapi", re.IGNORECASE)
NUCLEAR_COLOR = "ffffff"
MARKER_COLORS = ("ff0000", "00ff00", "0000ff", "ff00ff", "ffff00", "00ffff")


def is_nuclear_stain(name: str) -> bool:
    """True for marker names of a DNA stain (DNA_1, Hoechst, DAPI, ...)."""
    return bool(NUCLEAR_STAIN.search(name))


def channel_colors(names: Sequence[str]) -> list[str]:
    """Colour of each channel, 6 lower-case hex digits (``"ff0000"``), from the channels' marker names.

    Parameters
    ----------
    names : sequence of str
        Marker name of every channel of the image, in channel order (markers.csv order).

    Returns
    -------
    list of str, one per channel: white for nuclear stains, :data:`MARKER_COLORS` cycled over the
    other channels.
    """
    colors, k = [], 0
    for name in names:
        if is_nuclear_stain(name):
            colors.append(NUCLEAR_COLOR)
        else:
            colors.append(MARKER_COLORS[k % len(MARKER_COLORS)])
            k += 1
    return colors


def ome_color(color: str) -> int:
    """OME-XML ``Color`` of a 6-hex-digit colour: RGBA packed in a signed 32-bit integer, alpha 255."""
    rgba = int(color, 16) << 8 | 0xFF
    return rgba - (1 << 32) if rgba >= 1 << 31 else rgba
