"""Stage ``quantify``: the Level 4 single-cell feature tables, ``quantification/`` in the results layout.

For every segmentation engine that left masks in ``segmentation/<engine>-<slide>/`` and every mask
named by ``quantify.masks`` in params.yml (default ``cell``, ``nuclei``) it writes MCQuant's table
``quantification/<slide>--<engine>_<mask>.csv``, the same table as ``.parquet`` and as AnnData
``.h5ad``, and ``qc/quantify/summary.json``. The registered image is read once, strip by strip, for
all masks of an engine, from the chunks of ``registration/<slide>.ome.zarr``; the masks by the byte
ranges of their tiles. The science is :mod:`atlas.science.quantification`; this module is the file
I/O, shared with ``atlas quantify``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from atlas import layout
from atlas.errors import InvalidInput, Problem
from atlas.science.bands import BandsDisagree, band_rows, merge_bands, quantify_band_in_parts
from atlas.science.imageio import TiffRows, open_tiff
from atlas.science.quantification import ID_COLUMN, MORPHOLOGY_COLUMNS, NegativeLabels, marker_columns, quantify
from atlas.slide import htan
from atlas.slide.convention import MARKERS, parse_markers
from atlas.stages import StageContext
from atlas.storage import Store

if TYPE_CHECKING:  # imported where tables are built or read: atlas quantify imports it while it measures
    import pandas as pd

log = logging.getLogger(__name__)

QC_DIR = f"{layout.QC}/quantify"
# Pixels of an item's band measured at once (whole chunk rows, at least one): the masks' labels (4 B/px
# each) and the channels' row strip they are measured from, so an item's memory does not grow with its
# band's height, nor with the slide's width while a strip (a chunk row) leaves room for a part.
PART_PIXELS = 32_000_000
# Rows of a table converted at once when it is written as CSV text or as a Parquet row group.
BATCH_ROWS = 65_536


@contextmanager
def open_level0(source: Path | BinaryIO, role: str, name: str | None = None) -> Iterator:
    """Full-resolution level of a (pyramidal OME-)TIFF as a zarr array read tile by tile.

    Parameters
    ----------
    source : Path or binary file
        A path, or a seekable file object (e.g. ranged reads of a store's object).
    role : {"image", "mask"}
        What the file should be, for error messages.
    name : str, optional
        The file's name in messages (default: ``source``).

    Yields
    ------
    TiffRows or zarr.Array
        (C, Y, X) or (Y, X), chunks = the file's tiles (or strips), read by row slices: a
        :class:`TiffRows` when level 0 is one 2-D page per plane (every OME-TIFF), else zarr.
    """
    fix = ("give a tiled (pyramidal OME-)TIFF with channel planes (C, Y, X)" if role == "image"
           else "give an integer label image (Y, X) of the same size as the image, 0 = background")
    name = name or str(source)
    with open_tiff(source, fix, name=name) as tif:
        series = tif.series[0]
        squeezed = [n for n, a in zip(series.shape, series.axes, strict=True) if not (n == 1 and a not in "YX")]
        if not series.axes.endswith("YX") or "S" in series.axes or len(squeezed) > (3 if role == "image" else 2):
            raise InvalidInput(Problem(name, f"has axes {series.axes} of shape {series.shape}; "
                                       f"expected {'(C, Y, X)' if role == 'image' else '(Y, X)'}", fix))
        if TiffRows.is_planar(series):
            yield TiffRows(tif, series)
            return
        import zarr

        with series.aszarr(level=0) as store:
            yield zarr.open_array(store, mode="r")


def check_inputs(image_name: str, image, mask_names: Mapping[str, str], masks: Mapping[str, object],
                 markers_path: Path, n_markers: int) -> None:
    """Raise InvalidInput with every mismatch between image, masks and markers.csv (files named as given)."""
    problems = []
    n_channels = image.shape[0] if image.ndim == 3 else 1
    shown = PurePosixPath(image_name).name
    if n_markers != n_channels:
        problems.append(Problem(str(markers_path), f"lists {n_markers} markers but {shown} has "
                                f"{n_channels} channels", "give markers.csv one row per image channel, in order"))
    for name, mask in masks.items():
        shape = tuple(s for s in mask.shape if s != 1) if mask.ndim > 2 else mask.shape
        if shape != tuple(image.shape[-2:]):
            problems.append(Problem(mask_names[name], f"mask has shape {tuple(mask.shape)}, the image "
                                    f"{shown} {tuple(image.shape)}",
                                    "use the mask segmented from this image (same Y, X size)"))
        elif not np.issubdtype(mask.dtype, np.integer):
            problems.append(Problem(mask_names[name], f"mask has dtype {mask.dtype}, not integer labels",
                                    "write the mask as an integer label image (e.g. uint32), 0 = background"))
    if problems:
        raise InvalidInput(problems)


def quantify_files(image_path: Path, mask_paths: Mapping[str, Path], marker_names: Sequence[str],
                   remove: Sequence[bool], *, markers_path: Path = Path(MARKERS),
                   progress: Callable[[int, int], None] | None = None
                   ) -> tuple[dict[str, pd.DataFrame], tuple[int, ...]]:
    """MCQuant tables of an image file for each mask file, and the image's shape.

    Parameters
    ----------
    image_path : Path
        Registered (C, Y, X) OME-TIFF.
    mask_paths : dict of str to Path
        Mask name (e.g. ``"cell"``) to its label image.
    marker_names, remove, markers_path, progress
        As for :func:`quantify_arrays`.

    Returns
    -------
    tables : dict of str to pandas.DataFrame
        One MCQuant table per mask.
    shape : tuple of int
        Shape of the image, (C, Y, X) or (Y, X).

    Raises
    ------
    InvalidInput
        Unreadable files, shape mismatch, non-integer or negative masks, marker count != channels.
    """
    with ExitStack() as stack:
        image = stack.enter_context(open_level0(image_path, "image"))
        masks = {name: stack.enter_context(open_level0(path, "mask")) for name, path in mask_paths.items()}
        return quantify_arrays(image, str(image_path), masks, {n: str(p) for n, p in mask_paths.items()},
                               marker_names, remove, markers_path=markers_path, progress=progress)


def quantify_arrays(image, image_name: str, masks: Mapping[str, object], mask_names: Mapping[str, str],
                    marker_names: Sequence[str], remove: Sequence[bool], *, markers_path: Path = Path(MARKERS),
                    progress: Callable[[int, int], None] | None = None
                    ) -> tuple[dict[str, pd.DataFrame], tuple[int, ...]]:
    """MCQuant tables of an image array for each mask array (read strip by strip), and the image's shape.

    Parameters
    ----------
    image : (C, Y, X) or (Y, X) array-like
        E.g. a zarr array; read strip by strip.
    image_name : str
        Named in errors.
    masks : dict of str to array-like
        Mask name (e.g. ``"cell"``) to its (Y, X) labels.
    mask_names : dict of str to str
        Mask name to its file, named in errors.
    marker_names, remove : sequence
        One name and one remove flag per image channel (markers.csv order); removed channels are
        not read and get no column.
    markers_path : Path
        Named in errors.
    progress : callable, optional
        ``progress(rows_done, rows_total)``.
    """
    total, done = image.shape[-2] * (len(masks) + 1), 0

    def step(rows: int) -> None:
        nonlocal done
        done += rows
        if progress:
            progress(done, total)

    tables = measure_checked(image, image_name, masks, mask_names, marker_names, remove, markers_path,
                             lambda names, kept: quantify(image, masks, names, channels=kept, progress=step))
    return tables, tuple(image.shape)


def measure_checked(image, image_name: str, masks: Mapping[str, object], mask_names: Mapping[str, str],
                    marker_names: Sequence[str], remove: Sequence[bool], markers_path: Path,
                    measure: Callable[[list[str], list[int]], Any]) -> Any:
    """``measure(names, channels)`` of the kept markers, after :func:`check_inputs`; a negative mask
    (the one thing only reading it shows) raised as InvalidInput naming its file."""
    check_inputs(image_name, image, mask_names, masks, markers_path, len(marker_names))
    kept = [i for i, r in enumerate(remove) if not r]
    try:
        return measure([marker_names[i] for i in kept], kept)
    except NegativeLabels as exc:
        raise InvalidInput(Problem(mask_names[exc.mask], str(exc), "write the mask as non-negative integer "
                                   "labels, 0 = background")) from exc


def to_anndata(table: pd.DataFrame, slide_id: str, uns: Mapping[str, str]):
    """The table as AnnData, laid out as scimap's MCMICRO import builds it (and as squidpy reads it).

    scimap's ``mcmicro_to_scimap`` (labsyspharm/scimap ``scimap/preprocessing/mcmicro_to_scimap.py``,
    default arguments, ``custom_imageid`` = the slide id) makes: obs names ``<imageid>_<CellID>``
    (unique when slides are combined); ``obs`` = the table's columns from ``X_centroid`` on, then
    ``CellID``, then ``imageid`` (= ``slide_id``, the column its tools group by); ``var`` = the
    markers whose name does not contain "dna" (any case); ``.raw`` = their mean intensities;
    ``X`` and ``layers["log"]`` = ``log1p`` of them; ``uns["all_markers"]`` = every marker column.
    Added for squidpy/scanpy: ``obsm["spatial"]`` = (X_centroid, Y_centroid) in pixels; and ``uns``
    entries describing the table (slide, engine, mask, image).
    """
    import anndata
    import pandas as pd

    markers = [c for c in table.columns if c != ID_COLUMN and c not in MORPHOLOGY_COLUMNS]
    kept = [m for m in markers if "dna" not in m.lower()]
    obs = table[[*MORPHOLOGY_COLUMNS, ID_COLUMN]].assign(imageid=slide_id)
    obs.index = pd.Index((f"{slide_id}_" + table[ID_COLUMN].astype(str)).to_numpy(), dtype=object)
    # one (cells, markers) copy of the means, in C order (what h5py writes without copying it again);
    # .raw keeps this array, X and layers["log"] share its log1p
    means = np.empty((len(table), len(kept)), np.float64)
    for j, name in enumerate(kept):
        means[:, j] = table[name].to_numpy()
    adata = anndata.AnnData(X=means, obs=obs, var=pd.DataFrame(index=pd.Index(kept, dtype=object)))
    adata.raw = adata
    adata.X = np.log1p(means)
    adata.layers["log"] = adata.X
    adata.obsm["spatial"] = table[["X_centroid", "Y_centroid"]].to_numpy(np.float64)
    adata.uns.update({"all_markers": markers, **uns})
    return adata


def _float_text(values: np.ndarray):
    """``str`` of each float64 as pandas' ``to_csv`` writes it (shortest round trip; NaN as ""), as Arrow strings.

    Arrow's cast writes the same shortest round-trip digits as Python's ``repr`` and, for
    1e-4 <= |x| < 1e10 (and 0), the same text except the ".0" Python gives whole numbers. The
    other values (NaN, inf, tiny and huge magnitudes; rare in a cell table) are formatted by Python.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pc.cast(pa.array(values), pa.string())
    magnitude = np.abs(values)
    with np.errstate(invalid="ignore"):
        fixed = ((magnitude >= 1e-4) & (magnitude < 1e10)) | (values == 0)
        whole = fixed & (values == np.floor(values))
    if whole.all():
        text = pc.binary_join_element_wise(text, ".0", "")
    elif whole.any():
        text = pc.if_else(pa.array(whole), pc.binary_join_element_wise(text, ".0", ""), text)
    other = ~fixed
    if other.any():
        python = ["" if x != x else repr(x) for x in values[other].tolist()]
        text = pc.replace_with_mask(text, pa.array(other), pa.array(python, pa.string()))
    return text


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """MCQuant's CSV: byte for byte what ``table.to_csv(path, index=False)`` writes, 5-10x faster.

    The header by the csv module (pandas' own quoting rules), the rows by Arrow's CSV writer from
    columns already formatted as pandas formats them (:func:`_float_text`; integers as ``str``),
    two columns at a time, :data:`BATCH_ROWS` rows at a time: the text, ~20 B a value, is held for
    one batch of rows, not for the whole table.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pa_csv

    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow(table.columns)
    columns = [table[name].to_numpy() for name in table.columns]   # views of the table's blocks
    for name, values in zip(table.columns, columns, strict=True):
        if values.dtype.kind not in "fiu":
            raise TypeError(f"column {name!r} has dtype {values.dtype}; a cell table holds numbers only")

    def text(values: np.ndarray):
        if values.dtype.kind == "f":
            return _float_text(values.astype(np.float64, copy=False))
        return pc.cast(pa.array(values), pa.string())

    names = [str(i) for i in range(len(columns))]
    options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
    with open(path, "wb") as f, ThreadPoolExecutor(2, thread_name_prefix="csv-text") as pool:
        f.write(header.getvalue().encode("utf-8"))
        for start in range(0, len(table), BATCH_ROWS):   # Arrow's casts release the GIL
            batch = list(pool.map(text, [values[start:start + BATCH_ROWS] for values in columns]))
            pa_csv.write_csv(pa.table(batch, names=names), f, options)


def _write_parquet(table: pd.DataFrame, path: Path, uns: Mapping[str, str]) -> None:
    """The table as Parquet, one row group per :data:`BATCH_ROWS` rows converted at a time (the
    schema, pandas metadata included, is the whole table's, as ``to_parquet`` gives it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.Schema.from_pandas(table, preserve_index=False)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(table), BATCH_ROWS):
            writer.write_table(pa.Table.from_pandas(table.iloc[start:start + BATCH_ROWS], schema=schema,
                                                    preserve_index=False))


def _write_h5ad(table: pd.DataFrame, path: Path, uns: Mapping[str, str]) -> None:
    to_anndata(table, uns["slide_id"], uns).write_h5ad(path)


# The table's formats: suffix -> writer(table, path, uns), side by side under one name.
TABLE_WRITERS = {".csv": lambda table, path, uns: write_csv(table, path), ".parquet": _write_parquet,
                 ".h5ad": _write_h5ad}
TABLE_SUFFIXES = tuple(TABLE_WRITERS)


def _write_formats(table: pd.DataFrame, paths: Sequence[Path], uns: Mapping[str, str]) -> None:
    """Every format at once, one thread each: the CSV and Parquet writers (Arrow) run outside the
    GIL while the .h5ad is written. The overlap is bounded: CSV and Parquet hold one batch of
    :data:`BATCH_ROWS` rows each, so the memory is the table's, the AnnData's arrays and two batches."""
    with ThreadPoolExecutor(len(TABLE_WRITERS)) as pool:
        pending = [pool.submit(write, table, path, uns) for path, write in zip(paths, TABLE_WRITERS.values(),
                                                                                 strict=True)]
        for future in pending:
            future.result()


def write_table(table: pd.DataFrame, csv_path: Path, uns: Mapping[str, str]) -> list[Path]:
    """Write the table as MCQuant CSV, Parquet and AnnData .h5ad side by side; return the paths."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    paths = [csv_path.with_suffix(s) for s in TABLE_SUFFIXES]
    _write_formats(table, paths, uns)
    return paths


def store_table(work: Store, table: pd.DataFrame, csv_rel: str, uns: Mapping[str, str]) -> None:
    """:func:`write_table` into a store: the formats written locally, then stored."""
    with ExitStack() as stack:
        paths = [stack.enter_context(work.local_file(str(PurePosixPath(csv_rel).with_suffix(suffix))))
                 for suffix in TABLE_SUFFIXES]
        _write_formats(table, paths, uns)


def table_summary(table: pd.DataFrame, image_shape: Sequence[int]) -> dict:
    """QC figures of one table: cells, mask coverage, cell area quantiles (px)."""
    area = table["Area"].to_numpy()
    quantiles = np.quantile(area, [0.05, 0.5, 0.95]).round(1).tolist() if area.size else [None] * 3
    return {"cells": len(table),
            "coverage": round(float(area.sum()) / float(image_shape[-2] * image_shape[-1]), 4),
            "area_p05_p50_p95_px": quantiles}


def find_engines(work: Store, slide_id: str) -> list[str]:
    """Segmentation engines that left a ``segmentation/<engine>-<slide>/`` folder, by name."""
    folders = {PurePosixPath(rel).parts[1] for rel in work.list(layout.SEGMENTATION) if rel.count("/") >= 2}
    return sorted(f.removesuffix(f"-{slide_id}") for f in folders if f.endswith(f"-{slide_id}"))


def registered_image(work: Store, slide_id: str):
    """Full resolution of ``registration/<slide>.ome.zarr`` as a lazy (C, Y, X) zarr array."""
    import zarr

    rel = layout.registration_zarr(slide_id)
    try:
        return zarr.open_group(work.zarr(rel, read_only=True), mode="r", zarr_format=2)["0"]
    except (FileNotFoundError, KeyError) as exc:
        raise InvalidInput(Problem(rel, "registered image is missing", "run the stitch stage first")) from exc


def _engine_masks(ctx: StageContext) -> dict[str, dict[str, str]]:
    """engine -> mask name -> its results-layout path, for every engine that segmented the slide."""
    engines = find_engines(ctx.work, ctx.slide_id)
    if not engines:
        raise InvalidInput(Problem(f"{layout.SEGMENTATION}/", f"no segmentation of slide {ctx.slide_id}",
                                   "run the segment stage first"))
    found = {e: {m: layout.mask_path(ctx.slide_id, e, m) for m in ctx.params.quantify.masks} for e in engines}
    missing = [r for rel in found.values() for r in rel.values() if not ctx.work.exists(r)]
    if missing:
        raise InvalidInput([Problem(r, "mask is missing", "rerun the segment stage, or list only the masks "
                                    "it makes under quantify.masks in params.yml") for r in missing])
    return found


def _part_rel(ctx: StageContext, engine: str, name: str, index: int) -> str:
    """Where item ``index`` puts its band's part ``name`` (a mask's table, or ``band.json``) of ``engine``."""
    return f"{ctx.job.stage.item_dir}/{engine}/{index:05d}.{name}"


@contextmanager
def _masks(work: Store, rel: Mapping[str, str]) -> Iterator[dict]:
    """The masks at ``rel`` (mask name -> path) opened as lazy arrays read by byte ranges."""
    with ExitStack() as stack:
        yield {m: stack.enter_context(open_level0(stack.enter_context(work.open(r)), "mask", r))
               for m, r in rel.items()}


def run_item(ctx: StageContext, index: int, count: int) -> None:
    """Measure the cells of row band ``index`` of ``count`` (:func:`band_rows` over the image's chunk
    rows) of every mask, :data:`PART_PIXELS` at a time: each mask's table part as Parquet and
    ``band.json`` (rows read, foreground)."""
    image = registered_image(ctx.work, ctx.slide_id)
    markers = parse_markers(ctx.slide.read_text(MARKERS))
    band = band_rows(image.shape[-2], count, image.chunks[-2])[index]
    for engine, rel in _engine_masks(ctx).items():
        read = {"band": list(band), "image_rows": list(band), "mask_rows": list(band),
                "foreground": dict.fromkeys(rel, 0)}
        if band[1] > band[0]:
            with _masks(ctx.work, rel) as masks:
                tables, window = measure_checked(
                    image, layout.registration_zarr(ctx.slide_id), masks, rel, [m.marker_name for m in markers],
                    [m.remove for m in markers], Path(MARKERS),
                    lambda names, kept: quantify_band_in_parts(image, masks, names, band, channels=kept,
                                                               max_pixels=PART_PIXELS, chunk=image.chunks[-2]))
            read.update({"image_rows": list(window.rows), "mask_rows": list(window.read),
                         "foreground": window.foreground})
            for mask, table in tables.items():
                buffer = io.BytesIO()
                table.to_parquet(buffer, index=False)
                ctx.work.write_bytes(_part_rel(ctx, engine, f"{mask}.parquet", index), buffer.getvalue())
        ctx.work.write_text(_part_rel(ctx, engine, "band.json", index), json.dumps(read) + "\n")


def _merged_table(ctx: StageContext, image, engine: str, mask: str, rel: str, markers) -> pd.DataFrame:
    """One mask's table from its bands' parts; measured whole (one band) if the bands disagree."""
    import pandas as pd

    parts, foreground = [], 0
    for index in range(ctx.job.count):
        foreground += json.loads(ctx.work.read_text(_part_rel(ctx, engine, "band.json", index)))["foreground"][mask]
        part = _part_rel(ctx, engine, f"{mask}.parquet", index)
        if ctx.work.exists(part):
            parts.append(pd.read_parquet(io.BytesIO(ctx.work.read_bytes(part))))
    try:
        return merge_bands(parts, foreground)
    except BandsDisagree as exc:
        log.warning("%s: %s; measuring it in one band", rel, exc)
        with _masks(ctx.work, {mask: rel}) as masks:
            tables, _ = quantify_arrays(image, layout.registration_zarr(ctx.slide_id), masks, {mask: rel},
                                        [m.marker_name for m in markers], [m.remove for m in markers])
            return tables[mask]


def _merge_mask(ctx: StageContext, image, engine: str, mask: str, mask_rel: str, markers) -> tuple[dict, list]:
    """Merge and store one mask's table; its QC summary and HTAN rows (the table is let go on return,
    so a merge holds one table at a time)."""
    table = _merged_table(ctx, image, engine, mask, mask_rel, markers)
    image_name = PurePosixPath(layout.registration_tiff(ctx.slide_id)).name  # the Level 2 image the tables describe
    store_table(ctx.work, table, layout.table_path(ctx.slide_id, engine, mask),
                {"slide_id": ctx.slide_id, "engine": engine, "mask": mask, "image": image_name})
    return (table_summary(table, image.shape),
            htan.level4_rows(ctx.slide_id, engine, mask, len(table), table.shape[1] - 1))


def merge(ctx: StageContext) -> None:
    """Join the bands' parts into the tables (CSV, Parquet, h5ad) and write ``qc/quantify/summary.json``."""
    image = registered_image(ctx.work, ctx.slide_id)
    markers = parse_markers(ctx.slide.read_text(MARKERS))
    summary: dict = {"status": "ok", "markers": marker_columns([m.marker_name for m in markers if not m.remove]),
                     "bands": ctx.job.count, "tables": {}}
    htan_rows = []
    for engine, rel in _engine_masks(ctx).items():
        for mask, mask_rel in rel.items():
            name = PurePosixPath(layout.table_path(ctx.slide_id, engine, mask)).name
            summary["tables"][name], rows = _merge_mask(ctx, image, engine, mask, mask_rel, markers)
            htan_rows += rows
    ctx.work.write_text(layout.htan_table("ImagingLevel4"), htan.table_text(htan_rows))
    ctx.work.write_text(f"{QC_DIR}/{layout.QC_SUMMARY}", json.dumps(summary, indent=1) + "\n")
