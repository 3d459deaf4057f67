"""The publish stage as an array: items copy disjoint shares of the run's results, resumably; the
merge writes the manifest and makes the release visible.

The run is the local run of the sample slide (``sample_run``), its publish jobs run again through
the runner's job contract with a recording publisher standing for the results bucket (the S3
copies themselves: tests/test_release.py; the whole cloud path: tests/test_jobs.py).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from atlas import layout
from atlas.pipeline.contract import StageFailed
from atlas.pipeline.local import folder_context, run_local_job
from atlas.stages import get_stage
from atlas.stages import publish as publish_stage
from atlas.stages.publish import batch_unit, share


class RecordingPublisher:
    """A :class:`atlas.stages.publish.Publisher` that notes what it is asked; its ``fail_at``-th copy
    call raises, as a Spot reclaim would end the item there."""

    destination = "s3://results/slide/run/"

    def __init__(self, fail_at: int | None = None):
        self.fail_at, self.calls, self.copied, self.finished = fail_at, 0, [], None

    def copy(self, files):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ConnectionError("the instance was reclaimed")
        self.copied += [f["path"] for f in files]

    def finish(self, manifest):
        self.finished = manifest


@pytest.fixture
def unpublished(sample_run, tmp_path) -> Path:
    """A copy of the sample run as it was before its publish stage."""
    out = Path(shutil.copytree(sample_run, tmp_path / "run"))
    for path in [*(out / layout.PROVENANCE).glob("publish*"), out / layout.MANIFEST]:
        path.unlink()
    shutil.rmtree(out / layout.WORK / "publish", ignore_errors=True)
    return out


def context(sample_slide, out: Path, publisher):
    run_id = json.loads((out / layout.PROVENANCE / "align.json").read_text())["run_id"]
    return replace(folder_context(sample_slide, out, run_id=run_id), publisher=publisher)


def test_items_copy_disjoint_shares_and_the_merge_releases_the_manifest(sample_slide, sample_run, unpublished):
    """Three items copy every file of the manifest once between them; the merge writes the manifest
    (the same as the local run's, which had no publisher) and only then makes the release visible."""
    publishers = [RecordingPublisher() for _ in range(4)]
    *items, merged = get_stage("publish").jobs(3)
    for job, publisher in zip([*items, merged], publishers, strict=True):
        assert run_local_job(context(sample_slide, unpublished, publisher), job) is not None
    manifest = json.loads((unpublished / layout.MANIFEST).read_text())
    copied = [path for p in publishers[:3] for path in p.copied]
    assert all(p.copied for p in publishers[:3]) and publishers[3].copied == []
    assert sorted(copied) == sorted(f["path"] for f in manifest["files"])  # disjoint, and together all of it
    assert json.loads(json.dumps(publishers[3].finished)) == manifest
    assert all(p.finished is None for p in publishers[:3])
    # the release is today's: the files of every stage but publish, with their writers' sizes and sha256
    local = json.loads((sample_run / layout.MANIFEST).read_text())
    assert manifest["files"] == local["files"] and manifest["stages"] == local["stages"]
    assert not any(f["path"].startswith(f"{layout.PROVENANCE}/publish") for f in manifest["files"])
    assert "publish" not in {s["stage"] for s in manifest["stages"]}
    for entry in manifest["files"]:
        assert (unpublished / entry["path"]).stat().st_size == entry["size"]


def test_a_reclaimed_item_resumes_after_the_batches_it_copied(sample_slide, unpublished, monkeypatch):
    """An item cut short after two batches copies, on its retry, only the batches not yet journaled."""
    monkeypatch.setattr(publish_stage, "COPY_BATCH", 3)
    item = get_stage("publish").jobs(2)[0]
    reclaimed = RecordingPublisher(fail_at=3)
    with pytest.raises(StageFailed, match="reclaimed"):
        run_local_job(context(sample_slide, unpublished, reclaimed), item)
    assert len(reclaimed.copied) == 6 and not (unpublished / item.record).exists()
    retry = RecordingPublisher()
    assert run_local_job(context(sample_slide, unpublished, retry), item) is not None
    whole = RecordingPublisher()
    shutil.rmtree(unpublished / layout.WORK / "publish")
    (unpublished / item.record).unlink()
    run_local_job(context(sample_slide, unpublished, whole), item)
    assert reclaimed.copied + retry.copied == whole.copied and len(whole.copied) > 9
    assert retry.calls == whole.calls - 2


def test_shares_are_disjoint_balanced_and_the_same_in_every_item():
    files = [{"path": f"registration/S1.ome.zarr/0/{k}", "size": 1000 + k, "sha256": f"{k:064x}"} for k in range(500)]
    files.append({"path": "registration/S1.ome.tif", "size": 10 ** 10, "sha256": "f" * 64})
    shares = [share(files, i, 4) for i in range(4)]
    assert sorted(f["path"] for s in shares for f in s) == sorted(f["path"] for f in files)
    assert [share(list(reversed(files)), i, 4) for i in range(4)] == shares  # the list's order does not matter
    (alone,) = [s for s in shares if any(f["path"].endswith(".ome.tif") for f in s)]
    assert alone == [files[-1]]  # the large object gets an item of its own
    assert max(map(len, shares)) - min(len(s) for s in shares if s is not alone) <= 1
    # a batch is known by its files' paths and sha256: one changed file makes it another batch
    changed = [dict(files[0], sha256="a" * 64), *files[1:3]]
    here = RecordingPublisher.destination
    assert batch_unit(0, files[:3], here) == batch_unit(0, [dict(f) for f in files[:3]], here) \
        != batch_unit(0, changed, here)
    # ... and by where it goes: released again elsewhere, it is copied again
    assert batch_unit(0, files[:3], here) != batch_unit(0, files[:3], "s3://other-results/slide/run/")
