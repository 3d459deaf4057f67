"""HTAN metadata of a release: one table per HTAN imaging component, with the fields we know.

The HTAN data model (ncihtan/data-models, ``HTAN.dependencies.csv`` and ``HTAN.model.csv``, checked
at commit f77ac86) describes released imaging files with one metadata manifest per component.
A release carries, in ``metadata/htan-<Component>.csv`` (:func:`atlas.layout.htan_table`):

``ImagingLevel2``
    The registered OME-TIFF: dimensions, pixel type and size, dimension order, pyramid, image id,
    all read from its OME-XML; its channel table; software; parent = the raw cycle files.
``ImagingLevel3Channels``
    One row per channel of that image: ``Channel ID`` and ``Channel Name`` as in its OME-XML,
    ``Cycle Number`` from markers.csv.
``ImagingLevel3Segmentation``
    Each mask: object class (``nucleus`` / ``whole cell``, the model's valid values), number of
    objects, ``Mask``, software, parent = the registered image.
``ImagingLevel4``
    Each cell table (CSV, and the .h5ad as ``hdf5``): objects, features, summary statistic
    ``Mean``, object class, parents = image and mask, channel table.

Column names are the model's attribute names. HTAN identifiers (``HTAN Data File ID`` and the
participant/biospecimen ids) are assigned at submission and are not known here: the ``HTAN Parent
...`` columns hold the parent's path in the release (or upload, for raw files) for the submitter
to map to ids. Fields we do not know (assay type, microscope, objective, QC verdicts, antibodies)
are left out rather than guessed. ``Parameter file`` is the release's ``manifest.json`` (its
parameters and software versions). The Parquet tables and the OME-Zarr have no row: the model's
``File Format`` has no value for them (they are the same data as the CSV and the OME-TIFF).
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import tifffile

from atlas import layout
from atlas.slide.convention import Marker

OBJECT_CLASS = {"nuclei": "nucleus", "cell": "whole cell"}   # mask name -> HTAN Imaging Object Class
CHANNELS = "ImagingLevel3Channels"


def _ome_pixels(path: Path) -> tuple[ET.Element, ET.Element, bool, bool]:
    """(Image element, Pixels element, big endian, pyramid) of an OME-TIFF, from its header only."""
    with tifffile.TiffFile(path) as tif:
        root = ET.fromstring(tif.ome_metadata)
        pyramid = len(tif.series[0].levels) > 1
        big_endian = tif.byteorder == ">"
    image = next(e for e in root.iter() if e.tag.endswith("}Image"))
    pixels = next(e for e in image if e.tag.endswith("}Pixels"))
    return image, pixels, big_endian, pyramid


def _software(versions: Mapping[str, str], *names: str, note: str = "") -> str:
    parts = [f"{name} {versions[name]}" for name in ("tissue-atlas", *names) if name in versions]
    return ", ".join(parts) + (f" ({note})" if note else "")


def level2_rows(out_dir: Path, slide_id: str, raw_files: Sequence[str],
                versions: Mapping[str, str]) -> tuple[list[dict], list[dict]]:
    """ImagingLevel2 row of the registered image and ImagingLevel3Channels rows of its channels.

    ``raw_files`` are the uploaded cycle files (paths in the upload), the image's parents.
    """
    rel = layout.registration_tiff(slide_id)
    image, pixels, big_endian, pyramid = _ome_pixels(out_dir / rel)
    level2 = {
        "Component": "ImagingLevel2", "Filename": rel, "File Format": "OME-TIFF",
        "HTAN Parent Data File ID": ",".join(raw_files), "Image ID": image.get("ID"),
        "Channel Metadata Filename": layout.htan_table(CHANNELS),
        "Software and Version": _software(versions, "ashlar"),
        "Pyramid": "yes" if pyramid else "no", "Zstack": "no", "Tseries": "no",
        "DimensionOrder": pixels.get("DimensionOrder"), "PixelType": pixels.get("Type"),
        "Pixels BigEndian": "true" if big_endian else "false",
        **{key: int(pixels.get(key)) for key in ("SizeX", "SizeY", "SizeC", "SizeZ", "SizeT")},
        "PlaneCount": int(pixels.get("SizeZ")),
        "PhysicalSizeX": float(pixels.get("PhysicalSizeX")), "PhysicalSizeXUnit": pixels.get("PhysicalSizeXUnit", "µm"),
        "PhysicalSizeY": float(pixels.get("PhysicalSizeY")), "PhysicalSizeYUnit": pixels.get("PhysicalSizeYUnit", "µm"),
        "Parameter file": layout.MANIFEST,
    }
    channels = [{"Component": CHANNELS, "Channel ID": c.get("ID"), "Channel Name": c.get("Name")}
                for c in pixels if c.tag.endswith("}Channel")]
    return [level2], channels


def cycle_numbers(channel_names: Sequence[str], markers: Sequence[Marker]) -> list[int | None]:
    """Cycle of each image channel: markers.csv rows matched in order (cycles left out are skipped)."""
    cycles, k = [], 0
    for name in channel_names:
        while k < len(markers) and markers[k].marker_name != name:
            k += 1
        cycles.append(markers[k].cycle_number if k < len(markers) else None)
        k += 1
    return cycles


def segmentation_rows(out_dir: Path, slide_id: str, versions: Mapping[str, str]) -> list[dict]:
    """ImagingLevel3Segmentation rows: every mask of every engine's ``segmentation/<engine>-<slide>/``."""
    summary_path = out_dir / layout.QC / "segment" / layout.QC_SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    rows = []
    for folder in sorted((out_dir / layout.SEGMENTATION).glob(f"*-{slide_id}")):
        engine = folder.name.removesuffix(f"-{slide_id}")
        for mask, object_class in OBJECT_CLASS.items():
            rel = layout.mask_path(slide_id, engine, mask)
            if not (out_dir / rel).is_file():
                continue
            # nucleus i and cell i share their id: the segment summary's count holds for both masks
            objects = summary.get("nuclei") if summary.get("engine") == engine else None
            rows.append({"Component": "ImagingLevel3Segmentation", "Filename": rel, "File Format": "OME-TIFF",
                         "HTAN Parent Data File ID": layout.registration_tiff(slide_id),
                         "Imaging Segmentation Data Type": "Mask", "Imaging Object Class": object_class,
                         "Number of Objects": objects,
                         "Software and Version": _software(versions, "scikit-image",
                                                           *(("onnxruntime",) if engine == "unet" else ()),
                                                           note=f"segment engine {engine}"),
                         "Parameter file": layout.MANIFEST})
    return rows


def level4_rows(out_dir: Path, slide_id: str, versions: Mapping[str, str]) -> list[dict]:
    """ImagingLevel4 rows: each ``quantification/<slide>--<engine>_<mask>`` table as CSV and as .h5ad."""
    import pyarrow.parquet as pq

    rows = []
    for csv in sorted((out_dir / layout.QUANTIFICATION).glob(f"{slide_id}--*_*.csv")):
        engine, mask = csv.stem.split("--", 1)[1].rsplit("_", 1)
        meta = pq.ParquetFile(csv.with_suffix(".parquet")).metadata   # the same table; its footer is cheap
        for suffix, file_format in ((".csv", "csv"), (".h5ad", "hdf5")):
            rows.append({"Component": "ImagingLevel4",
                         "Filename": layout.table_path(slide_id, engine, mask, suffix), "File Format": file_format,
                         "HTAN Parent Data File ID": f"{layout.registration_tiff(slide_id)},"
                                                     f"{layout.mask_path(slide_id, engine, mask)}",
                         "HTAN Parent Channel Metadata ID": layout.htan_table(CHANNELS),
                         "Number of Objects": meta.num_rows, "Number of Features": meta.num_columns - 1,
                         "Imaging Object Class": OBJECT_CLASS.get(mask, mask), "Imaging Summary Statistic": "Mean",
                         "Software and Version": _software(versions, note="MCQuant-compatible quantify"),
                         "Parameter file": layout.MANIFEST})
    return rows


def metadata_tables(out_dir: Path, slide_id: str, markers: Sequence[Marker], raw_files: Sequence[str],
                    versions: Mapping[str, str]) -> dict[str, pd.DataFrame]:
    """The release's HTAN metadata tables by component (components without files are left out).

    Parameters
    ----------
    out_dir : Path
        Root of the results layout.
    slide_id : str
    markers : sequence of Marker
        markers.csv of the slide (cycle numbers).
    raw_files : sequence of str
        The uploaded raw files (paths in the upload): the Level 2 image's parents.
    versions : dict of str to str
        Package versions (:func:`atlas.stages.publish.software_versions`).
    """
    tables: dict[str, list[dict]] = {}
    if (out_dir / layout.registration_tiff(slide_id)).is_file():
        level2, channels = level2_rows(out_dir, slide_id, raw_files, versions)
        for row, cycle in zip(channels, cycle_numbers([c["Channel Name"] for c in channels], markers), strict=True):
            row["Cycle Number"] = cycle
        tables.update({"ImagingLevel2": level2, CHANNELS: channels})
    tables["ImagingLevel3Segmentation"] = segmentation_rows(out_dir, slide_id, versions)
    tables["ImagingLevel4"] = level4_rows(out_dir, slide_id, versions)
    return {component: pd.DataFrame(rows) for component, rows in tables.items() if rows}
