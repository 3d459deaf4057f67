"""From a foreground map to nucleus instances: the seeded watershed both engines share.

Touching nuclei form one foreground blob. Its *core* (a stricter foreground: high U-Net
probability, or intensity well above the threshold) pinches apart where nuclei meet; peaks of the
core's smoothed distance transform seed one instance each, and a watershed grows the seeds over
the full foreground, along valleys of ``surface`` (the image's edges).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import watershed


def seeded_watershed(foreground: np.ndarray, core: np.ndarray, surface: np.ndarray, *,
                     seed_sigma: float, min_distance: int, min_area: int,
                     brightness: np.ndarray | None = None) -> np.ndarray:
    """Split a foreground mask into instances.

    Parameters
    ----------
    foreground : (Y, X) bool ndarray
        Every nucleus pixel.
    core : (Y, X) bool ndarray
        Stricter foreground inside ``foreground`` that separates touching nuclei.
    surface : (Y, X) float ndarray
        Flooded by the final watershed; instances meet along its ridges (e.g. gradient magnitude).
    seed_sigma : float
        Gaussian sigma (px) applied to the core's distance transform before finding peaks.
    min_distance : int
        Minimum distance (px) between two seeds.
    min_area : int
        Instances smaller than this (px) are dropped.
    brightness : (Y, X) float ndarray, optional
        Added to the distance transform before peak finding: breaks its plateaus and ridges in
        favour of bright spots, so a bright nucleus beside a dim one gets its own seed.

    Returns
    -------
    (Y, X) int32 ndarray
        Instance labels 1..n, 0 background.
    """
    foreground = ndi.binary_fill_holes(foreground)
    core = ndi.binary_fill_holes(core) & foreground
    if not core.any():
        return np.zeros(foreground.shape, dtype=np.int32)
    distance = ndi.distance_transform_edt(core)
    if seed_sigma > 0:
        distance = ndi.gaussian_filter(distance, seed_sigma)
    if brightness is not None:
        distance = distance + brightness
    components, _ = ndi.label(core)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(core.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    seeds = watershed(-distance, markers, mask=core)
    labels = watershed(surface, seeds, mask=foreground)
    return remove_small(labels, min_area)


def remove_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Drop instances smaller than ``min_area`` px and renumber the rest 1..n (int32)."""
    counts = np.bincount(labels.ravel())
    keep = counts >= min_area
    keep[0] = False
    lut = np.zeros(counts.size, dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]


def typical_radius(core: np.ndarray) -> float:
    """Typical nucleus radius (px) in a foreground map: the median over its connected pieces of
    the largest distance to the background (the inscribed radius). Touching nuclei merged into one
    piece still give one nucleus's radius. 0.0 when ``core`` is empty."""
    core = ndi.binary_fill_holes(core)
    pieces, n = ndi.label(core)
    if n == 0:
        return 0.0
    inscribed = ndi.maximum(ndi.distance_transform_edt(core), pieces, np.arange(1, n + 1))
    return float(np.median(inscribed))


def distance_watershed(foreground: np.ndarray, min_distance: int) -> np.ndarray:
    """The textbook split of a foreground map: peaks of its distance transform (at least
    ``min_distance`` px apart) seed a watershed of the negated distance transform.

    The baseline the engines are measured against (benchmarks/segment.py), with the U-Net
    probability > 0.5 as foreground. Returns (Y, X) int32 labels 1..n.
    """
    distance = ndi.distance_transform_edt(foreground)
    pieces, _ = ndi.label(foreground)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=pieces, exclude_border=False)
    markers = np.zeros(foreground.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    return watershed(-distance, markers, mask=foreground).astype(np.int32)
