"""Overview rendering speed: our deep-zoom tiles vs libvips ``dzsave`` on the same mosaic, one run.

Usage: ``.venv/bin/python benchmarks/render.py [--repeat N] [--scale S]``

The mosaic is the real BaSiCPy brain section (``../shared/data/stitching/basicpy_wsi_brain``, its
54 tiles placed at Fiji's registered positions), repeated ``S x S`` times, as 8 channels (the
mosaic, the DSB2018 nucleus image tiled over it, and mixes of the two) written as a pyramidal
OME-TIFF with :mod:`atlas.science.pyramid`, like the registered image the render stage reads.

Both sides render the same two groups of four channels into 1024-px JPEG (quality 85) tiles down
to a level that fits one tile:
- ours: :func:`atlas.science.overview.render_overview` (the full stage work: contrast, tiles, exhibit, page);
- reference: pyvips reads the same channels from the same file, applies the same display ranges
  and colours (linear, clamp, tint, sum, clamp), and writes them with ``dzsave`` (depth onetile).
  It gets the display ranges for free.

Also compares the contrast fit (our 1-D EM) with scikit-learn's GaussianMixture, which it replaces.

Prints tiles per second of each and the ratio (goal: ours >= 0.5x dzsave).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atlas.science.overview import render_overview  # noqa: E402
from atlas.science.overview.contrast import _gmm_range, sample_pixels  # noqa: E402
from atlas.science.overview.exhibit import make_groups  # noqa: E402
from atlas.science.overview.source import TiffPyramid  # noqa: E402
from atlas.science.overview.tiles import hex_to_rgb  # noqa: E402
from atlas.science.pyramid import write_ome_tiff_pyramid  # noqa: E402
from tests.realdata import data_root  # noqa: E402  (../shared/data, or fetched)
from tests.test_overview_browser import brain_mosaic, tiled  # noqa: E402  (the test's real mosaic)

DATA = data_root()
TILE = 1024
MARKERS = ["DNA_1", "Nuclei", "Mix_a", "Mix_b", "DNA_2", "Nuclei_2", "Mix_c", "Mix_d"]


def make_image(path: Path, scale: int) -> None:
    mosaic = np.tile(brain_mosaic(DATA), (scale, scale))
    nuclei = tiled(tifffile.imread(DATA / "segmentation" / "stardist_dsb2018" / "img2d.tif"), mosaic.shape)
    nuclei = nuclei * np.uint16(100)
    channels = [mosaic, nuclei, mosaic // 2 + nuclei // 4, np.maximum(mosaic, nuclei)]
    image = np.stack(channels + [np.flipud(c) for c in channels])
    write_ome_tiff_pyramid(path, image, channel_names=MARKERS, pixel_size_um=2.583, tile_size=TILE)


def run_ours(image: Path, out: Path) -> tuple[float, int]:
    start = time.perf_counter()
    result = render_overview(image, out, slide_id="bench", markers=MARKERS, tile_size=TILE)
    return time.perf_counter() - start, result["tiles"]


def run_vips(image: Path, out: Path) -> tuple[float, int]:
    import pyvips

    with TiffPyramid(image, TILE) as pyramid:
        coarsest = pyramid.level(pyramid.n_levels - 1)
    from atlas.science.overview.contrast import auto_contrast
    ranges = [auto_contrast(sample_pixels(plane)) for plane in coarsest]
    groups = make_groups(MARKERS, ranges, 4)
    start = time.perf_counter()
    for group in groups:
        total = None
        for c, (low, high), color in zip(group.channels, group.ranges, group.colors, strict=True):
            channel = pyvips.Image.tiffload(str(image), page=c, access="sequential")
            value = ((channel - low) * (255.0 / (high - low))).clamp(min=0, max=255)
            tinted = value.linear([w / 255 for w in hex_to_rgb(color)], [0, 0, 0])
            total = tinted if total is None else total + tinted
        rgb = total.clamp(min=0, max=255).cast("uchar")
        rgb.dzsave(str(out / group.path), tile_size=TILE, overlap=0, depth="onetile", suffix=".jpg[Q=85]")
    seconds = time.perf_counter() - start
    return seconds, sum(1 for _ in out.rglob("*.jpg"))


def compare_gmm(image: Path) -> None:
    """Our EM fit vs scikit-learn's GaussianMixture on the same samples: time and ranges."""
    from sklearn.mixture import GaussianMixture

    with TiffPyramid(image, TILE) as pyramid:
        coarsest = pyramid.level(pyramid.n_levels - 1)
    ours_s = theirs_s = 0.0
    worst = 0.0
    for plane in coarsest:
        values = sample_pixels(plane).astype(np.float64)
        logs = np.log(values[values > 0])
        t0 = time.perf_counter()
        ours_low, ours_high = _gmm_range(values)
        t1 = time.perf_counter()
        gmm = GaussianMixture(3, max_iter=1000, tol=1e-6, random_state=0).fit(logs[:, None])
        t2 = time.perf_counter()
        ours_s, theirs_s = ours_s + t1 - t0, theirs_s + t2 - t1
        top = int(np.argmax(gmm.means_.ravel()))
        sk_high = float(np.exp(gmm.means_.ravel()[top] + 2 * np.sqrt(gmm.covariances_.ravel()[top])))
        worst = max(worst, abs(ours_high - sk_high) / sk_high)
    print(f"contrast fit, {len(coarsest)} channels: ours {ours_s:.2f} s, scikit-learn {theirs_s:.2f} s "
          f"({theirs_s / ours_s:.0f}x slower); upper limits differ by at most {100 * worst:.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side; the best counts")
    parser.add_argument("--scale", type=int, default=2, help="mosaic repeated SCALE x SCALE times")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-render-") as tmp:
        tmp = Path(tmp)
        image = tmp / "mosaic.ome.tif"
        make_image(image, args.scale)
        with TiffPyramid(image, TILE) as pyramid:
            print(f"mosaic {pyramid.shape} {pyramid.dtype}, {pyramid.n_levels} levels, tiles {TILE} px")
        best = {"ours": (np.inf, 0), "dzsave": (np.inf, 0)}
        for _ in range(args.repeat):  # interleaved, so both see the same machine noise
            for name, fn in (("ours", run_ours), ("dzsave", run_vips)):
                out = tmp / name
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                seconds, tiles = fn(image, out / "overview" if name == "ours" else out)
                best[name] = min(best[name], (seconds, tiles))
        rates = {}
        for name, (seconds, tiles) in best.items():
            rates[name] = tiles / seconds
            print(f"{name:7s} {tiles:4d} tiles in {seconds:6.2f} s = {rates[name]:6.1f} tiles/s")
        print(f"ratio ours / dzsave = {rates['ours'] / rates['dzsave']:.2f} (goal >= 0.5)")
        compare_gmm(image)


if __name__ == "__main__":
    main()
