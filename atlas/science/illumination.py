"""Retrospective illumination (shading) correction in the manner of BaSiC.

BaSiC (Peng et al., Nat Commun 8:14836, 2017) models every tile of an acquisition as

    I_n(x) = b_n * F(x) + D(x) + E_n(x)

with a flat field ``F`` (mean 1) and a dark field ``D`` shared by all tiles, one baseline ``b_n``
per tile, and a sparse residual ``E_n`` (the specimen where it deviates from the baseline). ``F``
and ``D`` are smooth: they are sparse in the 2-D DCT domain. The low-rank + sparse decomposition
is solved by an inexact augmented-Lagrangian (ALM) iteration on downsampled tiles, reweighted a
few times so that bright specimen structure stops pulling on the flat field.

The dark field is not estimated (``D = 0``): the model leaves ``b`` and ``D`` determined only up
to ``b -> b + c, D -> D - c F``, and our regressions of a known constant camera offset on the
sample slide came out biased ~2.5x. BaSiC's option of sorting each pixel's intensities across the
tiles was tried and gave a less accurate flat field on the sample (docs/stitching.md).

This is our implementation (basicpy 2.0 needs torch and numpy < 2); it follows the paper's
model and default regularisation rules. Plain functions over numpy arrays, no I/O.
"""
from __future__ import annotations

import numpy as np
from scipy.fft import dctn, idctn
from skimage.transform import resize

WORKING_SIZE = 128          # tiles are fitted at this side length (BaSiC's default)
MAX_ITERATIONS = 500        # ALM iterations per fit
TOLERANCE = 1e-6            # ALM stops when ||D - A - E||_F / ||D||_F falls below this
MAX_REWEIGHTS = 10          # outer reweighting rounds
REWEIGHT_TOLERANCE = 1e-3   # ... until the flat field changes by less than this (relative L1)
REWEIGHT_EPSILON = 0.1      # weight = 1 / (|E| / mean + epsilon)


def _dct(a: np.ndarray) -> np.ndarray:
    return dctn(a, norm="ortho")


def _idct(a: np.ndarray) -> np.ndarray:
    return idctn(a, norm="ortho")


def _shrink(a: np.ndarray, threshold) -> np.ndarray:
    """Soft thresholding, the proximal step of the L1 norm."""
    return np.sign(a) * np.maximum(np.abs(a) - threshold, 0)


def _fit(data: np.ndarray, weight: np.ndarray, smoothness: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One inexact-ALM fit of ``data ≈ b ⊗ F + E`` on the working-size stack.

    Returns the flat-field term ``F`` (not normalised), the baselines ``b`` (mean 1) and the sparse
    residual ``E``.
    """
    n = len(data)
    spectral_norm = np.linalg.norm(data.reshape(n, -1), 2)
    mu, mu_max, rho = 12.5 / spectral_norm, 12.5 / spectral_norm * 1e7, 1.5
    data_norm = np.linalg.norm(data)
    multiplier = np.zeros_like(data)
    residual = np.zeros_like(data)
    flat_dct = np.zeros(data.shape[1:])
    baseline = np.ones(n)
    for _ in range(MAX_ITERATIONS):
        flat = _idct(flat_dct)
        step = (data - baseline[:, None, None] * flat - residual + multiplier / mu).mean(axis=0)
        flat_dct = _shrink(flat_dct + _dct(step), smoothness / mu)
        flat = _idct(flat_dct)
        residual = _shrink(data - baseline[:, None, None] * flat + multiplier / mu, weight / mu)
        clean = data - residual
        baseline = np.maximum(clean.mean(axis=(1, 2)) / clean.mean(), 0)
        gap = data - baseline[:, None, None] * flat - residual
        multiplier += mu * gap
        mu = min(mu * rho, mu_max)
        if np.linalg.norm(gap) / data_norm < TOLERANCE:
            break
    return flat, baseline, residual


def estimate_flatfield(tiles: np.ndarray, *, smoothness: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Flat field shared by a stack of tiles (BaSiC's model without the dark-field term).

    Parameters
    ----------
    tiles : (N, Y, X) array-like, or an iterable of N (Y, X) arrays (read one at a time)
        The tiles of one channel of one acquisition (counts, any real dtype), N >= 2. Background
        tiles help; BaSiC's authors recommend dozens of tiles for a stable estimate.
    smoothness : float
        Factor on the automatic DCT-sparsity weight of the flat field (larger = smoother).

    Returns
    -------
    flatfield : (Y, X) float32 ndarray
        Multiplicative profile with mean 1.
    darkfield : (Y, X) float32 ndarray
        Additive profile in counts; zeros: the dark field is not estimated (a constant camera
        offset is not identifiable from tens of tiles of varying specimen; see docs/stitching.md).
    """
    small, shape = [], None
    for tile in tiles:                       # one tile at a time: only the working-size stack is held
        tile = np.asarray(tile, dtype=np.float64)
        if tile.ndim != 2 or shape not in (None, tile.shape):
            raise ValueError(f"tiles must all be 2-D of one shape; got {tile.shape} after {shape}")
        shape = tile.shape
        small.append(resize(tile, (WORKING_SIZE, WORKING_SIZE), order=1, anti_aliasing=True, preserve_range=True))
    if len(small) < 2:
        raise ValueError(f"a flat field needs at least 2 tiles; got {len(small)}")
    small = np.stack(small)
    scale = small.mean()
    if not scale > 0:
        raise ValueError("tiles have no positive intensity: cannot estimate a flat field")
    data = small / scale
    mean_image = data.mean(axis=0)
    # BaSiC's automatic weight: proportional to the L1 norm of the mean tile's DCT spectrum
    weight_flat = np.abs(_dct(mean_image / mean_image.mean())).sum() / 800 * smoothness
    weight = np.ones_like(data)
    previous = None
    for _ in range(MAX_REWEIGHTS):
        flat, baseline, residual = _fit(data, weight, weight_flat)
        profile = flat / flat.mean()
        weight = 1 / (np.abs(residual) / (baseline[:, None, None] * flat).mean() + REWEIGHT_EPSILON)
        weight *= weight.size / weight.sum()
        if previous is not None and np.abs(profile - previous).sum() / np.abs(previous).sum() < REWEIGHT_TOLERANCE:
            break
        previous = profile
    flatfield = resize(profile, shape, order=1, preserve_range=True)
    return (flatfield / flatfield.mean()).astype(np.float32), np.zeros(shape, np.float32)


def correct(tile: np.ndarray, flatfield: np.ndarray, darkfield: np.ndarray) -> np.ndarray:
    """Shading-corrected tile ``(tile - darkfield) / flatfield``, in the tile's dtype.

    Parameters
    ----------
    tile : (Y, X) ndarray
        Raw counts; integer or float.
    flatfield, darkfield : (Y, X) float ndarray
        From :func:`estimate_flatfield`.

    Returns
    -------
    (Y, X) ndarray, same dtype as ``tile``
        Integer tiles are rounded and clipped to the dtype's range.
    """
    out = (tile.astype(np.float32) - darkfield) / flatfield
    if np.issubdtype(tile.dtype, np.integer):
        info = np.iinfo(tile.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(tile.dtype)
    return out.astype(tile.dtype)
