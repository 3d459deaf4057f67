"""Nucleus and cell segmentation: engines behind one interface, tiled for images of any size.

An engine turns part of an image into nucleus instances. It works at its own pixel size
(``pixel_size_um``, the scale its parameters or weights were made for) and must offer:

``name``
    Short name without ``-``; the results folder is ``segmentation/<name>-<slide>/``.
``pixel_size_um``
    Working scale (µm/px); images are resampled to it (:class:`tiling.ScaledImage`). For the
    engine :func:`make_engine` returns, the scale its parameters or weights were made for.
``scaled_for(pixel_size_um) -> Engine``
    The engine to run on an image of that native pixel size (None: unknown), working at the scale
    it chooses: ``classical`` at the image's own scale unless finer than 0.65 µm/px, ``unet``
    always at its training scale (:func:`tiling.working_view`).
``calibrate(sample) -> dict``
    Global constants (thresholds, noise level) from :func:`tiling.calibration_sample`, so that
    every tile of an image uses the same ones.
``segment(view, box, calibration) -> (Y, X) int labels``
    Instances of ``box`` (working px), reading whatever context it needs from ``view``.

The engines shipped work offline: ``classical`` (no weights) and ``unet`` (ONNX weights from a
configured path or ``s3://`` URI). Another engine (Cellpose- or Mesmer-class) is one more entry in
:data:`ENGINES`. :func:`atlas.science.segmentation.tiling.segment_image` runs an engine over a whole image.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from atlas.errors import InvalidInput, Problem
from atlas.science.segmentation.classical import ClassicalEngine
from atlas.science.segmentation.tiling import Box, ScaledImage
from atlas.science.segmentation.unet import SHA256_ENV, WEIGHTS_ENV, UNetEngine

ENGINES = ("classical", "unet")
AUTO = "auto"


class Engine(Protocol):
    name: str
    pixel_size_um: float

    def scaled_for(self, pixel_size_um: float | None) -> Engine: ...

    def calibrate(self, sample: list[np.ndarray]) -> dict[str, float]: ...

    def segment(self, view: ScaledImage, box: Box, calibration: dict) -> np.ndarray: ...


@dataclass(frozen=True)
class EngineSettings:
    """Which engine to make, as the entry point (CLI, job) resolved it; :meth:`make` builds it.

    Attributes
    ----------
    name : {"classical", "unet"}
    weights : str or None
        U-Net weights path or ``s3://`` URI.
    weights_sha256 : str or None
    """

    name: str
    weights: str | None = None
    weights_sha256: str | None = None

    @classmethod
    def resolve(cls, name: str, settings: Mapping[str, str], *, weights: str | None = None,
                weights_sha256: str | None = None) -> EngineSettings:
        """Settings for engine ``name`` (``auto`` included): weights given here, else from ``settings``
        (``$ATLAS_UNET_WEIGHTS``, ``$ATLAS_UNET_SHA256``; the entry point passes its environment)."""
        weights = weights or settings.get(WEIGHTS_ENV) or None
        weights_sha256 = weights_sha256 or settings.get(SHA256_ENV) or None
        return cls(resolve_engine_name(name, weights), weights, weights_sha256)

    def make(self) -> Engine:
        return make_engine(self.name, weights=self.weights, weights_sha256=self.weights_sha256)


def resolve_engine_name(name: str, weights: str | None = None) -> str:
    """``auto`` -> ``unet`` when weights are given, else ``classical``."""
    if name == AUTO:
        return "unet" if weights else "classical"
    if name not in ENGINES:
        raise InvalidInput(Problem("segment.engine", f"unknown engine {name!r}",
                                   f"use one of {', '.join((AUTO,) + ENGINES)}"))
    return name


def make_engine(name: str = AUTO, *, weights: str | None = None, weights_sha256: str | None = None) -> Engine:
    """The engine called ``name`` (see :func:`resolve_engine_name`), ready to run.

    Parameters
    ----------
    name : {"auto", "classical", "unet"}
    weights : str, optional
        U-Net weights path or ``s3://`` URI (entry points default it to ``$ATLAS_UNET_WEIGHTS``:
        :meth:`EngineSettings.resolve`).
    weights_sha256 : str, optional
        Expected sha256 of the weights.
    """
    name = resolve_engine_name(name, weights)
    if name == "classical":
        return ClassicalEngine()
    if not weights:
        raise InvalidInput(Problem(WEIGHTS_ENV, "the unet engine needs weights and none are configured",
                                   f"set {WEIGHTS_ENV} (path or s3:// URI) and {SHA256_ENV}, pass --weights, "
                                   "or use --engine classical"))
    return UNetEngine(weights, weights_sha256)
