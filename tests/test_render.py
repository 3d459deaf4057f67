"""Overview rendering (atlas.science.overview, the render stage, `atlas render`) on real images.

Real data (read in place from ../shared/data): the DSB2018 nucleus image and its ground-truth
label mask, and the steinbock IMC float32 ROI with its DeepCell mask. Synthetic planes only where
the case is about the values themselves: an all-zero channel (a failed stain), an all-65535
channel (a saturated one), NaN/inf (a broken float image).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile

from atlas.errors import InvalidInput
from atlas.science.overview import render_overview
from atlas.science.overview.contrast import FALLBACK_PERCENTILES, auto_contrast, fit_gmm_1d, sample_pixels
from atlas.science.overview.exhibit import label_dir, make_groups
from atlas.science.overview.source import TiffPyramid
from atlas.science.overview.tiles import composite, outlines, scale_to_display
from atlas.science.pyramid import downsample, write_ome_tiff_pyramid
from atlas.slide.palette import channel_colors

EXHIBIT_KEYS = {"Images", "Header", "Rotation", "Layout", "Stories", "Channels", "Masks", "Groups"}
TILE = 128  # small tiles, so a 512 px image has a real pyramid (512, 256, 128 px levels)
NAMES = ["DNA_1", "Empty", "Saturated", "CD45"]


@pytest.fixture(scope="module")
def images(dsb, tmp_path_factory):
    return write_images(dsb, tmp_path_factory.mktemp("render-inputs"))


def write_images(dsb, folder: Path) -> tuple[Path, Path]:
    """(image.ome.tif, cell.ome.tif): DSB nuclei, an empty and a saturated channel, the nuclei flipped."""
    nuclei, mask = dsb
    stack = np.stack([nuclei, np.zeros_like(nuclei), np.full_like(nuclei, 65535), np.fliplr(nuclei)])
    write_ome_tiff_pyramid(folder / "image.ome.tif", stack, channel_names=NAMES, pixel_size_um=0.5, tile_size=TILE)
    write_ome_tiff_pyramid(folder / "cell.ome.tif", mask.astype(np.uint32), channel_names=["cell"], pixel_size_um=0.5,
                           tile_size=TILE, labels=True)
    return folder / "image.ome.tif", folder / "cell.ome.tif"


@pytest.fixture(scope="module")
def site(images, tmp_path_factory):
    image, mask = images
    out = tmp_path_factory.mktemp("site") / "overview"
    result = render_overview(image, out, slide_id="DSB", markers=NAMES, mask_path=mask, tile_size=TILE,
                             channels_per_group=2)
    return out, result


def inlined_data(site_dir: Path) -> dict:
    html = (site_dir / "index.html").read_text()
    match = re.search(r'<script id="atlas-data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(match[1])


def decode(path: Path) -> np.ndarray:
    return imagecodecs.imread(path.read_bytes())


# ---- contrast -------------------------------------------------------------------------------

def test_auto_contrast_on_real_nuclei_blackens_background_and_keeps_nuclei(dsb):
    nuclei, mask = dsb
    low, high = auto_contrast(sample_pixels(nuclei))
    assert 0 <= low < high <= nuclei.max()
    assert (nuclei[mask == 0] <= low).mean() > 0.9      # background black
    assert (nuclei[mask > 0] > low).mean() > 0.85       # nuclei visible
    assert (nuclei >= high).mean() < 0.05               # few pixels clipped bright


def test_auto_contrast_shows_sparse_imc_markers_over_a_black_background(shared_data):
    """Sparse float IMC channels with hot pixels: the chosen range blacks out the background, clips
    the hot pixels, and sets the cells off from the background better than the full range or fixed
    percentiles do (auto-minerva's reason to fit a mixture). Cells: the ROI's DeepCell mask."""
    folder = shared_data / "quantification" / "steinbock_imc"
    image = tifffile.imread(folder / "img" / "20210305_NE_mockData2_001.tiff")
    cells = tifffile.imread(folder / "masks_deepcell" / "20210305_NE_mockData2_001.tiff") > 0

    def separation(plane: np.ndarray, low: float, high: float) -> float:
        shown = scale_to_display(plane, low, high).astype(float)
        return shown[cells].mean() / (shown[~cells].mean() + 0.01)

    for c, plane in enumerate(image):
        low, high = auto_contrast(sample_pixels(plane))
        assert np.isfinite([low, high]).all() and plane.min() <= low < high < plane.max(), c
        assert (plane[~cells] <= low).mean() > 0.95, f"channel {c}: background not black"
        assert (plane >= high).mean() < 0.01, f"channel {c}: too much clipped"
        full = separation(plane, plane.min(), plane.max())
        fixed = separation(plane, *np.percentile(plane, FALLBACK_PERCENTILES))
        assert separation(plane, low, high) > max(full, fixed), c


@pytest.mark.parametrize("plane, shown", [
    (np.zeros((64, 64), np.uint16), 0),                     # failed stain: black
    (np.full((64, 64), 65535, np.uint16), 255),             # saturated: full brightness
    (np.full((64, 64), 7.5, np.float32), 255),              # constant positive float
    (np.zeros((64, 64), np.float32), 0),
])
def test_auto_contrast_of_constant_channels(plane, shown):
    low, high = auto_contrast(sample_pixels(plane))
    assert np.isfinite([low, high]).all() and high > low
    assert np.all(scale_to_display(plane, low, high) == shown)


def test_auto_contrast_ignores_nan_and_inf():
    plane = np.linspace(0, 100, 64 * 64, dtype=np.float32).reshape(64, 64)
    plane[::7, ::5] = np.nan
    plane[3, 3], plane[4, 4] = np.inf, -np.inf
    low, high = auto_contrast(sample_pixels(plane))
    assert np.isfinite([low, high]).all() and 0 <= low < high <= 100
    shown = scale_to_display(plane, low, high)
    assert shown.dtype == np.uint8 and shown[0, 0] == 0  # NaN shows black
    assert auto_contrast(np.array([np.nan, np.nan])) == (0.0, 1.0)


def test_fit_gmm_1d_recovers_a_known_mixture():
    # A numerical check of the EM fit itself: samples drawn from a known 3-component mixture.
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(2, 0.3, 30000), rng.normal(5, 0.5, 15000), rng.normal(8, 0.4, 5000)])
    counts, edges = np.histogram(x, bins=1024)
    weights, means, sds = fit_gmm_1d((edges[:-1] + edges[1:]) / 2, counts, 3)
    np.testing.assert_allclose(means, [2, 5, 8], atol=0.05)
    np.testing.assert_allclose(sds, [0.3, 0.5, 0.4], atol=0.05)
    np.testing.assert_allclose(weights, [0.6, 0.3, 0.1], atol=0.02)


# ---- compositing, outlines, groups ----------------------------------------------------------

def test_composite_is_minervas_formula(dsb):
    nuclei, _ = dsb
    planes = np.stack([nuclei, np.flipud(nuclei)])
    ranges, colors = [(20.0, 120.0), (30.0, 90.0)], ["ffffff", "ff8000"]
    expected = np.zeros(nuclei.shape + (3,))
    for plane, (low, high), color in zip(planes, ranges, colors, strict=True):
        value = np.clip((plane - low) / (high - low), 0, 1)
        expected += value[..., None] * np.array([int(color[i:i + 2], 16) for i in (0, 2, 4)]) / 255
    expected = np.clip(expected, 0, 1) * 255
    got = composite(planes, ranges, colors)
    assert got.shape == nuclei.shape + (3,) and got.dtype == np.uint8
    assert np.abs(got - expected).max() <= 2  # 8-bit rounding per channel
    # the lookup-table path for integers and the arithmetic path for floats agree
    assert np.array_equal(composite(planes.astype(np.float32), ranges, colors), got)


def test_outlines_mark_every_object_boundary(dsb):
    _, mask = dsb
    edge = outlines(np.pad(mask, 1, mode="edge"))
    assert not edge[mask == 0].any()
    ids = np.unique(mask[mask > 0])
    assert set(np.unique(mask[edge])) == set(ids)     # every nucleus has an outline
    assert edge.sum() < 0.5 * (mask > 0).sum()          # outlines, not filled objects


def test_groups_start_at_dna_stains_and_paths_follow_minerva():
    names = ["DNA_1", "CD45", "panCK", "DNA 2", "CD3", "aSMA", "Ki67", "CD8", "Hoechst"]
    groups = make_groups(names, [(0.0, 1.0)] * len(names), 4)
    assert [g.labels for g in groups] == [("DNA_1", "CD45", "panCK"), ("DNA 2", "CD3", "aSMA", "Ki67"),
                                          ("CD8",), ("Hoechst",)]
    assert groups[1].path == "Group-2_3__DNA-2--4__CD3--5__aSMA--6__Ki67"
    # the slide's one palette (also the OME-TIFF's and OME-Zarr's): a marker keeps its colour in every view
    assert groups[0].colors == ("ffffff", "ff0000", "00ff00")
    assert groups[1].colors == ("ffffff", "0000ff", "ff00ff", "ffff00")
    assert [c for g in groups for c in g.colors] == channel_colors(names)
    assert label_dir("CD45 (clone/2)") == "CD45-clone2"


# ---- reading pyramids -----------------------------------------------------------------------

def test_tiff_pyramid_reads_stored_and_computed_levels(dsb, tmp_path):
    nuclei, _ = dsb
    stack = np.stack([nuclei, nuclei[::-1]])[:, :500, :300]  # odd tiling at the edges
    write_ome_tiff_pyramid(tmp_path / "p.ome.tif", stack, channel_names=["a", "b"], pixel_size_um=1.0, tile_size=64)
    tifffile.imwrite(tmp_path / "strips.tif", stack, rowsperstrip=37)          # one page, planar channels
    tifffile.imwrite(tmp_path / "tiles.tif", stack, tile=(96, 96), compression="zlib")
    for name in ("p.ome.tif", "strips.tif", "tiles.tif"):
        with TiffPyramid(tmp_path / name, 64) as pyramid:
            assert pyramid.shape == (2, 500, 300)
            assert pyramid.level_shapes == [(500, 300), (250, 150), (125, 75), (63, 38)]
            assert np.array_equal(pyramid.read(0, [1, 0], 61, 190, 250, 300), stack[[1, 0], 61:190, 250:300])
            level2 = downsample(downsample(stack[1]))
            got = pyramid.read(2, [1], 0, 125, 0, 75)[0]
            assert np.abs(got.astype(int) - level2).max() <= 1  # stored or computed, same pyramid
    with TiffPyramid(tmp_path / "p.ome.tif", 64) as pyramid:
        assert pyramid.pixel_size_um == 1.0 and pyramid.channel_names == ["a", "b"]


def test_tiff_pyramid_refuses_interleaved_rgb(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    with pytest.raises(InvalidInput, match="channel planes"):
        TiffPyramid(tmp_path / "rgb.tif", 1024)


def test_tiff_pyramid_names_a_file_that_is_not_a_tiff(tmp_path):
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    with pytest.raises(InvalidInput, match="junk.tif: cannot be read as TIFF .*give a \\(pyramidal OME-\\)TIFF"):
        TiffPyramid(tmp_path / "junk.tif", 1024)


# ---- the whole site -------------------------------------------------------------------------

def test_site_layout_follows_minerva(site):
    out, result = site
    exhibit = json.loads((out / "exhibit.json").read_text())
    assert exhibit.keys() >= EXHIBIT_KEYS
    image = exhibit["Images"][0]
    assert (image["Width"], image["Height"], image["MaxLevel"]) == (512, 512, 2)
    assert exhibit["PixelsPerMicron"] == 2.0
    assert [g["Channels"] for g in exhibit["Groups"]] == [["DNA_1", "Empty"], ["Saturated", "CD45"]]
    waypoint = exhibit["Stories"][0]["Waypoints"][0]
    assert waypoint["Group"] == exhibit["Groups"][0]["Name"] and waypoint["Masks"] == ["Cell outlines"]
    assert result == {"tiles": 3 * 21, "groups": 2, "levels": 3, "mask": True, "waypoints": 3, "drafted": True}
    for layer, ext in [(g["Path"], "jpg") for g in exhibit["Groups"]] + [(exhibit["Masks"][0]["Path"], "png")]:
        folder = out / image["Path"] / layer
        names = sorted(p.name for p in folder.iterdir())
        expected = sorted(f"{level}_{x}_{y}.{ext}" for level, n in ((0, 4), (1, 2), (2, 1))
                          for x in range(n) for y in range(n))
        assert names == expected
        assert decode(folder / f"0_3_3.{ext}").shape[:2] == (TILE, TILE)
        assert decode(folder / f"2_0_0.{ext}").shape[:2] == (128, 128)  # whole image at 1/4
    story = json.loads((out / "story.json").read_text())
    channels = [c for g in story["groups"] for c in g["channels"]]
    assert all(0 <= c["min"] < c["max"] <= 1 for c in channels)
    assert (out / "openseadragon" / "openseadragon.min.js").is_file()
    assert (out / "openseadragon" / "images" / "zoomin_rest.png").is_file()
    assert (out / "openseadragon" / "LICENSE.txt").is_file()
    html = (out / "index.html").read_text()
    assert "http://" not in html and "https://" not in html   # nothing from a CDN
    assert inlined_data(out)["exhibit"] == exhibit


def test_site_tiles_show_the_channels(site, dsb):
    out, _ = site
    exhibit = json.loads((out / "exhibit.json").read_text())
    base = out / exhibit["Images"][0]["Path"]
    first, second = (base / g["Path"] for g in exhibit["Groups"])
    # group 1: DNA white + an all-zero channel in red adds nothing: grey, and bright on nuclei
    tile = decode(first / "0_1_1.jpg").astype(int)
    assert np.abs(tile[..., 0] - tile[..., 2]).mean() < 3
    nuclei, mask = dsb
    region = mask[TILE:2 * TILE, TILE:2 * TILE] > 0
    assert tile[region].mean() > 3 * tile[~region].mean()
    # group 2: a saturated channel covers everything in its palette colour (the slide's second marker: green)
    assert exhibit["Groups"][1]["Colors"][0] == channel_colors(NAMES)[2] == "00ff00"
    assert decode(second / "1_0_1.jpg")[..., 1].mean() > 250


def test_outline_tiles_join_into_the_whole_image_outlines(site, dsb):
    out, _ = site
    _, mask = dsb
    folder = out / "images" / "cell-outlines"
    mosaic = np.zeros((512, 512), bool)
    for x in range(4):
        for y in range(4):
            rgba = decode(folder / f"0_{x}_{y}.png")
            assert rgba.shape == (TILE, TILE, 4)
            mosaic[y * TILE:(y + 1) * TILE, x * TILE:(x + 1) * TILE] = rgba[..., 3] == 255
    assert np.array_equal(mosaic, outlines(np.pad(mask, 1, mode="edge")))


def test_render_is_deterministic(images, site, tmp_path):
    image, mask = images
    again = tmp_path / "overview"
    render_overview(image, again, slide_id="DSB", markers=NAMES, mask_path=mask, tile_size=TILE, channels_per_group=2)
    first = {p.relative_to(site[0]): p.read_bytes() for p in site[0].rglob("*") if p.is_file()}
    second = {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()}
    tiles = [p for p in first if p.parts[0] == "images"]
    assert len(tiles) == site[1]["tiles"] > 0 and {"index.html", "exhibit.json"} <= {p.name for p in first}
    assert first == second


def test_render_without_segmentation_has_no_outline_layer(images, tmp_path):
    image, _ = images
    out = tmp_path / "overview"
    result = render_overview(image, out, slide_id="DSB", markers=NAMES, tile_size=TILE)
    exhibit = json.loads((out / "exhibit.json").read_text())
    assert result["mask"] is False and exhibit["Masks"] == []
    assert exhibit["Stories"][0]["Waypoints"][0]["Masks"] == []
    assert not (out / "images" / "cell-outlines").exists()
    assert len(exhibit["Groups"]) == 1  # four channels, one DNA stain: one group


def test_render_float_image_with_its_real_mask(shared_data, tmp_path):
    folder = shared_data / "quantification" / "steinbock_imc"
    name = "20210305_NE_mockData2_001.tiff"
    panel = [line.split(",")[1] for line in (folder / "panel.csv").read_text().splitlines()[1:]]
    out = tmp_path / "overview"
    result = render_overview(folder / "img" / name, out, slide_id="IMC", markers=panel,
                             mask_path=folder / "masks_deepcell" / name)
    assert result == {"tiles": 3, "groups": 2, "levels": 1, "mask": True, "waypoints": 3, "drafted": True}
    text = (out / "exhibit.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert decode(out / "images" / "cell-outlines" / "0_0_0.png").shape == (87, 103, 4)


def test_render_errors_name_the_file_and_leave_nothing_behind(images, dsb, tmp_path, monkeypatch):
    image, mask = images
    out = tmp_path / "overview"
    with pytest.raises(InvalidInput, match="lists 3 markers but image.ome.tif has 4 channels"):
        render_overview(image, out, slide_id="DSB", markers=NAMES[:3], tile_size=TILE)
    tifffile.imwrite(tmp_path / "small.tif", dsb[1][:100])
    with pytest.raises(InvalidInput, match="does not match the image"):
        render_overview(image, out, slide_id="DSB", markers=NAMES, mask_path=tmp_path / "small.tif", tile_size=TILE)
    monkeypatch.setenv("ATLAS_VIEWER_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(InvalidInput, match="npm ci --prefix viewer"):
        render_overview(image, out, slide_id="DSB", markers=NAMES, tile_size=TILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.tif"]


# ---- the stage and the command --------------------------------------------------------------

def test_cli_render(images, tmp_path):
    from typer.testing import CliRunner

    from atlas.cli import app

    image, mask = images
    markers = tmp_path / "markers.csv"
    markers.write_text("channel_number,cycle_number,marker_name\n"
                       + "".join(f"{i + 1},1,{n}\n" for i, n in enumerate(NAMES)))
    out = tmp_path / "site"
    result = CliRunner().invoke(app, ["render", "--image", str(image), "--mask", str(mask), "--markers", str(markers),
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 group(s)" in result.output and "2 waypoints (drafted)" in result.output and (out / "index.html").is_file()
    assert inlined_data(out)["panel"]["slideId"] == "image"
    story = tmp_path / "story.yml"
    story.write_text(STORY_YML)
    authored = CliRunner().invoke(app, ["render", "--image", str(image), "--markers", str(markers),
                                        "--story", str(story), "-o", str(out)])
    assert authored.exit_code == 0, authored.output
    assert "2 group(s)" in authored.output and "2 waypoints (authored)" in authored.output


# ---- stories, Minerva compatibility ---------------------------------------------------------

# Keys Minerva's readers use, checked against their sources (docs/overview.md cites them):
# minerva-story json-schema/exhibit/waypoints.md (required waypoint keys), minerva-author
# src/app.py format_arrow / format_overlay (arrow and overlay keys), make_channels (Channels).
WAYPOINT_KEYS = {"Name", "Description", "Arrows", "Overlays", "Group", "Masks", "ActiveMasks", "Zoom", "Pan"}
ARROW_KEYS = {"Text", "HideArrow", "Point", "Angle"}
OVERLAY_KEYS = {"x", "y", "width", "height"}
CHANNEL_KEYS = {"Rendered", "Name", "Path"}
# minerva-author src/app.py: api_import reads in_file and csv_file unconditionally, then
# sample_info, groups, waypoints, masks; make_waypoints reads these keys of a saved waypoint.
AUTHOR_KEYS = {"in_file", "csv_file", "sample_info", "groups", "waypoints", "masks"}
AUTHOR_WAYPOINT_KEYS = {"name", "text", "group", "zoom", "pan", "arrows", "overlays", "masks"}
AUTHOR_ARROW_KEYS = {"text", "hide", "position", "angle"}

STORY_YML = """
groups:
  - {name: Nuclei, channels: [DNA_1, CD45], colors: [0000ff, "#FF8000"]}
  - {name: Bright, channels: [Saturated]}
waypoints:
  - name: Start
    description: "Two groups <b>authored</b>"
  - name: Corner
    description: "**CD45** in the corner"
    group: Bright
    center_um: [64, 192]
    zoom: 4
    arrows: [{at_um: [80, 200], text: nuclei}]
    overlays: [{box_um: [32, 160, 64, 48]}]
    masks: [Cell outlines]
"""


@pytest.fixture(scope="module")
def story_site(images, tmp_path_factory):
    from atlas.slide.story import parse_story

    image, mask = images
    out = tmp_path_factory.mktemp("story-site") / "overview"
    result = render_overview(image, out, slide_id="DSB", markers=NAMES, mask_path=mask, tile_size=TILE,
                             story=parse_story(STORY_YML), channel_layers=True)
    return out, result


def test_exhibit_carries_the_authored_story_in_minervas_keys(story_site):
    out, result = story_site
    assert result["waypoints"] == 2 and result["drafted"] is False
    exhibit = json.loads((out / "exhibit.json").read_text())
    image = exhibit["Images"][0]
    assert image["TileSize"] == [TILE, TILE]       # Minerva assumes 1024 without it
    assert [g["Name"] for g in exhibit["Groups"]] == ["Nuclei", "Bright"]
    assert exhibit["Groups"][0]["Colors"] == ["0000ff", "ff8000"]   # authored colours win
    # the slide's palette otherwise (the colour the channel has in the OME-TIFF and OME-Zarr)
    assert exhibit["Groups"][1]["Colors"] == [channel_colors(NAMES)[NAMES.index("Saturated")]]
    start, corner = exhibit["Stories"][0]["Waypoints"]
    assert start.keys() >= WAYPOINT_KEYS and corner.keys() >= WAYPOINT_KEYS
    # Minerva's viewport: the image is 1 high; µm -> px at 0.5 µm/px, then / 512 px
    assert start["Pan"] == [0.5, 0.5] and corner["Pan"] == [0.25, 0.75]
    assert corner["Group"] == "Bright" and corner["ActiveMasks"] == ["Cell outlines"] and start["ActiveMasks"] == []
    assert corner["Zoom"] == pytest.approx(4 * start["Zoom"])
    [arrow] = corner["Arrows"]
    assert arrow.keys() == ARROW_KEYS and arrow["Point"] == [0.3125, 0.78125] and arrow["Text"] == "nuclei"
    [box] = corner["Overlays"]
    assert box == {"x": 0.125, "y": 0.625, "width": 0.25, "height": 0.1875} and box.keys() == OVERLAY_KEYS
    # raw HTML in a description reaches Minerva Story (showdown, unsanitized) only as text
    assert start["Description"] == "Two groups &lt;b&gt;authored&lt;/b&gt;"


def test_channel_layers_are_grey_tiles_minerva_composites(story_site):
    out, result = story_site
    exhibit = json.loads((out / "exhibit.json").read_text())
    layers = exhibit["Channels"]
    assert [c["Name"] for c in layers] == NAMES and all(c.keys() == CHANNEL_KEYS for c in layers)
    assert all(c["Rendered"] is False for c in layers)
    assert layers[0]["Path"] == "DNA-1_0__DNA-1"     # Minerva Author's single-channel path
    assert result["tiles"] == 21 * (2 + 4 + 1)     # two groups, four channels, the outlines
    for layer in layers:
        tile = decode(out / "images" / layer["Path"] / "0_1_1.jpg").astype(int)
        assert tile.ndim == 3 and np.abs(tile[..., 0] - tile[..., 2]).max() <= 2  # grey: Minerva colours it
    assert decode(out / "images" / layers[1]["Path"] / "2_0_0.jpg").max() < 5       # the empty channel is black
    page = inlined_data(out)
    assert [c["name"] for c in page["channelLayers"]] == NAMES


def test_story_json_is_a_minerva_author_save_file(story_site):
    out, _ = story_site
    story = json.loads((out / "story.json").read_text())
    assert story.keys() >= AUTHOR_KEYS
    # Author opens in_file relative to where it runs and asks for it when missing; the image and
    # the mask it names are those this overview was rendered from
    assert (out / story["in_file"]).resolve().name == "image.ome.tif"
    assert (out / story["masks"][0]["path"]).resolve().name == "cell.ome.tif"
    start, corner = story["waypoints"]
    assert AUTHOR_WAYPOINT_KEYS == start.keys() == corner.keys()
    assert corner["group"] == "Bright" and corner["pan"] == [0.25, 0.75] and corner["masks"] == [0]
    assert corner["arrows"][0].keys() == AUTHOR_ARROW_KEYS and corner["arrows"][0]["position"] == [0.3125, 0.78125]
    assert corner["overlays"] == [[0.125, 0.625, 0.25, 0.1875]]
    assert [g["label"] for g in story["groups"]] == ["Nuclei", "Bright"]
    assert story["groups"][0]["channels"][1] == {**story["groups"][0]["channels"][1], "id": 3, "label": "CD45",
                                                  "color": "ff8000"}


def test_page_data_has_the_waypoints_in_pixels(story_site):
    out, _ = story_site
    waypoints = inlined_data(out)["story"]["waypoints"]
    assert [w["name"] for w in waypoints] == ["Start", "Corner"]
    corner = waypoints[1]
    assert corner["center"] == [128, 384] and corner["zoom"] == 4 and corner["group"] == 1 and corner["outlines"]
    assert corner["arrows"] == [{"at": [160, 400], "text": "nuclei"}] and corner["overlays"] == [[64, 320, 128, 96]]
    assert waypoints[0]["center"] == [256, 256] and waypoints[0]["outlines"] is False
    summary = json.loads((out / "summary.json").read_text())
    assert summary["markers"] == NAMES and summary["waypoints"] == 2 and summary["drafted"] is False
    assert (out / summary["thumbnail"]).is_file()


def test_a_story_that_does_not_fit_the_image_is_refused_before_rendering(images, tmp_path):
    from atlas.slide.story import parse_story

    image, mask = images
    story = parse_story(STORY_YML.replace("[64, 192]", "[64, 900]").replace("[Saturated]", "[Saturated, CD8]"))
    out = tmp_path / "overview"
    with pytest.raises(InvalidInput) as info:
        render_overview(image, out, slide_id="DSB", markers=NAMES, mask_path=mask, tile_size=TILE, story=story)
    messages = [str(p) for p in info.value.problems]
    assert any(m.startswith("story.yml: group 2 'Bright': channel(s) 'CD8' are not markers") for m in messages)
    assert any(m.startswith("story.yml: waypoint 2 'Corner': center_um [64, 900] is outside the image")
               and "x 0 to 256 µm, y 0 to 256 µm" in m for m in messages)
    assert list(tmp_path.iterdir()) == []


def test_drafted_story_without_a_cell_table_goes_where_the_group_is_bright(site):
    out, _ = site
    exhibit = json.loads((out / "exhibit.json").read_text())
    overview, *groups = exhibit["Stories"][0]["Waypoints"]
    assert overview["Name"] == "Overview" and overview["Pan"] == [0.5, 0.5]
    assert [w["Group"] for w in groups] == [g["Name"] for g in exhibit["Groups"]]
    # group 1 is DNA_1 + an all-zero channel: no signal to go to, the whole image; group 2
    # (Saturated, CD45 = the nuclei flipped left-right) goes where its nuclei are brightest
    assert groups[0]["Pan"] == [0.5, 0.5] and "no signal" in groups[0]["Description"]
    assert groups[1]["Zoom"] > overview["Zoom"] and "brightest" in groups[1]["Description"]
