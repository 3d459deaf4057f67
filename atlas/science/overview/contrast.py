"""Automatic display contrast of one channel, as MCMICRO's auto-minerva chooses it.

auto-minerva fits a three-component Gaussian mixture to the log intensities of a sample of the
channel, drops the lowest (background) component, and shows the range from where the two upper
components' weighted densities cross to two standard deviations above the brightest one. It
adapts to both dense stains (DNA: most pixels are signal) and sparse markers (a few bright cells
on a dim background), where a fixed pair of percentiles would either crush or wash out one kind.

Where a mixture cannot be fitted (a constant, empty or nearly binary channel), robust percentiles
are used instead, and a constant channel is shown as it is: all-zero stays black, a saturated
channel shows at full brightness (it *is* saturated). Every range is finite with ``high > low``.
"""
from __future__ import annotations

import numpy as np

# At most this many pixels feed the fit (auto-minerva samples a 200 x 200 grid).
MAX_SAMPLES = 40_000
# Percentiles (in %) of the fallback range.
FALLBACK_PERCENTILES = (0.5, 99.9)
# Log intensities are binned this finely for the fit (bins ~0.5 % of intensity wide or less).
HISTOGRAM_BINS = 1024
# Fewer distinct positive values than this and the mixture is not meaningful.
MIN_DISTINCT = 16


def sample_pixels(plane: np.ndarray, max_samples: int = MAX_SAMPLES) -> np.ndarray:
    """A deterministic, evenly spread sample of a plane's pixels.

    Parameters
    ----------
    plane : (Y, X) ndarray
        One channel, usually a low-resolution pyramid level.
    max_samples : int
        Upper bound on the number of pixels returned.

    Returns
    -------
    (N,) ndarray, N <= max_samples, same dtype as ``plane``: every k-th row and column.
    """
    plane = np.asarray(plane)
    step = max(1, int(np.ceil(np.sqrt(plane.size / max_samples))))
    return plane[::step, ::step].ravel()


# Starting points of the fit, as quantiles of the data; the best of the fits is kept (a mixture
# likelihood has local optima, e.g. two components splitting the dominant background).
GMM_STARTS = ((1 / 6, 1 / 2, 5 / 6), (0.25, 0.75, 0.99), (0.5, 0.9, 0.999))


def _kmeans_1d(x: np.ndarray, counts: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Weighted 1-D k-means (Lloyd) from ``means``: the components' labels of every x."""
    for _ in range(100):
        nearest = np.abs(x[:, None] - means).argmin(axis=1)
        mass = np.bincount(nearest, weights=counts, minlength=means.size)
        sums = np.bincount(nearest, weights=counts * x, minlength=means.size)
        updated = np.where(mass > 0, sums / np.maximum(mass, 1e-300), means)
        if np.allclose(updated, means):
            break
        means = updated
    return np.abs(x[:, None] - means).argmin(axis=1)


def _em_1d(x: np.ndarray, counts: np.ndarray, nearest: np.ndarray, n: int, max_iter: int, tol: float,
           reg_var: float) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """EM from a hard assignment; (mean log-likelihood, weights, means, variances)."""
    total = counts.sum()
    mass = np.bincount(nearest, weights=counts, minlength=n) + 1e-10
    means = np.bincount(nearest, weights=counts * x, minlength=n) / mass
    var = np.bincount(nearest, weights=counts * (x - means[nearest]) ** 2, minlength=n) / mass + reg_var
    weights = mass / mass.sum()
    previous = -np.inf
    for _ in range(max_iter):
        log_p = -0.5 * (x[:, None] - means) ** 2 / var - 0.5 * np.log(2 * np.pi * var) + np.log(weights)
        top = log_p.max(axis=1, keepdims=True)
        log_norm = (top + np.log(np.exp(log_p - top).sum(axis=1, keepdims=True))).ravel()
        likelihood = float((log_norm * counts).sum() / total)
        if likelihood - previous < tol:
            break
        previous = likelihood
        resp = np.exp(log_p - log_norm[:, None]) * counts[:, None]
        mass = resp.sum(axis=0) + 10 * np.finfo(float).eps
        weights = mass / total
        means = (resp * x[:, None]).sum(axis=0) / mass
        var = (resp * (x[:, None] - means) ** 2).sum(axis=0) / mass + reg_var
    return likelihood, weights, means, var


def fit_gmm_1d(x: np.ndarray, counts: np.ndarray | None = None, n_components: int = 3, max_iter: int = 1000,
               tol: float = 1e-6, reg_var: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum-likelihood 1-D Gaussian mixture by expectation-maximisation.

    The model of ``sklearn.mixture.GaussianMixture(n_components)`` on one feature, started
    deterministically (k-means from several quantile seeds, the best likelihood kept) and fitted
    to a histogram, which makes it much faster (see benchmarks/render.py); that matters with
    dozens of channels per slide.

    Parameters
    ----------
    x : (N,) ndarray
        Sample values (here: log intensities), or histogram bin centres with ``counts``.
    counts : (N,) ndarray, optional
        How many samples each value of ``x`` stands for (default 1 each).
    n_components : int
        3 here; with another number the seeds are evenly spaced quantiles.
    max_iter : int
    tol : float
        Stop when the mean log-likelihood improves by less than this.
    reg_var : float
        Added to each variance (sklearn's ``reg_covar``), so a component never collapses.

    Returns
    -------
    weights, means, sds : (n_components,) float64 ndarrays, sorted by mean.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    counts = np.ones_like(x) if counts is None else np.asarray(counts, dtype=np.float64).ravel()
    order = np.argsort(x)
    cumulative = np.cumsum(counts[order]) / counts.sum()
    starts = GMM_STARTS if n_components == 3 else (tuple((np.arange(n_components) + 0.5) / n_components),)
    fits = [_em_1d(x, counts, _kmeans_1d(x, counts, np.interp(q, cumulative, x[order])), n_components,
                   max_iter, tol, reg_var) for q in starts]
    _, weights, means, var = max(fits, key=lambda fit: fit[0])
    order = np.argsort(means)
    return weights[order], means[order], np.sqrt(var[order])


def _gmm_range(values: np.ndarray) -> tuple[float, float] | None:
    """auto-minerva's (low, high) from a 3-component mixture of log intensities; None if unfit."""
    positive = values[values > 0]
    if np.unique(positive).size < MIN_DISTINCT:
        return None
    counts, edges = np.histogram(np.log(positive), bins=HISTOGRAM_BINS)
    filled = counts > 0
    weights, means, sds = fit_gmm_1d(((edges[:-1] + edges[1:]) / 2)[filled], counts[filled], 3)
    mid, top = 1, 2
    high = means[top] + 2 * sds[top]
    # Where the weighted densities of the two upper components cross, between their means.
    grid = np.linspace(means[mid], means[top], 1000)

    def density(k: int) -> np.ndarray:
        return weights[k] * np.exp(-0.5 * ((grid - means[k]) / sds[k]) ** 2) / sds[k]

    above = np.nonzero(density(top) >= density(mid))[0]
    low = grid[above[0]] if above.size else means[top] - 2 * sds[top]
    low, high = float(np.exp(low)), float(np.exp(high))
    if not (np.isfinite(low) and np.isfinite(high)):
        return None
    return low, high


def auto_contrast(values: np.ndarray) -> tuple[float, float]:
    """Display range of one channel from a sample of its pixels.

    Parameters
    ----------
    values : ndarray
        Pixel intensities of the channel in its own units (any dtype), e.g. from
        :func:`sample_pixels`; NaN and infinities are ignored.

    Returns
    -------
    (low, high) : tuple of float
        Finite, ``high > low``, within the sample's value range where it has one. Pixels at or
        below ``low`` render black, at or above ``high`` at full channel colour.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    vmin, vmax = float(values.min()), float(values.max())
    if vmax == vmin:  # constant channel: black if <= 0, full brightness if positive (saturated)
        return (0.0, vmax) if vmax > 0 else (vmin, vmin + 1.0)
    fitted = _gmm_range(values)
    if fitted is not None:
        low, high = max(fitted[0], vmin), min(fitted[1], vmax)
        if high > low:
            return low, high
    low, high = (float(v) for v in np.percentile(values, FALLBACK_PERCENTILES))
    if high <= low:  # nearly constant: a few outliers only
        high = vmax
    return low, high
