"""Per-slide parameters: ``params.yml`` holds one optional section per stage.

Example::

    stitch:
      align_channel: 0
      maximum_shift_um: 30
    segment:
      engine: classical
      channel: DNA_1

Unknown sections or keys are errors (a typo must not silently fall back to a default), and so are
values of the wrong type: YAML's ``yes`` or ``'0'`` is not taken for a bool or a number.
:func:`parse_params` reports every bad field at once, each as a :class:`~atlas.errors.Problem`
naming params.yml, the field (``stitch.align_channel``), the value and the fix.
"""
from __future__ import annotations

import difflib
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from atlas.errors import InvalidInput, Problem

PARAMS = "params.yml"   # the file's name in a slide folder


def _whole_number(value: Any) -> Any:
    """YAML writes ``1024.0`` for a float that is a whole number: take it for the int it is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Strict types (a YAML string or bool is never a number); ints also accept whole floats.
Int = Annotated[int, BeforeValidator(_whole_number)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class StitchParams(_Section):
    align_channel: Int = Field(0, ge=0)          # channel index within each cycle used for alignment (DNA)
    maximum_shift_um: float = Field(30.0, gt=0)  # ASHLAR -m; MCMICRO's default 30 µm
    filter_sigma: float = Field(0.0, ge=0)       # Gaussian sigma (px) before alignment
    flip_x: bool = False
    flip_y: bool = False
    illumination: bool = False                   # BaSiC flat/dark-field correction before stitching
    skip_failed_cycles: bool = False             # drop a cycle that cannot be registered instead of failing
    tile_size: Int = Field(1024, gt=0)           # pyramid tile size of the Level 2 outputs (px)


class SegmentParams(_Section):
    engine: str = "auto"                         # auto (unet when weights are configured) | classical | unet
    channel: Int | str = 0                       # nucleus channel: index in the registered image or marker name
    expand_um: float = Field(2.0, ge=0)          # nucleus -> cell expansion distance (µm)
    tile_size: Int = Field(2048, gt=0)           # segmentation tile (px), bounded memory
    overlap: Int = Field(128, ge=0)              # tile overlap (px); must exceed the largest nucleus diameter


class QuantifyParams(_Section):
    # YAML gives a list: a tuple in lax mode, its items still strict strings
    masks: tuple[str, ...] = Field(("cell", "nuclei"), min_length=1, strict=False)


class RenderParams(_Section):
    channels_per_group: Int = Field(4, ge=1)     # auto-minerva groups 4 channels per group
    tile_size: Int = Field(1024, gt=0)           # Minerva's deep-zoom tile size
    channel_layers: bool = False                 # also one grey tile layer per channel (Minerva composites them)


class OverviewParams(_Section):
    public: bool = True                          # false: released to the results bucket only, not the public site


class Params(_Section):
    stitch: StitchParams = StitchParams()
    segment: SegmentParams = SegmentParams()
    quantify: QuantifyParams = QuantifyParams()
    render: RenderParams = RenderParams()
    overview: OverviewParams = OverviewParams()

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_are_defaults(cls, data: Any) -> Any:
        """``stitch:`` with nothing under it means the defaults, as an absent section does."""
        if isinstance(data, dict):
            return {name: {} if value is None else value for name, value in data.items()}
        return data

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every parameter, defaults included (recorded in the results manifest)."""
        return self.model_dump()


def _yaml(value: Any) -> str:
    """A value as it would be written in params.yml, e.g. ``[cell, nuclei]``."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _problems(errors: list[ErrorDetails], doc: dict, file: str) -> list[Problem]:
    """pydantic's errors as one Problem per bad section or field, in the order of the file, each with the fix."""
    by_field: dict[tuple[str, ...], list[ErrorDetails]] = {}
    for error in errors:
        # section or section.key; list indices and union branch tags below it name no field
        by_field.setdefault(tuple(str(p) for p in error["loc"][:2]), []).append(error)
    def position(loc: tuple[str, ...]) -> tuple[int, int]:   # where the field is written in params.yml
        section = doc[loc[0]]
        return list(doc).index(loc[0]), list(section).index(loc[1]) if len(loc) == 2 else -1

    problems = []
    for loc, errs in sorted(by_field.items(), key=lambda item: position(item[0])):
        section = loc[0]
        model = Params.model_fields[section].annotation if len(loc) == 2 else Params
        known = list(model.model_fields)
        if errs[0]["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            what = f"key {'.'.join(loc)}" if len(loc) == 2 else f"section {section!r}"
            problems.append(Problem(file, f"unknown {what}", f"{hint}use one of {', '.join(known)}"))
        elif len(loc) == 1:
            problems.append(Problem(file, f"section {section!r} must be a mapping, got {doc[section]!r}",
                                    "indent key: value pairs under it"))
        else:
            path, value = ".".join(loc), doc[section][loc[1]]
            why = " or ".join(dict.fromkeys(e["msg"][0].lower() + e["msg"][1:] for e in errs))
            default = model.model_fields[loc[1]].default
            problems.append(Problem(file, f"{path} = {value!r}: {why}",
                                    f"use a value like {_yaml(default)}, or leave {path} out for its default"))
    return problems


def parse_params(text: str | None, file: str = PARAMS) -> Params:
    """Parse params.yml text (None or empty -> defaults).

    Raises
    ------
    InvalidInput
        With one Problem per bad section or field: not YAML, not a mapping, unknown names, wrong
        types or values out of range.
    """
    if not text or not text.strip():
        return Params()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInput(Problem(file, f"not valid YAML ({exc})", "fix the YAML syntax")) from exc
    if doc is None:
        return Params()
    if not isinstance(doc, dict):
        raise InvalidInput(Problem(file, "must be a mapping of stage name -> settings", "see docs/slide-format.md"))
    try:
        return Params.model_validate(doc)
    except ValidationError as exc:
        raise InvalidInput(_problems(exc.errors(), doc, file)) from None
