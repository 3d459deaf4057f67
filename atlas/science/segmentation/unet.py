"""The learned engine: the bioimage.io "UNet 2D Nuclei Broad" ONNX model, then a seeded watershed.

The model (MIT; trained on DSB2018 fluorescence nuclei) maps one 512 x 512 window, normalised to
zero mean and unit variance, to nucleus-foreground logits. It is semantic: touching nuclei come
out as one blob, so :func:`atlas.science.segmentation.instances.seeded_watershed` splits them, seeded from
the high-probability core.

Scale. DSB2018 fluorescence images were mostly taken at 20x (about 0.65 µm/px); its nuclei are
~24 px across (median area 440 px in the StarDist test image). We take 0.65 µm/px as the model's
training scale and resample every image to it (:data:`UNetSettings.pixel_size_um`), coarse images
too: the model's accuracy depends on the nuclei's size in pixels (DSB2018 imaged at 1.95 µm/px:
F1 0.74 when upsampled to 0.65 µm/px, 0.63 at its own scale; see
docs/segmentation.md), so unlike the classical engine it pays for the extra pixels.

Windows. The image is covered by 512 px windows on a fixed lattice (stride 448 = 512 - 2 x 32 px
halo, last window flush with the image edge); the probabilities of overlapping windows are
blended with weights that ramp down across the 32 px halo. The lattice is anchored to the image,
not to the tile, so every tile computes the same probability for a pixel.

Normalisation. Each window is normalised with its own mean and standard deviation, as in
training (``(x - mean) / (std + 1e-6)``), except that the standard deviation is floored at
``noise_floor`` times the image's noise level: a window of plain background then stays
low-contrast instead of having its noise blown up into "nuclei".

Weights are never part of the project: they come from a local path or ``s3://`` URI
(``ATLAS_UNET_WEIGHTS``) and are checked against a sha256 (``ATLAS_UNET_SHA256``).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.special import expit

from atlas.errors import InvalidInput, Problem
from atlas.science.segmentation.instances import seeded_watershed, typical_radius
from atlas.science.segmentation.tiling import Box, ScaledImage
from atlas.slide.convention import sha256_file

WEIGHTS_ENV = "ATLAS_UNET_WEIGHTS"
SHA256_ENV = "ATLAS_UNET_SHA256"
CACHE_ENV = "ATLAS_MODEL_CACHE"
WINDOW = 512        # the model's static input size (px)
HALO = 32           # border of each output window that is blended away (bioimage.io halo)
EPS = 1e-6          # bioimage.io zero_mean_unit_variance default


@dataclass(frozen=True)
class UNetSettings:
    """Post-processing of the U-Net probabilities (selected on the DSB2018 tuning set with
    held-out folds, see benchmarks/segment.py and docs/segmentation.md).

    Seeding adapts to the nuclei's size: :meth:`UNetEngine.calibrate` measures the image's typical
    nucleus radius r (:func:`atlas.science.segmentation.instances.typical_radius` of the core in a
    few sample windows), and seeds are smoothed and spaced in units of r, so large and small nuclei
    are split alike.

    Attributes
    ----------
    pixel_size_um : float
        Working scale: the model's training pixel size (µm).
    seed_probability : float
        Core (seed region) = probability above this.
    foreground_probability : float
        Nucleus pixels = probability above this.
    seed_sigma_radius : float
        Smoothing (sigma) of the core's distance transform before peak finding, in nucleus radii.
    seed_min_distance_radius : float
        Minimum distance between two nucleus seeds, in nucleus radii.
    default_radius_um : float
        Nucleus radius assumed when the sample windows hold no nucleus core (µm).
    radius_windows : int
        Sample windows (the most varied blocks of the calibration sample) the radius is measured in.
    min_area_um2 : float
        Smaller instances are dropped (µm²).
    noise_floor : float
        Window standard deviations are floored at this many times the image's noise sigma.
    """

    pixel_size_um: float = 0.65
    seed_probability: float = 0.9
    foreground_probability: float = 0.5
    seed_sigma_radius: float = 0.2
    seed_min_distance_radius: float = 0.4
    default_radius_um: float = 4.0
    radius_windows: int = 4
    min_area_um2: float = 8.5
    noise_floor: float = 4.0


def resolve_weights(uri: str, sha256: str | None = None) -> Path:
    """Local path of the weights at ``uri`` (a path or ``s3://bucket/key``), sha256-checked.

    Parameters
    ----------
    uri : str
        Local file or S3 object. S3 objects are downloaded once into ``$ATLAS_MODEL_CACHE``
        (default ``~/.cache/atlas/models``), named by their digest.
    sha256 : str, optional
        Expected hex digest; required for ``s3://`` URIs, checked whenever given.

    Raises
    ------
    InvalidInput
        Missing file, missing digest for S3, or a digest mismatch.
    """
    fix_sha = f"set {SHA256_ENV} (or --weights-sha256) to the sha256 of the intended weights"
    expected = sha256.strip().lower() if sha256 else None
    if uri.startswith("s3://"):
        if not expected:
            raise InvalidInput(Problem(uri, "weights from S3 need a sha256 to verify them", fix_sha))
        path = _download_s3(uri, expected)
    else:
        path = Path(uri).expanduser()
        if not path.is_file():
            raise InvalidInput(Problem(uri, "U-Net weights file not found",
                                       f"point {WEIGHTS_ENV} (or --weights) at the ONNX file"))
    if expected:
        actual = sha256_file(path)
        if actual != expected:
            raise InvalidInput(Problem(uri, f"weights sha256 is {actual}, expected {expected}",
                                       "use the weights the deployment pinned, or " + fix_sha))
    return path


def _download_s3(uri: str, sha256: str) -> Path:
    import boto3

    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "atlas" / "models")
    target = cache / f"{sha256}.onnx"
    if target.is_file() and sha256_file(target) == sha256:
        return target
    bucket, _, key = uri[len("s3://"):].partition("/")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, suffix=".part", delete=False) as tmp:
        boto3.client("s3").download_fileobj(bucket, key, tmp)
    os.replace(tmp.name, target)
    return target


def window_starts(size: int, window: int = WINDOW, halo: int = HALO) -> list[int]:
    """Start of each model window along an axis of ``size`` px (the image-anchored lattice)."""
    if size <= window:
        return [0]
    return list(range(0, size - window, window - 2 * halo)) + [size - window]


def _blend_weights(window: int = WINDOW, halo: int = HALO) -> np.ndarray:
    ramp = np.minimum(1.0, np.minimum(np.arange(1, window + 1), np.arange(window, 0, -1)) / (halo + 1))
    return np.outer(ramp, ramp).astype(np.float32)


class UNetEngine:
    """Nucleus segmentation with the ONNX U-Net (onnxruntime, CUDA when available, else CPU).

    Parameters
    ----------
    weights : str or Path
        ONNX file or ``s3://`` URI of the weights.
    sha256 : str, optional
        Expected digest of the weights file.
    settings : UNetSettings
        Working scale and post-processing.
    """

    name = "unet"

    def __init__(self, weights: str | Path, sha256: str | None = None, settings: UNetSettings = UNetSettings()):
        import onnxruntime as ort

        self.settings = settings
        self.pixel_size_um = settings.pixel_size_um
        self.weights = resolve_weights(str(weights), sha256)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(self.weights), providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise InvalidInput(Problem(str(weights), f"not loadable as an ONNX model ({exc})",
                                       "point the weights setting at the unet2d_nuclei_broad weights.onnx")) from exc
        (model_input,) = self.session.get_inputs()
        if list(model_input.shape) != [1, 1, WINDOW, WINDOW]:
            raise InvalidInput(Problem(str(weights), f"model input shape is {model_input.shape}, "
                                       f"expected [1, 1, {WINDOW}, {WINDOW}]", "use the unet2d_nuclei_broad weights"))
        self._input = model_input.name
        self._weights = _blend_weights()

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def scaled_for(self, pixel_size_um: float | None) -> UNetEngine:
        """The engine for an image of ``pixel_size_um``: itself, it always works at the training scale."""
        return self

    def calibrate(self, sample: list[np.ndarray]) -> dict[str, float]:
        """Noise sigma of the image (robust: MAD of neighbouring-pixel differences / sqrt 2) and its
        typical nucleus radius (working px, :func:`nucleus_radius`; 0.0 when the sample shows none)."""
        diffs = np.concatenate([np.diff(block, axis=1).ravel() for block in sample])
        mad = np.median(np.abs(diffs - np.median(diffs))) if diffs.size else 0.0
        calibration = {"noise_sigma": float(1.4826 * mad / np.sqrt(2))}
        probabilities = self.sample_probabilities(sample, calibration)
        calibration["nucleus_radius_px"] = nucleus_radius(probabilities, self.settings.seed_probability)
        return calibration

    def sample_probabilities(self, sample: list[np.ndarray], calibration: dict) -> list[np.ndarray]:
        """Nucleus probability of the ``radius_windows`` sample blocks of largest standard deviation
        (where the nuclei are, on a slide that is mostly glass), in sample order."""
        spread = [-float(block.std()) for block in sample]
        chosen = sorted(np.argsort(spread, kind="stable")[:self.settings.radius_windows])
        probabilities = []
        for i in chosen:
            block = ScaledImage(sample[i])
            probabilities.append(self.probability(block, (0, block.shape[0], 0, block.shape[1]), calibration)[0])
        return probabilities

    def probability(self, view: ScaledImage, box: Box,
                    calibration: dict) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Nucleus probability over ``box`` (working px) and the pixels it was computed from.

        Returns
        -------
        probability : (y1 - y0, x1 - x0) float32 ndarray
        pixels : float32 ndarray
            The union of the model windows over ``box``, read once (it contains ``box``).
        origin : tuple of int
            Working coordinates (y, x) of ``pixels[0, 0]``.
        """
        floor = self.settings.noise_floor * calibration["noise_sigma"]
        y0, y1, x0, x1 = box
        ys = [s for s in window_starts(view.shape[0]) if s < y1 and s + WINDOW > y0]
        xs = [s for s in window_starts(view.shape[1]) if s < x1 and s + WINDOW > x0]
        pixels = view.read((ys[0], ys[-1] + WINDOW, xs[0], xs[-1] + WINDOW))
        total = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
        weight = np.zeros_like(total)
        for wy in ys:
            for wx in xs:
                window = pixels[wy - ys[0]:wy - ys[0] + WINDOW, wx - xs[0]:wx - xs[0] + WINDOW]
                inside = window[:view.shape[0] - wy, :view.shape[1] - wx]   # statistics over real pixels only
                scale = max(float(inside.std()), floor) + EPS
                normalised = ((window - float(inside.mean())) / scale).astype(np.float32)
                logits = self.session.run(None, {self._input: normalised[None, None]})[0][0, 0]
                ty0, ty1, tx0, tx1 = max(wy, y0), min(wy + WINDOW, y1), max(wx, x0), min(wx + WINDOW, x1)
                w = self._weights[ty0 - wy:ty1 - wy, tx0 - wx:tx1 - wx]
                total[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0] += w * expit(logits[ty0 - wy:ty1 - wy, tx0 - wx:tx1 - wx])
                weight[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0] += w
        return total / weight, pixels, (ys[0], xs[0])

    def split_inputs(self, view: ScaledImage, box: Box, calibration: dict) -> tuple[np.ndarray, np.ndarray]:
        """What :func:`split_instances` takes for ``box`` (working px): the nucleus probability and
        the watershed surface (the image's gradient magnitude, sigma 1 px), both (y1 - y0, x1 - x0)."""
        prob, pixels, (top, left) = self.probability(view, box, calibration)
        edges = ndi.gaussian_gradient_magnitude(pixels, 1.0)
        y0, y1, x0, x1 = box
        return prob, edges[y0 - top:y1 - top, x0 - left:x1 - left]

    def segment(self, view: ScaledImage, box: Box, calibration: dict) -> np.ndarray:
        """Nucleus instances (int32 labels) of ``box`` at working scale."""
        probability, surface = self.split_inputs(view, box, calibration)
        return split_instances(probability, surface, calibration["nucleus_radius_px"], self.settings)


def nucleus_radius(probabilities: list[np.ndarray], seed_probability: float) -> float:
    """Typical nucleus radius (px): the median over the probability maps that show a nucleus core
    (probability > ``seed_probability``) of :func:`typical_radius`; 0.0 when none does."""
    radii = [typical_radius(core) for core in (p > seed_probability for p in probabilities) if core.any()]
    return float(np.median(radii)) if radii else 0.0


def split_instances(probability: np.ndarray, surface: np.ndarray, radius_px: float,
                    settings: UNetSettings) -> np.ndarray:
    """Nucleus instances (int32 labels) from the U-Net probability: a seeded watershed of ``surface``
    over probability > ``foreground_probability``, seeded from the core (> ``seed_probability``),
    seeds smoothed and spaced in units of ``radius_px`` (``default_radius_um`` when 0)."""
    px = settings.pixel_size_um
    radius = radius_px or settings.default_radius_um / px
    return seeded_watershed(probability > settings.foreground_probability, probability > settings.seed_probability,
                            surface, seed_sigma=settings.seed_sigma_radius * radius,
                            min_distance=max(1, round(settings.seed_min_distance_radius * radius)),
                            min_area=max(1, round(settings.min_area_um2 / px ** 2)))
