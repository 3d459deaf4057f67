"""Stories: story.yml parsed and checked (alone and in `atlas validate`), and the drafted story.

Real data: the made sample slide (validation against its markers and the extent of its tiles;
the full run's cell table for drafting) and the steinbock IMC ROI with its DeepCell cell table
(real cells and intensities) for drafting on a table not made by this project.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from test_ops import cloud  # noqa: F401 - the emulated deployment (fixture)
from typer.testing import CliRunner

from atlas import layout
from atlas.errors import InvalidInput
from atlas.science.overview.exhibit import make_groups
from atlas.science.overview.story import CellTable, draft_story, md_escape
from atlas.slide.convention import write_manifest
from atlas.slide.story import STORY, Story, check_story, dump_story, parse_story, validate_story_text
from atlas.slide.validate import validate_slide

MARKERS = ["DNA_1", "CD45", "panCK", "DNA_2", "CD3", "aSMA"]   # the sample slide's
GOOD = """
groups:
  - {name: Immune, channels: [DNA_1, CD45, CD3], colors: [ffffff, ff0000, 00ff00]}
waypoints:
  - name: Whole slide
    description: The sample.
  - name: Immune border
    description: "**CD45** cells gather at the border."
    group: Immune
    center_um: [300, 250]
    zoom: 4
    arrows: [{at_um: [310, 260], text: "immune cells"}]
    overlays: [{box_um: [250, 200, 120, 90]}]
    masks: [Cell outlines]
"""


def problems_of(text: str, extent=(900.0, 900.0), image_px=(1400, 1400)) -> list[str]:
    try:
        validate_story_text(text, markers=MARKERS, per_group=4, extent_um=extent, image_px=image_px)
    except InvalidInput as exc:
        return [str(p) for p in exc.problems]
    return []


def test_good_story_parses_and_round_trips():
    story = parse_story(GOOD)
    assert problems_of(GOOD) == []
    assert [g.name for g in story.groups] == ["Immune"] and story.groups[0].colors == ("ffffff", "ff0000", "00ff00")
    border = story.waypoints[1]
    assert (border.center_um, border.zoom, border.group, border.masks) == ((300, 250), 4, "Immune", ("Cell outlines",))
    assert border.arrows[0].at_um == (310, 260) and border.overlays[0].box_um == (250, 200, 120, 90)
    assert story.waypoints[0].group is None and story.waypoints[0].center_um is None   # defaults: first group, centre
    assert parse_story(dump_story(story, "a comment")) == story


BROKEN = [
    ("waypoints: [{name: A", r"story\.yml: not valid YAML \(.*line 1.*-- fix: fix the YAML syntax"),
    ("groups: []\n", r"story\.yml: the file: missing 'waypoints'"),
    ("waypoints: []\n", r"story\.yml: waypoints: must be a list of at least one waypoint"),
    ("waypoints: [{name: A, colour: red}]", r"story\.yml: waypoint 1: unknown key 'colour' -- fix: use only name, "),
    ("waypoints: [{description: x}]", r"story\.yml: waypoint 1: missing 'name' -- fix: give it a name"),
    ("waypoints: [{name: A, group: Immune2}]",
     r"story\.yml: waypoint 1 'A': group 'Immune2' is not a channel group of this slide -- fix: use one of: Group 1, "
     r"Group 2 \(or define groups: in story\.yml\)"),
    ("waypoints: [{name: A, center_um: [5000, 10]}]",
     r"story\.yml: waypoint 1 'A': center_um \[5000, 10\] is outside the image -- fix: give a point inside the "
     r"image: x 0 to 900 µm, y 0 to 900 µm"),
    ("waypoints: [{name: A, center_um: [5, ten]}]", r"story\.yml: waypoint 1 'A': center_um\[1\]: must be a number"),
    ("waypoints: [{name: A, zoom: 0}]", r"story\.yml: waypoint 1 'A': zoom 0 must be above 0"),
    ("waypoints: [{name: A, zoom: 100}]", r"story\.yml: waypoint 1 'A': zoom 100 is beyond full resolution .* -- "
                                          r"fix: use a zoom of at most 14\.0"),
    ("waypoints: [{name: A, arrows: [{at_um: [10, 950], text: x}]}]",
     r"story\.yml: waypoint 1 'A': arrow 1: at_um \[10, 950\] is outside the image"),
    ("waypoints: [{name: A, overlays: [{box_um: [800, 10, 200, 50]}]}]",
     r"story\.yml: waypoint 1 'A': overlay 1 box_um \[800, 10, 200, 50\] reaches outside the image"),
    ("waypoints: [{name: A, overlays: [{box_um: [8, 10, 0, 50]}]}]",
     r"story\.yml: waypoint 1 'A': overlay 1 has width 0 and height 50 -- fix: give a box with positive width"),
    ("waypoints: [{name: A, masks: [Nuclei]}]",
     r"story\.yml: waypoint 1 'A': mask\(s\) 'Nuclei' are not layers of the overview -- fix: use 'Cell outlines'"),
    ("groups: [{name: G, channels: [DNA_1, CD8]}]\nwaypoints: [{name: A, group: G}]",
     r"story\.yml: group 1 'G': channel\(s\) 'CD8' are not markers of this slide -- fix: use marker names from "
     r"markers\.csv: DNA_1, CD45"),
    ("groups: [{name: G, channels: [DNA_1, CD45], colors: [ffffff]}]\nwaypoints: [{name: A}]",
     r"story\.yml: group 1 'G': has 2 channels but 1 colors -- fix: give one colour per channel"),
    ("groups: [{name: G, channels: [DNA_1], colors: [red]}]\nwaypoints: [{name: A}]",
     r"story\.yml: group 1 'G': colors \['red'\] are not 6-digit hex colours"),
    ("groups: [{name: G, channels: [CD3]}, {name: G, channels: [CD45]}]\nwaypoints: [{name: A}]",
     r"story\.yml: group 2 'G': has the same name as an earlier group"),
]


@pytest.mark.parametrize("text, expected", BROKEN, ids=[re.sub(r"\W+", "-", t)[:40] for t, _ in BROKEN])
def test_each_broken_story_names_the_file_the_place_and_the_fix(text, expected):
    found = problems_of(text)
    assert any(re.search(expected, p) for p in found), found


def test_every_problem_is_reported_at_once():
    text = ("groups: [{name: G, channels: [CD8]}]\nwaypoints:\n  - {name: A, group: H}\n"
            "  - {name: B, center_um: [-1, 0]}\n")
    found = problems_of(text)
    assert len(found) == 3 and all(p.startswith("story.yml: ") for p in found)


def test_automatic_group_names_come_from_channels_per_group():
    story = parse_story("waypoints: [{name: A, group: Group 3}]")
    assert check_story(story, markers=MARKERS, per_group=4, extent_um=None) != []   # two groups (one per DNA)
    assert check_story(story, markers=MARKERS, per_group=2, extent_um=None) == []   # four groups


def slide_hashes(slide: Path) -> dict[str, str]:
    return {p.relative_to(slide).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(slide.rglob("*")) if p.is_file()}


def test_atlas_validate_checks_story_yml_against_the_slide(slide_copy):
    from atlas.cli import app

    (slide_copy / STORY).write_text(GOOD)
    write_manifest(slide_copy)
    assert validate_slide(slide_copy) == []
    (slide_copy / STORY).write_text(GOOD.replace("[300, 250]", "[3000, 250]").replace("CD3]", "CD8]"))
    write_manifest(slide_copy)
    before = slide_hashes(slide_copy)
    result = CliRunner().invoke(app, ["validate", str(slide_copy)])
    assert result.exit_code == 1
    assert "✗ story.yml: waypoint 2 'Immune border': center_um [3000, 250] is outside the image" in result.output
    assert "x 0 to 932 µm, y 0 to 932 µm" in result.output    # the stitched extent, from the tiles' positions
    assert "✗ story.yml: group 1 'Immune': channel(s) 'CD8' are not markers of this slide" in result.output
    assert slide_hashes(slide_copy) == before                 # validation never touches the slide


def test_atlas_validate_reports_a_story_that_is_not_yaml(slide_copy):
    (slide_copy / STORY).write_text("waypoints:\n  - name: [unclosed\n")
    write_manifest(slide_copy)
    found = [str(p) for p in validate_slide(slide_copy)]
    assert len(found) == 1 and found[0].startswith("story.yml: not valid YAML")


# ---- drafting -------------------------------------------------------------------------------

IMC = "20210305_NE_mockData2_001"


@pytest.fixture(scope="module")
def imc(shared_data):
    """The steinbock ROI: its channels, its DeepCell cell table (centroids + mean intensities)."""
    folder = shared_data / "quantification" / "steinbock_imc"
    image = tifffile.imread(folder / "img" / f"{IMC}.tiff")
    intensities = pd.read_csv(folder / "intensities_deepcell" / f"{IMC}.csv")
    props = pd.read_csv(folder / "regionprops_deepcell" / f"{IMC}.csv")
    assert list(intensities["Object"]) == list(props["Object"])
    names = list(intensities.columns[1:])
    cells = CellTable(props["centroid-1"].to_numpy(), props["centroid-0"].to_numpy(),
                      intensities[names].to_numpy(np.float32))
    return image, names, cells


def draft_imc(imc, per_group: int = 2) -> tuple[Story, list]:
    image, names, cells = imc
    ranges = [(float(np.percentile(p, 1)), float(np.percentile(p, 99.9))) for p in image]
    groups = make_groups(names, ranges, per_group)
    story = draft_story(groups=groups, width=image.shape[2], height=image.shape[1], pixel_size_um=1.0,
                        header="IMC ROI", cells=cells)
    return story, groups


def test_drafted_story_has_an_overview_then_one_waypoint_per_group(imc):
    story, groups = draft_imc(imc)
    assert story.groups == () and len(story.waypoints) == len(groups) + 1
    overview, *per_group = story.waypoints
    assert overview.name == "Overview" and overview.zoom == 1 and overview.description.startswith("IMC ROI")
    assert [w.group for w in per_group] == [g.name for g in groups]
    image, names, cells = imc
    assert problems_of_story(story, names, image) == []     # a drafted story passes its own checks


def problems_of_story(story: Story, names: list[str], image: np.ndarray) -> list:
    return check_story(story, markers=names, per_group=2, extent_um=(image.shape[2], image.shape[1]),
                       image_px=(image.shape[2], image.shape[1]))


def test_drafted_views_hold_more_marker_high_cells_than_the_slide(imc):
    """Each group's view is where its markers are enriched: its share of marker-high cells (the
    number the description reports) is above the slide's, and the numbers match the table."""
    story, groups = draft_imc(imc)
    image, names, cells = imc
    for waypoint in story.waypoints[1:]:
        text = waypoint.description
        found = re.search(r"\*\*(\d+)\*\* of the \*\*(\d+)\*\* cells in view .* "
                          r"\(\*\*(\d+)%\*\*; slide: (\d+)% of (\d+) cells\)", text)
        assert found, text
        high, in_view, share, slide_share, total = map(int, found.groups())
        assert total == cells.x.size and 0 < high <= in_view < total
        assert share > slide_share
        assert "| Marker | High in view | High on slide | Mean in view | Mean on slide |" in text
        cx, cy = waypoint.center_um
        assert 0 <= cx <= image.shape[2] and 0 <= cy <= image.shape[1] and waypoint.zoom == 2  # 55 cells: zoom 2


def test_drafted_story_is_deterministic(imc):
    first, _ = draft_imc(imc)
    second, _ = draft_imc(imc)
    assert dump_story(first) == dump_story(second)


def test_marker_names_are_literal_in_drafted_markdown():
    assert md_escape("CD8_a*") == "CD8\\_a\\*" and md_escape("<b>") == "\\<b\\>"


def test_story_draft_cli_prints_the_story_the_run_rendered(sample_run):
    """`atlas story draft RESULTS` prints what the render stage drafted (same waypoints and numbers),
    as story.yml that validates and renders back."""
    from atlas.cli import app

    result = CliRunner().invoke(app, ["story", "draft", str(sample_run)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# story.yml drafted from")
    story = parse_story(result.output)
    html = (sample_run / layout.OVERVIEW / layout.OVERVIEW_PAGE).read_text()
    page = json.loads(re.search(r'<script id="atlas-data" type="application/json">(.*?)</script>', html, re.S)[1])
    rendered = page["story"]["waypoints"]
    assert page["story"]["drafted"] is True
    assert [w.name for w in story.waypoints] == [w["name"] for w in rendered]
    assert [w.description for w in story.waypoints] == [w["description"] for w in rendered]
    pixel = page["panel"]["image"]["pixelSizeUm"]
    for waypoint, shown in zip(story.waypoints, rendered, strict=True):
        assert waypoint.center_um == pytest.approx([v * pixel for v in shown["center"]], abs=0.06)
    assert len(story.waypoints) == 1 + len(page["exhibit"]["Groups"])   # overview + one per group
    assert "cells in view" in story.waypoints[1].description


# ---- atlas rerun --story ------------------------------------------------------------------------

def test_rerun_from_render_with_a_new_story(cloud, sample_slide, tmp_path):  # noqa: F811 - the fixture
    """`atlas rerun SLIDE --from render --story FILE`: a copy of the slide listing the new story.yml,
    the earlier stages reused; a story that does not fit the slide, or one the rerun would not
    render, starts nothing."""
    import boto3
    from test_ops import cli, finish_job, finish_stitching, objects, table, tell

    from atlas.aws import ops
    from atlas.aws.s3 import S3Uri
    from atlas.aws.store import S3Store
    from atlas.pipeline.runner import reads_slide, slide_entries
    from atlas.slide.convention import SLIDE_MANIFEST, parse_manifest
    from atlas.stages import get_stage
    from atlas.storage import JobView

    # the emulated cloud of tests/test_ops.py: the sample slide uploaded and its run started
    slide_id = sample_slide.name
    old = ops.slide_status(slide_id, table=table(cloud)).run_id
    tell(cloud, old, "RUNNING")
    finish_stitching(cloud, tmp_path, slide_id, old)
    for item in range(4):
        finish_job(cloud, tmp_path, slide_id, old, "segment", item)
    finish_job(cloud, tmp_path, slide_id, old, "segment")   # the merge
    for item in range(2):
        finish_job(cloud, tmp_path, slide_id, old, "quantify", item)
    finish_job(cloud, tmp_path, slide_id, old, "quantify")   # the merge
    tell(cloud, old, "SUCCEEDED")

    bad = tmp_path / "bad.yml"
    bad.write_text("waypoints: [{name: A, group: Immune}]\n")
    refused = cli("rerun", slide_id, "--from", "render", "--story", str(bad))
    assert isinstance(refused.exception, InvalidInput)
    assert f"{bad}: waypoint 1 'A': group 'Immune' is not a channel group of this slide" in str(refused.exception)
    good = tmp_path / "story.yml"
    good.write_text(GOOD)
    late = cli("rerun", slide_id, "--from", "publish", "--story", str(good))
    assert isinstance(late.exception, InvalidInput) and "rerun --from render" in str(late.exception)
    assert ops.slide_status(slide_id, table=table(cloud)).run_id == old      # nothing was started

    shown = cli("rerun", slide_id, "--from", "render", "--story", str(good))
    assert shown.exit_code == 0, shown.output
    assert f"with {good}" in shown.output
    status = ops.slide_status(slide_id, table=table(cloud))
    payload = json.loads(boto3.client("stepfunctions").describe_execution(
        executionArn=status.execution_arn)["input"])
    assert payload["slide_uri"] == f"s3://{cloud.settings.work_bucket}/{ops.RERUN_PREFIX}/{status.run_id}/{slide_id}/"
    files = objects(payload["slide_uri"])
    assert files[STORY] == GOOD.encode()
    assert STORY in {e.path for e in parse_manifest(files[SLIDE_MANIFEST].decode())}
    assert STORY not in objects(f"s3://{cloud.ingest_bucket}/{slide_id}/")   # the lab's upload is unchanged
    reused = objects(payload["work_uri"])
    assert "qc/quantify/job.txt" in reused and not any(k.startswith("overview/") for k in reused)
    # the render job reads the new story from the slide copy, as its declared input
    render = get_stage("render").jobs()[0]
    slide = JobView(S3Store(boto3.client("s3"), S3Uri.parse(payload["slide_uri"])),
                    slide_entries(S3Store(boto3.client("s3"), S3Uri.parse(payload["slide_uri"]))),
                    readable=lambda rel: reads_slide(render, rel), writable=lambda rel: False)
    assert slide.read_text(STORY) == GOOD
