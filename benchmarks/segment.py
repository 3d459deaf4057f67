"""Benchmark: nucleus segmentation accuracy (held out) and CPU speed of each engine, against a baseline.

Accuracy is F1 at IoU >= 0.5 and >= 0.75 (one-to-one matching, as StarDist and the 2018 Data
Science Bowl report it), pooled over the nuclei of a data set, on two real data sets:

* ``tuning``: ``../shared/data/segmentation/dsb2018_fluo_tuning`` (31 DSB2018 fluorescence images,
  1,503 nuclei, five looks A-E). Every setting is *selected* here, with held-out folds: for each
  look, the grid point with the best F1@0.5 on the other four looks is scored on that look
  (leave-one-look-out; a look is one source, so its images never sit on both sides). The figures
  printed for this set are those held-out scores, pooled over the 31 images.
* ``stardist``: the StarDist DSB2018 test image and its masks (125 nuclei,
  ``../shared/data/segmentation/stardist_dsb2018``), never used for selection: scored with the
  settings selected on all 31 tuning images (the engines' defaults).

Methods: the two engines (``unet``: the ONNX U-Net + seeded watershed seeded in units of the
nucleus radius; ``classical``), the baseline ``unet+dt`` (the same U-Net probability > 0.5 and the
textbook distance-transform watershed, :func:`atlas.science.segmentation.instances.distance_watershed`,
its seed spacing selected the same way), and two unselected references (``otsu+cc``: Gaussian,
Otsu, connected components; ``unet+cc``: U-Net probability > 0.5, connected components) and an oracle,
``bound``: the U-Net's foreground split by the true masks (:func:`truth_split`), what a splitter of that
foreground that knew the nuclei would score: the gap to it is the splitting's. Images
are taken at 0.65 µm/px (DSB2018 gives no pixel size).

Scale: the StarDist image as a coarser camera would record it (resized by 1/d with anti-aliasing,
pixel size 0.65 d µm), segmented at 0.65 µm/px and at its own scale. Speed: megapixels/s on CPU
over a larger image (the StarDist image mirrored to ``--size`` px square), tiled with the stage's
defaults, as a ratio of the ``otsu+cc`` reference's time in the same process. Peak traced (numpy)
memory, tiled vs one tile.

    .venv/bin/python benchmarks/segment.py [--size 2048] [--repeat 2] [--parts accuracy,scale,speed]
"""
from __future__ import annotations

import argparse
import csv
import itertools
import sys
import time
import tracemalloc
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed
from skimage.transform import resize

from atlas.params import SegmentParams
from atlas.science.segmentation import make_engine
from atlas.science.segmentation.classical import ClassicalEngine, ClassicalSettings
from atlas.science.segmentation.instances import distance_watershed, remove_small
from atlas.science.segmentation.metrics import match_instances
from atlas.science.segmentation.tiling import ScaledImage, calibration_sample, segment_image
from atlas.science.segmentation.unet import UNetEngine, UNetSettings, nucleus_radius, split_instances

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.realdata import data_root  # noqa: E402  (../shared/data, or fetched)

DATA = data_root()
IMAGE = DATA / "segmentation" / "stardist_dsb2018" / "img2d.tif"
TRUTH = DATA / "segmentation" / "stardist_dsb2018" / "mask2d.tif"
TUNING = DATA / "segmentation" / "dsb2018_fluo_tuning"
WEIGHTS = DATA / "models" / "unet2d_nuclei_broad" / "weights.onnx"
IOU = (0.5, 0.75)
# The grids selected over (leave-one-look-out on the tuning set); the engines' defaults must be
# the point chosen on all 31 images.
UNET_GRID = [{"foreground_probability": fg, "seed_probability": core, "seed_sigma_radius": sigma,
              "seed_min_distance_radius": spacing}
             for fg, core, sigma, spacing in itertools.product((0.4, 0.5, 0.7), (0.8, 0.9), (0.15, 0.2, 0.3),
                                                               (0.3, 0.4, 0.5))]
CLASSICAL_GRID = [{"threshold_scale": t, "seed_min_distance_um": d}
                  for t, d in itertools.product((0.5, 0.7, 0.9), (2.0, 2.6, 3.25))]
BASELINE_GRID = [{"min_distance": d} for d in (3, 5, 8, 12)]
COARSENING = (1.5, 2, 3, 4)        # pixel size 0.65 d µm
REFERENCE_UM = 0.65


def otsu_components(image: np.ndarray) -> np.ndarray:
    """Reference: smooth, global Otsu threshold, connected components."""
    smooth = ndi.gaussian_filter(image.astype(np.float32), 1.0)
    return ndi.label(smooth > threshold_otsu(smooth))[0]


def truth_split(foreground: np.ndarray, truth: np.ndarray, min_area: int) -> np.ndarray:
    """``foreground`` split as by a splitter that knew the true nuclei: each of its pixels goes to the
    true nucleus it lies in, or to the one it reaches first through the foreground; pieces of it that
    reach no true nucleus stay as (false) instances. Instances below ``min_area`` px are dropped, as the engines do."""
    grown = watershed(np.zeros(foreground.shape, np.float32), np.where(foreground, truth, 0).astype(np.int32),
                      mask=foreground)
    stray, _ = ndi.label(foreground & (grown == 0))
    return remove_small(np.where(stray > 0, stray + grown.max(), grown), min_area)


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


@dataclass
class Sample:
    """One labelled image: its look (``S`` for the StarDist image), pixels, truth and U-Net inputs."""

    name: str
    look: str
    image: np.ndarray
    truth: np.ndarray
    probability: np.ndarray | None = None
    surface: np.ndarray | None = None
    radius: dict | None = None


def load_samples() -> tuple[list[Sample], Sample]:
    """The 31 tuning images (with their look) and the StarDist test image."""
    rows = list(csv.DictReader((TUNING / "manifest.csv").open()))
    tuning = [Sample(r["image_id"][:8], r["group"],
                     np.asarray(Image.open(TUNING / "images" / f"{r['image_id']}.png"))[..., 0].astype(np.float32),
                     tifffile.imread(TUNING / "masks" / f"{r['image_id']}.tif")) for r in rows]
    return tuning, Sample("stardist", "S", tifffile.imread(IMAGE).astype(np.float32), tifffile.imread(TRUTH))


def nuclei(sample: Sample) -> int:
    return int(np.count_nonzero(np.unique(sample.truth)))


def add_unet_inputs(engine: UNetEngine, sample: Sample) -> None:
    """The model's probability and the watershed surface of a whole (<= 512 px) image, computed once."""
    view = ScaledImage(sample.image)
    (block,) = calibration_sample(view)          # small image: the sample is the image itself
    assert block.shape == sample.image.shape
    calibration = engine.calibrate([block])
    sample.probability, sample.surface = engine.split_inputs(view, (0, *view.shape[:1], 0, view.shape[1]), calibration)
    sample.radius = {}


def unet_labels(sample: Sample, point: dict) -> np.ndarray:
    settings = replace(UNetSettings(), **point)
    if point["seed_probability"] not in sample.radius:
        sample.radius[point["seed_probability"]] = nucleus_radius([sample.probability], point["seed_probability"])
    return split_instances(sample.probability, sample.surface, sample.radius[point["seed_probability"]], settings)


METHODS = {
    "unet": (UNET_GRID, unet_labels),
    "classical": (CLASSICAL_GRID,
                  lambda s, point: segment_image(s.image, ClassicalEngine(replace(ClassicalSettings(), **point)))),
    "unet+dt": (BASELINE_GRID, lambda s, point: distance_watershed(s.probability > 0.5, point["min_distance"])),
    "otsu+cc": ([{}], lambda s, point: otsu_components(s.image)),
    "unet+cc": ([{}], lambda s, point: ndi.label(s.probability > 0.5)[0]),
    "bound": ([{}], lambda s, point: truth_split(s.probability > UNetSettings().foreground_probability, s.truth,
                                                  round(UNetSettings().min_area_um2 / REFERENCE_UM ** 2))),
}


def counts(sample: Sample, labels: np.ndarray) -> np.ndarray:
    """(true positives at each IoU of :data:`IOU`, n_true, n_pred) of one image."""
    scores = [match_instances(sample.truth, labels, t) for t in IOU]
    return np.array([s.tp for s in scores] + [scores[0].n_true, scores[0].n_pred])


def f1(total: np.ndarray) -> list[float]:
    """Pooled F1 at each IoU of :data:`IOU` from summed :func:`counts`."""
    return [2 * tp / (total[-2] + total[-1]) for tp in total[:len(IOU)]]


def select(scores: np.ndarray, rows: np.ndarray) -> int:
    """Grid point with the best pooled F1@0.5 over ``rows`` of ``scores`` (points x images x counts)."""
    return int(np.argmax([f1(point[rows].sum(axis=0))[0] for point in scores]))


def held_out_table(tuning: list[Sample], stardist: Sample) -> dict[str, dict]:
    """Leave-one-look-out selection on the tuning set; the StarDist image scored with the all-31 choice."""
    looks = np.array([s.look for s in tuning])
    results = {}
    for name, (grid, run) in METHODS.items():
        scores = np.array([[counts(s, run(s, point)) for s in tuning] for point in grid])
        held = np.zeros_like(scores[0])
        chosen = {}
        for look in sorted(set(looks.tolist())):
            best = select(scores, looks != look)
            held[looks == look] = scores[best][looks == look]
            chosen[look] = grid[best]
        final = grid[select(scores, np.ones(len(tuning), bool))]
        results[name] = {"held": f1(held.sum(axis=0)), "stardist": f1(counts(stardist, run(stardist, final))),
                         "looks": {look: f1(held[looks == look].sum(axis=0))[0] for look in chosen},
                         "chosen": chosen, "final": final}
    return results


def accuracy(engines: dict) -> None:
    tuning, stardist = load_samples()
    for sample in [*tuning, stardist]:
        add_unet_inputs(engines["unet"], sample)
    print(f"\nAccuracy: tuning set held out by look ({sum(nuclei(s) for s in tuning)} nuclei, "
          f"leave-one-look-out) | StarDist DSB2018 image ({nuclei(stardist)} nuclei, never selected on)")
    results = held_out_table(tuning, stardist)
    looks = sorted(results["unet"]["looks"])
    print(f"{'method':<10} {'tuning F1@.5':>12} {'F1@.75':>7}   {'stardist F1@.5':>14} {'F1@.75':>7}   "
          + " ".join(f"{look:>5}" for look in looks))
    for name, r in results.items():
        print(f"{name:<10} {r['held'][0]:12.3f} {r['held'][1]:7.3f}   "
              f"{r['stardist'][0]:14.3f} {r['stardist'][1]:7.3f}   "
              + " ".join(f"{r['looks'][look]:5.3f}" for look in looks))
    defaults = {"unet": UNetSettings(), "classical": ClassicalSettings()}
    for name, r in results.items():
        if r["final"]:
            print(f"{name}: chosen per held-out look {r['chosen']}; on all 31: {r['final']}")
        if name in defaults and any(getattr(defaults[name], k) != v for k, v in r["final"].items()):
            print(f"WARNING: {name}'s defaults are not the point selected on all 31 images")
    check = match_instances(stardist.truth, segment_image(stardist.image, engines["unet"])).f1
    print(f"unet engine (defaults, through segment_image) on the StarDist image: F1@0.5 {check:.3f}")


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
    parser.add_argument("--parts", type=lambda v: v.split(","), default=["accuracy", "scale", "speed"],
                        help="comma-separated: accuracy, scale, speed")
    args = parser.parse_args()

    image, truth = tifffile.imread(IMAGE), tifffile.imread(TRUTH)
    engines = {"classical": make_engine("classical"), "unet": make_engine("unet", weights=str(WEIGHTS))}
    print(f"U-Net providers: {engines['unet'].providers}")
    if "accuracy" in args.parts:
        accuracy(engines)
    if "scale" in args.parts:
        scale_table(image, truth)
    if "speed" in args.parts:
        speed(image, engines, args.size, args.repeat)


def speed(image: np.ndarray, engines: dict, size: int, repeat: int) -> None:
    big = np.pad(image, ((0, size - image.shape[0]), (0, size - image.shape[1])), mode="symmetric")
    megapixels = big.size / 1e6
    defaults = SegmentParams()
    print(f"\nSpeed on CPU, {size} x {size} ({megapixels:.1f} MP), tile {defaults.tile_size} px, "
          f"overlap {defaults.overlap} px, best of {repeat}")
    reference = best_time(lambda: otsu_components(big), repeat)
    print(f"{'otsu+cc':<10} {reference:7.2f} s {megapixels / reference:8.2f} MP/s   ratio 1.00")
    for name, engine in engines.items():
        seconds = best_time(lambda engine=engine: segment_image(big, engine, tile_size=defaults.tile_size,
                                                  overlap=defaults.overlap), repeat)
        print(f"{name:<10} {seconds:7.2f} s {megapixels / seconds:8.2f} MP/s   ratio {seconds / reference:.1f} "
              "x reference time")

    coarse = big[:size // 2, :size // 2]
    pixel = 4 * REFERENCE_UM
    print(f"\nClassical engine on a coarse image ({coarse.shape[0]} px square declared {pixel:.2f} µm/px), "
          f"best of {repeat}")
    own = best_time(lambda: segment_image(coarse, engines["classical"], pixel_size_um=pixel), repeat)
    upsampled = best_time(lambda: segment_at(ClassicalEngine(pixel_size_um=REFERENCE_UM), coarse, pixel), repeat)
    print(f"at its own scale {own:7.2f} s; upsampled to {REFERENCE_UM} µm/px {upsampled:7.2f} s "
          f"({upsampled / own:.1f} x the time)")

    print(f"\nPeak traced numpy memory, classical engine, {size} px image")
    for tile in (size, size // 4):
        mib = peak_traced(lambda tile=tile: segment_image(big, engines["classical"], tile_size=tile,
                                                           overlap=defaults.overlap))
        print(f"tile {tile:>5} px: {mib:7.0f} MiB")


if __name__ == "__main__":
    main()
