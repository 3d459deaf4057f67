"""``atlas validate`` on the made sample and on broken copies of it.

The broken copies stand for the upload mistakes labs make: a transfer cut short, a markers.csv
that does not match the cycles, a manifest written before a file was added, a file replaced
after the manifest, a spreadsheet exported in the wrong shape.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atlas.cli import app
from atlas.errors import InvalidInput
from atlas.slide.convention import parse_markers, run_id_for, write_manifest
from atlas.slide.validate import validate_slide


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def first_cycle(slide: Path) -> Path:
    return sorted((slide / "raw").glob("*.ome.tif"))[0]


def test_sample_slide_is_valid(sample_slide):
    assert validate_slide(sample_slide) == []
    result = CliRunner().invoke(app, ["validate", str(sample_slide)])
    assert result.exit_code == 0, result.output
    assert "valid slide" in result.output


def truncate_cycle(slide: Path) -> None:
    cycle = first_cycle(slide)
    data = cycle.read_bytes()
    cycle.write_bytes(data[: len(data) * 2 // 3])
    write_manifest(slide)  # the uploader's manifest matches the truncated file: only the TIFF itself can tell


def drop_marker_row(slide: Path) -> None:
    lines = (slide / "markers.csv").read_text().splitlines()
    (slide / "markers.csv").write_text("\n".join(lines[:-1]) + "\n")
    write_manifest(slide)


def drop_manifest_entry(slide: Path) -> None:
    doc = json.loads((slide / "manifest.json").read_text())
    doc["files"] = [f for f in doc["files"] if f["path"] != "markers.csv"]
    (slide / "manifest.json").write_text(json.dumps(doc))


def grow_file(slide: Path) -> None:
    with open(first_cycle(slide), "ab") as fh:
        fh.write(b"\0" * 10)


def junk_markers(slide: Path) -> None:
    (slide / "markers.csv").write_text("Marker;Cycle\nDNA;1\n")
    write_manifest(slide)


@pytest.mark.parametrize("breaker, file_part, message_part", [
    (truncate_cycle, "raw/", "truncated"),
    (drop_marker_row, "raw/", "channel(s) but markers.csv lists"),
    (drop_manifest_entry, "markers.csv", "not listed in manifest.json"),
    (grow_file, "raw/", "manifest.json says"),
    (junk_markers, "markers.csv", "missing column(s) channel_number, cycle_number, marker_name"),
])
def test_broken_slide_is_reported_and_left_untouched(slide_copy, breaker, file_part, message_part):
    breaker(slide_copy)
    before = tree_digest(slide_copy)
    problems = validate_slide(slide_copy)
    assert any(file_part in p.file and message_part in p.message for p in problems), problems
    assert all(p.fix for p in problems)
    result = CliRunner().invoke(app, ["validate", str(slide_copy)])
    assert result.exit_code == 1
    assert message_part in result.output and "fix:" in result.output
    assert tree_digest(slide_copy) == before


def test_every_problem_is_reported_at_once(slide_copy):
    grow_file(slide_copy)
    (slide_copy / "notes.txt").write_text("extra")
    (slide_copy / "params.yml").write_text("stitch:\n  align_chanel: 1\n")
    problems = validate_slide(slide_copy)
    messages = "\n".join(str(p) for p in problems)
    assert "manifest.json says" in messages
    assert "notes.txt: present but not listed" in messages
    assert "unknown key stitch.align_chanel" in messages


def test_missing_manifest_and_positions(tmp_path, slide_copy):
    (slide_copy / "manifest.json").unlink()
    problems = validate_slide(slide_copy)
    assert [p.file for p in problems] == ["manifest.json"]


def test_bad_slide_id(tmp_path, sample_slide):
    import shutil
    bad = Path(shutil.copytree(sample_slide, tmp_path / "my slide#1"))
    problems = validate_slide(bad)
    assert any("slide id" in p.message for p in problems)


def test_markers_duplicates_and_numbering():
    with pytest.raises(InvalidInput) as info:
        parse_markers("channel_number,cycle_number,marker_name\n1,1,DNA\n3,1,DNA\n")
    text = str(info.value)
    assert "duplicate marker_name(s) DNA" in text and "must run 1..2" in text


def test_markers_optional_columns():
    markers = parse_markers("channel_number,cycle_number,marker_name,exposure,background,remove\n"
                            "1,1,DNA_1,100,,\n2,1,CD45,200,DNA_1,TRUE\n")
    assert [m.remove for m in markers] == [False, True]
    assert markers[1].background == "DNA_1" and markers[1].exposure == 200.0


def test_manifest_verb_writes_what_upload_would_and_refuses_an_invalid_slide(slide_copy, monkeypatch):
    """`atlas manifest SLIDE` after the last file: the same bytes `atlas upload` sends (same run id)."""
    expected = (slide_copy / "manifest.json").read_bytes()   # the sample's, written by write_manifest
    (slide_copy / "manifest.json").unlink()
    result = CliRunner().invoke(app, ["manifest", str(slide_copy)])
    assert result.exit_code == 0, result.output
    assert (slide_copy / "manifest.json").read_bytes() == expected
    assert run_id_for(slide_copy.name, expected) in result.output
    assert validate_slide(slide_copy) == []

    (slide_copy / "params.yml").write_text("stitch:\n  align_chanel: 1\n")   # added after: listed by a rerun
    monkeypatch.chdir(slide_copy)
    result = CliRunner().invoke(app, ["manifest", "."])
    assert result.exit_code == 1 and isinstance(result.exception, InvalidInput)
    assert [str(p) for p in result.exception.problems] == [
        "params.yml: unknown key stitch.align_chanel -- fix: did you mean 'align_channel'? use one of "
        "align_channel, maximum_shift_um, filter_sigma, flip_x, flip_y, illumination, skip_failed_cycles, tile_size"]
    assert (slide_copy / "manifest.json").read_bytes() == expected, "a refused slide keeps its manifest"

    (slide_copy / "params.yml").write_text("stitch:\n  align_channel: 1\n")
    result = CliRunner().invoke(app, ["manifest", "."])
    assert result.exit_code == 0, result.output
    listed = {f["path"]: f for f in json.loads((slide_copy / "manifest.json").read_text())["files"]}
    assert listed["params.yml"]["size"] == (slide_copy / "params.yml").stat().st_size
    assert validate_slide(slide_copy) == [] and not list(slide_copy.glob(".*partial"))


def test_cycle_checks_are_the_stitch_stages_own(sample_slide):
    """The checks upload, the catalog and the stitch stage share (pure): each mistake once, by file.

    The metadata stand for what a microscope export gets wrong: another camera binning in one
    cycle, another objective, no calibration, an alignment channel the cycles do not have.
    """
    from atlas.slide.validate import check_contents, check_cycles, read_cycles

    names = ["raw/cycle-01.ome.tif", "raw/cycle-02.ome.tif"]
    good = read_cycles(sample_slide, names)
    markers = parse_markers((sample_slide / "markers.csv").read_text())
    assert check_cycles(markers, good, align_channel=0) == []
    first, second = (good[n] for n in names)
    binned = replace(second, tile_shape=(first.tile_shape[0] // 2, first.tile_shape[1] // 2),
                     pixel_size_um=None)
    problems = check_cycles(markers, {names[0]: first, names[1]: binned}, align_channel=first.n_channels)
    expected = [
        (names[0], f"alignment channel {first.n_channels} does not exist"),
        (names[1], "has no physical pixel size"),
        (names[1], f"alignment channel {first.n_channels} does not exist"),
        (names[1], f"tiles are {binned.tile_shape} {binned.dtype}, but the first cycle's"),
    ]
    assert len(problems) == len(expected)
    for problem, (file, start) in zip(problems, expected, strict=True):
        assert problem.file == file and problem.message.startswith(start), problem
    other_objective = replace(second, pixel_size_um=second.pixel_size_um * 2)
    (problem,) = check_cycles(markers, {names[0]: first, names[1]: other_objective})
    assert problem.file == names[1] and "differs from the first cycle's" in problem.message
    (problem,) = check_cycles(markers, {names[0]: first})
    assert problem.file == "markers.csv" and "lists 2 cycle(s) but raw/ holds 1 cycle file(s)" in problem.message

    texts = {"markers_text": (sample_slide / "markers.csv").read_text(), "manifest_text": None}
    problems = check_contents(slide_id="S1", files={}, params_text="stitch:\n  align_channel: 9\n",
                              cycles=good, **texts)
    assert [(p.file, p.message) for p in problems if "alignment" in p.message] == [
        (name, f"alignment channel 9 does not exist (the cycle has {first.n_channels} channels)") for name in names]


def test_cycle_numbers_may_not_skip_a_cycle():
    with pytest.raises(InvalidInput, match=r"cycle_number must run 1, 2, 3, ... without gaps"):
        parse_markers("channel_number,cycle_number,marker_name\n1,1,DNA_1\n2,3,DNA_3\n")


def test_marker_names_read_as_mcquant_reads_them():
    """`atlas quantify` takes markers files made for MCQuant: looser than a slide's markers.csv."""
    from atlas.slide.convention import parse_marker_names

    assert parse_marker_names("\ufeffmarker_name,remove\nDNA,\nCD3,TRUE\nDNA,\n\n") == (
        ["DNA", "CD3", "DNA"], [False, True, False])
    assert parse_marker_names("DNA\nCK5\nDNA\n") == (["DNA", "CK5", "DNA"], [False, False, False])
    slide_markers = "channel_number,cycle_number,marker_name\n1,1,DNA_1\n2,1,CD45\n"
    assert parse_marker_names(slide_markers) == (["DNA_1", "CD45"], [False, False])
    for text, message in [("name,other\nA,B\n", "has no marker_name column (header ['name', 'other'])"),
                          ("marker_name\nA\n\n,x\n", "empty marker_name on line(s) [3]"),
                          ("A\n\n  \nB\n ", None), ("", "lists no markers")]:
        if message is None:
            assert parse_marker_names(text, "m.csv") == (["A", "B"], [False, False])
            continue
        with pytest.raises(InvalidInput) as info:
            parse_marker_names(text, "m.csv")
        (problem,) = info.value.problems
        assert problem.file == "m.csv" and problem.message == message and "marker_name column" in problem.fix
