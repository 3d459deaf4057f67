"""Slide validation: every problem at once, each naming the file and the fix. Never modifies input.

:func:`check_contents` is pure (no I/O) so that the catalog Lambda can run the same checks on
what it recorded from S3 events and ranged reads; :func:`validate_slide` gathers the same facts
from a local folder and adds what only a local copy can show (sha256, truncated pixel data).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import tifffile

from atlas.errors import InvalidInput, Problem
from atlas.params import parse_params
from atlas.slide.convention import (
    MARKERS,
    PARAMS,
    RAW,
    RAW_DTYPES,
    RAW_SUFFIXES,
    SLIDE_MANIFEST,
    Marker,
    channels_per_cycle,
    check_slide_id,
    manifest_bytes,
    parse_manifest,
    parse_markers,
    raw_files,
    sha256_file,
    slide_files,
    slide_manifest,
)
from atlas.slide.ome import CycleMetadata, read_cycle_metadata
from atlas.slide.story import STORY, check_story, parse_story

REUPLOAD = "upload the file again, then regenerate manifest.json (`atlas upload` does both)"
PIXEL_SIZE_RTOL = 1e-4          # ASHLAR's tolerance for "the same" pixel size
MAX_TILES_SHOWN = 10


def _positions_problem(name: str, meta: CycleMetadata) -> Problem:
    where = "OME Plane PositionX/PositionY missing"
    if missing := meta.tiles_without_position:
        shown = ", ".join(map(str, missing[:MAX_TILES_SHOWN])) + (" ..." if len(missing) > MAX_TILES_SHOWN else "")
        what = f"{len(missing)} of {meta.n_tiles} tiles have no stage position ({where}; tiles {shown})"
    else:
        what = f"tiles have no stage position ({where})"
    return Problem(name, what, "export the tiles with their stage coordinates (Plane PositionX/PositionY with units) "
                               "so they can be placed, or pack them with `atlas import fiji`")


def _cycle_problems(name: str, meta: CycleMetadata, align_channel: int | None) -> list[Problem]:
    """What is wrong with one readable cycle file on its own."""
    problems = [] if meta.positions_um is not None else [_positions_problem(name, meta)]
    if meta.pixel_size_um is None:
        problems.append(Problem(name, "has no physical pixel size (Pixels PhysicalSizeX)",
                                "export with PhysicalSizeX/PhysicalSizeY in µm"))
    if meta.dtype not in RAW_DTYPES:
        problems.append(Problem(name, f"pixel type {meta.dtype} is not supported",
                                f"export tiles as {' or '.join(RAW_DTYPES)}"))
    if align_channel is not None and align_channel >= meta.n_channels:
        problems.append(Problem(name, f"alignment channel {align_channel} does not exist "
                                f"(the cycle has {meta.n_channels} channels)",
                                "set stitch.align_channel in params.yml to the DNA channel index (0-based)"))
    return problems


def _mismatch_problems(metas: dict[str, CycleMetadata]) -> list[Problem]:
    """Cycles whose tiles or pixel size differ from the first cycle's."""
    problems = []
    (first_name, first), *others = metas.items()
    for name, meta in others:
        if (meta.tile_shape, meta.dtype) != (first.tile_shape, first.dtype):
            problems.append(Problem(name, f"tiles are {meta.tile_shape} {meta.dtype}, but the first cycle's "
                                    f"({first_name}) are {first.tile_shape} {first.dtype}",
                                    "acquire every cycle with the same camera settings"))
        if meta.pixel_size_um and first.pixel_size_um and not math.isclose(
                meta.pixel_size_um, first.pixel_size_um, rel_tol=PIXEL_SIZE_RTOL):
            problems.append(Problem(name, f"pixel size {meta.pixel_size_um} µm differs from the first cycle's "
                                    f"{first.pixel_size_um} µm", "acquire every cycle with the same objective"))
    return problems


def check_cycles(markers: list[Marker] | None, cycles: dict[str, CycleMetadata | Exception],
                 align_channel: int | None = None) -> list[Problem]:
    """Every problem of the cycle files, against markers.csv and each other (pure: no I/O).

    Parameters
    ----------
    markers : list of Marker or None
        markers.csv, parsed (None when it is missing or unreadable: channel counts are not checked).
    cycles : dict of str to CycleMetadata or Exception
        Slide-relative name of each cycle file -> its OME metadata, or the error reading it. Cycle
        ``k`` is the ``k``-th name in sorted order, as MCMICRO orders them.
    align_channel : int, optional
        ``stitch.align_channel`` of params.yml, checked to exist in every cycle.
    """
    if not cycles:
        return [Problem(f"{RAW}/", f"no cycle files (*{RAW_SUFFIXES[0]}) found",
                        f"put one OME-TIFF per cycle under {RAW}/")]
    names = sorted(cycles)
    problems: list[Problem] = []
    readable: dict[str, CycleMetadata] = {}
    for name in names:
        meta = cycles[name]
        if isinstance(meta, Exception):
            problems.append(Problem(name, f"not a readable OME-TIFF ({meta})",
                                    "export the cycle as OME-TIFF (one OME Image per tile) and upload it again"))
            continue
        readable[name] = meta
        problems += _cycle_problems(name, meta, align_channel)
    if readable:
        problems += _mismatch_problems(readable)
    if markers is None:
        return problems
    per_cycle = channels_per_cycle(markers)   # cycle numbers run 1..N (parse_markers checks)
    if len(per_cycle) != len(names):
        problems.append(Problem(MARKERS, f"lists {len(per_cycle)} cycle(s) but {RAW}/ holds {len(names)} cycle "
                                f"file(s) ({', '.join(names)})", "give one cycle_number per cycle file, in file-name "
                                "order, or upload the missing cycle files"))
        return problems
    for cycle, name in enumerate(names, start=1):
        if name in readable and readable[name].n_channels != per_cycle[cycle]:
            problems.append(Problem(name, f"has {readable[name].n_channels} channel(s) but {MARKERS} lists "
                                    f"{per_cycle[cycle]} for cycle {cycle}",
                                    f"make {MARKERS} list exactly one row per channel of each cycle file, "
                                    "cycles in file-name order"))
    return problems


def mosaic_extent(cycles: dict[str, CycleMetadata | Exception]
                  ) -> tuple[tuple[float, float], tuple[int, int]] | None:
    """((width, height) in µm, (width, height) in px) of the stitched image, from the first cycle's
    tile positions (ASHLAR's mosaic spans them); None when no cycle tells."""
    for name in sorted(cycles):
        meta = cycles[name]
        if isinstance(meta, CycleMetadata) and meta.positions_um is not None and meta.pixel_size_um:
            (y0, x0), (y1, x1) = meta.positions_um.min(axis=0), meta.positions_um.max(axis=0)
            height = float(y1 - y0) + meta.tile_shape[0] * meta.pixel_size_um
            width = float(x1 - x0) + meta.tile_shape[1] * meta.pixel_size_um
            return (width, height), (round(width / meta.pixel_size_um), round(height / meta.pixel_size_um))
    return None


def check_story_text(story_text: str, markers: list[Marker] | None, params_text: str | None,
                     cycles: dict[str, CycleMetadata | Exception]) -> list[Problem]:
    """Problems of story.yml: its form, then (when markers.csv and params.yml parse) its groups,
    channels and views against the markers and the stitched image's extent."""
    try:
        story = parse_story(story_text, STORY)
        params = parse_params(params_text)
    except InvalidInput as exc:
        return [p for p in exc.problems if p.file == STORY]  # params problems are reported on their own
    if markers is None:
        return []
    extent = mosaic_extent(cycles)
    return check_story(story, markers=[m.marker_name for m in markers], per_group=params.render.channels_per_group,
                       extent_um=extent[0] if extent else None, image_px=extent[1] if extent else None)


def read_cycles(slide_dir: Path, names: list[str]) -> dict[str, CycleMetadata | Exception]:
    """OME metadata of each cycle file (slide-relative names), or the error that reading it raised."""
    cycles: dict[str, CycleMetadata | Exception] = {}
    for name in names:
        try:
            cycles[name] = read_cycle_metadata(Path(slide_dir) / name)
        except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
            cycles[name] = exc
    return cycles


def _manifest_problems(manifest_text: str | None, files: dict[str, int]) -> list[Problem]:
    """manifest.json against the files present: missing, extra, or of another size."""
    if manifest_text is None:
        return [Problem(SLIDE_MANIFEST, "missing", "write manifest.json last (`atlas upload` does it)")]
    try:
        listed = {e.path: e for e in parse_manifest(manifest_text)}
    except InvalidInput as exc:
        return exc.problems
    problems = []
    for path, entry in sorted(listed.items()):
        if path not in files:
            problems.append(Problem(path, "listed in manifest.json but missing", REUPLOAD))
        elif files[path] != entry.size:
            problems.append(Problem(path, f"size {files[path]} bytes, manifest.json says {entry.size}", REUPLOAD))
    problems += [Problem(path, "present but not listed in manifest.json",
                         "delete the file or regenerate manifest.json to include it")
                 for path in sorted(set(files) - set(listed))]
    return problems


def check_contents(*, slide_id: str, files: dict[str, int], manifest_text: str | None, markers_text: str | None,
                   params_text: str | None, cycles: dict[str, CycleMetadata | Exception],
                   story_text: str | None = None) -> list[Problem]:
    """Every problem of a slide from facts already gathered (pure; used locally and by the catalog).

    Parameters
    ----------
    slide_id : str
    files : dict of str to int
        Slide-relative path -> size in bytes of each file actually present (manifest excluded).
    manifest_text, markers_text, params_text, story_text : str or None
        Contents of manifest.json, markers.csv, params.yml and story.yml (None when absent).
    cycles : dict of str to CycleMetadata or Exception
        OME metadata of each raw cycle file, or the error raised reading it.
    """
    problems = check_slide_id(slide_id) + _manifest_problems(manifest_text, files)
    markers = align_channel = None
    if markers_text is None:
        problems.append(Problem(MARKERS, "missing", "add markers.csv (channel_number,cycle_number,marker_name)"))
    else:
        try:
            markers = parse_markers(markers_text)
        except InvalidInput as exc:
            problems.extend(exc.problems)
    try:
        align_channel = parse_params(params_text).stitch.align_channel
    except InvalidInput as exc:
        problems.extend(exc.problems)
    problems.extend(check_cycles(markers, cycles, align_channel))
    if story_text is not None:
        problems.extend(check_story_text(story_text, markers, params_text, cycles))
    return problems


def _truncation(path: Path) -> str | None:
    """Why a TIFF's pixel data do not fit in the file, or None when every strip/tile is there."""
    size = path.stat().st_size
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)]
            if ends and max(ends) > size:
                return f"pixel data end at byte {max(ends)} but the file has {size} bytes"
    return None


def _read_text(path: Path) -> str | None:
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8", errors="replace")


def validate_slide(slide_dir: Path) -> list[Problem]:
    """Every problem of a local slide folder (read-only; the folder is never modified)."""
    slide_dir = Path(slide_dir)
    if not slide_dir.is_dir():
        return [Problem(str(slide_dir), "is not a folder", "give the path of the slide folder")]
    names = slide_files(slide_dir)
    files = {n: (slide_dir / n).stat().st_size for n in names}
    cycles = read_cycles(slide_dir, raw_files(names))
    problems: list[Problem] = []
    for name, meta in cycles.items():
        if isinstance(meta, Exception):
            continue
        try:
            why = _truncation(slide_dir / name)
        except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
            cycles[name] = exc
            continue
        if why is not None:
            problems.append(Problem(name, f"truncated: {why}", REUPLOAD))
    manifest_text = _read_text(slide_dir / SLIDE_MANIFEST)
    problems = check_contents(slide_id=slide_dir.resolve().name, files=files, manifest_text=manifest_text,
                              markers_text=_read_text(slide_dir / MARKERS),
                              params_text=_read_text(slide_dir / PARAMS), cycles=cycles,
                              story_text=_read_text(slide_dir / STORY)) + problems
    if manifest_text is not None:
        try:
            entries = parse_manifest(manifest_text)
        except InvalidInput:
            entries = []
        for entry in entries:
            if files.get(entry.path) == entry.size and sha256_file(slide_dir / entry.path) != entry.sha256:
                problems.append(Problem(entry.path, "sha256 differs from manifest.json (file changed or corrupted)",
                                        REUPLOAD))
    return problems


def validate_with_manifest(slide_dir: Path, slide_id: str, manifest: bytes) -> list[Problem]:
    """Every problem of the slide as it will be with ``manifest`` as its manifest.json.

    Runs :func:`validate_slide` on a view of the folder named ``slide_id`` whose files are links to
    the originals, so the folder itself is never modified.
    """
    with tempfile.TemporaryDirectory(prefix="atlas-manifest-") as tmp:
        view = Path(tmp) / slide_id
        view.mkdir()
        for entry in parse_manifest(manifest.decode()):
            (view / entry.path).parent.mkdir(parents=True, exist_ok=True)
            os.symlink((Path(slide_dir) / entry.path).resolve(), view / entry.path)
        (view / SLIDE_MANIFEST).write_bytes(manifest)
        return validate_slide(view)


def write_checked_manifest(slide_dir: Path) -> Path:
    """Write ``manifest.json`` for a slide folder after its last file, as ``atlas upload`` does.

    Raises
    ------
    InvalidInput
        With every problem of the slide (then nothing is written, an earlier manifest.json stays).
    """
    slide_dir = Path(slide_dir)
    if not slide_dir.is_dir():
        raise InvalidInput(Problem(str(slide_dir), "is not a folder", "give the path of the slide folder"))
    slide_id = slide_dir.resolve().name   # also for `atlas manifest .`
    data = manifest_bytes(slide_manifest(slide_dir, slide_id))
    if problems := validate_with_manifest(slide_dir, slide_id, data):
        raise InvalidInput(problems)
    path = slide_dir / SLIDE_MANIFEST
    partial = path.with_name(f".{SLIDE_MANIFEST}.partial")
    partial.write_bytes(data)
    partial.replace(path)   # whole or not at all: the manifest is the slide's completeness signal
    return path
