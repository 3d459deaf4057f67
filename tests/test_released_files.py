"""What a release of the sample slide holds, checked as the field's tools and standards see it.

One full local run of the made sample slide (``sample_run``, shared by the end-to-end tests). Its
raw cycle files carry acquisition dates as microscopes write them (OME ``AcquisitionDate``, TIFF
``DateTime``); none may reach a released file (MITI's rule for patient-derived images).
"""
from __future__ import annotations

import json

import anndata
import pandas as pd
import pytest
import tifffile

from atlas import layout
from atlas.slide.convention import read_markers
from atlas.slide.palette import channel_colors
from atlas.slide.sample import ACQUIRED
from tests.ome_checks import DATETIME_TAG, validate_ome_tiff, validate_ome_zarr

# Attribute names of the HTAN data model (ncihtan/data-models @ f77ac86, HTAN.dependencies.csv) of
# each imaging component this project describes; the release's tables may use no other column.
HTAN_ATTRIBUTES = {
    "ImagingLevel2": {
        "Component", "Filename", "File Format", "HTAN Parent Biospecimen ID", "HTAN Participant ID",
        "HTAN Data File ID", "Channel Metadata Filename", "Imaging Assay Type", "Protocol Link", "Software and Version",
        "Microscope", "Objective", "NominalMagnification", "LensNA", "WorkingDistance", "WorkingDistanceUnit",
        "Immersion", "Pyramid", "Zstack", "Tseries", "Passed QC", "Comment", "FOV number", "FOVX", "FOVXUnit",
        "FOVY", "FOVYUnit", "Frame Averaging", "Image ID", "DimensionOrder", "PhysicalSizeX", "PhysicalSizeXUnit",
        "PhysicalSizeY", "PhysicalSizeYUnit", "PhysicalSizeZ", "PhysicalSizeZUnit", "Pixels BigEndian",
        "PlaneCount", "SizeC", "SizeT", "SizeX", "SizeY", "SizeZ", "PixelType", "MERFISH Positions File",
        "MERFISH Codebook File",
        # the model's Level 2 has no parent field; ImagingLevel3Image and the higher levels name it so
        "HTAN Parent Data File ID", "Parameter file"},
    "ImagingLevel3Channels": {
        "Component", "HTAN Channel Metadata ID", "Channel ID", "Channel Name", "Channel Passed QC",
        "Channel QC Failure Type", "Channel QC Failure Comment", "Target Name", "Antibody Name", "Antibody Role",
        "RRID identifier", "Cycle Number", "Sub Cycle Number", "Fluorophore", "Clone", "Lot", "Vendor",
        "Catalog Number", "Excitation Wavelength", "Emission Wavelength", "Excitation Bandwidth",
        "Emission Bandwidth", "Metal Isotope Element", "Metal Isotope Mass", "Oligo Barcode Upper Strand",
        "Oligo Barcode Lower Strand", "Dilution", "Concentration"},
    "ImagingLevel3Segmentation": {
        "Component", "Filename", "File Format", "HTAN Parent Data File ID", "HTAN Data File ID",
        "Imaging Segmentation Data Type", "Parameter file", "Software and Version", "Commit SHA",
        "Imaging Object Class", "Imaging Object Class Description", "Number of Objects"},
    "ImagingLevel4": {
        "Component", "Filename", "File Format", "HTAN Parent Data File ID", "HTAN Parent Channel Metadata ID",
        "HTAN Data File ID", "Parameter file", "Software and Version", "Commit SHA", "Number of Objects",
        "Number of Features", "Imaging Object Class", "Imaging Object Class Description",
        "Imaging Summary Statistic"},
}
HTAN_FILE_FORMATS = {"OME-TIFF", "csv", "hdf5", "tif", "tiff", "json", "png", "jpg", "html"}
HTAN_OBJECT_CLASSES = {"nucleus", "cytoplasm", "plasma membrane", "whole cell", "spot"}


@pytest.fixture(scope="module")
def released(sample_run) -> list[str]:
    """Every file of the run's results layout (what publishing copies), the manifest included."""
    return sorted(p.relative_to(sample_run).as_posix() for top in layout.LEVELS if (sample_run / top).is_dir()
                  for p in (sample_run / top).rglob("*") if p.is_file()) + [layout.MANIFEST]


def test_no_released_file_carries_the_raw_files_dates(sample_run, sample_slide, released):
    raw = sorted((sample_slide / "raw").glob("*.ome.tif"))
    with tifffile.TiffFile(raw[0]) as tif:      # the upload is dated, as microscopes date it
        assert DATETIME_TAG in tif.pages[0].tags and "<AcquisitionDate>" in tif.ome_metadata
    dates = [ACQUIRED.strftime(f).encode() for f in ("%Y-%m-%d", "%Y:%m:%d")]
    tiffs = [rel for rel in released if rel.endswith(".ome.tif")]
    assert len(tiffs) == 3
    for rel in tiffs:
        validate_ome_tiff(sample_run / rel)       # no DateTime in any IFD, no AcquisitionDate
    for rel in released:
        data = (sample_run / rel).read_bytes()
        assert not any(date in data for date in dates), f"{rel} carries the acquisition date"


def test_images_validate_and_every_view_shows_a_channel_in_one_colour(sample_run, sample_slide):
    slide = sample_slide.name
    markers = [m.marker_name for m in read_markers(sample_slide / "markers.csv")]
    palette = channel_colors(markers)
    (image,) = validate_ome_tiff(sample_run / layout.registration_tiff(slide)).images
    assert image.name == slide
    tiff_colors = [c.color.as_hex(format="long").lstrip("#") for c in image.pixels.channels]
    zarr_image, labels = validate_ome_zarr(sample_run / layout.registration_zarr(slide))
    assert zarr_image.attributes.multiscales[0].name == slide and set(labels) == {"nuclei", "cell"}
    zarr_colors = [c.color.lower() for c in zarr_image.attributes.omero.channels]
    exhibit = json.loads((sample_run / layout.OVERVIEW / "exhibit.json").read_text())
    overview = {label: color for g in exhibit["Groups"] for label, color in zip(g["Channels"], g["Colors"],
                                                                                  strict=True)}
    assert tiff_colors == zarr_colors == [overview[m] for m in markers] == palette


def test_manifest_gives_each_file_its_miti_level_and_htan_component(sample_run, released):
    manifest = json.loads((sample_run / layout.MANIFEST).read_text())
    entries = {f["path"]: f for f in manifest["files"]}
    # publish's own records are not in the manifest its merge writes (the merge's is written after it)
    assert set(entries) == {p for p in released if p != layout.MANIFEST
                            and not p.startswith(f"{layout.PROVENANCE}/publish")}
    expected = {"registration": (2, "ImagingLevel2"), "segmentation": (3, "ImagingLevel3Segmentation"),
                "quantification": (4, "ImagingLevel4"), "overview": (5, "Auxiliary"), "qc": (None, "Auxiliary"),
                "metadata": (None, "Auxiliary")}
    for path, entry in entries.items():
        assert (entry["level"], entry["component"]) == expected[path.split("/")[0]], path


def test_htan_tables_use_the_data_models_names_and_describe_the_files(sample_run, sample_slide):
    slide = sample_slide.name
    tables = {c: pd.read_csv(sample_run / layout.htan_table(c)) for c in HTAN_ATTRIBUTES}
    for component, table in tables.items():
        assert set(table.columns) <= HTAN_ATTRIBUTES[component], component
        assert set(table["Component"]) == {component}
        if "File Format" in table:
            assert set(table["File Format"]) <= HTAN_FILE_FORMATS
        for path in table.get("Filename", []):
            assert (sample_run / path).is_file(), path
    (level2,) = tables["ImagingLevel2"].to_dict("records")
    with tifffile.TiffFile(sample_run / layout.registration_tiff(slide)) as tif:
        c, y, x = tif.series[0].shape
    assert (level2["SizeC"], level2["SizeY"], level2["SizeX"], level2["PixelType"]) == (c, y, x, "uint16")
    assert level2["PhysicalSizeX"] == pytest.approx(0.65) and level2["Pyramid"] == "yes"
    assert level2["HTAN Parent Data File ID"].split(",") == [f"{slide}/raw/cycle-01.ome.tif",
                                                             f"{slide}/raw/cycle-02.ome.tif"]
    markers = read_markers(sample_slide / "markers.csv")
    channels = tables["ImagingLevel3Channels"]
    assert list(channels["Channel Name"]) == [m.marker_name for m in markers]
    assert list(channels["Cycle Number"]) == [m.cycle_number for m in markers]
    segmentation = tables["ImagingLevel3Segmentation"]
    assert set(segmentation["Imaging Object Class"]) == {"nucleus", "whole cell"} <= HTAN_OBJECT_CLASSES
    level4 = tables["ImagingLevel4"]
    for row in level4.to_dict("records"):
        rows = len(pd.read_parquet((sample_run / row["Filename"]).with_suffix(".parquet")))
        assert row["Number of Objects"] == rows and row["Imaging Summary Statistic"] == "Mean"
        mask = row["HTAN Parent Data File ID"].split(",")[1]
        objects = segmentation.set_index("Filename").loc[mask, "Number of Objects"]
        assert objects == rows                  # every segmented object has its row


def test_h5ad_of_the_run_is_named_by_slide_for_scimap(sample_run, sample_slide):
    slide = sample_slide.name
    for path in sorted((sample_run / layout.QUANTIFICATION).glob("*.h5ad")):
        adata = anndata.read_h5ad(path)
        assert set(adata.obs["imageid"]) == {slide} and adata.obs_names[0].startswith(f"{slide}_")
        assert "DNA_1" in adata.uns["all_markers"] and "DNA_1" not in adata.var_names
