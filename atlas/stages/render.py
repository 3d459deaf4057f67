"""Stage ``render``: the slide's Minerva-style web overview, ``overview/`` in the results layout.

Reads ``registration/<slide>.ome.tif`` (pyramid levels), the cell mask
``segmentation/<engine>-<slide>/cell.ome.tif`` for the outline layer (left out when there is no
segmentation), the cell table for the cell count and the drafted story, ``qc/<stage>/summary.json``
for the QC panel, ``markers.csv`` and the slide's ``story.yml`` when it has one; the rendering
itself is :func:`atlas.science.overview.render_overview`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from atlas import layout
from atlas.errors import InvalidInput, Problem
from atlas.science.overview import PanelInfo, render_overview
from atlas.science.overview.render import draft_for_image, header_text
from atlas.science.overview.source import TiffPyramid
from atlas.science.overview.story import CellTable
from atlas.science.quantification import marker_columns
from atlas.slide.convention import MARKERS, read_markers
from atlas.slide.story import STORY, Story, parse_story
from atlas.stages import CompletionRecord, StageContext

# The folders whose files the panel links to (by data level), and how deep to list them.
DATA_FOLDERS = (layout.REGISTRATION, layout.SEGMENTATION, layout.QUANTIFICATION)
MAX_QC_ITEMS = 40


def find_cell_mask(out_dir: Path, slide_id: str) -> Path | None:
    """``segmentation/<engine>-<slide>/cell.ome.tif`` of the first engine (by name) that made one."""
    found = sorted((out_dir / layout.SEGMENTATION).glob(f"*-{slide_id}/cell.ome.tif"))
    return found[0] if found else None


def cell_table(out_dir: Path, slide_id: str, mask: Path | None) -> Path | None:
    """The cell feature table (MCQuant CSV) of the mask's engine, else of any engine; None without one."""
    tables = []
    if mask is not None:
        engine = mask.parent.name.removesuffix(f"-{slide_id}")
        tables.append(out_dir / layout.table_path(slide_id, engine, "cell"))
    tables += sorted((out_dir / layout.QUANTIFICATION).glob(f"{slide_id}--*_cell.csv"))
    return next((t for t in tables if t.is_file()), None)


def read_cells(table: Path, markers: list[str]) -> CellTable | None:
    """Centroids and marker means of a cell table (its Parquet twin when present: only the columns
    needed are read); None when it lacks the columns of these markers."""
    import pandas as pd

    columns = ["X_centroid", "Y_centroid", *marker_columns(markers)]
    parquet = table.with_suffix(".parquet")
    try:
        if parquet.is_file():
            frame = pd.read_parquet(parquet, columns=columns)
        else:
            frame = pd.read_csv(table, usecols=columns, dtype=dict.fromkeys(columns, "float64"))
    except (ValueError, KeyError):
        return None
    return CellTable(frame["X_centroid"].to_numpy(), frame["Y_centroid"].to_numpy(),
                     frame[columns[2:]].to_numpy(dtype="float32"))


def read_story(slide_dir: Path) -> Story | None:
    """The slide's story.yml, parsed (checked against the image when rendering); None without one."""
    path = Path(slide_dir) / STORY
    return parse_story(path.read_text(encoding="utf-8"), STORY) if path.is_file() else None


def image_markers(image: Path, slide_dir: Path, tile_size: int) -> list[str]:
    """Marker names of the registered image's channels: markers.csv, or the image's own channel
    names when they differ in number (a cycle left out by stitch.skip_failed_cycles)."""
    names = [m.marker_name for m in read_markers(Path(slide_dir) / MARKERS)]
    with TiffPyramid(image, tile_size) as pyramid:
        if pyramid.channel_names and len(pyramid.channel_names) != len(names):
            names = pyramid.channel_names
    return names


def draft(out_dir: Path, slide_id: str, markers: list[str], channels_per_group: int, tile_size: int) -> Story:
    """The story the render stage drafts for a results folder without story.yml (``atlas story draft``)."""
    image = out_dir / layout.registration_tiff(slide_id)
    mask = find_cell_mask(out_dir, slide_id)
    table = cell_table(out_dir, slide_id, mask)
    with TiffPyramid(image, tile_size) as pyramid:
        return draft_for_image(pyramid, markers, channels_per_group=channels_per_group,
                               cells=read_cells(table, markers) if table else None,
                               header=header_text(slide_id, markers, count_cells(table)))


def count_cells(table: Path | None) -> int | None:
    """Rows of the cell feature table (MCQuant CSV, one row per cell), or None without one."""
    if table is None:
        return None
    with open(table, "rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        f.seek(-1, os.SEEK_END)
        unterminated = f.read(1) != b"\n"
    return lines + unterminated - 1  # minus the header


def condense(doc, prefix: str = "", out: dict | None = None, limit: int = MAX_QC_ITEMS) -> dict:
    """Flatten a QC summary to at most ``limit`` ``{"a.b.0.c": scalar}`` items for the panel.

    Lists of scalars become one comma-separated string; deeper structure gets dotted keys
    (list items numbered from 1, as cycles are).
    """
    out = {} if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(doc, dict):
        for key, value in doc.items():
            condense(value, f"{prefix}.{key}" if prefix else str(key), out, limit)
    elif isinstance(doc, list) and all(not isinstance(v, (dict, list)) for v in doc):
        text = ", ".join(str(v) for v in doc)
        out[prefix] = text if len(text) <= 120 else text[:117] + "..."
    elif isinstance(doc, list):
        for i, value in enumerate(doc, start=1):
            condense(value, f"{prefix}.{i}", out, limit)
    else:
        out[prefix] = doc
    return out


def qc_panel(out_dir: Path) -> dict:
    """``{stage: {"summary": condensed summary.json, "files": [its qc files]}}`` for every qc/<stage>/."""
    panel = {}
    for summary in sorted((out_dir / layout.QC).glob(f"*/{layout.QC_SUMMARY}")):
        try:
            doc = json.loads(summary.read_text())
        except ValueError:
            doc = {layout.QC_SUMMARY: "unreadable"}
        files = sorted(p.relative_to(out_dir).as_posix() for p in summary.parent.iterdir() if p.is_file())
        panel[summary.parent.name] = {"summary": condense(doc), "files": files}
    return panel


def data_files(out_dir: Path, records: Mapping[str, CompletionRecord], results_uri: str | None) -> list[dict]:
    """Result files by data level for the panel; an ``.ome.zarr`` folder counts as one entry.

    Sizes come from the run's completion records ``records`` (they list every output; a job need
    not hold the files it does not read), else, for a results folder made otherwise, from the files
    on disk. ``uri`` is the file's published location below ``results_uri``, or None (not published).
    """
    sizes = {out["path"]: out["size"] for _, record in sorted(records.items()) for out in record.doc["outputs"]}
    sizes = sizes or {p.relative_to(out_dir).as_posix(): p.stat().st_size
                      for folder in DATA_FOLDERS for p in (out_dir / folder).rglob("*") if p.is_file()}
    entries: dict[str, int] = {}
    for rel, size in sizes.items():
        parts = rel.split("/")
        if parts[0] in DATA_FOLDERS:  # an .ome.zarr folder counts as one entry
            zarr = next((i for i, part in enumerate(parts) if part.endswith(".zarr")), len(parts) - 1)
            top = "/".join(parts[:zarr + 1])
            entries[top] = entries.get(top, 0) + size
    return [{"level": layout.level_of(rel), "path": rel, "size": size,
             "uri": f"{results_uri.rstrip('/')}/{rel}" if results_uri else None}
            for rel, size in sorted(entries.items(), key=lambda e: (DATA_FOLDERS.index(e[0].split("/")[0]), e[0]))]


def run(ctx: StageContext) -> None:
    """Render ``overview/`` from the registered image and whatever later stages produced."""
    out_dir = Path(ctx.out_dir)
    image = out_dir / layout.registration_tiff(ctx.slide_id)
    if not image.is_file():
        raise InvalidInput(Problem(layout.registration_tiff(ctx.slide_id), "not found; the render stage needs "
                                   "the registered image", "run the stitch stage first"))
    params = ctx.params.render
    story = read_story(ctx.slide_dir)  # before the long part: a malformed story.yml fails at once
    names = image_markers(image, ctx.slide_dir, params.tile_size)
    mask = find_cell_mask(out_dir, ctx.slide_id)
    table = cell_table(out_dir, ctx.slide_id, mask)
    panel = PanelInfo(run_id=ctx.run_id, cell_count=count_cells(table),
                      qc=qc_panel(out_dir), data=data_files(out_dir, ctx.records, ctx.results_uri))
    cells = read_cells(table, names) if table is not None and story is None else None
    render_overview(image, out_dir / layout.OVERVIEW, slide_id=ctx.slide_id, markers=names, mask_path=mask,
                    panel=panel, channels_per_group=params.channels_per_group, tile_size=params.tile_size,
                    story=story, cells=cells, channel_layers=params.channel_layers, viewer_dir=ctx.viewer_dir)
