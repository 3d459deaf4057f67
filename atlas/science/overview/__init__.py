"""Minerva-style overview of a slide: deep-zoom JPEG tiles per channel group, exhibit.json, and a
self-contained page (OpenSeadragon, side panel) that any static HTTP server can serve.

See docs/overview.md for the layout of the output and the choices made (contrast, colours).
"""
from atlas.science.overview.contrast import auto_contrast, sample_pixels
from atlas.science.overview.render import PanelInfo, render_overview

__all__ = ["PanelInfo", "auto_contrast", "render_overview", "sample_pixels"]
