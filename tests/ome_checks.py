"""Validation of released images as the field's reference libraries do it.

* OME-TIFF: the OME-XML against the OME 2016-06 XSD (``ome_types.from_xml(validate=True)``, lxml).
* OME-Zarr: the NGFF 0.4 image, its ``labels/`` group and every label image, parsed into the
  ``ome-zarr-models`` pydantic models (spec rules: axes, datasets, scales, omero, image-label).
* Dates: no TIFF ``DateTime`` (tag 306) in any IFD, SubIFDs included, and no OME ``AcquisitionDate``.
"""
from __future__ import annotations

from pathlib import Path

import tifffile
import zarr

DATETIME_TAG = 306


def _ome_zarr_models():
    """ome-zarr-models' v0.4 models, usable with pydantic >= 2.13.

    ome-zarr-models 1.6 models are generic pydantic-zarr groups that pydantic 2.13+ leaves "not
    fully defined" until rebuilt with the names they refer to (ome-zarr-models-py#417; 1.7 caps
    pydantic below 2.13 instead, under the images' pin).
    """
    from ome_zarr_models.v04.image import Image
    from ome_zarr_models.v04.image_label import ImageLabel
    from ome_zarr_models.v04.labels import Labels
    from pydantic_zarr.v2 import ArraySpec, GroupSpec

    for model in (Labels, ImageLabel, Image):
        model.model_rebuild(_types_namespace={"GroupSpec": GroupSpec, "ArraySpec": ArraySpec})
    return Image, ImageLabel


def validate_ome_tiff(path: Path):
    """The OME model of an OME-TIFF, validated against the XSD; asserts that no IFD has a date."""
    import ome_types

    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
        for series in tif.series:
            for level in series.levels:
                for page in level.pages:
                    page = page.aspage()          # a TiffFrame's tags are read only as a page
                    assert DATETIME_TAG not in page.tags, f"{path}: TIFF DateTime in an IFD"
    ome = ome_types.from_xml(xml, validate=True)
    assert all(image.acquisition_date is None for image in ome.images), f"{path}: OME AcquisitionDate"
    return ome


def validate_ome_zarr(path: Path):
    """``(image, {label name: image label})``: the NGFF 0.4 models of an OME-Zarr and its labels."""
    image_model, label_model = _ome_zarr_models()
    group = zarr.open_group(path, mode="r", zarr_format=2)
    image = image_model.from_zarr(group)
    names = group["labels"].attrs["labels"] if "labels" in group else []
    return image, {name: label_model.from_zarr(group[f"labels/{name}"]) for name in names}
