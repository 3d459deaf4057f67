"""The stage registry: the one list of pipeline stages, what each builds on, and the jobs each one runs as.

It drives the local runner (:mod:`atlas.pipeline.local`), the Batch entrypoint (``atlas stage``,
:mod:`atlas.aws.job`), the local Step Functions + Batch stand-in (``localcloud.executor``), the
Batch job definitions and the Step Functions state machine (``infra/``), and ops' status.

The stage contract
------------------
Each stage is a module ``atlas.stages.<name>``. A plain stage exposes ``run(ctx) -> None``; an
array stage (``array_size > 0``) exposes ``run_item(ctx, index, count) -> None`` (item ``index``
of ``count`` does its share of the work, e.g. tiles ``index, index + count, ...``) and
``merge(ctx) -> None``. A stage does all its I/O through the stores of its context
(:mod:`atlas.storage`): it reads the slide as uploaded from ``ctx.slide`` and earlier stages'
outputs from ``ctx.work``, by byte range, chunk or whole small object, never by copying whole
inputs; it writes only what the registry declares into ``ctx.work``: its ``outputs`` (plain job,
merge) or, for an array item, objects below its ``item_dir``. Local scratch space it needs besides
(memory maps, temporary stores) lives in ``ctx.scratch``. It must be deterministic: the same
inputs give byte-identical outputs. It reads nothing from the environment: what the entry point
knows (engine weights, where the run is published, the job's vCPUs, the completion records it
builds on) is in the context.

The stage graph
---------------
A stage builds on the stages its ``after`` names (default: the stage listed just before it), and
on theirs in turn (:func:`ancestors`): its jobs get their completion records and may read their
outputs, nothing else. The registry's order is a topological order of the graph (the local runner
runs it); stages that do not build on each other run in the branches of a ``Parallel`` state
(:func:`atlas.stages.flow.flow`). ``after`` is stated, not derived from the patterns: publish
declares no input yet releases everything, and ``qc/*/*`` overlaps several stages' outputs.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import TYPE_CHECKING, Any

from atlas import layout
from atlas.params import Params
from atlas.storage import Store

if TYPE_CHECKING:  # the registry stays light to import (CDK app, ops); the engines pull in scipy
    from atlas.science.segmentation import EngineSettings
    from atlas.stages.publish import Publisher

RAW_PREFIX = "raw:"          # an input pattern relative to the slide, not to the results layout


def matches(rel: str, pattern: str) -> bool:
    """Does ``rel`` (a posix path) fall under the glob ``pattern``?

    Path components are matched one by one (``*`` never crosses a ``/``), and a path below a
    matching folder matches too: ``registration/*.ome.zarr/labels`` covers every file of the
    labels group, as :meth:`pathlib.Path.glob` plus "a folder counts file by file" would.
    """
    parts, pats = PurePosixPath(rel).parts, PurePosixPath(pattern).parts
    return len(parts) >= len(pats) and all(fnmatchcase(p, q) for p, q in zip(parts, pats, strict=False))


@dataclass(frozen=True)
class SlideSize:
    """How big a slide is, as its raw files' OME metadata says (the catalog reads it by ranged reads
    before a run starts; the registry sizes each stage's jobs from it).

    Attributes
    ----------
    tiles : int
        Tiles per cycle.
    cycles : int
    channels : int
        Channels over all cycles (the registered image's).
    tile_shape : (int, int)
        (Y, X) pixels of a tile.
    """

    tiles: int
    cycles: int
    channels: int
    tile_shape: tuple[int, int]

    @property
    def pixels(self) -> int:
        """Pixels per channel of the mosaic, at most (tiles x tile pixels; overlaps counted twice)."""
        return self.tiles * self.tile_shape[0] * self.tile_shape[1]

    @classmethod
    def of_cycles(cls, cycles: Sequence[Any]) -> SlideSize:
        """The size of a slide from its cycles' OME metadata (:class:`atlas.slide.ome.CycleMetadata`:
        ``n_tiles``, ``n_channels``, ``tile_shape``), in cycle order; the first cycle's tiles count."""
        first = cycles[0]
        return cls(tiles=int(first.n_tiles), cycles=len(cycles), channels=sum(int(c.n_channels) for c in cycles),
                   tile_shape=(int(first.tile_shape[0]), int(first.tile_shape[1])))


@dataclass(frozen=True)
class JobSizes:
    """What one Batch job of a stage gets for a given slide: its array size, vCPUs, memory, timeout.

    Attributes
    ----------
    items : int
        Array items (0: a single job).
    vcpus, memory_mib, timeout_s : int
    """

    items: int
    vcpus: int
    memory_mib: int
    timeout_s: int


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline and what it needs to run as a Batch job.

    Attributes
    ----------
    name : str
        Stage name, also the CLI verb, Batch job name and state name.
    image : {"cpu", "gpu"}
        Container image that runs it.
    vcpus : int
        vCPUs of its Batch job; its thread pools are sized from this (``ctx.vcpus``).
    memory_mib : int
        Memory of its Batch job (MiB).
    timeout_s : int
        Batch attempt timeout (s).
    inputs : tuple of str
        Glob patterns of what it reads, relative to the results layout (``raw:`` prefix: relative
        to the slide). Earlier stages' outputs it reads must match one.
    outputs : tuple of str
        Glob patterns of everything the stage (plain job, or the merge of an array stage) writes
        in the results layout; writing anything else fails the job.
    array_size : int
        0 for a single job; otherwise the number of Batch array items (then a merge job).
    item_dir : str or None
        Array stages: the work folder the items write their parts to (and the merge reads). It is
        part of the run's work, never of a release.
    item_outputs : tuple of str
        Array stages: glob patterns of results an item writes in place besides its ``item_dir``
        (e.g. its share of an OME-Zarr's chunks); an item may write nothing else.
    publishes : bool
        Its Batch jobs release the run (the last stage): they get a ``publisher`` in their context.
    params_section : str or None
        The params.yml section its outputs depend on (default: the stage's name; the stitching
        stages share ``stitch``).
    sizing : callable, optional
        ``sizing(slide: SlideSize) -> JobSizes``: the stage's fan-out, memory and timeout as
        functions of the slide (:meth:`sizes`); None: the constants above, whatever the slide.
    after : tuple of str or None
        Names of the stages it builds on (see "The stage graph" above); None: the stage listed
        just before it (none for the first).
    """

    name: str
    image: str
    vcpus: int
    memory_mib: int
    timeout_s: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    array_size: int = 0
    item_dir: str | None = None
    item_outputs: tuple[str, ...] = ()
    publishes: bool = False
    params_section: str | None = None
    sizing: Callable[[SlideSize], JobSizes] | None = None
    after: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if bool(self.array_size) != bool(self.item_dir):
            raise ValueError(f"stage {self.name!r}: an array stage needs an item_dir, a plain stage has none")

    def sizes(self, slide: SlideSize | None = None) -> JobSizes:
        """The stage's jobs' sizes for ``slide`` (its ``sizing``), or the registry's constants."""
        if slide is None or self.sizing is None:
            return JobSizes(self.array_size, self.vcpus, self.memory_mib, self.timeout_s)
        sized = self.sizing(slide)
        if sized.memory_mib > HOST_MEMORY_MIB:
            raise ValueError(f"stage {self.name!r}: sizing asks for {sized.memory_mib} MiB; a job gets at most "
                             f"{HOST_MEMORY_MIB} MiB (HOST_MEMORY_MIB, what a 16 GiB host leaves a container)")
        if bool(sized.items) != bool(self.array_size):
            raise ValueError(f"stage {self.name!r}: sizing gave {sized.items} items; an array stage needs at "
                             "least one, a plain stage none")
        return sized

    @property
    def params(self) -> str:
        """The params.yml section its outputs depend on."""
        return self.params_section or self.name

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"atlas.stages.{self.name}")

    def jobs(self, items: int | None = None) -> tuple[Job, ...]:
        """The stage's jobs in the order they run: the items (``items``, default ``array_size``)
        then the merge for an array stage; the one job of a plain stage."""
        if not self.array_size:
            return (Job(self),)
        count = self.array_size if items is None else items
        return (*(Job(self, item=i, count=count) for i in range(count)), Job(self, merge=True, count=count))

    def declared(self, job: Job, rel: str) -> bool:
        """May ``job`` of this stage write the results-layout path ``rel``?"""
        return any(matches(rel, pattern) for pattern in self.writes(job))

    def writes(self, job: Job) -> tuple[str, ...]:
        """The patterns ``job`` of this stage may write: an item's ``item_dir`` and ``item_outputs``,
        else the ``outputs``."""
        return (self.item_dir, *self.item_outputs) if job.item is not None else self.outputs

    def reads(self, rel: str) -> bool:
        """Is the results-layout path ``rel`` one of this stage's declared (non-raw) inputs?"""
        return any(matches(rel, p) for p in self.inputs if not p.startswith(RAW_PREFIX))

    def raw_inputs(self) -> tuple[str, ...]:
        """Input patterns relative to the slide (the ``raw:`` ones, prefix removed)."""
        return tuple(p[len(RAW_PREFIX):] for p in self.inputs if p.startswith(RAW_PREFIX))


@dataclass(frozen=True)
class Job:
    """One unit of work of a stage: the plain job, one array item, or the merge of an array stage.

    Attributes
    ----------
    stage : Stage
    item : int or None
        Array item index (None for a plain job or a merge).
    merge : bool
    count : int
        Items of the array (0 for a plain stage).
    """

    stage: Stage
    item: int | None = None
    merge: bool = False
    count: int = 0

    @property
    def label(self) -> str:
        """For people and logs: ``stitch``, ``segment[2]``, ``segment merge``."""
        return self.stage.name + ("" if self.item is None else f"[{self.item}]") + (" merge" if self.merge else "")

    @property
    def name(self) -> str:
        """Batch job definition and Step Functions state: ``segment`` (the array), ``segment-merge``."""
        return f"{self.stage.name}-merge" if self.merge else self.stage.name

    @property
    def record(self) -> str:
        """Results-layout path of its completion record, ``qc/provenance/<stage>[.<item>].json``."""
        return layout.completion_record(self.stage.name, self.item)

    def argv(self, *, slide_uri: str, work_uri: str, run_id: str, items: int | str | None = None,
             vcpus: int | str | None = None) -> list[str]:
        """Arguments of ``atlas`` that run this job: ``stage NAME --slide-uri ... [--merge] [--items N]
        [--vcpus V]``.

        Array items get no index here: Batch sets ``AWS_BATCH_JOB_ARRAY_INDEX`` in each child (the
        local executor does the same). ``items``: the array's size in this run, for an array stage's
        items and merge; ``vcpus``: the job's vCPUs in this run (both from the execution input's
        ``sizes``). Values may be Batch parameter references (``Ref::run_id``).
        """
        argv = ["stage", self.stage.name, "--slide-uri", slide_uri, "--work-uri", work_uri, "--run-id", run_id]
        argv += ["--merge"] if self.merge else []
        argv += ["--items", str(items)] if items is not None and self.stage.array_size else []
        return argv + (["--vcpus", str(vcpus)] if vcpus is not None else [])

    def declared(self, rel: str) -> bool:
        """May this job write ``rel``? (:meth:`Stage.declared`)"""
        return self.stage.declared(self, rel)


# Batch's limits and what one Batch job may ask for: memory must fit the instance family's hosts
# (ECS keeps some of a 16 GiB host for itself), arrays have 2..10,000 children.
HOST_MEMORY_MIB = 15 * 1024
MAX_ARRAY_SIZE = 10_000
SEGMENT_PIXELS_PER_ITEM = 100_000_000  # one segment item per ~100 MP of the nucleus channel
SEGMENT_MIN_ITEMS = 4
TARGET_TILE_PIXELS = 2048 * 2048  # the rates in the sizings below are per tile of this size


def segment_sizes(slide: SlideSize) -> JobSizes:
    """Segment fans out by the slide's pixels: one item per :data:`SEGMENT_PIXELS_PER_ITEM` (at least
    :data:`SEGMENT_MIN_ITEMS`), each reading its region's chunks of one channel."""
    items = min(MAX_ARRAY_SIZE, max(SEGMENT_MIN_ITEMS, math.ceil(slide.pixels / SEGMENT_PIXELS_PER_ITEM)))
    return JobSizes(items=items, vcpus=4, memory_mib=HOST_MEMORY_MIB, timeout_s=6 * 3600)


QUANTIFY_PIXELS_PER_ITEM = 100_000_000  # one quantify band per ~100 MP of the label image
QUANTIFY_MIN_ITEMS = 2


def quantify_sizes(slide: SlideSize) -> JobSizes:
    """Quantify fans out by the slide's pixels: one row band per :data:`QUANTIFY_PIXELS_PER_ITEM` (at
    least :data:`QUANTIFY_MIN_ITEMS`), each holding its band of the masks (4 B/px each) and reading the
    channels' chunks of its rows; the merge holds the tables (one row per cell)."""
    items = min(MAX_ARRAY_SIZE, max(QUANTIFY_MIN_ITEMS, math.ceil(slide.pixels / QUANTIFY_PIXELS_PER_ITEM)))
    return JobSizes(items=items, vcpus=2, memory_mib=HOST_MEMORY_MIB, timeout_s=3 * 3600)


RENDER_CHANNEL_PIXELS_PER_ITEM = 1_000_000_000  # one render item per ~1 G channel-pixels of the full-size level
RENDER_MIN_ITEMS = 2
RENDER_MEMORY_MIB = 8192
RENDER_CHANNEL_PIXELS_PER_SECOND = 5_000_000  # per item (2 vCPUs), reading, compositing and encoding tiles


def render_sizes(slide: SlideSize) -> JobSizes:
    """Render fans out by the slide's channels and pixels: one item per :data:`RENDER_CHANNEL_PIXELS_PER_ITEM`
    of channel-pixels (at least :data:`RENDER_MIN_ITEMS`), each rendering a share of the overview's tile
    rows (by layer and level) from the chunks of its layers' channels, a tile at a time per thread;
    its timeout from its share at :data:`RENDER_CHANNEL_PIXELS_PER_SECOND`, three times over. The
    merge holds the cell table's centroids and marker means (the drafted story)."""
    channel_pixels = slide.channels * slide.pixels
    items = min(MAX_ARRAY_SIZE, max(RENDER_MIN_ITEMS, math.ceil(channel_pixels / RENDER_CHANNEL_PIXELS_PER_ITEM)))
    timeout = max(3600, math.ceil(3 * channel_pixels / items / RENDER_CHANNEL_PIXELS_PER_SECOND))
    return JobSizes(items=items, vcpus=2, memory_mib=RENDER_MEMORY_MIB, timeout_s=timeout)


def fan_out_sizes(unit: str, vcpus: int, memory_mib: int,
                  seconds_per_tile_channel: float) -> Callable[[SlideSize], JobSizes]:
    """Sizes of a stage that fans out one item per ``unit`` ("cycle" or "channel"), its timeout from
    the tile-channels of an item (``seconds_per_tile_channel`` at the 2048^2 px tiles of the target,
    three times over)."""
    def sizing(slide: SlideSize) -> JobSizes:
        units = slide.cycles if unit == "cycle" else slide.channels
        tile_channels = math.ceil(slide.channels / units) * slide.pixels / TARGET_TILE_PIXELS
        timeout = max(3600, math.ceil(3 * seconds_per_tile_channel * tile_channels))
        return JobSizes(items=min(MAX_ARRAY_SIZE, units), vcpus=vcpus, memory_mib=memory_mib, timeout_s=timeout)
    return sizing


MAX_JOB_VCPUS = 16  # the largest c6i/m6i hosts the jobs use whole (c6i.4xlarge); memory stays HOST_MEMORY_MIB


def align_sizes(slide: SlideSize) -> JobSizes:
    """Align reads the alignment channel of every tile of every cycle (about 1 s per 2048^2 px tile,
    three times over). Its tiles are registered in threads (the first cycle's tile pairs, then every
    later cycle's tiles; each cycle's thumbnail in a thread of its own: ``align_cycles``), so it gets
    a vCPU per 500 of those tiles (~1 s of CPU each), 4 to :data:`MAX_JOB_VCPUS`."""
    tiles = slide.cycles * slide.pixels / TARGET_TILE_PIXELS
    return JobSizes(items=0, vcpus=min(MAX_JOB_VCPUS, max(4, math.ceil(tiles / 500))),
                    memory_mib=HOST_MEMORY_MIB, timeout_s=max(3600, math.ceil(3 * tiles)))


EXPORT_CHANNEL_PIXELS_PER_VCPU = 20_000_000_000  # one vCPU encoding the OME-TIFF's tiles per this many
EXPORT_PIXELS_PER_VCPU_SECOND = 10_000_000       # read from the zarr, predicted and deflated (a floor)


def export_sizes(slide: SlideSize) -> JobSizes:
    """The export encodes the OME-TIFF's tiles in threads (the job's vCPUs): one vCPU per
    :data:`EXPORT_CHANNEL_PIXELS_PER_VCPU` channel-pixels (2 to :data:`MAX_JOB_VCPUS`); its timeout
    from its pixels at :data:`EXPORT_PIXELS_PER_VCPU_SECOND`, three times over."""
    channel_pixels = slide.channels * slide.pixels
    vcpus = min(MAX_JOB_VCPUS, max(2, math.ceil(channel_pixels / EXPORT_CHANNEL_PIXELS_PER_VCPU)))
    timeout = max(3600, math.ceil(3 * channel_pixels / (vcpus * EXPORT_PIXELS_PER_VCPU_SECOND)))
    return JobSizes(items=0, vcpus=vcpus, memory_mib=4096, timeout_s=timeout)


PUBLISH_CHANNEL_PIXELS_PER_ITEM = 10_000_000_000  # one publish item per ~10 G channel-pixels (~1 min of copies)


def publish_sizes(slide: SlideSize) -> JobSizes:
    """Publish fans out by the slide's channel-pixels (the release's objects, mostly zarr chunks, grow with
    them), at least 2 items, each copying its share server-side; every job holds the run's list of results."""
    items = min(MAX_ARRAY_SIZE, max(2, math.ceil(slide.channels * slide.pixels / PUBLISH_CHANNEL_PIXELS_PER_ITEM)))
    return JobSizes(items=items, vcpus=1, memory_mib=4096, timeout_s=3600)


RAW_INPUTS = ("raw:markers.csv", "raw:raw/*", "raw:params.yml")
REGISTERED_ZARR = f"{layout.REGISTRATION}/*.ome.zarr"

STAGES: tuple[Stage, ...] = (
    Stage("illuminate", "cpu", vcpus=1, memory_mib=4096, timeout_s=3 * 3600, array_size=2,
          item_dir=f"{layout.WORK}/illuminate", item_outputs=(f"{layout.ILLUMINATION}/*",),
          sizing=fan_out_sizes("cycle", 1, 4096, 0.5), params_section="stitch", inputs=RAW_INPUTS, outputs=()),
    Stage("align", "cpu", vcpus=4, memory_mib=HOST_MEMORY_MIB, timeout_s=6 * 3600, sizing=align_sizes,
          params_section="stitch",
          inputs=(*RAW_INPUTS, f"{layout.ILLUMINATION}/*"),
          outputs=(REGISTERED_ZARR, f"{layout.QC}/stitch/*", f"{layout.WORK}/align/*")),
    Stage("mosaic", "cpu", vcpus=2, memory_mib=4096, timeout_s=6 * 3600, array_size=2,
          item_dir=f"{layout.WORK}/mosaic", item_outputs=(REGISTERED_ZARR,), params_section="stitch",
          sizing=fan_out_sizes("channel", 2, 4096, 2.0),
          inputs=(*RAW_INPUTS, f"{layout.ILLUMINATION}/*", f"{layout.WORK}/align/*", REGISTERED_ZARR),
          outputs=(f"{REGISTERED_ZARR}/.zattrs", f"{REGISTERED_ZARR}/.zgroup", f"{layout.QC}/stitch/mosaic.png")),
    Stage("export", "cpu", vcpus=2, memory_mib=4096, timeout_s=6 * 3600, params_section="stitch", sizing=export_sizes,
          inputs=("raw:markers.csv", REGISTERED_ZARR, f"{layout.WORK}/align/*"),
          outputs=(f"{layout.REGISTRATION}/*.ome.tif", layout.htan_table("ImagingLevel2"),
                   layout.htan_table("ImagingLevel3Channels"))),
    Stage("segment", "gpu", vcpus=4, memory_mib=HOST_MEMORY_MIB, timeout_s=6 * 3600, array_size=SEGMENT_MIN_ITEMS,
          item_dir=f"{layout.WORK}/segment", sizing=segment_sizes, after=("mosaic",),  # beside export
          inputs=(REGISTERED_ZARR,),
          outputs=(f"{layout.SEGMENTATION}/*/*", f"{layout.QC}/segment/*", f"{REGISTERED_ZARR}/labels",
                   layout.htan_table("ImagingLevel3Segmentation"))),
    Stage("quantify", "cpu", vcpus=2, memory_mib=HOST_MEMORY_MIB, timeout_s=3 * 3600, array_size=QUANTIFY_MIN_ITEMS,
          item_dir=f"{layout.WORK}/quantify", sizing=quantify_sizes,
          inputs=(REGISTERED_ZARR, f"{layout.SEGMENTATION}/*/*"),
          outputs=(f"{layout.QUANTIFICATION}/*", f"{layout.QC}/quantify/*", layout.htan_table("ImagingLevel4"))),
    Stage("render", "cpu", vcpus=2, memory_mib=RENDER_MEMORY_MIB, timeout_s=3 * 3600, array_size=RENDER_MIN_ITEMS,
          item_dir=f"{layout.WORK}/render", item_outputs=(f"{layout.OVERVIEW}/images",), sizing=render_sizes,
            inputs=("raw:story.yml", REGISTERED_ZARR, f"{layout.SEGMENTATION}/*/*",
                  f"{layout.QUANTIFICATION}/*", f"{layout.QC}/*/*"),
          outputs=(f"{layout.OVERVIEW}/*",)),
    Stage("publish", "cpu", vcpus=1, memory_mib=4096, timeout_s=3600, array_size=2,
          item_dir=f"{layout.WORK}/publish", sizing=publish_sizes, publishes=True, after=("export", "render"),
          inputs=(), outputs=(layout.MANIFEST,)),
)


# The stages that make the registered image (Level 2) from the raw cycles: ``atlas stitch``.
STITCHING: tuple[Stage, ...] = STAGES[:4]


def get_stage(name: str) -> Stage:
    """The registered stage called ``name``; ValueError lists the valid names."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage {name!r}; stages are {', '.join(s.name for s in STAGES)}")


def dependencies(stage: Stage) -> tuple[Stage, ...]:
    """The stages ``stage`` builds on directly: its ``after``, default the stage listed before it."""
    if stage.after is not None:
        return tuple(get_stage(name) for name in stage.after)
    index = STAGES.index(stage)
    return STAGES[max(index - 1, 0):index]


def ancestors(stage: Stage) -> tuple[Stage, ...]:
    """Every stage ``stage`` builds on, directly or through others, in registry order."""
    found: set[str] = set()
    todo = list(dependencies(stage))
    while todo:
        earlier = todo.pop()
        if earlier.name not in found:
            found.add(earlier.name)
            todo += dependencies(earlier)
    return tuple(s for s in STAGES if s.name in found)


def check_order(stages: Sequence[Stage]) -> None:
    """ValueError unless every stage is listed after the stages it builds on (checked on import)."""
    for stage in stages:
        if late := [d.name for d in dependencies(stage) if stages.index(d) >= stages.index(stage)]:
            raise ValueError(f"stage {stage.name!r} builds on {late}, listed after it: list them before it")


check_order(STAGES)


def run_jobs(stages: tuple[Stage, ...] | list[Stage] = STAGES,
             sizes: Mapping[str, Mapping[str, int]] | None = None) -> Iterator[Job]:
    """Every job of a run (of ``stages``), in the order they run; array stages as many items as the
    execution input's ``sizes`` say (:func:`execution_sizes`), default their ``array_size``."""
    for stage in stages:
        yield from stage.jobs(items_in(sizes, stage))


def batch_jobs(stages: tuple[Stage, ...] | list[Stage] = STAGES) -> list[Job]:
    """One job per Batch job definition and state machine state, in run order: each plain job, each
    array stage's item 0 standing for its whole array (Batch runs the items as one array job of
    ``count`` children), and each merge."""
    return [job for job in run_jobs(stages) if job.item in (None, 0)]


def upstream_jobs(job: Job, counts: Mapping[str, int] | None = None) -> list[Job]:
    """The jobs whose completion records ``job`` builds on: every job of every stage its stage builds
    on (:func:`ancestors`), and for a merge the items of its own stage. (The runs' provenance:
    publish, which builds on every stage, lists them all.)

    ``counts`` gives the item count of earlier array stages that ran with another than their
    default (from their merge records); see :func:`final_jobs`.
    """
    counts = counts or {}
    wanted = [j for earlier in ancestors(job.stage) for j in earlier.jobs(counts.get(earlier.name))]
    if job.merge:
        wanted += [j for j in job.stage.jobs(job.count) if j.item is not None]
    return wanted


def final_jobs(job: Job) -> list[Job]:
    """The last job of every stage ``job``'s builds on: its plain job or its merge, whose record says
    the stage is complete (and, for an array stage, how many items it ran: ``count``)."""
    return [earlier.jobs()[-1] for earlier in ancestors(job.stage)]


def run_sizes(slide: SlideSize | None) -> dict[str, JobSizes]:
    """Every Batch job's sizes for ``slide`` (None: the registry's constants), by job name
    (``segment``, ``segment-merge``, ...)."""
    sizes = {}
    for job in batch_jobs():
        sized = job.stage.sizes(slide)
        sizes[job.name] = replace(sized, items=0) if job.merge else sized
    return sizes


def execution_sizes(slide: SlideSize | None) -> dict[str, dict[str, int]]:
    """:func:`run_sizes` as a run's execution input carries them (``"sizes"``): ``{job name: {"items",
    "vcpus", "memory_mib", "timeout_s"}}``. Step Functions sizes each array job from it at run time
    (``ArrayProperties.Size`` = ``$.sizes.<stage>.items``, passed to the items and the merge as
    ``--items``); the local executor does the same."""
    return {name: {"items": s.items, "vcpus": s.vcpus, "memory_mib": s.memory_mib, "timeout_s": s.timeout_s}
            for name, s in run_sizes(slide).items()}


def items_in(sizes: Mapping[str, Mapping[str, int]] | None, stage: Stage) -> int | None:
    """The array size of ``stage`` in a run's execution-input ``sizes`` (None: plain stage, or not given)."""
    if not stage.array_size or not sizes or stage.name not in sizes:
        return None
    return int(sizes[stage.name]["items"])


@dataclass(frozen=True)
class CompletionRecord:
    """A completion record a job builds on, as the runner found it.

    Attributes
    ----------
    doc : dict
        Its content (:mod:`atlas.pipeline.records`): stage, item, run id, cost, ``outputs``.
    entry : dict
        The record file itself as an output of the run: ``{"path", "size", "sha256"}``.
    """

    doc: Mapping[str, Any]
    entry: Mapping[str, Any]


@dataclass(frozen=True)
class StageContext:
    """What a stage gets: the stores of the slide and of the run's results, and what the entry point knows.

    Attributes
    ----------
    slide_id : str
    run_id : str
    slide : Store
        The slide as uploaded (markers.csv, raw/, params.yml, manifest.json); read only.
    work : Store
        The run's results layout; earlier stages' outputs are there, this job's go there.
    params : Params
        Parsed params.yml (defaults where absent).
    scratch : Path or None
        A private local folder for temporary files (memory maps, intermediate stores, files being
        written before they are stored), removed after the job; None: the system's temporary folder.
    vcpus : int
        vCPUs of the job (thread pools are sized from it, never from the host's CPU count).
    records : mapping of str to CompletionRecord
        The completion records the job builds on (:func:`upstream_jobs`), by results-layout path.
    engine : EngineSettings or None
        The segmentation engine as the entry point resolved it (weights from its environment);
        None: the classical engine.
    results_uri : str or None
        Where the run will be published (``s3://<results>/<slide_id>/<run_id>/``); None when it is
        not (a local run).
    viewer_dir : Path or None
        OpenSeadragon's build folder for the overview; None: the repository's npm install.
    publisher : Publisher or None
        What copies the run's results to their release (the publishing Batch jobs'); None: a local run.
    job : Job or None
        The job being run (its stage, array item and item count); set by the runner.
    """

    slide_id: str
    run_id: str
    slide: Store
    work: Store
    params: Params
    scratch: Path | None = None
    vcpus: int = 1
    records: Mapping[str, CompletionRecord] = field(default_factory=dict)
    engine: EngineSettings | None = None
    results_uri: str | None = None
    viewer_dir: Path | None = None
    publisher: Publisher | None = None
    job: Job | None = None

    def for_job(self, job: Job, *, scratch: Path, records: Mapping[str, CompletionRecord] | None = None,
                vcpus: int | None = None) -> StageContext:
        """This context as ``job`` gets it: the job, its vCPUs (``vcpus``, what the run gave it; default
        the registry's), its scratch folder, the records it builds on."""
        return replace(self, job=job, vcpus=vcpus or job.stage.vcpus, scratch=Path(scratch),
                       records=dict(records or {}))

    def run(self, job: Job) -> None:
        """Run ``job``'s stage function per the contract: ``run``, one array item, or the merge."""
        module = job.stage.module
        if not job.stage.array_size:
            module.run(self)
        elif job.merge:
            module.merge(self)
        else:
            module.run_item(self, job.item, job.count)
