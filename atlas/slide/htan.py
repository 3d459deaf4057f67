"""HTAN metadata of a release: one table per HTAN imaging component, with the fields we know.

Each table is written by the stage that makes its files, from what that stage knows: ``stitch``
(ImagingLevel2, ImagingLevel3Channels), ``segment`` (ImagingLevel3Segmentation), ``quantify``
(ImagingLevel4).

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

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

import tifffile

from atlas import layout
from atlas.slide.convention import Marker

OBJECT_CLASS = {"nuclei": "nucleus", "cell": "whole cell"}   # mask name -> HTAN Imaging Object Class
CHANNELS = "ImagingLevel3Channels"


def _software(*names: str, note: str = "") -> str:
    """``"tissue-atlas 0.1.0, ashlar 1.20.0 (note)"``: installed versions of the packages named."""
    parts = []
    for name in ("tissue-atlas", *names):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(parts) + (f" ({note})" if note else "")


def level2_rows(image: Path | BinaryIO, slide_id: str, raw_files: Sequence[str],
                markers: Sequence[Marker]) -> dict[str, list[dict]]:
    """The ImagingLevel2 row of the registered OME-TIFF and the ImagingLevel3Channels rows of its channels.

    Parameters
    ----------
    image : Path or seekable binary file
        The written ``registration/<slide>.ome.tif`` (e.g. :meth:`atlas.storage.Store.open`: ranged
        reads); dimensions, pixel type and size, dimension order, image and channel ids come from
        its OME-XML (the first IFDs only are read).
    slide_id : str
    raw_files : sequence of str
        The uploaded cycle files (paths in the upload): the image's parents.
    markers : sequence of Marker
        markers.csv (cycle numbers of the channels).
    """
    with tifffile.TiffFile(image) as tif:
        root = ET.fromstring(tif.ome_metadata)
        pyramid = len(tif.series[0].levels) > 1
        big_endian = tif.byteorder == ">"
    image = next(e for e in root.iter() if e.tag.endswith("}Image"))
    pixels = next(e for e in image if e.tag.endswith("}Pixels"))
    level2 = {
        "Component": "ImagingLevel2", "Filename": layout.registration_tiff(slide_id), "File Format": "OME-TIFF",
        "HTAN Parent Data File ID": ",".join(raw_files), "Image ID": image.get("ID"),
        "Channel Metadata Filename": layout.htan_table(CHANNELS), "Software and Version": _software("ashlar"),
        "Pyramid": "yes" if pyramid else "no", "Zstack": "no", "Tseries": "no",
        "DimensionOrder": pixels.get("DimensionOrder"), "PixelType": pixels.get("Type"),
        "Pixels BigEndian": "true" if big_endian else "false",
        **{key: int(pixels.get(key)) for key in ("SizeX", "SizeY", "SizeC", "SizeZ", "SizeT")},
        "PlaneCount": int(pixels.get("SizeZ")),
        "PhysicalSizeX": float(pixels.get("PhysicalSizeX")), "PhysicalSizeXUnit": pixels.get("PhysicalSizeXUnit", "µm"),
        "PhysicalSizeY": float(pixels.get("PhysicalSizeY")), "PhysicalSizeYUnit": pixels.get("PhysicalSizeYUnit", "µm"),
        "Parameter file": layout.MANIFEST,
    }
    channels = [c for c in pixels if c.tag.endswith("}Channel")]
    cycles = cycle_numbers([c.get("Name") for c in channels], markers)
    return {"ImagingLevel2": [level2],
            CHANNELS: [{"Component": CHANNELS, "Channel ID": c.get("ID"), "Channel Name": c.get("Name"),
                        "Cycle Number": cycle} for c, cycle in zip(channels, cycles, strict=True)]}


def cycle_numbers(channel_names: Sequence[str], markers: Sequence[Marker]) -> list[int | None]:
    """Cycle of each image channel: markers.csv rows matched in order (cycles left out are skipped)."""
    cycles, k = [], 0
    for name in channel_names:
        while k < len(markers) and markers[k].marker_name != name:
            k += 1
        cycles.append(markers[k].cycle_number if k < len(markers) else None)
        k += 1
    return cycles


def segmentation_rows(slide_id: str, engine: str, objects: int) -> list[dict]:
    """ImagingLevel3Segmentation rows of an engine's masks; nucleus i and cell i share their id,
    so both hold ``objects``."""
    return [{"Component": "ImagingLevel3Segmentation", "Filename": layout.mask_path(slide_id, engine, mask),
             "File Format": "OME-TIFF", "HTAN Parent Data File ID": layout.registration_tiff(slide_id),
             "Imaging Segmentation Data Type": "Mask", "Imaging Object Class": object_class,
             "Number of Objects": objects,
             "Software and Version": _software("scikit-image", *(("onnxruntime",) if engine == "unet" else ()),
                                               note=f"segment engine {engine}"),
             "Parameter file": layout.MANIFEST} for mask, object_class in OBJECT_CLASS.items()]


def level4_rows(slide_id: str, engine: str, mask: str, objects: int, features: int) -> list[dict]:
    """ImagingLevel4 rows of one cell table, as CSV and as .h5ad (``hdf5``).

    ``features`` counts the table's columns but ``CellID`` (markers and shape).
    """
    parents = f"{layout.registration_tiff(slide_id)},{layout.mask_path(slide_id, engine, mask)}"
    return [{"Component": "ImagingLevel4", "Filename": layout.table_path(slide_id, engine, mask, suffix),
             "File Format": file_format, "HTAN Parent Data File ID": parents,
             "HTAN Parent Channel Metadata ID": layout.htan_table(CHANNELS),
             "Number of Objects": objects, "Number of Features": features,
             "Imaging Object Class": OBJECT_CLASS.get(mask, mask), "Imaging Summary Statistic": "Mean",
             "Software and Version": _software(note="MCQuant-compatible quantify"), "Parameter file": layout.MANIFEST}
            for suffix, file_format in ((".csv", "csv"), (".h5ad", "hdf5"))]


def table_text(rows: Sequence[Mapping]) -> str:
    """A component's table (``metadata/htan-<component>.csv``, :func:`atlas.layout.htan_table`) as
    CSV text, one row per file or channel."""
    import pandas as pd  # here, not at the top: atlas quantify imports this module before it needs pandas

    return pd.DataFrame(list(rows)).to_csv(index=False)
