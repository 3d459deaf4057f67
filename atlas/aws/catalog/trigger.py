"""The trigger decision: is a slide complete, is it valid, and then start exactly one run.

:func:`check_slide` reads every item of a slide (consistent read). Until ``manifest.json`` is there
and every file it lists has arrived with its size (and sha256, when the uploader recorded one), the
slide is COLLECTING and its item lists what is missing. Then the slide is validated
(:func:`atlas.slide.validate.check_contents`) and flipped COLLECTING -> READY or INVALID with one
conditional update, so that only one invocation wins; the winner starts the Step Functions execution
named after the run id (AWS refuses a second execution of that name) or sends the INVALID
notification listing every problem.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from boto3.dynamodb.conditions import Attr

from atlas.aws.catalog.objects import cycle_metadata_from_item, read_text_object
from atlas.aws.catalog.runs import execution_input, mark_ready, start_run
from atlas.aws.catalog.settings import Aws, Settings
from atlas.aws.catalog.status import notify
from atlas.aws.catalog.table import (
    OBJECT_SK_PREFIX,
    RUN_OUTCOME_FIELDS,
    SLIDE_SK,
    Status,
    slide_items,
    slide_key,
    timestamp,
    update_if,
)
from atlas.errors import InvalidInput, Problem
from atlas.slide.convention import MARKERS, PARAMS, SLIDE_MANIFEST, parse_manifest, raw_files, run_id_for
from atlas.slide.story import STORY
from atlas.stages import SlideSize, execution_sizes

# Everything a decision on a manifest version writes: cleared when a newer version is collected.
_DECISION_FIELDS = (*RUN_OUTCOME_FIELDS, "run_id", "status_order", "ignored")


@dataclass(frozen=True)
class _Manifest:
    item: dict
    data: bytes

    @property
    def version(self) -> str:
        return hashlib.sha256(self.data).hexdigest()[:12]

    @property
    def sequencer(self) -> str:
        return self.item["sequencer"]


def missing_files(entries, objects: Mapping[str, Mapping]) -> list[dict]:
    """Manifest entries not (yet) present as listed: ``[{"path", "expected_size", "found_size", "why"}]``."""
    missing = []
    for entry in entries:
        obj = objects.get(entry.path)
        if obj is None:
            why = "not arrived yet"
        elif int(obj["size"]) != entry.size:
            why = f"has {int(obj['size'])} bytes, manifest.json says {entry.size} (a newer upload may be arriving)"
        elif obj.get("sha256") and obj["sha256"] != entry.sha256:
            why = "content (sha256) differs from manifest.json (a newer upload may be arriving)"
        else:
            continue
        missing.append({"path": entry.path, "expected_size": entry.size,
                        "found_size": None if obj is None else int(obj["size"]), "why": why})
    return missing


def _open_manifest_condition(version: str | None, sequencer: str | None):
    """Condition for writing the slide item for a manifest version: never over a newer manifest,
    never over a decision already taken for this version."""
    if sequencer is None:  # no manifest yet: only a fresh or still manifest-less collecting slide
        return Attr("pk").not_exists() | (Attr("status").eq(Status.COLLECTING)
                                          & Attr("manifest_sequencer").not_exists())
    still_collecting = Attr("status").eq(Status.COLLECTING) & (
        Attr("manifest_sequencer").not_exists() | Attr("manifest_sequencer").lte(sequencer))
    newer_version = Attr("manifest_sequencer").lt(sequencer) & Attr("manifest_version").ne(version)
    return Attr("pk").not_exists() | still_collecting | newer_version


def check_slide(aws: Aws, settings: Settings, slide_id: str) -> dict:
    """Look at everything catalogued for a slide and move it on if it is complete (see module doc).

    Safe to call any number of times, concurrently, in any order: the conditional updates let one
    call decide per manifest version, and the execution name (the run id) is unique per version.

    Returns
    -------
    dict
        ``{"slide_id", "status", "outcome", ...}``; outcome is one of ``collecting``, ``started``,
        ``invalid``, ``decided`` (nothing to do: this version was decided already) or ``stale``
        (a newer manifest was seen meanwhile).
    """
    items = slide_items(aws.table, slide_id)
    slide = next((i for i in items if i["sk"] == SLIDE_SK), {})
    objects = {i["path"]: i for i in items if i["sk"].startswith(OBJECT_SK_PREFIX)}
    if SLIDE_MANIFEST not in objects:
        missing = [{"path": SLIDE_MANIFEST, "expected_size": None, "found_size": None,
                    "why": "not arrived yet (written last by `atlas upload`)"}]
        return _collecting(aws, slide_id, None, missing, {"files_present": len(objects)})
    manifest = _Manifest(objects[SLIDE_MANIFEST], read_text_object(aws.s3, objects[SLIDE_MANIFEST]))
    if slide.get("manifest_version") == manifest.version and slide.get("status") != Status.COLLECTING:
        return {"slide_id": slide_id, "status": slide["status"], "outcome": "decided", "run_id": slide.get("run_id")}
    manifest_text = manifest.data.decode("utf-8", errors="replace")
    try:
        entries = parse_manifest(manifest_text)
    except InvalidInput:
        entries = None  # complete as far as the uploader is concerned, and broken: validate what is there
    if missing := ([] if entries is None else missing_files(entries, objects)):
        return _collecting(aws, slide_id, manifest, missing, {"files_expected": len(entries),
                                                              "files_present": len(entries) - len(missing)})
    listed = set(objects) - {SLIDE_MANIFEST} if entries is None else {e.path for e in entries}
    if problems := _validate(aws, slide_id, manifest_text, listed, objects):
        return _decide_invalid(aws, settings, slide_id, manifest, problems)
    return _decide_ready(aws, settings, slide_id, manifest, listed, sorted(set(objects) - listed - {SLIDE_MANIFEST}),
                         slide_size(objects, listed))


def slide_size(objects: Mapping[str, Mapping], listed: set[str]) -> SlideSize:
    """The slide's size (:class:`atlas.stages.SlideSize`) from its cycles' catalogued OME metadata, which
    sizes the run's jobs (the execution input's ``sizes``)."""
    return SlideSize.of_cycles([cycle_metadata_from_item(objects[path]["ome"]) for path in raw_files(sorted(listed))])


def _version_fields(manifest: _Manifest) -> dict:
    return {"manifest_version": manifest.version, "manifest_sequencer": manifest.sequencer, "updated_at": timestamp()}


def _collecting(aws: Aws, slide_id: str, manifest: _Manifest | None, missing: list[dict], counts: dict) -> dict:
    """Record what is still missing (the slide stays COLLECTING)."""
    if manifest is None:
        condition, values, remove = _open_manifest_condition(None, None), {"updated_at": timestamp()}, ()
    else:
        condition = _open_manifest_condition(manifest.version, manifest.sequencer)
        values, remove = _version_fields(manifest), tuple(f for f in _DECISION_FIELDS if f != "missing")
    done = update_if(aws.table, slide_key(slide_id), condition,
                     {"status": Status.COLLECTING, "missing": missing, **counts, **values}, remove)
    result = {"slide_id": slide_id, "status": Status.COLLECTING, "outcome": "collecting" if done else "stale"}
    return result if manifest is None else result | {"missing": [m["path"] for m in missing]}


def _decide_ready(aws: Aws, settings: Settings, slide_id: str, manifest: _Manifest, listed: set[str],
                  ignored: list[str], size: SlideSize) -> dict:
    """Flip to READY for the manifest's run id and start its execution (once)."""
    run_id = run_id_for(slide_id, manifest.data)
    won = mark_ready(aws.table, slide_id, run_id, _open_manifest_condition(manifest.version, manifest.sequencer),
                     {"ignored": ignored, "files_expected": len(listed), "files_present": len(listed)}
                     | _version_fields(manifest))
    if not won:
        # Lost the race, or this is a retry after a crash between the flip and the start: start
        # only if the item says READY for this run without an execution (the start is idempotent).
        current = aws.table.get_item(Key=slide_key(slide_id), ConsistentRead=True)["Item"]
        if current.get("run_id") != run_id or current.get("status") != Status.READY or current.get("execution_arn"):
            return {"slide_id": slide_id, "status": current["status"], "outcome": "decided",
                    "run_id": current.get("run_id")}
    payload = execution_input(slide_id=slide_id, run_id=run_id, work_bucket=settings.work_bucket,
                              slide_uri=f"s3://{manifest.item['bucket']}/{slide_id}/", sizes=execution_sizes(size))
    arn = start_run(aws.table, aws.sfn, settings.state_machine_arn, payload=payload,
                    run_fields={"manifest_version": manifest.version})
    return {"slide_id": slide_id, "status": Status.READY, "outcome": "started", "run_id": run_id,
            "execution_arn": arn}


def _validate(aws: Aws, slide_id: str, manifest_text: str, listed: set[str],
              objects: Mapping[str, Mapping]) -> list[Problem]:
    """Every problem of a complete slide, from the catalog (the same checks as `atlas validate`).

    ``listed`` are the manifest's files: objects left from an earlier upload are not part of this
    manifest version and are neither checked nor processed.
    """
    from atlas.slide.validate import check_contents

    def text(name: str) -> str | None:
        if name not in listed:
            return None
        return read_text_object(aws.s3, objects[name]).decode("utf-8", errors="replace")

    cycles = {}
    for path in raw_files(sorted(listed)):
        obj = objects[path]
        cycles[path] = cycle_metadata_from_item(obj["ome"]) if obj.get("ome") else ValueError(obj.get("ome_error"))
    files = {path: int(objects[path]["size"]) for path in sorted(listed)}
    return check_contents(slide_id=slide_id, files=files, manifest_text=manifest_text, markers_text=text(MARKERS),
                          params_text=text(PARAMS), cycles=cycles, story_text=text(STORY))


def _decide_invalid(aws: Aws, settings: Settings, slide_id: str, manifest: _Manifest,
                    problems: list[Problem]) -> dict:
    won = update_if(aws.table, slide_key(slide_id), _open_manifest_condition(manifest.version, manifest.sequencer),
                    {"status": Status.INVALID, "problems": [{"file": p.file, "message": p.message, "fix": p.fix}
                                                            for p in problems]} | _version_fields(manifest),
                    remove=tuple(f for f in _DECISION_FIELDS if f != "problems"))
    if won:
        lines = [f"Slide {slide_id} is INVALID (manifest version {manifest.version}): nothing was processed "
                 "and the uploaded files are kept as they are.", "", f"Problems ({len(problems)}):"]
        lines += [f"  - {p}" for p in problems]
        lines += ["", "Fix them and upload the slide again (`atlas upload`); the new manifest starts a new run."]
        notify(aws, settings, slide_id=slide_id, status=Status.INVALID, lines=lines)
    return {"slide_id": slide_id, "status": Status.INVALID, "outcome": "invalid" if won else "decided",
            "problems": [str(p) for p in problems]}
