"""Per-slide parameters: ``params.yml`` holds one optional section per stage.

Example::

    stitch:
      align_channel: 0
      maximum_shift_um: 30
    segment:
      engine: classical
      channel: DNA_1

Unknown sections or keys are errors (a typo must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from atlas.errors import InvalidInput, Problem

PARAMS = "params.yml"   # the file's name in a slide folder


@dataclass(frozen=True)
class StitchParams:
    align_channel: int = 0          # channel index within each cycle used for alignment (DNA)
    maximum_shift_um: float = 30.0  # ASHLAR -m; MCMICRO's default 30 µm
    filter_sigma: float = 0.0       # Gaussian sigma (px) before alignment
    flip_x: bool = False
    flip_y: bool = False
    illumination: bool = False      # BaSiC flat/dark-field correction before stitching
    skip_failed_cycles: bool = False  # drop a cycle that cannot be registered instead of failing
    tile_size: int = 1024           # pyramid tile size of the Level 2 outputs (px)


@dataclass(frozen=True)
class SegmentParams:
    engine: str = "auto"            # auto (unet when weights are configured) | classical | unet
    channel: int | str = 0          # nucleus channel: index in the registered image or marker name
    expand_um: float = 2.0          # nucleus -> cell expansion distance (µm)
    tile_size: int = 2048           # segmentation tile (px), bounded memory
    overlap: int = 128              # tile overlap (px); must exceed the largest nucleus diameter


@dataclass(frozen=True)
class QuantifyParams:
    masks: tuple[str, ...] = ("cell", "nuclei")


@dataclass(frozen=True)
class RenderParams:
    channels_per_group: int = 4     # auto-minerva groups 4 channels per group
    tile_size: int = 1024           # Minerva's deep-zoom tile size


@dataclass(frozen=True)
class PublishParams:
    pass


@dataclass(frozen=True)
class Params:
    stitch: StitchParams = field(default_factory=StitchParams)
    segment: SegmentParams = field(default_factory=SegmentParams)
    quantify: QuantifyParams = field(default_factory=QuantifyParams)
    render: RenderParams = field(default_factory=RenderParams)
    publish: PublishParams = field(default_factory=PublishParams)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def _coerce(section: str, f: dataclasses.Field, value: Any, file: str) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)) and not isinstance(default, bool) and f.type != "int | str":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(default, int) and not float(value).is_integer():
            ok = False
        value = type(default)(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
    if not ok:
        raise InvalidInput(Problem(file, f"{section}.{f.name} = {value!r} has the wrong type",
                                   f"use a value like {default!r}"))
    return value


def parse_params(text: str | None, file: str = PARAMS) -> Params:
    """Parse params.yml text (None or empty -> defaults)."""
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
    sections = {f.name: f for f in dataclasses.fields(Params)}
    problems, built = [], {}
    for name, values in doc.items():
        if name not in sections:
            problems.append(Problem(file, f"unknown section {name!r}", f"use one of {', '.join(sections)}"))
            continue
        cls = sections[name].default_factory
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = values or {}
        if not isinstance(values, dict):
            problems.append(Problem(file, f"section {name!r} must be a mapping", "indent key: value pairs under it"))
            continue
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                problems.append(Problem(file, f"unknown key {name}.{key}",
                                        f"use one of {', '.join(fields) or '(none)'}"))
                continue
            try:
                kwargs[key] = _coerce(name, fields[key], value, file)
            except InvalidInput as exc:
                problems.extend(exc.problems)
        built[name] = cls(**kwargs)
    if problems:
        raise InvalidInput(problems)
    return Params(**built)
