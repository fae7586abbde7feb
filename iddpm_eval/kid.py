"""Kernel Inception Distance: unbiased MMD^2 with the polynomial kernel, averaged over subsets.

Defaults are torch-fidelity's: 100 subsets of 1000, kernel (x.y * gamma + coef0) ** degree with
degree 3, gamma 1/D, coef0 1; subsets drawn with ``np.random.RandomState(seed)`` (first set, then
second, per subset) as torch-fidelity does, so the same seed gives the same subsets. When a set
has fewer images than the subset size, the subset size shrinks to the smaller set (clean-fid's
rule; torch-fidelity refuses) and the returned ``subset_size`` says so. Computed in float64.
"""

from __future__ import annotations

import numpy as np


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2: off-diagonal means of k_xx and k_yy minus twice the mean of k_xy."""
    m = k_xx.shape[0]
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid(feats1: np.ndarray, feats2: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
        degree: int = 3, gamma: float | None = None, coef0: float = 1.0, seed: int = 2020,
        progress: bool = False) -> dict:
    """KID mean and standard deviation over subsets (``np.std``, ddof 0, as torch-fidelity)."""
    from tqdm.auto import tqdm

    x = np.asarray(feats1, dtype=np.float64)
    y = np.asarray(feats2, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs features [N, D] of the same D, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("KID features contain NaN or infinite values")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(x)} and {len(y)}")
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in tqdm(range(subsets), desc="KID", disable=not progress, leave=False):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        kw = dict(degree=degree, gamma=gamma, coef0=coef0)
        mmds[i] = mmd2_unbiased(polynomial_kernel(a, a, **kw), polynomial_kernel(a, b, **kw),
                                polynomial_kernel(b, b, **kw))
    return dict(kid_mean=float(mmds.mean()), kid_std=float(mmds.std()), subset_size=m, subsets=subsets)
