"""The .h5ad table as scimap and squidpy read it.

scimap cannot be installed beside this project (scimap 2.3.6 requires numpy < 2, anndata < 0.11,
zarr == 2.10.3, tifffile < 2024 and Python < 3.13), so these tests check every key scimap reads,
named from its source (labsyspharm/scimap @ 4df3a67):

* ``scimap/preprocessing/mcmicro_to_scimap.py`` -- how scimap turns an MCMICRO CSV into AnnData:
  re-enacted here from our CSV with pandas (:func:`scimap_import`), and our .h5ad must equal it;
* ``scimap/tools/spatial_distance.py`` -- reads ``obs['X_centroid']``, ``obs['Y_centroid']``,
  ``obs[phenotype]`` and ``obs['imageid']`` (its default ``imageid='imageid'``), and subsets with
  ``adata[adata.obs['imageid'] == i]``; its per-phenotype nearest distances are re-enacted with a
  KD-tree on two combined slides;
* ``scimap/tools/cluster.py`` and ``plotting/markerCorrelation.py`` default to ``layers['log']``;
  image viewers and gating tools take channel names from ``uns['all_markers']``.

Data: the real steinbock IMC ROIs (float32, DeepCell cell masks). Their first and last channels
are named ``DNA1`` / ``DNA2`` here, standing for the DNA stains of a cyclic-IF panel, which
scimap's import leaves out of ``X``.
"""
from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy.spatial import cKDTree

from atlas.science.quantification import MORPHOLOGY_COLUMNS, quantify
from atlas.stages.quantify import write_table

STEINBOCK = "quantification/steinbock_imc"
ROIS = {"S1": "20210305_NE_mockData1_002", "S2": "20210305_NE_mockData2_001"}
NAMES = ["DNA1", "Cytokeratin 5", "Laminin", "YBX1", "DNA2"]


def scimap_import(csv: Path, imageid: str) -> anndata.AnnData:
    """What ``sm.pp.mcmicro_to_scimap([csv], custom_imageid=imageid)`` builds, with its defaults
    (``remove_dna=True``, ``log=True``, ``unique_CellId=True``, ``split='X_centroid'``).

    scimap calls ``pd.read_csv(csv)``, whose default float parser can be an ulp off; the round-trip
    parser used here gives the table's exact values, which the .h5ad holds.
    """
    d = pd.read_csv(csv, float_precision="round_trip")
    d["imageid"] = imageid
    d.index = d["imageid"].astype(str) + "_" + d["CellID"].astype(str)
    d = d[[c for c in d.columns if c != "CellID"] + ["CellID"]]
    d = d[[c for c in d.columns if c != "imageid"] + ["imageid"]]
    d = d.replace([np.inf, -np.inf], 0)
    split = d.columns.get_loc("X_centroid")
    meta, expression = d.iloc[:, split:], d.iloc[:, :split]
    markers = list(expression.columns)
    expression = expression.loc[:, ~expression.columns.str.contains("dna", case=False)]
    adata = anndata.AnnData(expression)
    adata.obs = meta
    adata.uns["all_markers"] = markers
    adata.raw = adata
    adata.X = np.log1p(adata.X)
    adata.layers["log"] = adata.X
    return adata


@pytest.fixture(scope="module")
def tables(shared_data, tmp_path_factory) -> dict[str, Path]:
    """CSV path of each slide's cell table; the .h5ad beside it (written by the stage's writer)."""
    out = tmp_path_factory.mktemp("tables")
    paths = {}
    for slide, roi in ROIS.items():
        image = tifffile.imread(shared_data / STEINBOCK / "img" / f"{roi}.tiff")
        mask = tifffile.imread(shared_data / STEINBOCK / "masks_deepcell" / f"{roi}.tiff")
        table = quantify(image, {"cell": mask}, NAMES)["cell"]
        paths[slide] = out / f"{slide}--deepcell_cell.csv"
        write_table(table, paths[slide], {"slide_id": slide, "engine": "deepcell", "mask": "cell", "image": roi})
    return paths


@pytest.mark.parametrize("slide", ROIS)
def test_h5ad_is_what_scimaps_mcmicro_import_builds_from_the_csv(tables, slide):
    ours = anndata.read_h5ad(tables[slide].with_suffix(".h5ad"))
    ref = scimap_import(tables[slide], slide)
    assert list(ours.obs_names) == list(ref.obs_names) and ours.obs_names[0] == f"{slide}_1"
    assert list(ours.obs.columns) == list(ref.obs.columns) == [*MORPHOLOGY_COLUMNS, "CellID", "imageid"]
    for column in [*MORPHOLOGY_COLUMNS, "CellID"]:
        np.testing.assert_array_equal(ours.obs[column], ref.obs[column], err_msg=column)
    assert list(ours.obs["imageid"]) == list(ref.obs["imageid"]) and set(ours.obs["imageid"]) == {slide}
    assert list(ours.var_names) == list(ref.var_names) == ["Cytokeratin 5", "Laminin", "YBX1"]
    assert list(ours.raw.var_names) == list(ref.raw.var_names)
    # X and .raw as scimap builds them from the CSV
    np.testing.assert_array_equal(ours.raw.X, ref.raw.X)
    np.testing.assert_array_equal(ours.X, ref.X)
    np.testing.assert_array_equal(ours.layers["log"], ours.X)
    assert list(ours.uns["all_markers"]) == ref.uns["all_markers"] == NAMES
    # squidpy / scanpy: centroids in obsm['spatial'] (px, x then y)
    np.testing.assert_array_equal(ours.obsm["spatial"], ours.obs[["X_centroid", "Y_centroid"]].to_numpy())
    assert (ours.uns["slide_id"], ours.uns["engine"], ours.uns["mask"]) == (slide, "deepcell", "cell")


def test_combined_slides_keep_unique_cells_and_spatial_distance_reads_per_image(tables):
    slides = [anndata.read_h5ad(p.with_suffix(".h5ad")) for p in tables.values()]
    combined = anndata.concat(slides)
    assert combined.obs_names.is_unique and len(combined) == sum(len(a) for a in slides)
    assert set(combined.obs["imageid"]) == set(ROIS)
    # a phenotype as scimap's phenotype_cells would add one: Cytokeratin 5 high or low (log scale)
    high = combined[:, "Cytokeratin 5"].X.ravel() > np.median(combined[:, "Cytokeratin 5"].X)
    combined.obs["phenotype"] = np.where(high, "CK5+", "CK5-")
    # spatial_distance: per imageid, each cell's distance to the nearest other cell of each phenotype
    for image_id in combined.obs["imageid"].unique():
        subset = combined[combined.obs["imageid"] == image_id]
        xy = subset.obs[["X_centroid", "Y_centroid"]].to_numpy()
        for phenotype in subset.obs["phenotype"].unique():
            members = xy[(subset.obs["phenotype"] == phenotype).to_numpy()]
            dist, _ = cKDTree(members).query(xy, k=2)
            nearest = np.where(dist[:, 0] == 0, dist[:, 1], dist[:, 0])
            brute = np.sqrt(((xy[:, None, :] - members[None, :, :]) ** 2).sum(-1))
            brute[brute == 0] = np.inf
            np.testing.assert_allclose(nearest, brute.min(axis=1))
            assert np.isfinite(nearest).all() and len(nearest) == len(subset)
