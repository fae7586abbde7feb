"""Frechet distance between Gaussians fitted to features (FID, and sFID on spatial features).

``frechet_distance`` follows the TF-compatible convention: float64, ``scipy.linalg.sqrtm`` of
sigma1 @ sigma2, retried with 1e-6 * I added to both covariances when the square root is not
finite, real part taken (a large imaginary part is an error). ``frechet_distance_eig`` is the
independent cross-check: tr sqrt(sigma1 sigma2) = sum of sqrt(eigenvalues of
sqrt(sigma1) sigma2 sqrt(sigma1)), a symmetric PSD matrix, via ``eigh``.

The distance is never negative, but round-off can make it so (-7e-5 was seen for two identical
sets of Inception features): a value in [-1e-5 * (tr sigma1 + tr sigma2), 0) is returned as 0
(see :func:`clamp_round_off`); a more negative value, a sign of broken statistics, is returned as
it is.

Which form a caller gets is decided once, by :func:`choose_method`; :func:`fid_of` computes the
distance of two sides (features or fixed statistics) in that form, and :func:`bootstrap_fid`
gives its bootstrap interval. Feature passes and the other metrics live in :mod:`iddpm_eval.measure`.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from iddpm_eval.stats import bootstrap_draws, check_stats, stats_from_features


class FIDError(ValueError):
    """Statistics that cannot be compared (dimensions, non-finite values, complex square root)."""


def _checked(mu1, sigma1, mu2, sigma2):
    mu1, sigma1 = check_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise FIDError(f"statistics have different dimensions: {mu1.shape[0]} vs {mu2.shape[0]}")
    return mu1, sigma1, mu2, sigma2


def _sqrtm(m: np.ndarray) -> np.ndarray:
    # scipy < 1.16 prints a note for singular input unless disp=False; newer versions deprecate disp.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            out = linalg.sqrtm(m, disp=False)
        except TypeError:
            out = linalg.sqrtm(m)
    return out[0] if isinstance(out, tuple) else out  # scipy returns a bare array for 1x1 input


ROUND_OFF = 1e-5  # relative to tr(sigma1) + tr(sigma2): far above sqrtm's round-off, far below any real FID


def clamp_round_off(value: float, trace_sum: float) -> float:
    """0.0 for a round-off negative ``value`` (>= -ROUND_OFF * ``trace_sum``), else ``value``."""
    return 0.0 if -ROUND_OFF * abs(trace_sum) <= value <= 0 else float(value)  # -0.0 too


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), float64."""
    mu1, sigma1, mu2, sigma2 = _checked(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FIDError(f"matrix square root has a large imaginary part ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    traces = np.trace(sigma1) + np.trace(sigma2)
    return clamp_round_off(diff @ diff + traces - 2 * np.trace(covmean), traces)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_eig(mu1, sigma1, mu2, sigma2) -> float:
    """Same distance through symmetric eigendecompositions (negative round-off eigenvalues -> 0)."""
    mu1, sigma1, mu2, sigma2 = _checked(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    s1 = _psd_sqrt(sigma1)
    m = s1 @ sigma2 @ s1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(w, 0, None)).sum()
    traces = np.trace(sigma1) + np.trace(sigma2)
    return clamp_round_off(diff @ diff + traces - 2 * tr_covmean, traces)


def fid_lowrank(feats1: np.ndarray, feats2: np.ndarray, gram: bool = False) -> float:
    """FID of two feature sets computed in the span of the images: exact, and fast when there are
    fewer images than feature dimensions. With centred features A1 (n1 x d), A2 and
    S_i = A_i^T A_i / (n_i - 1), the non-zero eigenvalues of S1 S2 are those of M M^T / c with
    M = A1 A2^T and c = (n1 - 1)(n2 - 1), so tr sqrt(S1 S2) = (sum of singular values of M) / sqrt(c).
    No 1e-6 regularisation is needed (or applied).

    ``gram=True`` takes the singular values as square roots of the eigenvalues of the smaller Gram
    matrix (M M^T or M^T M; ``eigvalsh``, about 4x faster than the SVD at 1,000 images). Each
    eigenvalue then carries an absolute error of about eps ||M||^2, so a singular value below
    sqrt(eps) ||M|| is lost in it and the sum is off by at most n sqrt(eps) ||M|| / sqrt(c): about
    1e-5 of the top singular value per image, far inside a bootstrap interval (what it is used
    for: :func:`bootstrap_fid`'s rounds), but not bit-equal to the SVD, so the point estimate keeps
    the SVD."""
    a1 = np.asarray(feats1, np.float64)
    a2 = np.asarray(feats2, np.float64)
    if a1.ndim != 2 or a2.ndim != 2 or a1.shape[1] != a2.shape[1] or min(len(a1), len(a2)) < 2:
        raise FIDError(f"features must be (N >= 2, D) arrays of one D, got {a1.shape} and {a2.shape}")
    if not (np.isfinite(a1).all() and np.isfinite(a2).all()):
        raise FIDError("features hold NaN or infinite values")
    mu1, mu2 = a1.mean(0), a2.mean(0)
    a1, a2 = a1 - mu1, a2 - mu2
    n1, n2 = len(a1), len(a2)
    tr1, tr2 = (a1 * a1).sum() / (n1 - 1), (a2 * a2).sum() / (n2 - 1)
    m = a1 @ a2.T
    if gram:
        g = m @ m.T if n1 <= n2 else m.T @ m
        sv = np.sqrt(np.clip(np.linalg.eigvalsh(g), 0.0, None))
    else:
        sv = np.linalg.svd(m, compute_uv=False)
    nuclear = sv.sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return clamp_round_off(diff @ diff + tr1 + tr2 - 2 * nuclear, tr1 + tr2)


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FID of two feature sets by the convention (:func:`frechet_distance` of their statistics)."""
    mu1, s1 = stats_from_features(feats1, "first features")
    mu2, s2 = stats_from_features(feats2, "second features")
    return frechet_distance(mu1, s1, mu2, s2)


DISTANCES = {"sqrtm": frechet_distance, "eig": frechet_distance_eig}


def choose_method(feats1: np.ndarray | None, feats2: np.ndarray | None, method: str = "auto") -> str:
    """The form of the distance for two sides (features, or None for a side given as statistics):
    ``method`` itself unless it is "auto"; for "auto" the exact low-rank form (:func:`fid_lowrank`)
    when both sides have features and fewer images than feature dimensions, else "sqrtm". The one
    place that rule is decided: the bootstrap, FD-infinity and the sweep's FID all ask here."""
    if method != "auto":
        return method
    both = feats1 is not None and feats2 is not None
    return "lowrank" if both and max(len(feats1), len(feats2)) < feats1.shape[1] else "sqrtm"


def fid_of(feats1: np.ndarray | None, feats2: np.ndarray | None, stats1=None, stats2=None,
           method: str = "auto") -> float:
    """FID of two sides, each features [N, D] or, where the features are None, fixed statistics
    ``stats`` = (mu, sigma), in the form ``method`` ("sqrtm", "eig", "lowrank" or "auto", see
    :func:`choose_method`); statistics of a side with features are computed from them."""
    method = choose_method(feats1, feats2, method)
    if method in ("lowrank", "lowrank-gram"):
        return fid_lowrank(feats1, feats2, gram=method == "lowrank-gram")
    (mu1, s1), (mu2, s2) = (stats if feats is None else stats_from_features(feats)
                            for feats, stats in ((feats1, stats1), (feats2, stats2)))
    return DISTANCES[method](mu1, s1, mu2, s2)


def bootstrap_fid(feats1: np.ndarray | None, feats2: np.ndarray | None, rounds: int, *, stats1=None, stats2=None,
                  seed: int | None = 0, confidence: float = 0.95, progress: bool = False,
                  method: str = "auto", estimate: float | None = None, draws: list | None = None) -> dict:
    """Percentile bootstrap interval of FID: each round draws N images with replacement from
    every side that has features (a side given only as ``stats`` = (mu, sigma) stays fixed) and
    recomputes its statistics and the distance. Returns low, high, the rounds' values, which
    sides were resampled and the method used per round. ``method`` "auto": :func:`fid_lowrank`
    when both sides have features and fewer images than dimensions (the same number as sqrtm at
    a fraction of the cost: one 2048 sqrtm per round would take tens of seconds on a CPU; its rounds
    take the singular values from the Gram matrix, ``gram=True``), else "sqrtm"; "sqrtm", "eig" and
    "lowrank" force one.

    A resample repeats images, which inflates FID: at a few hundred images the whole bootstrap
    distribution can lie above the estimate, so the plain percentile interval (``pct_low``,
    ``pct_high``) can miss it. With ``estimate`` (the FID of the full sets), ``low``/``high`` are
    that interval shifted by the bootstrap's bias (mean of the rounds minus the estimate): the
    bootstrap's spread placed around the estimate. Without it they are the plain percentiles.

    ``draws``: the resamples (:func:`iddpm_eval.stats.bootstrap_draws`, shared with other metrics
    of the same pass); default drawn from ``seed``."""
    from tqdm.auto import tqdm

    if rounds < 2:
        raise ValueError(f"bootstrap needs at least 2 rounds, got {rounds}")
    if feats1 is None and feats2 is None:
        raise ValueError("bootstrap needs the features of at least one side, not only statistics")
    method = choose_method(feats1, feats2, method)
    if method == "lowrank" and (feats1 is None or feats2 is None):
        raise ValueError("the lowrank bootstrap needs the features of both sides")
    if draws is None:
        draws = bootstrap_draws(None if feats1 is None else len(feats1), None if feats2 is None else len(feats2),
                                rounds, seed)
    if len(draws) != rounds:
        raise ValueError(f"got {len(draws)} resamples for {rounds} bootstrap rounds")
    values = np.empty(rounds)
    per_round = "lowrank-gram" if method == "lowrank" else method  # the rounds' singular values from the Gram
    for r in tqdm(range(rounds), desc="bootstrap", disable=not progress, leave=False):
        i1, i2 = draws[r]
        values[r] = fid_of(None if feats1 is None else feats1[i1], None if feats2 is None else feats2[i2],
                           stats1, stats2, per_round)
    alpha = (1 - confidence) / 2
    pct_low, pct_high = (float(q) for q in np.quantile(values, [alpha, 1 - alpha]))
    bias = float(values.mean() - estimate) if estimate is not None else 0.0
    return dict(low=pct_low - bias, high=pct_high - bias, pct_low=pct_low, pct_high=pct_high, bias=bias,
                values=values, confidence=confidence, method=method,
                resampled=[name for name, f in (("a", feats1), ("b", feats2)) if f is not None])
