"""The stage registry: jobs of each stage, their sizes from the slide's size, and array sizes chosen at
run time carried through the completion records."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from atlas.aws.job import job_of
from atlas.pipeline import records
from atlas.pipeline.contract import BadJobArguments
from atlas.slide.ome import CycleMetadata
from atlas.stages import (
    HOST_MEMORY_MIB,
    MAX_ARRAY_SIZE,
    STAGES,
    STITCHING,
    JobSizes,
    SlideSize,
    Stage,
    ancestors,
    batch_jobs,
    check_order,
    dependencies,
    execution_sizes,
    get_stage,
    run_jobs,
    run_sizes,
)
from atlas.stages.flow import flat, flow
from atlas.storage import FolderStore

SAMPLE = SlideSize(tiles=9, cycles=2, channels=6, tile_shape=(512, 512))        # the made sample slide
TARGET = SlideSize(tiles=1000, cycles=10, channels=40, tile_shape=(2048, 2048))  # a real whole slide


def test_each_stage_runs_as_its_jobs_in_order():
    assert [job.label for job in run_jobs()] == [
        "illuminate[0]", "illuminate[1]", "illuminate merge", "align", "mosaic[0]", "mosaic[1]", "mosaic merge",
        "export", "segment[0]", "segment[1]", "segment[2]", "segment[3]", "segment merge", "quantify[0]",
        "quantify[1]", "quantify merge", "render[0]", "render[1]", "render merge", "publish[0]", "publish[1]",
        "publish merge"]
    assert [job.name for job in batch_jobs()] == ["illuminate", "illuminate-merge", "align", "mosaic", "mosaic-merge",
                                                  "export", "segment", "segment-merge", "quantify", "quantify-merge",
                                                  "render", "render-merge", "publish",
                                                  "publish-merge"]
    assert [stage.params for stage in STITCHING] == ["stitch"] * 4  # they share the params.yml section
    segment = get_stage("segment")
    assert [job.record for job in segment.jobs(2)] == ["qc/provenance/segment.0.json", "qc/provenance/segment.1.json",
                                                       "qc/provenance/segment.json"]
    assert segment.jobs(2)[1].argv(slide_uri="s3://i/S1/", work_uri="s3://w/r/", run_id="r") == [
        "stage", "segment", "--slide-uri", "s3://i/S1/", "--work-uri", "s3://w/r/", "--run-id", "r"]


def test_array_sizes_and_resources_follow_the_slide():
    # a small slide keeps the minimum
    assert (run_sizes(SAMPLE)["segment"].items, run_sizes(SAMPLE)["quantify"].items) == (4, 2)
    target = run_sizes(TARGET)
    # about one segment item and one quantify band per 100 MP: 1,000 tiles of 2048^2 px are 4.2 GP
    assert target["segment"].items == 42 and target["segment-merge"].items == 0
    assert target["quantify"].items == 42 and target["quantify-merge"].items == 0
    assert run_sizes(SlideSize(tiles=10**6, cycles=1, channels=1, tile_shape=(2048, 2048)))["segment"].items \
        == MAX_ARRAY_SIZE
    assert set(target) == {job.name for job in batch_jobs()}
    for name, sizes in target.items():
        assert sizes.memory_mib <= HOST_MEMORY_MIB, name  # every request fits a 16 GiB host
        assert (sizes.items > 0) == (name in ("illuminate", "mosaic", "segment", "quantify", "render", "publish")), name
    # the stitching fan-out: illumination one item per cycle, the mosaic one per channel; timeouts grow
    # with the tiles and channels
    assert (target["illuminate"].items, target["mosaic"].items) == (10, 40)
    assert (run_sizes(SAMPLE)["illuminate"].items, run_sizes(SAMPLE)["mosaic"].items) == (2, 6)
    assert all(target[name].timeout_s >= run_sizes(SAMPLE)[name].timeout_s for name in target)
    assert target["align"].timeout_s > run_sizes(SAMPLE)["align"].timeout_s
    # align registers its tiles over more vCPUs as tiles grow; the export encodes on more vCPUs as pixels grow
    assert (target["align"].vcpus, run_sizes(SAMPLE)["align"].vcpus) == (16, 4)
    assert run_sizes(SAMPLE)["export"].vcpus == 2 < target["export"].vcpus <= 16
    assert all(stage.memory_mib <= HOST_MEMORY_MIB for stage in STAGES)


def test_render_fans_out_by_channels_and_pixels():
    """Render items share the overview's tile rows: at least two on the sample slide, about one per
    1 G channel-pixels (40 channels x 4.2 GP: 168) on the target, each given the same memory."""
    assert run_sizes(SAMPLE)["render"].items == 2 and run_sizes(SAMPLE)["render-merge"].items == 0
    assert run_sizes(TARGET)["render"].items == math.ceil(40 * TARGET.pixels / 1e9) == 168
    fewer = run_sizes(SlideSize(tiles=1000, cycles=10, channels=20, tile_shape=(2048, 2048)))["render"]
    assert fewer.items == 84 and fewer.memory_mib == run_sizes(TARGET)["render"].memory_mib <= HOST_MEMORY_MIB
    assert run_sizes(SlideSize(tiles=10**6, cycles=10, channels=40, tile_shape=(2048, 2048)))["render"].items \
        == MAX_ARRAY_SIZE
    assert execution_sizes(SAMPLE)["render"]["items"] == 2 and execution_sizes(None)["render"]["items"] == 2


def test_publish_fans_out_by_channels_and_pixels():
    """Publish items share the release's objects: two on the sample slide, about one per 10 G
    channel-pixels on the target (40 channels x 4.2 GP: 17), each copying ~1/17 of ~10^6 objects."""
    assert run_sizes(SAMPLE)["publish"].items == 2 and run_sizes(SAMPLE)["publish-merge"].items == 0
    assert run_sizes(TARGET)["publish"].items == math.ceil(40 * TARGET.pixels / 1e10) == 17
    assert run_sizes(SlideSize(tiles=10**7, cycles=10, channels=40, tile_shape=(2048, 2048)))["publish"].items \
        == MAX_ARRAY_SIZE
    publish = get_stage("publish")
    assert publish.publishes and [j.label for j in publish.jobs(3)] == ["publish[0]", "publish[1]", "publish[2]",
                                                                        "publish merge"]


def test_the_execution_input_sizes_the_arrays_of_a_run():
    """What the trigger sends (sizes from the catalogued OME metadata) is what Step Functions and the
    local executor run: the array's items and merge, each told the array's size."""
    cycles = [CycleMetadata(n_tiles=1000, tile_shape=(2048, 2048), n_channels=4, dtype="uint16",
                            channel_names=("DNA", "a", "b", "c"), pixel_size_um=0.65, positions_um=None)
              for _ in range(10)]
    assert SlideSize.of_cycles(cycles) == TARGET
    sizes = execution_sizes(TARGET)
    assert sizes["segment"] == {"items": 42, "vcpus": 4, "memory_mib": HOST_MEMORY_MIB, "timeout_s": 6 * 3600}
    assert json.loads(json.dumps(sizes)) == sizes  # plain JSON, as an execution input
    jobs = [job for job in run_jobs(sizes=sizes) if job.stage.name == "segment"]
    assert [job.label for job in jobs] == [f"segment[{i}]" for i in range(42)] + ["segment merge"]
    assert jobs[-1].argv(slide_uri="s3://i/S1/", work_uri="s3://w/r/", run_id="r", items=42)[-3:] == [
        "--merge", "--items", "42"]
    assert [job.label for job in run_jobs(sizes=execution_sizes(None))] == [job.label for job in run_jobs()]


def test_an_array_run_at_another_size_is_found_by_the_stages_after_it(tmp_path):
    """The merge record says how many items ran; later jobs build on exactly those."""
    segment = get_stage("segment")
    *items, merge = job_of("segment", None, True, items=2).stage.jobs(2)
    assert job_of("segment", 1, False, items=2) == items[1]
    with pytest.raises(BadJobArguments, match="array index 2 is outside 0..1"):
        job_of("segment", 2, False, items=2)
    work = FolderStore(tmp_path)
    earlier = list(run_jobs(STITCHING))
    for job in [*earlier, *items, merge]:
        records.write_record(work, job, records.new_record(job, run_id="r", started=0, finished=1, outputs=[]))
    assert records.loads(work.read_bytes(merge.record))["count"] == 2
    found, missing, changed = records.upstream_records(work, get_stage("quantify").jobs()[0], "r")
    built_on = [j for j in earlier if j.stage.name != "export"]  # quantify builds on the mosaic, not the export
    assert sorted(found) == sorted(j.record for j in [*built_on, *items, merge])
    assert missing == [] and changed == {}
    assert segment.jobs()[2].record not in found  # the registry's default of 4 items does not apply


def test_stages_build_on_what_they_read_and_the_export_on_the_mosaic_alone(tmp_path):
    """The graph: every stage is listed after what it builds on; segment starts once the mosaic is
    merged, whether or not the export has run (Step Functions runs them side by side), and publish
    needs every stage."""
    names = [s.name for s in STAGES]
    assert all(names.index(d.name) < names.index(s.name) for s in STAGES for d in dependencies(s))
    assert [s.name for s in ancestors(get_stage("export"))] == ["illuminate", "align", "mosaic"]
    assert [s.name for s in ancestors(get_stage("segment"))] == ["illuminate", "align", "mosaic"]
    assert [s.name for s in ancestors(get_stage("quantify"))] == ["illuminate", "align", "mosaic", "segment"]
    # render runs beside the export: its overview names the OME-TIFF from the layout
    assert [s.name for s in ancestors(get_stage("render"))] == ["illuminate", "align", "mosaic", "segment", "quantify"]
    assert [s.name for s in ancestors(get_stage("publish"))] == names[:-1]
    work = FolderStore(tmp_path)
    for job in run_jobs([s for s in STITCHING if s.name != "export"]):
        records.write_record(work, job, records.new_record(job, run_id="r", started=0, finished=1, outputs=[]))
    assert records.upstream_records(work, get_stage("segment").jobs()[0], "r")[1] == []  # nothing missing
    missing = records.upstream_records(work, get_stage("publish").jobs()[0], "r")[1]
    assert {j.stage.name for j in missing} == {"export", "segment", "quantify", "render"}


def test_the_state_machine_shape_runs_independent_stages_as_parallel_branches():
    def names(steps):
        return [s.name if isinstance(s, Stage) else [names(b) for b in s] for s in steps]

    assert names(flow()) == ["illuminate", "align", "mosaic", [["export"], ["segment", "quantify", "render"]],
                             "publish"]
    assert flat(flow()) == list(STAGES)  # branch after branch is the registry's order
    with pytest.raises(ValueError, match="listed after it"):
        check_order((get_stage("segment"), get_stage("mosaic")))


def test_a_sizing_that_does_not_fit_a_host_is_refused():
    greedy = replace(get_stage("segment"), sizing=lambda slide: JobSizes(4, 4, HOST_MEMORY_MIB + 1, 3600))
    with pytest.raises(ValueError, match="at most"):
        greedy.sizes(TARGET)
    for slide in (SAMPLE, TARGET, SlideSize(tiles=10**6, cycles=20, channels=100, tile_shape=(2048, 2048))):
        # what SubmitJob applies: memory within the host, at least one vCPU, Batch's minimum attempt of 60 s
        sizes = execution_sizes(slide)
        assert all(s["memory_mib"] <= HOST_MEMORY_MIB and s["vcpus"] >= 1 and s["timeout_s"] >= 60
                   for s in sizes.values()), sizes
