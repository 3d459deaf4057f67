"""Stage ``render``: the slide's Minerva-style web overview, ``overview/`` in the results layout; an
array over the overview's tiles by layer (channel group, channel layer, cell outlines) and level band.

The work units are the tile rows of every level of every layer (:func:`atlas.science.overview.tiles.tile_units`,
in a fixed order); item ``i`` of ``n`` renders units ``i, i + n, ...``, reading only its layers'
channels of ``registration/<slide>.ome.zarr`` (and of its ``labels/cell`` for the outlines; no
outline layer without segmentation) chunk by chunk, region by region, and writes their tiles in
place below ``overview/images/``. Each unit is a :class:`atlas.storage.journal.Journal` unit in the
item's work folder, so an item cut short (a Spot reclaim) resumes from its last finished tile row;
a redone row is written again with the same bytes. Every item makes the same layers from the same
inputs: display ranges from the smallest level, groups from ``story.yml`` (checked against the
image) or ``render.channels_per_group``.

The merge writes what needs the whole: exhibit.json, story.json, summary.json, the page and its
viewer (:func:`atlas.science.overview.render.render_site`), from the quantify stage's
``qc/quantify/summary.json`` (cell count), the cell table's centroid and marker columns (the drafted
story), ``qc/<stage>/summary.json`` (QC panel), ``markers.csv`` and ``story.yml``; it removes whatever
else lies below ``overview/`` (an earlier attempt's layout), so the site is the same, byte for byte,
whatever the number of items, as :func:`atlas.science.overview.render_overview` makes it in one go.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import zarr

from atlas import layout
from atlas.errors import InvalidInput, Problem
from atlas.science.overview import PanelInfo
from atlas.science.overview.exhibit import IMAGES_PATH
from atlas.science.overview.render import draft_for_image, header_text, open_mask, plan_layers, render_site, tile_layers
from atlas.science.overview.site import find_viewer
from atlas.science.overview.source import ZarrPyramid
from atlas.science.overview.story import CellTable
from atlas.science.overview.tiles import render_tiles, tile_units
from atlas.science.quantification import marker_columns
from atlas.slide.convention import MARKERS, parse_markers
from atlas.slide.story import STORY, Story, parse_story
from atlas.stages import CompletionRecord, StageContext
from atlas.storage import MissingObject, Store, join
from atlas.storage.journal import Journal

# The folders whose files the panel links to (by data level), and how deep to list them.
DATA_FOLDERS = (layout.REGISTRATION, layout.SEGMENTATION, layout.QUANTIFICATION)
MAX_QC_ITEMS = 40


def find_cell_mask(work: Store, slide_id: str) -> str | None:
    """``segmentation/<engine>-<slide>/cell.ome.tif`` of the first engine (by name) that made one."""
    found = sorted(rel for rel in work.list(layout.SEGMENTATION)
                   if PurePosixPath(rel).name == "cell.ome.tif"
                   and PurePosixPath(rel).parent.name.endswith(f"-{slide_id}"))
    return found[0] if found else None


def cell_table(work: Store, slide_id: str, mask: str | None) -> str | None:
    """The cell feature table (MCQuant CSV) of the mask's engine, else of any engine; None without one."""
    tables = []
    if mask is not None:
        engine = PurePosixPath(mask).parent.name.removesuffix(f"-{slide_id}")
        tables.append(layout.table_path(slide_id, engine, "cell"))
    listed = work.list(layout.QUANTIFICATION)
    tables += sorted(rel for rel in listed if PurePosixPath(rel).name.startswith(f"{slide_id}--")
                     and rel.endswith("_cell.csv"))
    return next((t for t in tables if t in listed), None)


def read_cells(work: Store, table: str, markers: list[str]) -> CellTable | None:
    """Centroids and marker means of a cell table (its Parquet twin when present: only the columns
    needed are read, by range); None when it lacks the columns of these markers."""
    import pandas as pd

    columns = ["X_centroid", "Y_centroid", *marker_columns(markers)]
    parquet = str(PurePosixPath(table).with_suffix(".parquet"))
    try:
        if work.exists(parquet):
            with work.open(parquet) as f:
                frame = pd.read_parquet(f, columns=columns)
        else:
            with work.open(table) as f:
                frame = pd.read_csv(f, usecols=columns, dtype=dict.fromkeys(columns, "float64"))
    except (ValueError, KeyError):
        return None
    return CellTable(frame["X_centroid"].to_numpy(), frame["Y_centroid"].to_numpy(),
                     frame[columns[2:]].to_numpy(dtype="float32"))


def read_story(slide: Store) -> Story | None:
    """The slide's story.yml, parsed (checked against the image when rendering); None without one."""
    try:
        text = slide.read_text(STORY)
    except MissingObject:
        return None
    return parse_story(text, STORY)


def open_image(work: Store, slide_id: str, tile_size: int) -> tuple[zarr.Group, ZarrPyramid]:
    """The registered image's OME-Zarr group and its pyramid, read chunk by chunk."""
    zarr_rel = layout.registration_zarr(slide_id)
    try:
        group = zarr.open_group(work.zarr(zarr_rel, read_only=True), mode="r", zarr_format=2)
        return group, ZarrPyramid(group, tile_size, name=zarr_rel)
    except (FileNotFoundError, KeyError) as exc:
        raise InvalidInput(Problem(zarr_rel, "not found; the render stage needs the registered image",
                                   "run the stitch stage first")) from exc


def draft(work: Store, slide_id: str, markers: list[str], channels_per_group: int, tile_size: int) -> Story:
    """The story the render stage drafts for a results folder without story.yml (``atlas story draft``)."""
    mask = find_cell_mask(work, slide_id)
    table = cell_table(work, slide_id, mask)
    _, image = open_image(work, slide_id, tile_size)
    with image:
        return draft_for_image(image, markers, channels_per_group=channels_per_group,
                               cells=read_cells(work, table, markers) if table else None,
                               header=header_text(slide_id, markers, count_cells(work, slide_id, mask)))


def count_cells(work: Store, slide_id: str, mask: str | None) -> int | None:
    """Cells of the cell feature table, from the quantify stage's QC summary, or None without one."""
    try:
        tables = json.loads(work.read_text(f"{layout.QC}/quantify/{layout.QC_SUMMARY}")).get("tables", {})
    except (MissingObject, ValueError):
        return None
    names = []
    if mask is not None:
        engine = PurePosixPath(mask).parent.name.removesuffix(f"-{slide_id}")
        names.append(PurePosixPath(layout.table_path(slide_id, engine, "cell")).name)
    names += sorted(n for n in tables if n.startswith(f"{slide_id}--") and n.endswith("_cell.csv"))
    return next((int(tables[n]["cells"]) for n in names if n in tables), None)


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


def qc_panel(work: Store) -> dict:
    """``{stage: {"summary": condensed summary.json, "files": [its qc files]}}`` for every qc/<stage>/."""
    panel = {}
    listed = work.list(layout.QC)
    for summary in sorted(rel for rel in listed if rel.count("/") == 2 and rel.endswith("/" + layout.QC_SUMMARY)):
        folder = summary.rsplit("/", 1)[0]
        try:
            doc = json.loads(work.read_text(summary))
        except ValueError:
            doc = {layout.QC_SUMMARY: "unreadable"}
        files = sorted(rel for rel in listed if rel.rsplit("/", 1)[0] == folder)
        panel[folder.split("/")[1]] = {"summary": condense(doc), "files": files}
    return panel


def data_files(work: Store, records: Mapping[str, CompletionRecord], results_uri: str | None,
               beside: Sequence[str] = ()) -> list[dict]:
    """Result files by data level for the panel; an ``.ome.zarr`` folder counts as one entry.

    Sizes come from the run's completion records ``records`` (they list every output, read or
    not), else, for a results folder made otherwise, from the store's listing. ``beside``: files of
    the run that a stage running beside this one writes (the OME-TIFF, by the export), listed with
    size None unless known (the release's manifest.json gives their size and sha256). ``uri`` is
    the file's published location below ``results_uri``, or None (not published).
    """
    sizes = {out["path"]: out["size"] for _, record in sorted(records.items()) for out in record.doc["outputs"]}
    sizes = sizes or {rel: size for folder in DATA_FOLDERS for rel, size in work.list(folder).items()}
    entries: dict[str, int | None] = dict.fromkeys(beside)
    for rel, size in sizes.items():
        parts = rel.split("/")
        if parts[0] in DATA_FOLDERS:  # an .ome.zarr folder counts as one entry
            zarr = next((i for i, part in enumerate(parts) if part.endswith(".zarr")), len(parts) - 1)
            top = "/".join(parts[:zarr + 1])
            entries[top] = (entries.get(top) or 0) + size
    return [{"level": layout.level_of(rel), "path": rel, "size": size,
             "uri": f"{results_uri.rstrip('/')}/{rel}" if results_uri else None}
            for rel, size in sorted(entries.items(), key=lambda e: (DATA_FOLDERS.index(e[0].split("/")[0]), e[0]))]


@dataclass(frozen=True)
class Sources:
    """What every render job reads first: the story, the image, its markers, the cell mask.

    Attributes
    ----------
    story : Story or None
        The slide's story.yml, parsed; None without one.
    image : ZarrPyramid
    names : list of str
        Marker names in image channel order.
    mask : str or None
        The cell mask's OME-TIFF in the results (:func:`find_cell_mask`), named in story.json.
    labels : ZarrPyramid or None
        The image's ``labels/cell`` pyramid (the outline layer); None without segmentation.
    """

    story: Story | None
    image: ZarrPyramid
    names: list[str]
    mask: str | None
    labels: ZarrPyramid | None


@contextmanager
def sources(ctx: StageContext) -> Iterator[Sources]:
    """The :class:`Sources` of the run, the image and labels open for chunk-wise reads."""
    tile_size = ctx.params.render.tile_size
    story = read_story(ctx.slide)  # before the long part: a malformed story.yml fails at once
    group, image = open_image(ctx.work, ctx.slide_id, tile_size)
    names = [m.marker_name for m in parse_markers(ctx.slide.read_text(MARKERS))]
    # A cycle left out by stitch.skip_failed_cycles is missing from the image, which names its channels.
    if image.channel_names and len(image.channel_names) != len(names):
        names = image.channel_names
    mask = find_cell_mask(ctx.work, ctx.slide_id)
    labels = None
    if mask is not None and "labels" in group and "cell" in group["labels"]:
        labels = open_mask(ZarrPyramid(group["labels"]["cell"], tile_size, labels=True,
                                       name=f"{layout.registration_zarr(ctx.slide_id)}/labels/cell"), tile_size, image)
    with image:
        try:
            yield Sources(story, image, names, mask, labels)
        finally:
            if labels is not None:
                labels.close()


def run_item(ctx: StageContext, index: int, count: int) -> None:
    """Render the tiles of units ``index, index + count, ...`` of the overview, row by row, in place."""
    params = ctx.params.render
    find_viewer(ctx.viewer_dir)  # the merge needs it: fail before the long part
    with sources(ctx) as src:
        layers = plan_layers(src.image, src.names, channels_per_group=params.channels_per_group, story=src.story,
                             channel_layers=params.channel_layers)
        tiles = tile_layers(src.image, src.labels, layers.groups, layers.channels, layers.ranges)
        units = tile_units(len(tiles), src.image.level_shapes, params.tile_size)
        journal = Journal(ctx.work, f"{ctx.job.stage.item_dir}/{index}")

        def write(rel: str, data: bytes) -> None:
            ctx.work.write_bytes(join(layout.OVERVIEW, IMAGES_PATH, rel), data)

        for unit in units[index::count]:
            journal.run(unit.name, partial(render_tiles, tiles, [unit], src.image.level_shapes, params.tile_size,
                                           write, workers=ctx.vcpus))


def merge(ctx: StageContext) -> None:
    """The overview's exhibit, story, page and panel around the items' tiles; anything else below
    ``overview/`` is removed."""
    params = ctx.params.render
    with sources(ctx) as src:
        table = cell_table(ctx.work, ctx.slide_id, src.mask)
        panel = PanelInfo(run_id=ctx.run_id, cell_count=count_cells(ctx.work, ctx.slide_id, src.mask),
                          qc=qc_panel(ctx.work), data=data_files(ctx.work, ctx.records, ctx.results_uri,
                                                                 beside=(layout.registration_tiff(ctx.slide_id),)))
        cells = read_cells(ctx.work, table, src.names) if table is not None and src.story is None else None
        # story.json (Minerva Author) names the files as they lie next to overview/ in the results
        files = (f"../{layout.registration_tiff(ctx.slide_id)}", f"../{src.mask}" if src.mask else None)
        site = Path(tempfile.mkdtemp(prefix="site-", dir=ctx.scratch))
        try:
            rendered = render_site(src.image, site, slide_id=ctx.slide_id, markers=src.names,
                                   mask=src.labels is not None, panel=panel, tile_size=params.tile_size,
                                   channels_per_group=params.channels_per_group, story=src.story, cells=cells,
                                   channel_layers=params.channel_layers, viewer_dir=ctx.viewer_dir, story_files=files)
            store_site(ctx.work, site, rendered["tile_paths"])
        finally:
            shutil.rmtree(site, ignore_errors=True)


def store_site(work: Store, site: Path, tiles: list[str]) -> None:
    """Store the files of the local folder ``site`` below ``overview/``, and remove what lies there
    that is neither one of them nor one of the overview's ``tiles`` (paths relative to ``overview/``;
    the items wrote them)."""
    written = set()
    for path in sorted(p for p in site.rglob("*") if p.is_file()):
        rel = join(layout.OVERVIEW, path.relative_to(site).as_posix())
        work.write_bytes(rel, path.read_bytes())
        written.add(rel)
    keep = written | {join(layout.OVERVIEW, tile) for tile in tiles}
    for stale in sorted(set(work.list(layout.OVERVIEW)) - keep):
        work.delete(stale)
