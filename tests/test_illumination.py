"""Flat-field estimation (atlas.science.illumination) against truth and on real tiles.

* Truth: the made sample slide's tiles carry a known vignetting profile (``truth/flatfield.tif``,
  corners ~0.68 of the centre); the estimate is compared after normalising both to mean 1.
* Real: the 63 BaSiCPy WSI_brain tiles (the BaSiC paper's own example), read in place from
  ``../shared/data``. There is no true flat field, so the check is what the correction is for:
  neighbouring tiles agree better in their overlaps (placed at Fiji's registered positions).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile

from atlas.science.illumination import correct, estimate_flatfield
from atlas.slide.fiji import read_tile_configuration
from atlas.slide.ome import read_cycle_metadata, read_tile

BRAIN_TILES = 63
# Tiles whose Fiji position is wrong (see tests/test_stitch.py and the data README): left out.
FIJI_WRONG = {"0001", "0037", "0054", "0010", "0027", "0028", "0045", "0046"}
TISSUE_P99 = 1500


def relative_rms(estimate: np.ndarray, truth: np.ndarray) -> float:
    """RMS difference of two profiles, each normalised to mean 1."""
    return float(np.sqrt(np.mean((estimate / estimate.mean() - truth / truth.mean()) ** 2)))


def test_sample_flatfield_matches_truth(sample_dirs):
    """9 tiles per channel (3 x 3 grid). Measured relative RMS 0.035-0.043 over the six channels
    (a uniform profile scores 0.084, a smoothed per-pixel median 0.06-0.22)."""
    slide, truth_dir = sample_dirs
    truth = tifffile.imread(truth_dir / "flatfield.tif")
    uniform = relative_rms(np.ones_like(truth), truth)
    path = min((slide / "raw").glob("*.ome.tif"))                # cycle 1
    tiles = [read_tile(path, t) for t in range(read_cycle_metadata(path).n_tiles)]
    for channel in (0, 1):                      # DNA and CD45 of cycle 1
        flat, dark = estimate_flatfield(np.stack([t[channel] for t in tiles]))
        assert flat.dtype == np.float32 and flat.shape == truth.shape
        assert flat.mean() == pytest.approx(1, abs=1e-4) and not dark.any()
        error = relative_rms(flat, truth)
        assert error <= 0.046, (channel, error)
        assert error <= 0.55 * uniform
        # the corner fall-off is recovered, not flattened (the camera offset, not modelled, dilutes it)
        fall_off = 1 - flat[:32, :32].mean() / flat[224:288, 224:288].mean()
        true_fall_off = 1 - truth[:32, :32].mean() / truth[224:288, 224:288].mean()
        assert fall_off >= 0.5 * true_fall_off, (channel, fall_off, true_fall_off)


def _read_tileconfig(path) -> dict[str, tuple[float, float]]:
    return {re.search(r"(\d+)\.tif$", e.name).group(1): (e.y, e.x) for e in read_tile_configuration(path)}


def overlap_disagreement(tiles: dict[str, np.ndarray], positions: dict[str, tuple[float, float]]) -> float:
    """Sum of |A - B| over the overlaps of every pair of tiles, relative to their mean intensity there."""
    ids = sorted(positions)
    num = den = 0.0
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            dy, dx = np.round(np.subtract(positions[b], positions[a])).astype(int)
            h, w = tiles[a].shape[0] - abs(dy), tiles[a].shape[1] - abs(dx)
            if h < 20 or w < 20:
                continue
            pa = tiles[a][max(dy, 0):max(dy, 0) + h, max(dx, 0):max(dx, 0) + w].astype(float)
            pb = tiles[b][max(-dy, 0):max(-dy, 0) + h, max(-dx, 0):max(-dx, 0) + w].astype(float)
            num += np.abs(pa - pb).sum()
            den += ((pa + pb) / 2).sum()
    return num / den


def test_brain_tiles_agree_better_in_overlaps(shared_data):
    """Flat field from all 63 tiles; overlaps compared over the tissue tiles with a trusted Fiji
    position (123 pairs). Measured: relative disagreement 0.224 raw -> 0.141 corrected (ratio 0.63)."""
    folder = shared_data / "stitching" / "basicpy_wsi_brain"
    ids = [f"{i:04d}" for i in range(1, BRAIN_TILES + 1)]
    raw = {i: tifffile.imread(folder / f"C3-BrainSection{i}.tif") for i in ids}
    flat, dark = estimate_flatfield(raw[i] for i in ids)
    assert flat.shape == (512, 512) and flat.min() / flat.max() < 0.55       # strong vignetting found
    corrected = {i: correct(raw[i], flat, dark) for i in ids}
    positions = {i: p for i, p in _read_tileconfig(folder / "TileConfiguration.registered.txt").items()
                 if i not in FIJI_WRONG and np.percentile(raw[i], 99) >= TISSUE_P99}
    assert len(positions) >= 35
    before = overlap_disagreement(raw, positions)
    after = overlap_disagreement(corrected, positions)
    assert after <= 0.66 * before, (before, after)


def test_correct_inverts_the_shading_and_keeps_the_dtype():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :80]
    flat = (1 - 0.3 * (((yy - 32) / 32) ** 2 + ((xx - 40) / 40) ** 2) / 2).astype(np.float32)
    flat /= flat.mean()
    dark = np.full(flat.shape, 100, np.float32)
    scene = rng.uniform(500, 5000, flat.shape)
    tile = np.rint(scene * flat + dark).astype(np.uint16)
    out = correct(tile, flat, dark)
    assert out.dtype == np.uint16
    assert np.abs(out.astype(float) - scene).max() <= 0.5 / flat.min() + 0.5     # two roundings
    saturated = correct(np.full(flat.shape, 65535, np.uint16), flat, np.zeros_like(flat))
    assert saturated.dtype == np.uint16 and saturated.max() == 65535        # clipped, not wrapped
    assert correct(tile.astype(np.float32), flat, dark).dtype == np.float32


def test_estimate_needs_two_tiles_of_one_shape():
    with pytest.raises(ValueError, match="at least 2"):
        estimate_flatfield(np.ones((1, 8, 8)))
    with pytest.raises(ValueError, match="one shape"):
        estimate_flatfield([np.ones((8, 8)), np.ones((8, 9))])
