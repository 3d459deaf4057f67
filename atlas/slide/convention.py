"""The slide convention: what a lab uploads under ``<slide_id>/`` (see docs/slide-format.md).

::

    <slide_id>/markers.csv        MCMICRO markers: channel_number,cycle_number,marker_name[,...]
    <slide_id>/raw/*.ome.tif      one OME-TIFF per cycle, tiles as OME series with stage positions
    <slide_id>/params.yml         optional per-slide parameters (see atlas.params)
    <slide_id>/manifest.json      written last: every file with size and sha256

Everything here reads small text files only; pixels are read by the stages.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from atlas.errors import InvalidInput, Problem
from atlas.params import PARAMS as PARAMS  # part of the convention; parsed by atlas.params

MARKERS = "markers.csv"
SLIDE_MANIFEST = "manifest.json"   # the upload's manifest, written last (the release's own is atlas.layout.MANIFEST)
RAW = "raw"
RAW_SUFFIXES = (".ome.tif", ".ome.tiff")
RAW_DTYPES = ("uint8", "uint16")             # pixel types of raw tiles: what ASHLAR's reader stitches
SLIDE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
MARKER_COLUMNS = ("channel_number", "cycle_number", "marker_name")


@dataclass(frozen=True)
class Marker:
    """One row of markers.csv: one channel of the registered image, in image channel order."""

    channel_number: int
    cycle_number: int
    marker_name: str
    exposure: float | None = None
    background: str | None = None
    remove: bool = False


@dataclass(frozen=True)
class ManifestEntry:
    """A file of the slide as the uploader declared it (path relative to the slide)."""

    path: str
    size: int
    sha256: str


def check_slide_id(slide_id: str) -> list[Problem]:
    """Problems with a slide id (it becomes an S3 prefix and part of an execution name)."""
    if SLIDE_ID_RE.match(slide_id):
        return []
    return [Problem(slide_id or "<empty>", f"slide id {slide_id!r} has characters other than letters, "
                    "digits, '-' and '_', or is longer than 63 characters",
                    "rename the slide folder, e.g. to "
                    + repr(re.sub(r"[^A-Za-z0-9_-]", "_", slide_id)[:63] or "slide1"))]


MARKERS_FIX = "write markers.csv as CSV with header channel_number,cycle_number,marker_name (one row per channel)"


def _csv_rows(text: str, file: str, fix: str) -> list[list[str]]:
    """The non-blank rows of CSV text, each cell stripped (a UTF-8 byte order mark dropped)."""
    try:
        rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    except csv.Error as exc:
        raise InvalidInput(Problem(file, f"not readable as CSV ({exc})", fix)) from exc
    return [[cell.strip() for cell in row] for row in rows if any(cell.strip() for cell in row)]


def _flag(value: str | None) -> bool:
    """markers.csv's ``remove`` column: TRUE, 1 or YES (any case) is set."""
    return (value or "").upper() in ("TRUE", "1", "YES")


def _marker(line: int, row: dict[str, str], file: str) -> Marker | Problem:
    """One markers.csv row, or what is wrong with it."""
    try:
        channel, cycle = int(row["channel_number"]), int(row["cycle_number"])
    except ValueError:
        return Problem(file, f"line {line}: channel_number/cycle_number must be integers, "
                       f"got {row['channel_number']!r}/{row['cycle_number']!r}", MARKERS_FIX)
    if not row["marker_name"]:
        return Problem(file, f"line {line}: empty marker_name", "give every channel a name")
    exposure = row.get("exposure") or None
    try:
        exposure = float(exposure) if exposure is not None else None
    except ValueError:
        return Problem(file, f"line {line}: exposure {exposure!r} is not a number", "leave it empty or give a number")
    return Marker(channel, cycle, row["marker_name"], exposure, row.get("background") or None, _flag(row.get("remove")))


def _order_problems(markers: list[Marker], file: str) -> list[Problem]:
    """Unique names, channels 1..N in order, cycles 1, 2, 3, ... never decreasing."""
    problems = []
    names = [m.marker_name for m in markers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(Problem(file, f"duplicate marker_name(s) {', '.join(duplicates)}",
                                "make names unique, e.g. DNA_1, DNA_2 for the DNA stain of each cycle"))
    numbers = [m.channel_number for m in markers]
    if numbers and numbers != list(range(1, len(numbers) + 1)):
        problems.append(Problem(file, f"channel_number must run 1..{len(numbers)} in order, got {numbers}",
                                "number the channels 1, 2, 3, ... in image order"))
    cycles = [m.cycle_number for m in markers]
    if cycles != sorted(cycles) or sorted(set(cycles)) != list(range(1, len(set(cycles)) + 1)):
        problems.append(Problem(file, f"cycle_number must run 1, 2, 3, ... without gaps and never decrease, "
                                f"got {cycles}", "list channels cycle by cycle, first cycle = 1"))
    return problems


def parse_markers(text: str, file: str = MARKERS) -> list[Marker]:
    """Parse markers.csv text into markers in channel order.

    Raises
    ------
    InvalidInput
        With every problem found: missing columns, non-integer numbers, empty or duplicate names.
    """
    rows = _csv_rows(text, file, MARKERS_FIX)
    header = rows[0] if rows else []
    missing = [c for c in MARKER_COLUMNS if c not in header]
    if missing:
        raise InvalidInput(Problem(file, f"missing column(s) {', '.join(missing)}; header is {header}", MARKERS_FIX))
    if len(rows) == 1:
        raise InvalidInput(Problem(file, "has a header but no marker rows", MARKERS_FIX))
    parsed = [_marker(line, dict(zip(header, row + [""] * (len(header) - len(row)), strict=False)), file)
              for line, row in enumerate(rows[1:], start=2)]
    problems = [p for p in parsed if isinstance(p, Problem)]
    markers = [m for m in parsed if isinstance(m, Marker)]
    problems += _order_problems(markers, file)
    if problems:
        raise InvalidInput(problems)
    return markers


def parse_marker_names(text: str, file: str = MARKERS) -> tuple[list[str], list[bool]]:
    """Marker names and ``remove`` flags in channel order, read as MCQuant reads markers.csv.

    Looser than :func:`parse_markers`, for ``atlas quantify`` on files made elsewhere: a CSV with a
    ``marker_name`` column (other columns optional), or one name per line without a header.
    Repeated names are allowed (MCQuant's tables suffix them ``_1``, ``_2``).
    """
    fix = "give a CSV with a marker_name column, one row per image channel in order"
    rows = _csv_rows(text, file, fix)
    if not rows:
        raise InvalidInput(Problem(file, "lists no markers", fix))
    header = rows[0]
    if "marker_name" in header:
        records = [dict(zip(header, row, strict=False)) for row in rows[1:]]
        names = [r.get("marker_name", "") for r in records]
        remove = [_flag(r.get("remove")) for r in records]
        first_line = 2
    elif all(len(row) == 1 for row in rows):
        names, remove, first_line = [row[0] for row in rows], [False] * len(rows), 1
    else:
        raise InvalidInput(Problem(file, f"has no marker_name column (header {header})", fix))
    empty = [line for line, name in enumerate(names, start=first_line) if not name]
    if not names or empty:
        raise InvalidInput(Problem(file, f"empty marker_name on line(s) {empty}" if empty else "lists no markers", fix))
    return names, remove


def _read_text(path: Path, file: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(Problem(file, "is not UTF-8 text", "save markers.csv as UTF-8 CSV")) from exc


def read_markers(path: Path) -> list[Marker]:
    """Read and parse a slide's markers.csv file (see :func:`parse_markers`)."""
    return parse_markers(_read_text(path, Path(path).name), Path(path).name)


def read_marker_names(path: Path) -> tuple[list[str], list[bool]]:
    """Read a markers file the MCQuant way (see :func:`parse_marker_names`)."""
    return parse_marker_names(_read_text(path, str(path)), str(path))


def channels_per_cycle(markers: list[Marker]) -> dict[int, int]:
    """Number of channels of each cycle, e.g. ``{1: 4, 2: 4}``."""
    counts: dict[int, int] = {}
    for m in markers:
        counts[m.cycle_number] = counts.get(m.cycle_number, 0) + 1
    return counts


def parse_manifest(text: str, file: str = SLIDE_MANIFEST) -> list[ManifestEntry]:
    """Parse manifest.json: ``{"slide_id": ..., "files": [{"path", "size", "sha256"}, ...]}``."""
    fix = "regenerate it with `atlas upload` (or `atlas manifest SLIDE`) after the last file is in place"
    try:
        doc = json.loads(text)
        entries = [ManifestEntry(str(f["path"]), int(f["size"]), str(f["sha256"]).lower()) for f in doc["files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(Problem(file, f"not a valid manifest ({exc.__class__.__name__}: {exc})", fix)) from exc
    bad = [e.path for e in entries if e.path.startswith("/") or ".." in e.path.split("/") or e.path == SLIDE_MANIFEST]
    if bad:
        raise InvalidInput(Problem(file, f"entries {bad} are not relative paths inside the slide", fix))
    return entries


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def slide_files(slide_dir: Path) -> list[str]:
    """Every file of a slide folder except the manifest, as sorted POSIX relative paths."""
    slide_dir = Path(slide_dir)
    return sorted(p.relative_to(slide_dir).as_posix() for p in slide_dir.rglob("*")
                  if p.is_file() and p.relative_to(slide_dir).as_posix() != SLIDE_MANIFEST)


def slide_manifest(slide_dir: Path, slide_id: str | None = None) -> dict:
    """The manifest document of a slide folder as it is now (does not write it).

    ``slide_id`` defaults to the folder's name (``atlas upload s3://BUCKET/SLIDE_ID`` may rename it).
    """
    slide_dir = Path(slide_dir)
    return {"slide_id": slide_id or slide_dir.name,
            "files": [{"path": rel, "size": (slide_dir / rel).stat().st_size, "sha256": sha256_file(slide_dir / rel)}
                      for rel in slide_files(slide_dir)]}


def manifest_bytes(doc: dict) -> bytes:
    """manifest.json's bytes for a manifest document; the run id hashes exactly these."""
    return (json.dumps(doc, indent=1) + "\n").encode()


def write_manifest(slide_dir: Path) -> Path:
    """Write ``manifest.json`` for a slide folder; call it after every other file is in place.

    Unchecked: for slides this package makes. ``atlas manifest`` checks the slide first
    (:func:`atlas.slide.validate.write_checked_manifest`).
    """
    path = Path(slide_dir) / SLIDE_MANIFEST
    path.write_bytes(manifest_bytes(slide_manifest(slide_dir)))
    return path


def raw_files(names: list[str]) -> list[str]:
    """The cycle files among slide-relative paths, in cycle order (sorted by name, as MCMICRO does)."""
    return sorted(n for n in names if n.startswith(RAW + "/") and n.lower().endswith(RAW_SUFFIXES))


def run_id_for(slide_id: str, manifest_bytes: bytes, suffix: str | None = None) -> str:
    """Run id = ``<slide_id>-<first 12 hex of the manifest's sha256>[-<suffix>]``.

    It is also the Step Functions execution name (at most 80 characters), so starting the same
    manifest twice is refused by AWS; an explicit rerun adds a suffix.
    """
    run_id = f"{slide_id}-{hashlib.sha256(manifest_bytes).hexdigest()[:12]}"
    if suffix:
        run_id += f"-{suffix}"
    if len(run_id) > 80 or not SLIDE_ID_RE.match(run_id[:63]):
        raise ValueError(f"run id {run_id!r} is not a valid execution name (<= 80 chars of [A-Za-z0-9_-])")
    return run_id
