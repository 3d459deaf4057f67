"""The Data Overviews portal: index.html + index.json at the overview site's root, after each release.

Releases go through :func:`atlas.aws.release.release_run` against moto's S3. Each released slide has a
real overview rendered from the DSB2018 nucleus image (so its thumbnail and page load for real);
its other data levels are small stand-in files (release and the portal do not read pixels). The
portal is then served from a copy of the site bucket and opened in Debian's chromium.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_overview_browser import ARTIFACTS, browser, served  # noqa: F401 - the fixture and the static server
from typer.testing import CliRunner

from atlas import layout
from atlas.aws import access
from atlas.aws.portal import INDEX_JSON, publish_portal, read_index
from atlas.aws.release import LATEST, release_run
from atlas.aws.s3 import S3Uri
from atlas.errors import InvalidInput
from atlas.science.overview import render_overview
from atlas.science.pyramid import write_ome_tiff_pyramid

BUCKETS = ("work", "results", "site")  # created by the shared s3 fixture
MARKERS = {"S1": ["DNA_1", "CD45"], "S2": ["DNA_1", "panCK"], "S3": ["DNA_1", "CD3"]}
INDEX_KEYS = {"slide_id", "run_id", "overview", "markers", "cells", "levels", "released", "download_cost_usd"}


@pytest.fixture(scope="module")
def overviews(shared_data, tmp_path_factory) -> dict[str, Path]:
    """A real rendered overview per slide (the DSB nuclei, a second channel per slide)."""
    root = tmp_path_factory.mktemp("portal-overviews")
    nuclei = tifffile.imread(shared_data / "segmentation" / "stardist_dsb2018" / "img2d.tif")
    found = {}
    for k, (slide, markers) in enumerate(MARKERS.items()):
        image = root / f"{slide}.ome.tif"
        write_ome_tiff_pyramid(image, np.stack([nuclei, np.rot90(nuclei, k + 1)]), channel_names=markers,
                               pixel_size_um=0.5, tile_size=256)
        render_overview(image, root / slide, slide_id=slide, markers=markers, tile_size=256)
        found[slide] = root / slide
    return found


def release(s3, tmp_path: Path, overviews: dict, slide: str, run_id: str, *, public: bool = True,
            portal: bool = True) -> None:
    """A run of ``slide`` with its real overview, staged to the work bucket and released."""
    out = tmp_path / run_id
    shutil.copytree(overviews[slide], out / layout.OVERVIEW)
    stand_ins = {layout.registration_tiff(slide): 300_000, f"{layout.SEGMENTATION}/unet-{slide}/cell.ome.tif": 50_000,
                 layout.table_path(slide, "unet", "cell"): 2_000, "qc/stitch/summary.json": 20}
    for rel, size in stand_ins.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(run_id.encode().ljust(size, b"."))
    paths = [p.relative_to(out).as_posix() for p in sorted(out.rglob("*")) if p.is_file()]
    files = [{"path": rel, "size": (out / rel).stat().st_size, "level": layout.level_of(rel),
              "sha256": hashlib.sha256((out / rel).read_bytes()).hexdigest()} for rel in paths]
    params = {"render": {"tile_size": 256}} | ({} if public else {"overview": {"public": False}})
    (out / layout.MANIFEST).write_text(json.dumps({"slide_id": slide, "run_id": run_id, "params": params,
                                                   "files": files}))
    work = S3Uri("work", f"{run_id}/")
    for path in sorted(out.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), "work", work.join(path.relative_to(out).as_posix()).key)
    release_run(s3, json.loads((out / layout.MANIFEST).read_text()), work=work, slide_id=slide, run_id=run_id,
                results_bucket="results", overview_bucket="site" if portal else None, public=public)


def site_copy(s3, target: Path) -> Path:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="site"):
        for obj in page.get("Contents", []):
            path = target / obj["Key"]
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file("site", obj["Key"], str(path))
    return target


def site_keys(s3) -> list[str]:
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="site")
            for o in page.get("Contents", [])]


def test_a_slide_made_private_leaves_the_portal(s3, tmp_path, overviews):
    release(s3, tmp_path, overviews, "S1", "S1-aaaaaaaaaaaa")
    release(s3, tmp_path, overviews, "S2", "S2-bbbbbbbbbbbb")
    release(s3, tmp_path, overviews, "S1", "S1-cccccccccccc", public=False)   # params.yml now overview.public: false
    assert [s["slide_id"] for s in index_of(s3)["slides"]] == ["S2"]
    assert not any(key.startswith("S1/S1-cccccccccccc/") for key in site_keys(s3))


def index_of(s3) -> dict:
    return json.loads(s3.get_object(Bucket="site", Key=INDEX_JSON)["Body"].read())


def test_each_release_rewrites_the_portal_with_every_public_slide(s3, tmp_path, overviews):
    release(s3, tmp_path, overviews, "S1", "S1-aaaaaaaaaaaa")
    assert [s["slide_id"] for s in index_of(s3)["slides"]] == ["S1"]
    release(s3, tmp_path, overviews, "S2", "S2-bbbbbbbbbbbb")
    release(s3, tmp_path, overviews, "S3", "S3-cccccccccccc", public=False)   # overview.public: false
    release(s3, tmp_path, overviews, "S1", "S1-dddddddddddd")                 # a newer release of S1
    index = index_of(s3)
    slides = {s["slide_id"]: s for s in index["slides"]}
    assert list(slides) == ["S1", "S2"]                    # S3 is not public; S1 only once, its latest run
    assert not any(key.startswith("S3/") for key in site_keys(s3))   # nor is its overview on the site
    s1 = slides["S1"]
    assert s1.keys() >= INDEX_KEYS and s1["run_id"] == "S1-dddddddddddd"
    assert s1["overview"] == "S1/S1-dddddddddddd/index.html" and s1["markers"] == MARKERS["S1"]
    assert s1["cells"] is None and s1["waypoints"] == 2    # no cell table in these overviews; drafted story
    latest = json.loads(s3.get_object(Bucket="results", Key=f"S1/{LATEST}")["Body"].read())
    assert s1["released"] == latest["released"]
    levels = {entry["folder"]: entry for entry in s1["levels"]}
    assert [(e["level"], e["folder"]) for e in s1["levels"]] == [(2, "registration"), (3, "segmentation"),
                                                                  (4, "quantification"), (5, "overview"), (None, "qc")]
    assert levels["registration"]["bytes"] == 300_000 and levels["registration"]["files"] == 1
    assert levels["registration"]["uri"] == "s3://results/S1/S1-dddddddddddd/registration/"
    assert levels["registration"]["command"] == ("aws s3 cp --recursive s3://results/S1/S1-dddddddddddd/registration/ "
                                                 "./S1/registration/ --request-payer requester --region us-east-1")
    # the cost is the one `atlas data cost` gives for the whole release
    release_ = access.get_release("S1", bucket="results", client=s3)
    estimate = access.estimate_cost(release_)
    assert s1["download_cost_usd"] == pytest.approx(estimate.scenarios[-1].total_usd, abs=1e-6)
    assert s1["download_cost_in_region_usd"] == pytest.approx(estimate.scenarios[0].total_usd, abs=1e-6)
    assert s1["bytes"] == release_.size and "us-east-1" in index["cost_note"]
    # the page inlines the same list (it also opens from disk) and its script and style are there
    html = s3.get_object(Bucket="site", Key="index.html")["Body"].read().decode()
    assert json.dumps(index, separators=(",", ":")).replace("</", "<\\/") in html
    assert s3.head_object(Bucket="site", Key="portal.js")["ContentType"] == "text/javascript"
    assert "http://" not in html and "https://" not in html      # nothing from a CDN


def test_a_release_finishing_meanwhile_is_not_lost(s3, tmp_path, overviews):
    """Two releases finishing together: the portal write of one may start from a list without the
    other. The writer reads the releases again after writing and rewrites until nothing changed."""
    release(s3, tmp_path, overviews, "S1", "S1-aaaaaaaaaaaa")
    release(s3, tmp_path, overviews, "S2", "S2-bbbbbbbbbbbb", portal=False)   # released, portal not yet rewritten
    put = s3.put_object
    raced = []

    def racing_put(**kwargs):
        if kwargs["Key"] == INDEX_JSON and not raced:  # S2's release lands between listing and writing
            raced.append(True)
            s3.delete_object(Bucket="results", Key=f"S2/{LATEST}")
            put(**kwargs)
            s3.put_object = put
            release(s3, tmp_path / "again", overviews, "S2", "S2-eeeeeeeeeeee", portal=False)
            return None
        return put(**kwargs)

    s3.delete_object(Bucket="results", Key=f"S2/{LATEST}")  # as if S2 were still being released
    s3.put_object = racing_put
    index = publish_portal(s3, results_bucket="results", overview_bucket="site")
    assert raced and [(s["slide_id"], s["run_id"]) for s in index["slides"]] == [("S1", "S1-aaaaaaaaaaaa"),
                                                                                ("S2", "S2-eeeeeeeeeeee")]
    assert index_of(s3) == index


def test_atlas_data_ls_reads_the_portal_index(s3, tmp_path, overviews):
    from atlas.cli import app

    release(s3, tmp_path, overviews, "S1", "S1-aaaaaaaaaaaa")
    release(s3, tmp_path, overviews, "S2", "S2-bbbbbbbbbbbb")
    site = site_copy(s3, tmp_path / "site")
    assert [s["slide_id"] for s in read_index(str(site))["slides"]] == ["S1", "S2"]
    result = CliRunner().invoke(app, ["data", "ls", "--index", str(site / INDEX_JSON)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for slide, run_id in (("S1", "S1-aaaaaaaaaaaa"), ("S2", "S2-bbbbbbbbbbbb")):
        line = next(line for line in result.output.splitlines() if slide in line)
        assert run_id in line and ", ".join(MARKERS[slide]) in line
    (tmp_path / "not-an-index.json").write_text("[1, 2]")
    bad = CliRunner().invoke(app, ["data", "ls", "--index", str(tmp_path / "not-an-index.json")])
    assert isinstance(bad.exception, InvalidInput)   # `atlas` prints it as one line and exits 1
    assert str(bad.exception).endswith("not-an-index.json: is not a portal index.json (no slides list) -- fix: give "
                                       "the portal's address (https://.../ or .../index.json) or a local copy of its "
                                       "index.json")


def test_portal_lists_two_released_slides_filters_and_its_links_load(browser, s3, tmp_path, overviews):  # noqa: F811
    release(s3, tmp_path, overviews, "S1", "S1-aaaaaaaaaaaa")
    release(s3, tmp_path, overviews, "S2", "S2-bbbbbbbbbbbb")
    site = site_copy(s3, tmp_path / "site")
    with served(site) as base:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base}/index.html")
        page.wait_for_function("window.atlasPortal !== undefined")
        assert page.evaluate("window.atlasPortal.shown()") == ["S1", "S2"]
        assert page.text_content("#shown") == "2 of 2 slides"
        page.wait_for_function("[...document.images].every(i => i.complete)")
        thumbnails = page.eval_on_selector_all("img.thumb",
                                               "is => is.map(i => [i.getAttribute('src'), i.naturalWidth])")
        assert [src.split("/")[0] for src, _ in thumbnails] == ["S1", "S2"] and all(w > 0 for _, w in thumbnails)
        links = page.eval_on_selector_all("article h2 a", "as => as.map(a => a.href)")
        assert [link.rsplit("/", 3)[1:] for link in links] == [["S1", "S1-aaaaaaaaaaaa", "index.html"],
                                                              ["S2", "S2-bbbbbbbbbbbb", "index.html"]]
        commands = page.eval_on_selector_all("code.command", "cs => cs.map(c => c.textContent)")
        assert "aws s3 cp --recursive s3://results/S1/S1-aaaaaaaaaaaa/registration/ ./S1/registration/ " \
               "--request-payer requester --region us-east-1" in commands
        assert "to the internet" in page.text_content("article .cost")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "portal.png"))

        page.fill("#filter", "PANCK")                      # by marker name, any case
        assert page.evaluate("window.atlasPortal.shown()") == ["S2"]
        page.fill("#filter", "s1")                         # by slide
        assert page.evaluate("window.atlasPortal.shown()") == ["S1"]
        page.fill("#filter", "")
        page.select_option("#marker", "CD45")
        assert page.evaluate("window.atlasPortal.shown()") == ["S1"]
        assert page.evaluate("location.hash") == "#marker=CD45"
        page.select_option("#marker", "")
        page.click("article[data-slide=S2] .chips button:text('panCK')")   # a marker chip filters too
        assert page.evaluate("window.atlasPortal.shown()") == ["S2"]
        page.fill("#filter", "nothing-like-this")
        assert page.is_visible("#empty")

        for link in links:                                # each overview opens and draws its tiles
            overview = context.new_page()
            overview.on("pageerror", lambda e: errors.append(str(e)))
            overview.goto(link)
            overview.wait_for_function("window.atlasOverview !== undefined")
            overview.evaluate("window.atlasOverview.ready")
            overview.wait_for_function("window.atlasOverview.viewer.world.getItemAt(0).getFullyLoaded()")
        page.goto(f"{base}/index.html#q=CD45")             # the filter is in the URL
        page.wait_for_function("window.atlasPortal !== undefined")
        assert page.evaluate("window.atlasPortal.shown()") == ["S1"] and page.input_value("#filter") == "CD45"
        context.close()
    assert errors == []
