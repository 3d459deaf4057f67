"""Names of the results layout, shared by the local runner, the Batch stages and publishing.

The same tree appears under ``atlas run -o OUT`` and under ``<slide_id>/<run_id>/`` in the
results bucket. Names follow MCMICRO so its tools (and people used to them) find things.
"""
from __future__ import annotations

from pathlib import PurePosixPath

MANIFEST = "manifest.json"  # the release's manifest (the upload's own is atlas.slide.convention.SLIDE_MANIFEST)
REGISTRATION = "registration"
SEGMENTATION = "segmentation"
QUANTIFICATION = "quantification"
OVERVIEW = "overview"
QC = "qc"
ILLUMINATION = "illumination"
METADATA = "metadata"           # the release's HTAN metadata tables (atlas.slide.htan)
OVERVIEW_PAGE = "index.html"    # the overview's entry page, in overview/ (and at the top of its site copy)
QC_SUMMARY = "summary.json"     # each stage's qc/<stage>/summary.json, shown in the overview's QC panel
PROVENANCE = f"{QC}/provenance"  # one completion record per job of the run (released with the results)
WORK = "tmp"                    # array items' parts, read by their merge; in the work prefix, never released

# HTAN / MITI data levels of the folders above (qc, illumination and metadata are auxiliary: level None).
LEVELS = {REGISTRATION: 2, SEGMENTATION: 3, QUANTIFICATION: 4, OVERVIEW: 5, QC: None, ILLUMINATION: None,
          METADATA: None}
# HTAN data model components (ncihtan/data-models, HTAN.dependencies.csv) of the folders that have one;
# the overview, QC, illumination profiles and metadata tables are auxiliary files of the release.
COMPONENTS = {REGISTRATION: "ImagingLevel2", SEGMENTATION: "ImagingLevel3Segmentation",
              QUANTIFICATION: "ImagingLevel4"}
AUXILIARY = "Auxiliary"


def registration_tiff(slide_id: str) -> str:
    """Level 2 pyramidal OME-TIFF, e.g. ``registration/S1.ome.tif``."""
    return f"{REGISTRATION}/{slide_id}.ome.tif"


def registration_zarr(slide_id: str) -> str:
    """Level 2 OME-Zarr (NGFF 0.4) of the same image, with masks under its ``labels/`` group."""
    return f"{REGISTRATION}/{slide_id}.ome.zarr"


def segmentation_dir(slide_id: str, engine: str) -> str:
    """MCMICRO's ``segmentation/<method>-<imageID>/`` folder; engine names contain no ``-``."""
    if "-" in engine:
        raise ValueError(f"engine name {engine!r} must not contain '-' (MCMICRO splits on it)")
    return f"{SEGMENTATION}/{engine}-{slide_id}"


def mask_path(slide_id: str, engine: str, mask: str) -> str:
    """Label image of ``mask`` ("nuclei" or "cell"), e.g. ``segmentation/unet-S1/cell.ome.tif``."""
    return f"{segmentation_dir(slide_id, engine)}/{mask}.ome.tif"


def table_path(slide_id: str, engine: str, mask: str, suffix: str = ".csv") -> str:
    """MCQuant's ``quantification/<imageID>--<method>_<mask>.csv`` (also .parquet, .h5ad)."""
    return f"{QUANTIFICATION}/{slide_id}--{engine}_{mask}{suffix}"


def completion_record(stage: str, item: int | None = None) -> str:
    """Completion record of a stage's job (or of one of its array items), e.g. ``qc/provenance/segment.2.json``."""
    return f"{PROVENANCE}/{stage}{'' if item is None else f'.{item}'}.json"


def htan_table(component: str) -> str:
    """The release's HTAN metadata table of one component, e.g. ``metadata/htan-ImagingLevel2.csv``."""
    return f"{METADATA}/htan-{component}.csv"


def _top(relpath: str) -> str:
    top = PurePosixPath(relpath).parts[0]
    if top not in LEVELS and relpath != MANIFEST:
        raise ValueError(f"{relpath!r} is outside the results layout ({', '.join(LEVELS)})")
    return top


def level_of(relpath: str) -> int | None:
    """MITI data level of a file in the results layout (None for auxiliary files)."""
    return LEVELS.get(_top(relpath))


def component_of(relpath: str) -> str:
    """HTAN component of a file in the results layout (:data:`AUXILIARY` for files without one)."""
    return COMPONENTS.get(_top(relpath), AUXILIARY)
