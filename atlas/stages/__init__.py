"""The stage registry: the one ordered list of pipeline stages.

It drives the local runner (:mod:`atlas.pipeline.local`), the Batch entrypoint (``atlas stage``), the
Batch job definitions and the Step Functions state machine (``infra/``).

The stage contract
------------------
Each stage is a module ``atlas.stages.<name>``. A plain stage exposes ``run(ctx) -> None``; an
array stage (``array_size > 0``) exposes ``run_item(ctx, index, count) -> None`` (item ``index``
of ``count`` does its share of the work, e.g. tiles ``index, index + count, ...``) and
``merge(ctx) -> None``. A stage reads the raw slide from ``ctx.slide_dir`` and earlier stages'
outputs from ``ctx.out_dir``, and writes only below ``ctx.out_dir`` in the results layout
(:mod:`atlas.layout`). It must be deterministic: the same inputs give byte-identical outputs.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from atlas.params import Params


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
        vCPUs of its Batch job.
    memory_mib : int
        Memory of its Batch job (MiB).
    timeout_s : int
        Batch attempt timeout (s).
    inputs, outputs : tuple of str
        Glob patterns relative to the results layout (``raw:`` prefix: relative to the slide).
    array_size : int
        0 for a single job; otherwise the number of Batch array children.
    """

    name: str
    image: str
    vcpus: int
    memory_mib: int
    timeout_s: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    array_size: int = 0

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"atlas.stages.{self.name}")

    def execute(self, ctx: StageContext, *, item: int | None = None, merge: bool = False) -> None:
        """Run the stage's work per the contract: ``run``, one array item, or the array merge."""
        if self.array_size and not merge and item is None:
            raise ValueError(f"stage {self.name!r} is an array stage: give an item index or merge=True")
        if not self.array_size:
            self.module.run(ctx)
        elif merge:
            self.module.merge(ctx)
        else:
            self.module.run_item(ctx, item, self.array_size)


STAGES: tuple[Stage, ...] = (
    Stage("stitch", "cpu", vcpus=4, memory_mib=16384, timeout_s=6 * 3600,
          inputs=("raw:markers.csv", "raw:raw/*", "raw:params.yml"),
          outputs=("registration/*", "illumination/*", "qc/stitch/*")),
    Stage("segment", "gpu", vcpus=4, memory_mib=16384, timeout_s=6 * 3600, array_size=4,
          inputs=("registration/*.ome.tif", "registration/*.ome.zarr/.z*", "registration/*.ome.zarr/0/.zarray"),
          outputs=("segmentation/*/*", "qc/segment/*", "registration/*.ome.zarr/labels")),
    Stage("quantify", "cpu", vcpus=2, memory_mib=8192, timeout_s=3 * 3600,
          inputs=("registration/*.ome.tif", "segmentation/*/*"),
          outputs=("quantification/*", "qc/quantify/*")),
    Stage("render", "cpu", vcpus=2, memory_mib=8192, timeout_s=3 * 3600,
          inputs=("registration/*.ome.tif", "segmentation/*/*", "quantification/*", "qc/*/*"),
          outputs=("overview/*",)),
    Stage("publish", "cpu", vcpus=1, memory_mib=2048, timeout_s=3600,
          inputs=("*", "raw:markers.csv"), outputs=("metadata/*", "manifest.json")),
)


def get_stage(name: str) -> Stage:
    """The registered stage called ``name``; ValueError lists the valid names."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage {name!r}; stages are {', '.join(s.name for s in STAGES)}")


@dataclass(frozen=True)
class StageContext:
    """What a stage gets: where the slide and the run's results live, and the slide's settings.

    Attributes
    ----------
    slide_id : str
    run_id : str
    slide_dir : Path
        The slide as uploaded (markers.csv, raw/, params.yml, manifest.json).
    out_dir : Path
        Root of this run's results layout; earlier stages' outputs are already there.
    params : Params
        Parsed params.yml (defaults where absent).
    """

    slide_id: str
    run_id: str
    slide_dir: Path
    out_dir: Path
    params: Params
