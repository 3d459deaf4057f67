"""Benchmark: nucleus segmentation accuracy and CPU speed of each engine, against simple references.

Accuracy, on the real StarDist DSB2018 test image and its ground truth (125 nuclei) in
``../shared/data/segmentation/stardist_dsb2018/``: F1 at IoU >= 0.5 (one-to-one matching, as
StarDist and the DSB2018 challenge report it; StarDist reaches about 0.85-0.9 on this data set),
plus precision/recall and F1 at IoU 0.5..0.9. References in the same process:

* ``otsu+cc``: Gaussian smoothing, global Otsu threshold, connected components -- the baseline
  every classical method must beat;
* ``unet+cc``: the U-Net probability thresholded at 0.5, connected components -- the model
  without our seeded-watershed split (the model README's sanity run).

Scale: the same image as a coarser camera would record it (resized by 1/d with anti-aliasing,
pixel size 0.65 d µm), segmented at its own scale and resampled to 0.65 µm/px, F1 against the
true masks (labels enlarged back by nearest neighbour). This is what decides each engine's working
scale: the classical engine works at the image's scale, the U-Net at its training scale.

Speed: megapixels/s on CPU over a larger image (the DSB2018 image mirrored to ``--size`` px
square), tiled with the stage's defaults, each engine's time as a ratio of the ``otsu+cc``
reference's time on the same image in the same process (machines here are noisy). Peak traced
(numpy) memory, tiled vs one tile, shows that tiling bounds memory.

Caveat: the engines' parameters were tuned on this same image (there is no other labelled
nucleus image in shared/data), so the F1 values are training-set figures.

    .venv/bin/python benchmarks/segment.py [--size 2048] [--repeat 2]
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.transform import resize

from atlas.params import SegmentParams
from atlas.science.segmentation import make_engine
from atlas.science.segmentation.classical import ClassicalEngine
from atlas.science.segmentation.metrics import match_instances
from atlas.science.segmentation.tiling import ScaledImage, calibration_sample, segment_image
from atlas.science.segmentation.unet import UNetEngine, UNetSettings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.realdata import data_root  # noqa: E402  (../shared/data, or fetched)

DATA = data_root()
IMAGE = DATA / "segmentation" / "stardist_dsb2018" / "img2d.tif"
TRUTH = DATA / "segmentation" / "stardist_dsb2018" / "mask2d.tif"
WEIGHTS = DATA / "models" / "unet2d_nuclei_broad" / "weights.onnx"
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
COARSENING = (1.5, 2, 3, 4)        # pixel size 0.65 d µm
REFERENCE_UM = 0.65


def otsu_components(image: np.ndarray) -> np.ndarray:
    """Reference: smooth, global Otsu threshold, connected components."""
    smooth = ndi.gaussian_filter(image.astype(np.float32), 1.0)
    return ndi.label(smooth > threshold_otsu(smooth))[0]


def unet_components(engine, image: np.ndarray) -> np.ndarray:
    """Reference: the U-Net probability > 0.5, connected components (no instance split)."""
    view = ScaledImage(image)
    probability, _, _ = engine.probability(view, (0, *view.shape[:1], 0, view.shape[1]),
                                           engine.calibrate(calibration_sample(view)))
    return ndi.label(probability > 0.5)[0]


def segment_at(engine, image: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Instances of ``image`` (untiled) with ``engine`` held at its own working scale, whatever the image's."""
    view = ScaledImage(image, pixel_size_um / engine.pixel_size_um)
    whole = (0, image.shape[0], 0, image.shape[1])
    work_box = view.native_box_to_working(whole)
    labels = engine.segment(view, work_box, engine.calibrate(calibration_sample(view)))
    return view.labels_to_native(labels, work_box, whole)


def scale_table(image: np.ndarray, truth: np.ndarray) -> None:
    """F1@0.5 of each engine on coarser copies of ``image``: at 0.65 µm/px vs at the image's own scale."""
    print("\nScale: F1@0.5 on DSB2018 recorded with coarser pixels; engine at 0.65 µm/px | at the image's scale")
    print("px (µm)      shape   classical 0.65 | own   unet 0.65 | own")
    unet_reference = UNetEngine(WEIGHTS, settings=UNetSettings(pixel_size_um=REFERENCE_UM))
    for d in COARSENING:
        pixel = REFERENCE_UM * d
        shape = tuple(round(n / d) for n in image.shape)
        coarse = resize(image.astype(np.float32), shape, anti_aliasing=True, preserve_range=True).astype(np.float32)
        scores = []
        for engine in (ClassicalEngine(pixel_size_um=REFERENCE_UM), ClassicalEngine(pixel_size_um=pixel),
                       unet_reference, UNetEngine(WEIGHTS, settings=UNetSettings(pixel_size_um=pixel))):
            labels = segment_at(engine, coarse, pixel)
            enlarged = resize(labels, truth.shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.int32)
            scores.append(match_instances(truth, enlarged, 0.5).f1)
        print(f"{pixel:7.3f} {str(shape):>10}   {scores[0]:14.3f} | {scores[1]:.3f}"
              f"   {scores[2]:9.3f} | {scores[3]:.3f}")


def accuracy_row(name: str, truth: np.ndarray, labels: np.ndarray) -> str:
    scores = [match_instances(truth, labels, t) for t in THRESHOLDS]
    first = scores[0]
    return (f"{name:<10} {first.f1:6.3f} {first.precision:6.3f} {first.recall:6.3f} {first.n_pred:6d}   "
            + " ".join(f"{s.f1:5.3f}" for s in scores))


def best_time(run, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_traced(run) -> float:
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="side of the speed image (px)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per engine (best counts)")
    args = parser.parse_args()

    image, truth = tifffile.imread(IMAGE), tifffile.imread(TRUTH)
    engines = {"classical": make_engine("classical"), "unet": make_engine("unet", weights=str(WEIGHTS))}
    print(f"U-Net providers: {engines['unet'].providers}")
    print(f"\nAccuracy on DSB2018 ({int(np.count_nonzero(np.unique(truth)))} true nuclei, 512 x 512)")
    print(f"{'method':<10} {'F1@.5':>6} {'prec':>6} {'recall':>6} {'n':>6}   "
          f"F1 at IoU {' '.join(map(str, THRESHOLDS))}")
    print(accuracy_row("otsu+cc", truth, otsu_components(image)))
    print(accuracy_row("unet+cc", truth, unet_components(engines["unet"], image)))
    for name, engine in engines.items():
        print(accuracy_row(name, truth, segment_image(image, engine)))
    scale_table(image, truth)

    big = np.pad(image, ((0, args.size - image.shape[0]), (0, args.size - image.shape[1])), mode="symmetric")
    megapixels = big.size / 1e6
    defaults = SegmentParams()
    print(f"\nSpeed on CPU, {args.size} x {args.size} ({megapixels:.1f} MP), tile {defaults.tile_size} px, "
          f"overlap {defaults.overlap} px, best of {args.repeat}")
    reference = best_time(lambda: otsu_components(big), args.repeat)
    print(f"{'otsu+cc':<10} {reference:7.2f} s {megapixels / reference:8.2f} MP/s   ratio 1.00")
    for name, engine in engines.items():
        seconds = best_time(lambda engine=engine: segment_image(big, engine, tile_size=defaults.tile_size,
                                                  overlap=defaults.overlap), args.repeat)
        print(f"{name:<10} {seconds:7.2f} s {megapixels / seconds:8.2f} MP/s   ratio {seconds / reference:.1f} "
              "x reference time")

    coarse = big[:args.size // 2, :args.size // 2]
    pixel = 4 * REFERENCE_UM
    print(f"\nClassical engine on a coarse image ({coarse.shape[0]} px square declared {pixel:.2f} µm/px), "
          f"best of {args.repeat}")
    own = best_time(lambda: segment_image(coarse, engines["classical"], pixel_size_um=pixel), args.repeat)
    upsampled = best_time(lambda: segment_at(ClassicalEngine(pixel_size_um=REFERENCE_UM), coarse, pixel), args.repeat)
    print(f"at its own scale {own:7.2f} s; upsampled to {REFERENCE_UM} µm/px {upsampled:7.2f} s "
          f"({upsampled / own:.1f} x the time)")

    print(f"\nPeak traced numpy memory, classical engine, {args.size} px image")
    for tile in (args.size, args.size // 4):
        mib = peak_traced(lambda tile=tile: segment_image(big, engines["classical"], tile_size=tile,
                                                           overlap=defaults.overlap))
        print(f"tile {tile:>5} px: {mib:7.0f} MiB")


if __name__ == "__main__":
    main()
