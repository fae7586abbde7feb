"""Bootstrap intervals for precision, recall, density and coverage (k-NN balls, as
:mod:`iddpm_eval.prdc`).

Each round resamples both sets with replacement: the same draws as FID's bootstrap when both
are given :func:`iddpm_eval.stats.bootstrap_draws`' output, so one feature pass and one set of resamples serve
every metric. A resample is a multiset: image i appears c_i times (c_i >= 0). The metrics are
computed on it as on a fresh set of the same size, with one rule for repeated images: a point's
own copies are not its neighbours (a copy at distance 0 would shrink its ball to nothing), while
other images count with their multiplicity. So the radius of point i is the smallest distance d
such that the other images within d, counted with multiplicity, number at least k. Precision,
recall and coverage count points with multiplicity; density counts (fake, real) pairs with both
multiplicities. With every c_i = 1 this is exactly :func:`iddpm_eval.prdc.compute_prdc`.

Squared distances are computed once in float64 (three full matrices: real-real, fake-fake,
fake-real; memory is refused above ``max_elements``) and each round only gathers and compares.
Equal vectors get equal distances (see :func:`_consistent_sqdist`); otherwise the float64
expansion |a|^2 + |b|^2 - 2ab can differ from the exact value in the last bits, which changes a
decision only for a pair within ~1e-13 of a ball's edge (none on continuous features; integer
features such as pixels are exact).
The interval is the bootstrap percentile interval shifted by the bootstrap's bias (mean of the
rounds minus the full-set value), as for FID (:func:`iddpm_eval.fid.bootstrap_fid`), and
clipped to [0, 1] for the shares (precision, recall, coverage).
"""

from __future__ import annotations

import numpy as np

from iddpm_eval.stats import bootstrap_draws

METRICS = ("precision", "recall", "density", "coverage")
_NEIGHBOURS = 40  # sorted neighbours kept per point; rows whose resample needs more are redone in full


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 squared distances |a_i - b_j|^2 (exact for integer-valued features below 2^26)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


def _consistent_sqdist(xr: np.ndarray, xf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real-real, fake-fake and fake-real squared distances in which equal vectors get equal
    values: distances are computed once between the distinct rows of both sets and made exactly
    symmetric, so a generated image that copies a real one lands exactly on the balls' edges it
    should (``<=`` then counts it, as in the exact computation)."""
    uniq, inv = np.unique(np.concatenate([xr, xf]), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    g = _sqdist(uniq, uniq)
    step = 1024
    for a in range(0, len(g), step):  # exact symmetry, block by block (no full transpose copy)
        for b in range(a, len(g), step):
            avg = (g[a:a + step, b:b + step] + g[b:b + step, a:a + step].T) * 0.5
            g[a:a + step, b:b + step] = avg
            g[b:b + step, a:a + step] = avg.T
    ir, jf = inv[:len(xr)], inv[len(xr):]
    return g[np.ix_(ir, ir)], g[np.ix_(jf, jf)], g[np.ix_(jf, ir)]


class _Neighbours:
    """Squared distances of a set to itself, self excluded, with each row's nearest neighbours in order."""

    def __init__(self, d2: np.ndarray, k: int):
        self.d2 = d2
        np.fill_diagonal(self.d2, np.inf)
        n = len(d2)
        self.m = min(n - 1, max(_NEIGHBOURS, 4 * k))
        part = np.argpartition(self.d2, self.m - 1, axis=1)[:, :self.m] if self.m < n - 1 else \
            np.argsort(self.d2, axis=1)[:, :self.m]
        order = np.argsort(np.take_along_axis(self.d2, part, 1), axis=1, kind="stable")
        self.nbr = np.take_along_axis(part, order, 1)
        self.nd2 = np.take_along_axis(self.d2, self.nbr, 1)
        self.k = k

    def radii2(self, counts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Squared radius of each of ``rows`` in the multiset with these counts (own copies excluded)."""
        cum = np.cumsum(counts[self.nbr[rows]], axis=1)
        ok = cum[:, -1] >= self.k
        pos = np.argmax(cum >= self.k, axis=1)
        out = self.nd2[rows, pos]
        for t in np.nonzero(~ok)[0]:  # rare: the kept neighbours hold fewer than k draws
            r = rows[t]
            order = np.argsort(self.d2[r], kind="stable")
            c = np.cumsum(counts[order])
            c[order == r] = -1  # never reached through self (d2 = inf there anyway)
            hit = np.nonzero(c >= self.k)[0]
            out[t] = self.d2[r, order[hit[0]]] if hit.size else np.inf
        return out


def prdc_counts(nr: _Neighbours, nf: _Neighbours, d2fr: np.ndarray, cr: np.ndarray, cf: np.ndarray, k: int) -> dict:
    """The four metrics of the multisets with counts ``cr`` (real) and ``cf`` (fake)."""
    ur, uf = np.nonzero(cr)[0], np.nonzero(cf)[0]
    wr, wf = cr[ur].astype(np.float64), cf[uf].astype(np.float64)
    r2r, r2f = nr.radii2(cr, ur), nf.radii2(cf, uf)
    sub = d2fr[np.ix_(uf, ur)]
    in_real = sub <= r2r[None, :]  # fake j inside real ball i
    in_fake = sub <= r2f[:, None]  # real i inside fake ball j
    n, m = wr.sum(), wf.sum()
    return {"precision": float(wf @ in_real.any(1)) / m,
            "recall": float(wr @ in_fake.any(0)) / n,
            "density": float(wf @ (in_real @ wr)) / (k * m),
            "coverage": float(wr @ in_real.any(0)) / n}


def bootstrap_prdc(real, fake, rounds: int, *, k: int = 3, seed: int | None = 0, draws: list | None = None,
                   confidence: float = 0.95, max_elements: float = 1.5e8, progress: bool = False) -> dict:
    """Full-set precision, recall, density and coverage with bootstrap intervals. ``draws``:
    per round (real indices, fake indices), e.g. :func:`iddpm_eval.stats.bootstrap_draws` shared with FID's
    bootstrap; default drawn here from ``seed``. Returns for each metric the value, ``_ci_low``,
    ``_ci_high``, the bootstrap bias and the rounds' values."""
    from tqdm.auto import tqdm

    xr, xf = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if xr.ndim != 2 or xf.ndim != 2 or xr.shape[1] != xf.shape[1]:
        raise ValueError(f"precision/recall bootstrap: features must be (N, D) of one D, got {xr.shape} and {xf.shape}")
    n, m = len(xr), len(xf)
    if min(n, m) <= k:
        raise ValueError(f"precision/recall bootstrap: need more than k={k} points per set, got {n} and {m}")
    need = 2.0 * (n + m) ** 2
    if need > max_elements:
        raise ValueError(f"precision/recall bootstrap keeps float64 distance matrices: {n} real and {m} "
                         f"fake images need {need * 8 / 2**30:.1f} GiB (limit {max_elements * 8 / 2**30:.1f} GiB); "
                         f"use --num to bound the sets")
    if rounds < 2:
        raise ValueError(f"bootstrap needs at least 2 rounds, got {rounds}")
    if draws is None:
        draws = bootstrap_draws(n, m, rounds, seed)
    if len(draws) != rounds:
        raise ValueError(f"got {len(draws)} resamples for {rounds} rounds")
    d2rr, d2ff, d2fr = _consistent_sqdist(xr, xf)
    nr, nf = _Neighbours(d2rr, k), _Neighbours(d2ff, k)
    full = prdc_counts(nr, nf, d2fr, np.ones(n, np.int64), np.ones(m, np.int64), k)
    vals = {key: np.empty(rounds) for key in METRICS}
    for r, (ir, jf) in enumerate(tqdm(draws, desc="prdc bootstrap", disable=not progress, leave=False)):
        res = prdc_counts(nr, nf, d2fr, np.bincount(ir, minlength=n), np.bincount(jf, minlength=m), k)
        for key in METRICS:
            vals[key][r] = res[key]
    alpha = (1 - confidence) / 2
    out = {"k": k, "n_real": n, "n_fake": m, "rounds": rounds, "confidence": confidence,
           "ci_method": "bootstrap percentile, bias-shifted", "values": vals}
    for key in METRICS:
        lo, hi = np.quantile(vals[key], [alpha, 1 - alpha])
        bias = float(vals[key].mean() - full[key])
        lo, hi = lo - bias, hi - bias
        if key != "density":
            lo, hi = max(lo, 0.0), min(hi, 1.0)
        out.update({key: full[key], f"{key}_ci_low": float(max(lo, 0.0)), f"{key}_ci_high": float(hi),
                    f"{key}_boot_bias": bias})
    return out
