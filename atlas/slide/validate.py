"""Slide validation: every problem at once, each naming the file and the fix. Never modifies input.

:func:`check_contents` is pure (no I/O) so that the catalog Lambda can run the same checks on
what it recorded from S3 events and ranged reads; :func:`validate_slide` gathers the same facts
from a local folder and adds what only a local copy can show (sha256, truncated pixel data).
"""
from __future__ import annotations

from pathlib import Path

import tifffile

from atlas.errors import InvalidInput, Problem
from atlas.params import parse_params
from atlas.slide.convention import (
    MANIFEST,
    MARKERS,
    PARAMS,
    RAW,
    RAW_SUFFIXES,
    channels_per_cycle,
    check_slide_id,
    parse_manifest,
    parse_markers,
    raw_files,
    sha256_file,
    slide_files,
)
from atlas.slide.ome import CycleMetadata, read_cycle_metadata

REUPLOAD = "upload the file again, then regenerate manifest.json (`atlas upload` does both)"
ASHLAR_DTYPES = ("uint8", "uint16")


def check_cycles(markers_text: str | None, cycles: dict[str, CycleMetadata | Exception]) -> list[Problem]:
    """Problems with the cycle files given markers.csv: readability, positions, channel counts."""
    problems: list[Problem] = []
    markers = None
    if markers_text is not None:
        try:
            markers = parse_markers(markers_text)
        except InvalidInput as exc:
            problems.extend(exc.problems)
    if not cycles:
        problems.append(Problem(f"{RAW}/", f"no cycle files (*{RAW_SUFFIXES[0]}) found",
                                f"put one OME-TIFF per cycle under {RAW}/"))
        return problems
    names = sorted(cycles)
    for name in names:
        meta = cycles[name]
        if isinstance(meta, Exception):
            problems.append(Problem(name, f"not a readable OME-TIFF ({meta})",
                                    "export the cycle as OME-TIFF (one series per tile) and upload it again"))
            continue
        if meta.positions_um is None:
            problems.append(Problem(name, "tiles have no stage positions (OME Plane PositionX/PositionY)",
                                    "export with stage positions, or pack the tiles with `atlas import fiji`"))
        if meta.dtype not in ASHLAR_DTYPES:
            problems.append(Problem(name, f"pixel type {meta.dtype} is not supported",
                                    "export tiles as uint8 or uint16"))
    if markers is None:
        return problems
    per_cycle = channels_per_cycle(markers)
    if len(per_cycle) != len(names):
        problems.append(Problem(MARKERS, f"lists {len(per_cycle)} cycle(s) but {RAW}/ holds {len(names)} cycle file(s) "
                                f"({', '.join(names)})", "give one cycle_number per cycle file, in file-name order"))
        return problems
    for (cycle, expected), name in zip(sorted(per_cycle.items()), names, strict=True):
        meta = cycles[name]
        if isinstance(meta, CycleMetadata) and meta.n_channels != expected:
            problems.append(Problem(name, f"has {meta.n_channels} channel(s) but markers.csv lists {expected} "
                                    f"for cycle {cycle}",
                                    "make markers.csv list exactly one row per channel of each cycle"))
    return problems


def check_contents(*, slide_id: str, files: dict[str, int], manifest_text: str | None, markers_text: str | None,
                   params_text: str | None, cycles: dict[str, CycleMetadata | Exception]) -> list[Problem]:
    """Every problem of a slide from facts already gathered (pure; used locally and by the catalog).

    Parameters
    ----------
    slide_id : str
    files : dict of str to int
        Slide-relative path -> size in bytes of each file actually present (manifest excluded).
    manifest_text, markers_text, params_text : str or None
        Contents of manifest.json, markers.csv and params.yml (None when absent).
    cycles : dict of str to CycleMetadata or Exception
        OME metadata of each raw cycle file, or the error raised reading it.
    """
    problems = check_slide_id(slide_id)
    if manifest_text is None:
        problems.append(Problem(MANIFEST, "missing", "write manifest.json last (`atlas upload` does it)"))
    else:
        try:
            entries = parse_manifest(manifest_text)
        except InvalidInput as exc:
            problems.extend(exc.problems)
        else:
            listed = {e.path: e for e in entries}
            for path, entry in sorted(listed.items()):
                if path not in files:
                    problems.append(Problem(path, "listed in manifest.json but missing", REUPLOAD))
                elif files[path] != entry.size:
                    problems.append(Problem(path, f"size {files[path]} bytes, manifest.json says {entry.size}",
                                            REUPLOAD))
            for path in sorted(set(files) - set(listed)):
                problems.append(Problem(path, "present but not listed in manifest.json",
                                        "delete the file or regenerate manifest.json to include it"))
    if markers_text is None:
        problems.append(Problem(MARKERS, "missing", "add markers.csv (channel_number,cycle_number,marker_name)"))
    if params_text is not None:
        try:
            parse_params(params_text)
        except InvalidInput as exc:
            problems.extend(exc.problems)
    problems.extend(check_cycles(markers_text, cycles))
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
    cycles: dict[str, CycleMetadata | Exception] = {}
    problems: list[Problem] = []
    for name in raw_files(names):
        try:
            cycles[name] = read_cycle_metadata(slide_dir / name)
            if (why := _truncation(slide_dir / name)) is not None:
                problems.append(Problem(name, f"truncated: {why}", REUPLOAD))
        except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
            cycles[name] = exc
    manifest_text = _read_text(slide_dir / MANIFEST)
    problems = check_contents(slide_id=slide_dir.name, files=files, manifest_text=manifest_text,
                              markers_text=_read_text(slide_dir / MARKERS),
                              params_text=_read_text(slide_dir / PARAMS), cycles=cycles) + problems
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
