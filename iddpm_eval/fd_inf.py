"""FD-infinity (Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score and where to
find them"): the Frechet distance extrapolated to infinitely many images.

FID computed from N images is biased upwards by a term that is, to first order, linear in 1/N.
The paper computes FID on random subsets of growing size, fits FID_N = FD_inf + s / N by least
squares and reports the intercept. Here every side that has features is subsampled (without
replacement) at the same fractions f_1 < ... < f_P = 1 of its size, so both sides' bias terms
scale together; a side given only as statistics stays fixed (its own finite-sample bias is not
removed, and the result says so). The fit is against 1/N with N the subset size of the smaller
side with features; the last point (f = 1) is the plain FID of the full sets.

Intervals (``ci_method``):
- "regression": the intercept's ordinary-least-squares standard error from the residuals of the
  P points, with Student's t on P - 2 degrees of freedom. It reflects the subset noise around
  the line only, not the sampling noise of the full sets: too narrow (on Gaussian features,
  64 dims, 500 + 500 images, a nominal 95% interval covered the true distance 28 times in 40).
- "bootstrap": every round resamples the images of each side with features (with replacement)
  and reruns the whole subset-and-fit procedure; the percentile interval is shifted by the
  bootstrap's bias (mean of the rounds minus the estimate), as :func:`iddpm_eval.fid.bootstrap_fid`
  does. This one includes the sampling noise of the sets; it is used whenever rounds are given.
  It is conservative (same setting: about 1.5 times the width of the estimator's 95% range,
  10 covers in 10), because repeated images in a resample add subset noise.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sstats

from iddpm_eval.fid import FIDError, choose_method, fid_of

MIN_SUBSET = 10  # a covariance from fewer images is too noisy to put on a line


class FDInfError(FIDError):
    """FD-infinity cannot be computed with these sets and settings; the message names the numbers."""


def subset_sizes(n: int, points: int, min_fraction: float, name: str = "set") -> np.ndarray:
    """Subset sizes round(f * n) for f = linspace(min_fraction, 1, points); all distinct and at
    least :data:`MIN_SUBSET`, or an :class:`FDInfError` that names the numbers."""
    if points < 3:
        raise FDInfError(f"FD-infinity needs at least 3 subset sizes for a line with a residual, got {points}")
    if not 0 < min_fraction < 1:
        raise FDInfError(f"FD-infinity: the smallest subset fraction must be in (0, 1), got {min_fraction}")
    sizes = np.round(np.linspace(min_fraction, 1.0, points) * n).astype(int)
    if sizes[0] < MIN_SUBSET or len(np.unique(sizes)) < points:
        need = max(int(np.ceil(MIN_SUBSET / min_fraction)), int(np.ceil((points - 1) / (1 - min_fraction))))
        raise FDInfError(f"FD-infinity with {points} subset sizes from {min_fraction:g} x N to N needs "
                         f"{points} distinct subsets of at least {MIN_SUBSET} images: {name} has {n} images "
                         f"(smallest subset {sizes[0]}); give at least {need} images, fewer --fd-inf-points "
                         f"or a larger --fd-inf-min-fraction")
    return sizes


def linear_fit(x: np.ndarray, y: np.ndarray, confidence: float = 0.95) -> dict:
    """Ordinary least squares y = c + s x; the intercept c with its standard error and t interval."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    p = len(x)
    xm, ym = x.mean(), y.mean()
    sxx = ((x - xm) ** 2).sum()
    slope = ((x - xm) * (y - ym)).sum() / sxx
    intercept = ym - slope * xm
    resid = y - (intercept + slope * x)
    s2 = (resid ** 2).sum() / (p - 2)
    se = float(np.sqrt(s2 * (1.0 / p + xm ** 2 / sxx)))
    t = float(sstats.t.ppf(0.5 + confidence / 2, p - 2))
    return dict(intercept=float(intercept), slope=float(slope), se=se, low=float(intercept - t * se),
                high=float(intercept + t * se), resid_std=float(np.sqrt(s2)), resid=resid)


def _curve(f1, f2, s1, s2, sizes1, sizes2, rng, method: str) -> np.ndarray:
    """FID of one random subset per size (``f`` features or None, then ``s`` = (mu, sigma) fixed)."""
    out = np.empty(len(sizes1 if f1 is not None else sizes2))
    for i in range(len(out)):
        parts = [None if f is None else f[rng.permutation(len(f))[:sizes[i]]]
                 for f, sizes in ((f1, sizes1), (f2, sizes2))]
        out[i] = fid_of(parts[0], parts[1], s1, s2, method)
    return out


def fd_infinity(feats1: np.ndarray | None, feats2: np.ndarray | None, *, stats1=None, stats2=None,
                points: int = 15, min_fraction: float = 0.2, seed: int | None = 0, method: str = "auto",
                bootstrap: int = 0, confidence: float = 0.95, progress: bool = False,
                names: tuple[str, str] = ("first set", "second set")) -> dict:
    """FD-infinity of two sides, each features [N, D] or (when features are None) fixed statistics
    ``stats`` = (mu, sigma). ``method``: how each subset's FID is computed ("auto": the exact
    low-rank form when both sides have features and the largest set is smaller than D, else
    "sqrtm"; or "sqrtm", "eig", "lowrank"). Returns the intercept ``fd_inf`` with ``low``/``high``
    (see the module doc for ``ci_method``), the slope, the subset sizes, the FID at each size,
    the line's prediction and residual at the largest size. ``names`` name the sides in errors."""
    if feats1 is None and feats2 is None:
        raise FDInfError("FD-infinity needs the features of at least one side, not only statistics")
    for f, s, name in ((feats1, stats1, "first"), (feats2, stats2, "second")):
        if f is None and s is None:
            raise FDInfError(f"FD-infinity: the {name} side has neither features nor statistics")
    sizes = [None if f is None else subset_sizes(len(f), points, min_fraction, nm)
             for f, nm in zip((feats1, feats2), names)]
    both = feats1 is not None and feats2 is not None
    method = choose_method(feats1, feats2, method)
    if method == "lowrank" and not both:
        raise FDInfError("the lowrank form needs the features of both sides")
    if method not in ("sqrtm", "eig", "lowrank"):
        raise FDInfError(f"unknown FD-infinity method {method!r}")
    # x = 1/N of the smaller side with features
    n_axis = min((s for s in sizes if s is not None), key=lambda s: s[-1])
    x = 1.0 / n_axis
    dim = (feats1 if feats1 is not None else feats2).shape[1]
    note = None
    if n_axis[0] < dim:
        note = (f"the smallest subsets ({n_axis[0]} images) are smaller than the feature dimension ({dim}): "
                f"FID's bias is not linear in 1/N there and FD-infinity is biased (Chong & Forsyth use 5,000 "
                f"to 50,000 images for 2048 dimensions)")
    rng = np.random.default_rng(seed)
    s1 = None if feats1 is not None else stats1
    s2 = None if feats2 is not None else stats2
    y = _curve(feats1, feats2, s1, s2, sizes[0], sizes[1], rng, method)
    fit = linear_fit(x, y, confidence)
    out = dict(fd_inf=fit["intercept"], low=fit["low"], high=fit["high"], se=fit["se"], slope=fit["slope"],
               ci_method="regression", sizes=[int(v) for v in n_axis], fids=y.tolist(),
               fid_at_largest=float(y[-1]), line_at_largest=float(fit["intercept"] + fit["slope"] * x[-1]),
               resid_at_largest=float(fit["resid"][-1]), resid_std=fit["resid_std"], points=points,
               min_fraction=min_fraction, method=method, confidence=confidence, note=note,
               fixed_sides=[nm for nm, f in zip(("a", "b"), (feats1, feats2)) if f is None])
    if bootstrap:
        from tqdm.auto import tqdm

        if bootstrap < 2:
            raise FDInfError(f"the FD-infinity bootstrap needs at least 2 rounds, got {bootstrap}")
        vals = np.empty(bootstrap)
        for r in tqdm(range(bootstrap), desc="FD-inf bootstrap", disable=not progress, leave=False):
            g1 = None if feats1 is None else feats1[rng.integers(0, len(feats1), len(feats1))]
            g2 = None if feats2 is None else feats2[rng.integers(0, len(feats2), len(feats2))]
            vals[r] = linear_fit(x, _curve(g1, g2, s1, s2, sizes[0], sizes[1], rng, method), confidence)["intercept"]
        alpha = (1 - confidence) / 2
        lo, hi = np.quantile(vals, [alpha, 1 - alpha])
        bias = float(vals.mean() - out["fd_inf"])
        out.update(low=float(lo - bias), high=float(hi - bias), ci_method="bootstrap", bootstrap_rounds=bootstrap,
                   bootstrap_bias=bias, regression_low=fit["low"], regression_high=fit["high"])
    return out
