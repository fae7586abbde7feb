"""Bootstrap over runs: whole runs drawn with replacement (a run's checkpoints stay together), the
point selection recomputed on each resample, every resample refitted by the batched L-BFGS."""

from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from iddpm_eval.scaling.fit import Fit
from iddpm_eval.scaling.law import DELTA, box_bounds, model_for
from iddpm_eval.scaling.lbfgs import lbfgs_batch


def run_weights(groups, rng: np.random.Generator) -> np.ndarray:
    """One bootstrap draw over runs: each row's weight is how often its run was drawn."""
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    g = inv.max() + 1
    counts = np.bincount(rng.integers(0, g, size=g), minlength=g)
    return counts[inv].astype(float)


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along axis 0, ignoring failed (NaN) resamples."""
    q = 100 * (1 - level) / 2
    return np.nanpercentile(samples, q, axis=0), np.nanpercentile(samples, 100 - q, axis=0)


def bootstrap(fit: Fit, logx: np.ndarray, ly: np.ndarray, groups, select: Callable[[np.ndarray], np.ndarray],
              n_boot: int, seed: int, *, fixed_E=None, delta=DELTA, boot_starts: int = 2, chunk: int = 256,
              progress: bool = True) -> np.ndarray:
    """(n_boot, P) parameter draws from a bootstrap over runs; NaN where a resample has too few points.

    Each resample draws whole runs with replacement, applies ``select`` (a mask over the rows that
    are present) and refits from the full-data optimum and the ``boot_starts - 1`` next best grid
    starts of the full fit; all resamples run together in :func:`lbfgs_batch`.
    """
    model = model_for(fit.form, fixed_E)
    logx = logx.reshape(len(ly), -1)
    z = logx - fit.center
    bounds = box_bounds(model, ly)
    starts = np.concatenate([fit.theta[None, :], fit.starts[:max(boot_starts - 1, 0)]])
    rng = np.random.default_rng(seed)
    W = np.zeros((n_boot, len(ly)))
    for b in range(n_boot):
        w = run_weights(groups, rng)
        W[b] = w * select(w > 0)
    enough = (W > 0).sum(axis=1) > model.n_params
    for j in range(logx.shape[1] if model.n_terms > 1 else 0):  # joint form: several N and several D
        enough &= np.array([len(np.unique(logx[wb > 0, j])) >= 2 for wb in W])
    names = list(fit.params)
    out = np.full((n_boot, len(names)), np.nan)
    ok_idx = np.flatnonzero(enough)
    bar = tqdm(total=n_boot, desc="bootstrap", unit="resample", disable=not progress, leave=False)
    bar.update(n_boot - len(ok_idx))
    for c in range(0, len(ok_idx), chunk):
        idx = ok_idx[c:c + chunk]
        ns = len(starts)
        th0 = np.repeat(starts, len(idx), axis=0)  # start-major: (ns * len(idx), P)
        ww = np.tile(W[idx], (ns, 1))
        th, f = lbfgs_batch(model, th0, z, ly, ww, delta, bounds)
        best = f.reshape(ns, len(idx)).argmin(axis=0)
        th = th.reshape(ns, len(idx), -1)[best, np.arange(len(idx))]
        for i, row in zip(idx, th):
            p = model.params(row, fit.center)
            out[i] = [p[k] for k in names]
        bar.update(len(idx))
    bar.close()
    return out
