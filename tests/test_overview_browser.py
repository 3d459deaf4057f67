"""The overview in a real browser: Debian's chromium, headless, driven by Playwright.

The site is served by a plain static HTTP server on localhost (as any static host would), and
the page must open without console errors, load its tiles, switch groups, toggle the outline
layer and zoom. Screenshots go to ``test-artifacts/`` (gitignored) for a person to look at.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``; never ``playwright install``).

Inputs: the real brain section of ``../shared/data/stitching/basicpy_wsi_brain`` placed at its
registered positions (a 2048 x 3072 px crop), with the DSB2018 nucleus image and its ground-truth
nuclei tiled over it as a second stain and as the cell mask; and the results of one full ``atlas run``
of the made sample slide (the session fixture ``sample_run``: with segmentation and quantification).

Stories: an authored story.yml with two waypoints, an arrow and a box on the brain section
(stepping with the buttons and the arrow keys, deep links), and hostile text (script, event
handlers, javascript: links) in a description, a waypoint name, an arrow text and a marker name.
"""
from __future__ import annotations

import functools
import http.server
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from atlas import layout
from atlas.science.overview import render_overview
from atlas.science.pyramid import write_ome_tiff_pyramid
from atlas.slide.fiji import read_tile_configuration

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
BRAIN_MARKERS = ["DNA_1", "Nuclei", "DNA_2", "Nuclei_2"]
BRAIN_CROP = np.s_[400:2448, 600:3672]  # 2048 x 3072 px of the section: 3 levels, 9 tiles per layer
VIEWPORT = {"width": 1280, "height": 800}
PANEL_WIDTH = 340  # px, from overview.css


def brain_mosaic(shared_data: Path) -> np.ndarray:
    """The 54 listed brain tiles pasted at Fiji's registered positions, (Y, X) uint16."""
    folder = shared_data / "stitching" / "basicpy_wsi_brain"
    entries = read_tile_configuration(folder / "TileConfiguration.registered.txt")
    x0, y0 = min(e.x for e in entries), min(e.y for e in entries)
    tiles = {e.name: tifffile.imread(folder / e.name) for e in entries}
    th, tw = next(iter(tiles.values())).shape
    mosaic = np.zeros((int(max(e.y - y0 for e in entries)) + th + 1, int(max(e.x - x0 for e in entries)) + tw + 1),
                      np.uint16)
    for e in entries:
        r, c = int(round(e.y - y0)), int(round(e.x - x0))
        mosaic[r:r + th, c:c + tw] = tiles[e.name]
    return mosaic


def tiled(plane: np.ndarray, shape: tuple[int, int], *, labels: bool = False) -> np.ndarray:
    """``plane`` repeated to cover ``shape``; label ids made unique per copy."""
    ny, nx = -(-shape[0] // plane.shape[0]), -(-shape[1] // plane.shape[1])
    out = np.tile(plane.astype(np.uint32 if labels else plane.dtype), (ny, nx))
    if labels:
        copy = np.kron(np.arange(ny * nx, dtype=np.uint32).reshape(ny, nx), np.ones(plane.shape, np.uint32))
        out = np.where(out > 0, out + copy * (int(plane.max()) + 1), 0)
    return np.ascontiguousarray(out[:shape[0], :shape[1]])


@pytest.fixture(scope="module")
def brain_results(shared_data, tmp_path_factory) -> Path:
    """A results folder whose overview/ was rendered from real images, with an outline layer."""
    root = tmp_path_factory.mktemp("brain")
    dsb = shared_data / "segmentation" / "stardist_dsb2018"
    mosaic = brain_mosaic(shared_data)[BRAIN_CROP]
    nuclei = tiled(tifffile.imread(dsb / "img2d.tif"), mosaic.shape) * np.uint16(100)
    image = np.stack([mosaic, nuclei, np.fliplr(mosaic), np.flipud(nuclei)])
    mask = tiled(tifffile.imread(dsb / "mask2d.tif"), mosaic.shape, labels=True)
    (root / "registration").mkdir()
    (root / "segmentation" / "truth-brain").mkdir(parents=True)
    write_ome_tiff_pyramid(root / "registration" / "brain.ome.tif", image, channel_names=BRAIN_MARKERS,
                           pixel_size_um=2.583)
    write_ome_tiff_pyramid(root / "segmentation" / "truth-brain" / "cell.ome.tif", mask, channel_names=["cell"],
                           pixel_size_um=2.583, labels=True)
    render_overview(root / "registration" / "brain.ome.tif", root / "overview", slide_id="brain",
                    markers=BRAIN_MARKERS, mask_path=root / "segmentation" / "truth-brain" / "cell.ome.tif")
    return root


@contextmanager
def served(root: Path, headers: dict[str, str] | None = None):
    """``root`` on a static HTTP server at http://127.0.0.1:<port>/ for the duration, adding ``headers``
    to every response (as the site's CloudFront response headers policy does)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def end_headers(self) -> None:
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            super().end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()


class Page:
    """A headless chromium page that records console errors and every response."""

    def __init__(self, page):
        self.page, self.errors, self.responses = page, [], []
        page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url}"))
        page.on("response", lambda r: self.responses.append((r.url, r.status)))

    def tiles(self, layer: str = "", ext: str = "jpg") -> list[tuple[str, int]]:
        return [(u, s) for u, s in self.responses if u.endswith("." + ext) and "/images/" + layer in u]

    def settle(self) -> None:
        """Wait until every tiled image in the viewer has loaded all the tiles it needs."""
        self.page.wait_for_function("""() => {
            const w = window.atlasOverview.viewer.world;
            for (let i = 0; i < w.getItemCount(); i++) {
                const item = w.getItemAt(i);
                if (item.getOpacity() > 0 && !item.getFullyLoaded()) return false;
            }
            return w.getItemCount() > 0;
        }""", timeout=30_000)
        self.page.wait_for_timeout(300)  # last frame drawn

    def shot(self, name: str) -> np.ndarray:
        """Screenshot to test-artifacts/<name>.png; returns the viewer area as an (H, W, 3) array."""
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return np.asarray(Image.open(path).convert("RGB"))[:, PANEL_WIDTH + 2:]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail("Debian's chromium is not installed: apt-get install -y chromium (the test setup does this)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@contextmanager
def opened(browser, url: str):
    context = browser.new_context(viewport=VIEWPORT)
    page = Page(context.new_page())
    page.page.goto(url)
    page.page.wait_for_function("window.atlasOverview !== undefined")
    page.page.evaluate("window.atlasOverview.ready")
    page.page.evaluate("""() => { window.tileFailures = [];
        window.atlasOverview.viewer.addHandler('tile-load-failed', e => window.tileFailures.push(e.message)); }""")
    try:
        yield page
    finally:
        context.close()


def yellow(pixels: np.ndarray) -> int:
    """Pixels of the outline colour (ffff00)."""
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    return int(((r > 200) & (g > 200) & (b < 90)).sum())


def test_overview_opens_switches_groups_and_toggles_outlines(browser, brain_results):
    with served(brain_results) as base, opened(browser, f"{base}/overview/index.html") as page:
        groups = page.page.evaluate("window.atlasOverview.viewer.world.getItemCount()")
        assert groups == 2  # the group and the (hidden) outline layer
        page.settle()
        first = page.tiles("Group-1_")
        assert first and all(status == 200 for _, status in first)
        assert page.tiles("Group-2_") == [] and page.tiles("cell-outlines", "png") == []
        view = page.shot("overview-brain-group1")
        assert view.mean() > 15                     # the slide is drawn, not a black canvas
        assert yellow(view) < 50

        page.page.check("#outline-toggle")
        page.settle()
        outlines = page.tiles("cell-outlines", "png")
        assert outlines and all(status == 200 for _, status in outlines)
        view = page.shot("overview-brain-outlines")
        assert yellow(view) > 1000                  # outlines drawn over the image
        page.page.uncheck("#outline-toggle")
        assert page.page.evaluate("window.atlasOverview.viewer.world.getItemAt(1).getOpacity()") == 0

        requested = len(page.responses)
        page.page.click("#groups .group >> nth=1")
        page.settle()
        second = [t for t in page.tiles("Group-2_") if page.responses.index(t) >= requested]
        assert second and all(status == 200 for _, status in second)
        assert page.page.evaluate("location.hash") == "#w=0&group=1"   # drafted story's first waypoint
        assert page.page.get_attribute("#groups .group >> nth=1", "aria-checked") == "true"
        page.shot("overview-brain-group2")

        page.page.evaluate("window.atlasOverview.viewer.viewport.zoomBy(6)")
        page.settle()
        full_resolution = [u for u, _ in page.tiles("Group-2_") if u.rsplit("/", 1)[1].startswith("0_")]
        assert full_resolution                      # level 0 (full resolution) tiles requested
        page.shot("overview-brain-zoomed")
        assert page.page.evaluate("window.tileFailures") == []
        assert page.errors == []
        assert page.page.text_content("#slide-id") == "brain"
        links = page.page.eval_on_selector_all("#data a", "els => els.map(e => e.getAttribute('href'))")
        assert links == []  # render_overview without a panel: no data section


def test_sample_slide_overview_in_browser(browser, sample_run):
    """The overview of a full run of the made sample slide, opened from its results folder (read only)."""
    slide_id = next((sample_run / layout.REGISTRATION).glob("*.ome.tif")).name.removesuffix(".ome.tif")
    [cell_mask] = (sample_run / layout.SEGMENTATION).glob(f"*-{slide_id}/cell.ome.tif")
    n_cells = len(np.unique(tifffile.imread(cell_mask, level=0))) - 1  # labels other than background
    with served(sample_run) as base, opened(browser, f"{base}/overview/index.html#group=1") as page:
        page.settle()
        assert page.page.get_attribute("#groups .group >> nth=1", "aria-checked") == "true"  # from the URL
        tiles = page.tiles("Group-2_")
        assert tiles and all(status == 200 for _, status in tiles)
        view = page.shot("overview-sample-group2")
        assert view.mean() > 5
        page.page.click("#groups .group >> nth=0")
        page.settle()
        assert page.tiles("Group-1_") and all(status == 200 for _, status in page.tiles("Group-1_"))
        view = page.shot("overview-sample-group1")
        assert yellow(view) < 50

        # segmentation: the outline layer, hidden until switched on
        assert page.page.evaluate("window.atlasOverview.viewer.world.getItemCount()") == 2
        assert page.page.is_visible("#outline-toggle")
        page.page.check("#outline-toggle")
        page.settle()
        outlines = page.tiles("cell-outlines", "png")
        assert outlines and all(status == 200 for _, status in outlines)
        assert yellow(page.shot("overview-sample-outlines")) > 1000
        # quantification: the cell count of the cell table, one row per segmented cell
        assert n_cells > 0
        assert page.page.text_content("#cell-count") == f"{n_cells:,} segmented cells"

        assert page.page.text_content("#slide-id") == slide_id
        links = page.page.eval_on_selector_all("#data a", "els => els.map(e => e.href)")
        for rel in (layout.registration_tiff(slide_id), cell_mask.relative_to(sample_run).as_posix(),
                    f"{layout.QUANTIFICATION}/{slide_id}--"):
            assert any(f"/{rel}" in link for link in links), (rel, links)
        for link in links:  # the data links resolve on the same server
            assert page.page.request.head(link).status == 200, link
        assert page.page.evaluate("window.tileFailures") == []
        assert page.errors == []


def test_overview_opens_from_disk(browser, brain_results, tmp_path):
    """Double-clicking index.html (file://) also works: the data is inlined, the viewer local."""
    site = Path(shutil.copytree(brain_results / "overview", tmp_path / "overview"))
    with opened(browser, site.joinpath("index.html").as_uri()) as page:
        page.settle()
        assert page.page.evaluate("window.tileFailures") == []
        assert page.errors == []
        assert page.shot("overview-brain-file").mean() > 15


# ---- stories ---------------------------------------------------------------------------------

BRAIN_PIXEL_UM = 2.583
BRAIN_STORY = """
waypoints:
  - name: The section
    description: "The whole **brain** section."
  - name: Lower right
    description: |
      Nuclei of the *second* stain.

      | a | b |
      | - | - |
      | 1 | 2 |
    group: Group 2
    center_um: [5800, 3900]
    zoom: 3
    arrows: [{at_um: [5600, 3700], text: dense nuclei}]
    overlays: [{box_um: [5300, 3500, 900, 700]}]
    masks: [Cell outlines]
"""


@pytest.fixture(scope="module")
def brain_story(brain_results, tmp_path_factory) -> Path:
    """The brain overview again, with the authored story (tiles are those of brain_results)."""
    from atlas.slide.story import parse_story

    root = tmp_path_factory.mktemp("brain-story")
    render_overview(brain_results / "registration" / "brain.ome.tif", root / "overview", slide_id="brain",
                    markers=BRAIN_MARKERS, mask_path=brain_results / "segmentation" / "truth-brain" / "cell.ome.tif",
                    story=parse_story(BRAIN_STORY))
    return root


def view_of(page) -> dict:
    """The viewport's centre (image px) and zoom relative to home, and what the story panel says."""
    return page.page.evaluate("""() => {
        const o = window.atlasOverview, v = o.viewer.viewport, item = o.viewer.world.getItemAt(0);
        const c = item.viewportToImageCoordinates(v.getCenter(true));
        return {x: c.x, y: c.y, zoom: v.getZoom(true) / v.getHomeZoom(), w: o.state.w, group: o.state.group,
                outlines: o.state.outlines, name: document.getElementById('wp-name').textContent,
                count: document.getElementById('wp-count').textContent, hash: location.hash};
    }""")


def wait_still(page) -> None:
    """Until the viewport stops moving (a waypoint animates there)."""
    page.page.wait_for_function("""() => { const v = window.atlasOverview.viewer.viewport;
        return Math.abs(v.getZoom(true) - v.getZoom(false)) < 1e-6
            && v.getCenter(true).distanceTo(v.getCenter(false)) < 1e-6; }""", timeout=10_000)
    page.settle()


def screen_box(page, selector: str) -> dict:
    return page.page.eval_on_selector(selector, "e => { const r = e.getBoundingClientRect(); "
                                                "return {x: r.left, y: r.top, right: r.right, bottom: r.bottom}; }")


def image_to_screen(page, x: float, y: float) -> dict:
    return page.page.evaluate("""([x, y]) => { const o = window.atlasOverview, item = o.viewer.world.getItemAt(0);
        const p = o.viewer.viewport.pixelFromPoint(item.imageToViewportCoordinates(x, y), true);
        const r = o.viewer.element.getBoundingClientRect();
        return {x: p.x + r.left, y: p.y + r.top}; }""", [x, y])


def test_story_steps_through_waypoints_with_buttons_and_keys(browser, brain_story):
    px = BRAIN_PIXEL_UM
    with served(brain_story) as base, opened(browser, f"{base}/overview/index.html") as page:
        page.settle()
        start = view_of(page)
        assert (start["w"], start["name"], start["count"], start["group"]) == (0, "The section", "1 / 2", 0)
        assert start["zoom"] == pytest.approx(1, abs=1e-3) and start["hash"] == "#w=0&group=0"
        assert page.page.inner_html("#wp-description") == "<p>The whole <strong>brain</strong> section.</p>\n"
        assert page.page.is_disabled("#wp-prev") and not page.page.is_disabled("#wp-next")
        assert page.page.locator(".wp-arrow, .wp-box").count() == 0
        plain = page.shot("story-brain-waypoint1")

        page.page.click("#wp-next")
        wait_still(page)
        second = view_of(page)
        assert (second["w"], second["name"], second["count"], second["group"], second["outlines"]) == \
            (1, "Lower right", "2 / 2", 1, True)
        assert (second["x"], second["y"]) == pytest.approx((5800 / px, 3900 / px), abs=1.0)   # µm -> px
        assert second["zoom"] == pytest.approx(3, rel=1e-3)
        assert second["hash"] == "#w=1&group=1&outlines=1"
        assert page.page.locator("#wp-description em").inner_text() == "second"
        assert page.page.locator("#wp-description table td").all_inner_texts() == ["1", "2"]   # GFM table
        # the arrow's tip and the box sit where story.yml put them, in screen pixels
        assert page.page.locator(".wp-arrow").count() == 1 and page.page.locator(".wp-box").count() == 1
        assert page.page.locator(".wp-arrow-text").inner_text() == "dense nuclei"
        tip, arrow = image_to_screen(page, 5600 / px, 3700 / px), screen_box(page, ".wp-arrow")
        assert (arrow["right"], arrow["bottom"]) == pytest.approx((tip["x"], tip["y"]), abs=2)
        top_left = image_to_screen(page, 5300 / px, 3500 / px)
        bottom_right = image_to_screen(page, (5300 + 900) / px, (3500 + 700) / px)
        box = screen_box(page, ".wp-box")
        assert (box["x"], box["y"], box["right"], box["bottom"]) == pytest.approx(
            (top_left["x"], top_left["y"], bottom_right["x"], bottom_right["y"]), abs=2)
        view = page.shot("story-brain-waypoint2")
        assert view.mean() > 15
        # the box is drawn: its white border is in the screenshot, one pixel inside its edge
        row = int(round(box["y"])) + 1
        left, right = int(round(box["x"])) - PANEL_WIDTH - 2, int(round(box["right"])) - PANEL_WIDTH - 2
        assert (view[row, left + 2:right - 2] > 200).all(axis=-1).mean() > 0.9
        assert yellow(view) > 1000                       # the waypoint turned the outlines on
        assert page.page.is_disabled("#wp-next")

        page.page.keyboard.press("ArrowLeft")            # back, by key; the viewer does not pan as well
        wait_still(page)
        back = view_of(page)
        assert (back["w"], back["group"], back["outlines"]) == (0, 0, False)
        assert (back["x"], back["y"], back["zoom"]) == pytest.approx((start["x"], start["y"], 1), abs=1e-3)
        assert page.page.locator(".wp-arrow, .wp-box").count() == 0
        page.page.keyboard.press("ArrowRight")
        wait_still(page)
        assert view_of(page)["w"] == 1 and page.page.locator(".wp-box").count() == 1
        page.page.keyboard.press("ArrowRight")          # past the last waypoint: stays
        assert view_of(page)["w"] == 1
        assert np.abs(page.shot("story-brain-key").astype(int) - plain.astype(int)).mean() > 5
        assert page.page.evaluate("window.tileFailures") == []
        assert page.errors == []


def test_deep_link_opens_the_waypoint(browser, brain_story):
    with served(brain_story) as base, opened(browser, f"{base}/overview/index.html#w=1") as page:
        page.settle()
        wait_still(page)
        view = view_of(page)
        assert (view["w"], view["name"], view["group"], view["outlines"]) == (1, "Lower right", 1, True)
        assert (view["x"], view["y"]) == pytest.approx((5800 / BRAIN_PIXEL_UM, 3900 / BRAIN_PIXEL_UM), abs=1.0)
        assert view["zoom"] == pytest.approx(3, rel=1e-3)
        assert page.page.locator(".wp-arrow").count() == 1 and page.page.locator(".wp-box").count() == 1
        assert page.tiles("Group-2_") and not page.tiles("Group-1_")   # only the waypoint's group is loaded
        page.shot("story-brain-deeplink")
        assert page.errors == []


HOSTILE = [
    '<script>window.pwned = "script"</script>',
    '<img src="x-img" onerror="window.pwned = \'img\'">',
    '[click me](javascript:window.pwned=\'link\')',
    '<a href="javascript:window.pwned=\'a\'">a</a>',
    '<iframe src="javascript:window.pwned=\'iframe\'"></iframe>',
    '<svg onload="window.pwned = \'svg\'"></svg>',
    '[ref]\n\n[ref]: javascript:window.pwned=\'ref\'',
]
HOSTILE_MARKER = '<img src="x-marker" onerror="window.pwned = \'marker\'">'


@pytest.fixture(scope="module")
def hostile_sites(shared_data, tmp_path_factory) -> Path:
    """Two overviews of the DSB nuclei with a hostile marker name: one with a hostile authored
    story (description, waypoint name, arrow text), one drafted (the marker name in the text)."""
    from atlas.slide.story import Arrow, Story, Waypoint

    root = tmp_path_factory.mktemp("hostile")
    nuclei = tifffile.imread(shared_data / "segmentation" / "stardist_dsb2018" / "img2d.tif")
    markers = ["DNA_1", HOSTILE_MARKER]
    write_ome_tiff_pyramid(root / "image.ome.tif", np.stack([nuclei, np.flipud(nuclei)]), channel_names=["a", "b"],
                           pixel_size_um=1.0, tile_size=256)
    story = Story((), (
        Waypoint("Start", "\n\n".join(HOSTILE)),
        Waypoint('<img src="x-name" onerror="window.pwned = \'name\'">', "*fine*", center_um=(200, 200), zoom=2,
                 arrows=(Arrow((210, 210), '<b onmouseover="window.pwned = 1">arrow</b>'),)),
    ))
    render_overview(root / "image.ome.tif", root / "authored", slide_id="hostile", markers=markers, story=story,
                    tile_size=256)
    render_overview(root / "image.ome.tif", root / "drafted", slide_id="hostile", markers=markers, tile_size=256)
    return root


def injected(page) -> dict:
    return page.page.evaluate("""() => ({
        pwned: window.pwned === undefined ? null : String(window.pwned),
        scripts: [...document.scripts].filter(s => s.src === '' && s.id !== 'atlas-data').length,
        handlers: [...document.querySelectorAll('*')].filter(
            e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
        images: document.querySelectorAll('img[src^="x-"]').length,
        frames: document.querySelectorAll('iframe, object, embed').length,
        jsLinks: [...document.querySelectorAll('[href], [src]')].filter(
            e => /^\\s*javascript:/i.test(e.getAttribute('href') || e.getAttribute('src') || '')).length,
        bold: document.querySelectorAll('#panel b, .wp-arrow b').length,
    })""")


def test_hostile_story_text_and_marker_names_stay_text(browser, hostile_sites):
    clean = {"pwned": None, "scripts": 0, "handlers": 0, "images": 0, "frames": 0, "jsLinks": 0, "bold": 0}
    with served(hostile_sites) as base:
        with opened(browser, f"{base}/authored/index.html") as page:
            page.settle()
            description = page.page.inner_text("#wp-description")
            for needle in ("<script>", 'onerror="window.pwned', "<iframe", "<svg onload"):
                assert needle in description                   # shown as the text it is
            links = page.page.eval_on_selector_all("#wp-description a", "es => es.map(e => [e.textContent, e.href])")
            assert links == [["click me", ""], ["ref", ""]]    # the markdown links, without their javascript: href
            assert HOSTILE_MARKER in page.page.inner_text("#markers")
            assert HOSTILE_MARKER in page.page.inner_text("#groups")
            page.page.click("#wp-next")
            wait_still(page)
            assert page.page.inner_text("#wp-name").startswith('<img src="x-name"')
            assert page.page.inner_text(".wp-arrow-text") == '<b onmouseover="window.pwned = 1">arrow</b>'
            page.page.hover(".wp-arrow-text", force=True)
            page.page.keyboard.press("ArrowLeft")
            page.page.wait_for_timeout(500)
            assert injected(page) == clean
            assert page.errors == []
        with opened(browser, f"{base}/drafted/index.html#w=1") as page:
            page.settle()
            assert HOSTILE_MARKER in page.page.inner_text("#wp-description")   # the drafted text names it
            assert HOSTILE_MARKER in page.page.inner_text("#wp-name")
            page.page.wait_for_timeout(500)
            assert injected(page) == clean
            assert page.errors == []


# ---- single-channel layers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def channel_site(shared_data, tmp_path_factory) -> Path:
    """The DSB nuclei and the nuclei flipped, with render.channel_layers: one grey layer per channel."""
    root = tmp_path_factory.mktemp("channels")
    nuclei = tifffile.imread(shared_data / "segmentation" / "stardist_dsb2018" / "img2d.tif")
    write_ome_tiff_pyramid(root / "image.ome.tif", np.stack([nuclei, np.fliplr(nuclei)]),
                           channel_names=["DNA_1", "CD45"], pixel_size_um=1.0, tile_size=256)
    render_overview(root / "image.ome.tif", root / "overview", slide_id="channels", markers=["DNA_1", "CD45"],
                    tile_size=256, channel_layers=True)
    return root


def colours(view: np.ndarray) -> tuple[float, float, float]:
    """Mean red, green, blue of the bright pixels of a view."""
    bright = view[view.max(axis=-1) > 60].astype(float)
    return tuple(bright.mean(axis=0)) if bright.size else (0.0, 0.0, 0.0)


def test_channel_layers_toggle_and_recolour_in_the_page(browser, channel_site):
    with served(channel_site) as base, opened(browser, f"{base}/overview/index.html") as page:
        page.settle()
        assert page.page.is_visible("#channels-section")
        grouped = page.shot("channels-group")
        r, g, b = colours(grouped)
        assert r > g + 20 and abs(g - b) < 5            # DNA_1 white + CD45 red (the group's colours)

        page.page.check("#channel-mode")
        page.page.wait_for_function("window.atlasOverview.channels.every(c => c.item)")
        page.settle()
        layers = page.tiles("DNA-1_0__DNA-1") + page.tiles("CD45_1__CD45")
        assert layers and all(status == 200 for _, status in layers)
        assert page.page.evaluate("window.atlasOverview.viewer.world.getItemAt(0).getOpacity()") == 0

        page.page.uncheck("#channel-list li:nth-child(2) input[type=checkbox]")   # CD45 off: DNA_1 alone, white
        page.settle()
        r, g, b = colours(page.shot("channels-dna-white"))
        assert min(r, g, b) > 100 and max(r, g, b) - min(r, g, b) < 15

        page.page.fill("#channel-list li:nth-child(1) input[type=color]", "#00ff00")  # recolour DNA_1 green
        page.page.wait_for_timeout(500)
        page.settle()
        r, g, b = colours(page.shot("channels-dna-green"))
        assert g > 100 and r < 30 and b < 30

        page.page.check("#channel-list li:nth-child(2) input[type=checkbox]")     # CD45 back, in red: they add up
        page.settle()
        both = page.shot("channels-green-red")
        r, g, b = colours(both)
        assert r > 40 and g > 40 and b < 30
        assert ((both[..., 0] > 150) & (both[..., 1] > 150)).sum() > 100        # yellow where both are bright

        page.page.uncheck("#channel-mode")                                        # back to the group
        page.settle()
        assert np.abs(page.shot("channels-group-again").astype(int) - grouped.astype(int)).mean() < 2
        assert page.page.evaluate("window.tileFailures") == []
        assert page.errors == []
