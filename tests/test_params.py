"""params.yml: the pydantic model behind it, its defaults and how its errors read.

The texts are the kind a lab writes by hand (typos, YAML's quoting, a missing value), not data.
"""
from __future__ import annotations

import pytest

from atlas.errors import InvalidInput
from atlas.params import PARAMS, Params, QuantifyParams, RenderParams, SegmentParams, StitchParams, parse_params


def problems_of(text: str) -> list[str]:
    with pytest.raises(InvalidInput) as info:
        parse_params(text)
    for problem in info.value.problems:
        assert problem.file == PARAMS and problem.fix
    return [f"{p.message} -- fix: {p.fix}" for p in info.value.problems]


@pytest.mark.parametrize("text", [None, "", "  \n", "# nothing set\n", "stitch:\n"])
def test_no_settings_mean_the_defaults(text):
    assert parse_params(text) == Params()


def test_defaults_are_the_documented_ones_and_recorded_whole():
    recorded = Params().to_dict()
    assert recorded == {
        "stitch": {"align_channel": 0, "maximum_shift_um": 30.0, "filter_sigma": 0.0, "flip_x": False,
                   "flip_y": False, "illumination": False, "skip_failed_cycles": False, "tile_size": 1024},
        "segment": {"engine": "auto", "channel": 0, "expand_um": 2.0, "tile_size": 2048, "overlap": 128},
        "quantify": {"masks": ("cell", "nuclei")},
        "render": {"channels_per_group": 4, "tile_size": 1024, "channel_layers": False},
        "overview": {"public": True},
    }


def test_values_are_read_with_their_types():
    params = parse_params("stitch:\n  maximum_shift_um: 15\n  flip_y: true\n  tile_size: 512.0\n"
                          "segment:\n  channel: DNA_1\nquantify:\n  masks: [cell]\nrender:\n  tile_size: 256\n")
    assert params.stitch == StitchParams(maximum_shift_um=15.0, flip_y=True, tile_size=512)
    assert isinstance(params.stitch.maximum_shift_um, float) and isinstance(params.stitch.tile_size, int)
    assert params.segment == SegmentParams(channel="DNA_1")
    assert params.quantify == QuantifyParams(masks=("cell",))
    assert params.render == RenderParams(tile_size=256)
    assert parse_params("segment:\n  channel: 2\n").segment.channel == 2


def test_params_are_immutable():
    params = parse_params("stitch:\n  align_channel: 1\n")
    with pytest.raises(ValueError):
        params.stitch.align_channel = 2  # type: ignore[misc]


def test_every_bad_field_is_one_problem_naming_field_value_and_fix():
    found = problems_of("stitch:\n  flip_x: 'yes'\n  align_chanel: 1\n  tile_size: 1.5\n"
                        "stich: {}\n"
                        "segment:\n  channel: true\n  overlap: -1\n"
                        "quantify:\n  masks: [cell, 3]\n"
                        "render: 4\n")
    assert found == [
        "stitch.flip_x = 'yes': input should be a valid boolean -- fix: use a value like false, "
        "or leave stitch.flip_x out for its default",
        "unknown key stitch.align_chanel -- fix: did you mean 'align_channel'? use one of align_channel, "
        "maximum_shift_um, filter_sigma, flip_x, flip_y, illumination, skip_failed_cycles, tile_size",
        "stitch.tile_size = 1.5: input should be a valid integer -- fix: use a value like 1024, "
        "or leave stitch.tile_size out for its default",
        "unknown section 'stich' -- fix: did you mean 'stitch'? use one of stitch, segment, quantify, render, "
        "overview",
        "segment.channel = True: input should be a valid integer or input should be a valid string "
        "-- fix: use a value like 0, or leave segment.channel out for its default",
        "segment.overlap = -1: input should be greater than or equal to 0 -- fix: use a value like 128, "
        "or leave segment.overlap out for its default",
        "quantify.masks = ['cell', 3]: input should be a valid string -- fix: use a value like [cell, nuclei], "
        "or leave quantify.masks out for its default",
        "section 'render' must be a mapping, got 4 -- fix: indent key: value pairs under it",
    ]


@pytest.mark.parametrize("text, part", [
    ("stitch:\n  align_channel: '0'\n", "stitch.align_channel = '0': input should be a valid integer"),
    ("stitch:\n  maximum_shift_um: 0\n", "stitch.maximum_shift_um = 0: input should be greater than 0"),
    ("segment:\n  engine: 3\n", "segment.engine = 3: input should be a valid string"),
    ("render:\n  channels_per_group: 0\n", "render.channels_per_group = 0: input should be greater than or equal"),
    ("quantify:\n  masks: []\n", "quantify.masks = []: tuple should have at least 1 item"),
    ("quantify:\n  masks: cell\n", "quantify.masks = 'cell': input should be a valid tuple"),
    ("publish: {}\n", "unknown section 'publish'"),
])
def test_wrong_values_are_refused(text, part):
    found = problems_of(text)
    assert len(found) == 1 and found[0].startswith(part), found


@pytest.mark.parametrize("text, part", [
    ("stitch: [\n", "not valid YAML"),
    ("- stitch\n", "must be a mapping of stage name -> settings"),
])
def test_unreadable_documents(text, part):
    assert part in problems_of(text)[0]


def test_the_file_name_is_the_one_given():
    with pytest.raises(InvalidInput) as info:
        parse_params("stich: {}\n", file="rerun/params.yml")
    assert [p.file for p in info.value.problems] == ["rerun/params.yml"]
