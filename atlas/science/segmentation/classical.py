"""The classical engine: smoothing, background subtraction, a global threshold, seeded watershed.

Needs no weights, so it is always available. Every size is given in µm (selected on the DSB2018
tuning set taken at 0.65 µm/px, with held-out folds: benchmarks/segment.py) and converted to
pixels once per working scale.
The engine works at an image's own pixel size when it is 0.65 µm/px or coarser: upsampling adds
pixels, not information, and costs their square in time (16x at 2.6 µm/px). Finer images are
downsampled to 0.65 µm/px, which loses nothing a nucleus needs. Steps, all local except the threshold:

1. Gaussian smoothing (``smooth_sigma_um``) against shot noise;
2. background subtraction: a rolling minimum over ``background_size_um`` (larger than a nucleus),
   smoothed by a box filter of the same size, removes uneven illumination and autofluorescence;
3. foreground = background-subtracted intensity above ``threshold_scale`` x the Otsu threshold,
   computed once per image from :func:`atlas.science.segmentation.tiling.calibration_sample`, and never
   below ``min_contrast`` x the noise sigma (a blank image gives no nuclei);
4. core = intensity above ``core_scale`` x that threshold; peaks of its distance transform, plus
   ``brightness_weight`` x the smoothed intensity in threshold units (so a bright nucleus beside a
   dim one gets its own seed), seed a watershed over the foreground along the image's edges
   (:func:`atlas.science.segmentation.instances.seeded_watershed`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from atlas.science.segmentation.instances import seeded_watershed
from atlas.science.segmentation.tiling import Box, ScaledImage


@dataclass(frozen=True)
class ClassicalSettings:
    """Parameters of the classical engine (sizes in µm).

    ``pixel_size_um`` is the scale they were tuned at and the finest the engine works at.
    """

    pixel_size_um: float = 0.65
    smooth_sigma_um: float = 0.65
    background_size_um: float = 20.0
    threshold_scale: float = 0.7
    core_scale: float = 1.1
    min_contrast: float = 3.0
    seed_sigma_um: float = 0.65
    seed_min_distance_um: float = 2.6
    brightness_weight: float = 0.2
    brightness_sigma_um: float = 1.3
    min_area_um2: float = 8.5
    edge_sigma_um: float = 0.65


class ClassicalEngine:
    """Nucleus segmentation by threshold and seeded watershed (scikit-image, scipy).

    Parameters
    ----------
    settings : ClassicalSettings
    pixel_size_um : float, optional
        Working scale (µm/px); default ``settings.pixel_size_um``. :meth:`scaled_for` picks it.
    """

    name = "classical"

    def __init__(self, settings: ClassicalSettings = ClassicalSettings(), pixel_size_um: float | None = None):
        self.settings = settings
        self.pixel_size_um = px = pixel_size_um or settings.pixel_size_um
        self._sigma = settings.smooth_sigma_um / px
        self._background = max(3, round(settings.background_size_um / px) | 1)
        self._edge_sigma = settings.edge_sigma_um / px
        self._seed_sigma = settings.seed_sigma_um / px
        self._brightness_sigma = settings.brightness_sigma_um / px
        self._min_distance = max(1, round(settings.seed_min_distance_um / px))
        self._min_area = max(1, round(settings.min_area_um2 / px ** 2))
        self.context = math.ceil(4 * max(self._sigma, self._edge_sigma)) + 2 * self._background + 2   # px each side

    def scaled_for(self, pixel_size_um: float | None) -> ClassicalEngine:
        """This engine working at an image's own pixel size, but never finer than the tuned scale.

        ``None`` (unknown pixel size) means the tuned scale.
        """
        working = max(pixel_size_um or self.settings.pixel_size_um, self.settings.pixel_size_um)
        return self if working == self.pixel_size_um else ClassicalEngine(self.settings, working)

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        """Smoothed, background-subtracted intensity of a (Y, X) float32 array."""
        smooth = ndi.gaussian_filter(pixels, self._sigma, mode="mirror")
        background = ndi.uniform_filter(ndi.minimum_filter(smooth, self._background, mode="mirror"),
                                        self._background, mode="mirror")
        return smooth - background

    def calibrate(self, sample: list[np.ndarray]) -> dict[str, float]:
        """Global threshold (background-subtracted intensity units) and noise sigma of the image."""
        values = np.concatenate([self.preprocess(block).ravel() for block in sample])
        diffs = np.concatenate([np.diff(block, axis=1).ravel() for block in sample])
        noise = float(1.4826 * np.median(np.abs(diffs - np.median(diffs))) / np.sqrt(2)) if diffs.size else 0.0
        otsu = float(threshold_otsu(values)) if values.size and values.min() < values.max() else 0.0
        threshold = max(self.settings.threshold_scale * otsu, self.settings.min_contrast * noise)
        return {"threshold": threshold, "otsu": otsu, "noise_sigma": noise}

    def segment(self, view: ScaledImage, box: Box, calibration: dict) -> np.ndarray:
        """Nucleus instances (int32 labels) of ``box`` at working scale."""
        s, c = self.settings, self.context
        y0, y1, x0, x1 = box
        pixels = view.read((y0 - c, y1 + c, x0 - c, x1 + c))
        signal = self.preprocess(pixels)[c:-c, c:-c]
        edges = ndi.gaussian_gradient_magnitude(pixels, self._edge_sigma)[c:-c, c:-c]
        threshold = calibration["threshold"]
        if threshold <= 0:      # constant image: nothing stands out
            return np.zeros(signal.shape, dtype=np.int32)
        brightness = s.brightness_weight / threshold * ndi.gaussian_filter(signal, self._brightness_sigma)
        return seeded_watershed(signal > threshold, signal > s.core_scale * threshold, edges,
                                seed_sigma=self._seed_sigma, min_distance=self._min_distance,
                                min_area=self._min_area, brightness=brightness)
