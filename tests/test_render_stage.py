"""The render stage (atlas.stages.render): an array over the overview's tile rows by layer and
level, then a merge, on a results folder made from real data (the DSB2018 nucleus image and its
ground-truth mask, as tests/test_render.py's ``images``): the panel from the results, the items'
shares, and the same overview byte for byte whatever the item count.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import tifffile
from test_render import NAMES, TILE, inlined_data, write_images

from atlas.params import Params, RenderParams
from atlas.science.overview import render_overview
from atlas.science.pyramid import write_ome_zarr, write_zarr_labels
from atlas.stages import Job, StageContext, get_stage
from atlas.storage import FolderStore, IoCounter


@pytest.fixture(scope="module")
def images(dsb, tmp_path_factory):
    return write_images(dsb, tmp_path_factory.mktemp("render-inputs"))


def _results(tmp_path: Path, images, *, segmented: bool) -> StageContext:
    """A results folder as the stages before render leave it: the registered image (OME-TIFF and
    OME-Zarr, with the cell labels when ``segmented``), the stitch QC, the cell mask and table, and
    the quantify QC summary that counts the cells."""
    image, mask = images
    slide_dir, out = tmp_path / "S1", tmp_path / "out"
    slide_dir.mkdir(parents=True)
    (slide_dir / "markers.csv").write_text("channel_number,cycle_number,marker_name\n"
                                           + "".join(f"{i + 1},1,{n}\n" for i, n in enumerate(NAMES)))
    (out / "registration").mkdir(parents=True)
    (out / "registration" / "S1.ome.tif").write_bytes(image.read_bytes())
    zarr_path = out / "registration" / "S1.ome.zarr"
    write_ome_zarr(zarr_path, tifffile.imread(image), channel_names=NAMES, pixel_size_um=0.5, tile_size=TILE)
    (out / "qc" / "stitch").mkdir(parents=True)
    summary = {"slide_id": "S1", "aligner": "ashlar 1.20",
               "cycles": [{"cycle": 1, "aligned_tiles": 9, "offset_px": [0, 0]}]}
    (out / "qc" / "stitch" / "summary.json").write_text(json.dumps(summary))
    if segmented:
        (out / "segmentation" / "unet-S1").mkdir(parents=True)
        (out / "segmentation" / "unet-S1" / "cell.ome.tif").write_bytes(mask.read_bytes())
        write_zarr_labels(zarr_path, "cell", tifffile.imread(mask))
        (out / "quantification").mkdir()
        (out / "quantification" / "S1--unet_cell.csv").write_text(
            "CellID,DNA_1\n" + "".join(f"{i},1.0\n" for i in range(1, 126)))
        (out / "qc" / "quantify").mkdir(parents=True)
        quantify_summary = {"tables": {"S1--unet_cell.csv": {"cells": 125}}}
        (out / "qc" / "quantify" / "summary.json").write_text(json.dumps(quantify_summary))
    params = Params(render=RenderParams(tile_size=TILE))
    return StageContext(slide_id="S1", run_id="S1-0123456789ab", slide=FolderStore(slide_dir), work=FolderStore(out),
                        params=params)


def render_stage(ctx: StageContext, count: int) -> None:
    """The render stage as the runners run it: items ``0 .. count - 1``, then the merge."""
    from atlas.stages import render

    stage = get_stage("render")
    for index in range(count):
        render.run_item(replace(ctx, job=Job(stage, item=index, count=count)), index, count)
    render.merge(replace(ctx, job=Job(stage, merge=True, count=count)))


def test_stage_renders_the_panel_from_the_results(images, tmp_path):
    ctx = replace(_results(tmp_path, images, segmented=True), results_uri="s3://atlas-results/S1/S1-0123456789ab/")
    render_stage(ctx, 2)
    panel = inlined_data(ctx.work.root / "overview")["panel"]
    assert panel["slideId"] == "S1" and panel["runId"] == "S1-0123456789ab"
    assert panel["cellCount"] == 125
    assert [m["name"] for m in panel["markers"]] == NAMES
    assert panel["qc"]["stitch"]["summary"]["cycles.1.aligned_tiles"] == 9
    assert panel["qc"]["stitch"]["files"] == ["qc/stitch/summary.json"]
    assert {(f["level"], f["path"]) for f in panel["data"]} == {
        (2, "registration/S1.ome.tif"), (2, "registration/S1.ome.zarr"), (3, "segmentation/unet-S1/cell.ome.tif"),
        (4, "quantification/S1--unet_cell.csv")}
    assert {f["uri"] for f in panel["data"]} >= {"s3://atlas-results/S1/S1-0123456789ab/registration/S1.ome.tif"}
    assert (ctx.work.root / "overview" / "images" / "cell-outlines" / "0_0_0.png").is_file()


def test_stage_without_segmentation(images, tmp_path):
    ctx = _results(tmp_path, images, segmented=False)  # not published: no results_uri
    render_stage(ctx, 2)
    data = inlined_data(ctx.work.root / "overview")
    assert data["exhibit"]["Masks"] == [] and data["panel"]["cellCount"] is None
    assert [f["uri"] for f in data["panel"]["data"]] == [None, None]  # the registered image's OME-TIFF and OME-Zarr


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_stage_items_share_the_tiles_and_any_count_gives_the_same_overview(images, tmp_path):
    """Items split the tile rows of every layer and level between them; the overview is byte for byte
    the same whatever the item count (one item is the single job), and the same as rendering it in
    one go (render_overview): 1, 3 and 20 items (more items than units: some render nothing)."""
    from atlas.science.overview.render import PanelInfo
    from atlas.science.overview.source import ZarrPyramid
    from atlas.stages import render

    sites = {}
    for count in (1, 3, 20):
        ctx = _results(tmp_path / f"items-{count}", images, segmented=True)
        (ctx.work.root / "overview" / "images" / "old-group").mkdir(parents=True)
        (ctx.work.root / "overview" / "images" / "old-group" / "0_0_0.jpg").write_bytes(b"stale")
        render_stage(ctx, count)
        sites[count] = tree(ctx.work.root / "overview")
    assert "images/old-group/0_0_0.jpg" not in sites[1]  # an earlier layout's tile is removed by the merge
    assert sites[3] == sites[1] and sites[20] == sites[1]
    layers = {rel.split("/")[1] for rel in sites[1] if rel.startswith("images/")}
    assert len(layers) == 2 and "cell-outlines" in layers  # one group of the four channels, the outlines
    # 512 px at 128 px tiles: 4 x 4 + 2 x 2 + 1 tiles per layer
    assert sum(rel.startswith("images/") for rel in sites[1]) == 2 * 21

    ctx = _results(tmp_path / "one-go", images, segmented=True)
    group, image = render.open_image(ctx.work, "S1", TILE)
    labels = ZarrPyramid(group["labels"]["cell"], TILE, labels=True)
    cells = render.read_cells(ctx.work, "quantification/S1--unet_cell.csv", NAMES)
    site = tmp_path / "one-go-site"
    render_overview(image, site, slide_id="S1", markers=NAMES, mask_path=labels, tile_size=TILE, cells=cells,
                    panel=PanelInfo(run_id=ctx.run_id, cell_count=125, qc=render.qc_panel(ctx.work),
                                    data=render.data_files(ctx.work, {}, None)),
                    story_files=("../registration/S1.ome.tif", "../segmentation/unet-S1/cell.ome.tif"))
    assert tree(site) == sites[1]


def test_stage_items_render_only_their_share(images, tmp_path):
    from atlas.science.overview.tiles import tile_units
    from atlas.stages import render

    ctx = _results(tmp_path, images, segmented=True)
    ctx = replace(ctx, work=FolderStore(ctx.work.root, counter=IoCounter()))
    stage = get_stage("render")
    render.run_item(replace(ctx, job=Job(stage, item=1, count=3)), 1, 3)
    # it read its rows' chunks of its layers and the smallest level (the display ranges), not the image
    image = sum(p.stat().st_size for p in (ctx.work.root / "registration" / "S1.ome.zarr").rglob("*") if p.is_file())
    assert ctx.work.counter.read < 0.5 * image, (ctx.work.counter.read, image)
    written = [p.relative_to(ctx.work.root / "overview" / "images") for p in (ctx.work.root / "overview").rglob("*")
               if p.is_file()]
    shapes = [(512, 512), (256, 256), (128, 128)]
    units = tile_units(2, shapes, TILE)[1::3]  # layer 0: the group (JPEG), layer 1: the outlines (PNG)
    assert {(p.parent.name == "cell-outlines", p.name) for p in written} == {
        (u.layer == 1, f"{u.level}_{x}_{u.row}.{'png' if u.layer else 'jpg'}")
        for u in units for x in range(shapes[u.level][1] // TILE)}
    assert not (ctx.work.root / "overview" / "index.html").exists()  # the page is the merge's


def test_tile_units_cover_every_row_once_and_any_shares_split_each_level_evenly():
    from atlas.science.overview.tiles import tile_units
    from atlas.science.pyramid import level_shapes

    shapes = level_shapes((3000, 5000), 1024)  # 4 levels: 3 + 2 + 1 + 1 tile rows
    units = tile_units(3, shapes, 1024)
    assert len({u.name for u in units}) == len(units) == 3 * 7
    assert {(u.layer, u.level, u.row) for u in units} == {(layer, level, row) for layer in range(3)
                                                          for level, (h, _) in enumerate(shapes)
                                                          for row in range(-(-h // 1024))}
    for count in (1, 2, 7, 50):
        shares = [units[i::count] for i in range(count)]
        assert sorted(u.name for share in shares for u in share) == sorted(u.name for u in units)
        full_size = [sum(u.level == 0 for u in share) for share in shares]
        assert max(full_size) - min(full_size) <= 1  # the costly full-size rows are spread evenly
