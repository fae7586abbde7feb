"""L-BFGS in a box for the scaling fits: scipy's L-BFGS-B for one problem, and a vectorised
version that runs many independent problems (the bootstrap resamples) at once.

Both minimise the loss times 1 / min(delta, 1)^2: the same minimiser, and tolerances that keep
their meaning when the Huber delta is small.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from iddpm_eval.scaling.law import Law


def _scale(delta: float) -> float:
    return 1.0 / min(delta, 1.0) ** 2


def lbfgs(model: Law, th0, z, ly, w, delta, bounds):
    """scipy's L-BFGS-B from ``th0`` with the analytic gradient and tight tolerances; returns its
    OptimizeResult (``fun`` is the scaled loss)."""
    scale = _scale(delta)

    def fun(th):
        f, g = model.loss_and_grad(th[None, :], z, ly, w, delta)
        return f[0] * scale, g[0] * scale

    return minimize(fun, th0, jac=True, method="L-BFGS-B", bounds=bounds,
                    options={"maxiter": 20000, "maxfun": 40000, "ftol": 1e-15, "gtol": 1e-11, "maxcor": 10})


class _History:
    """The last ``m`` steps s and gradient changes y of each of ``nb`` problems (rho = 0: empty slot)."""

    def __init__(self, m: int, nb: int, p: int):
        self.m = m
        self.S = np.zeros((m, nb, p))
        self.Y = np.zeros((m, nb, p))
        self.rho = np.zeros((m, nb))
        self.slot = np.zeros(nb, dtype=int)

    def direction(self, g: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Search directions of problems ``a`` (gradients ``g``, one row each) by the two-loop
        recursion over each problem's own history, newest first. Where that is not a descent
        direction the problem restarts from scaled steepest descent and its history is cleared."""
        S, Y, rho, m = self.S, self.Y, self.rho, self.m
        q = g.copy()
        alph = np.zeros((m, len(a)))
        order = [(self.slot[a] - 1 - i) % m for i in range(m)]
        for i, idx in enumerate(order):
            s_i, y_i, r_i = S[idx, a], Y[idx, a], rho[idx, a]
            alph[i] = r_i * (s_i * q).sum(1)
            q -= alph[i][:, None] * y_i
        newest = order[0]
        sy = (S[newest, a] * Y[newest, a]).sum(1)
        yy = (Y[newest, a] ** 2).sum(1)
        gamma = np.where(rho[newest, a] > 0, sy / np.where(yy > 0, yy, 1.0),
                         1.0 / np.maximum(np.abs(g).max(1), 1.0))
        q *= gamma[:, None]
        for i, idx in reversed(list(enumerate(order))):
            s_i, y_i, r_i = S[idx, a], Y[idx, a], rho[idx, a]
            beta = r_i * (y_i * q).sum(1)
            q += (alph[i] - beta)[:, None] * s_i
        d = -q
        bad = ~((g * d).sum(1) < 0)
        if bad.any():
            d[bad] = -g[bad] / np.maximum(np.abs(g[bad]).max(1, keepdims=True), 1.0)
            rho[:, a[bad]] = 0.0
        return d

    def add(self, a: np.ndarray, keep: np.ndarray, s: np.ndarray, y: np.ndarray, sy: np.ndarray) -> None:
        """Store the pair (s, y) of the problems ``a[keep]`` in their next slot."""
        ki = a[keep]
        self.S[self.slot[ki], ki] = s[keep]
        self.Y[self.slot[ki], ki] = y[keep]
        self.rho[self.slot[ki], ki] = 1.0 / sy[keep]
        self.slot[ki] = (self.slot[ki] + 1) % self.m


def _armijo(loss, x, f, g, d, lo, hi, max_halvings):
    """Backtracking Armijo search along ``d`` from ``x`` (one row per problem), steps projected
    onto the box [lo, hi]; ``loss(xt, rows)`` is the scaled loss of those rows. Returns the new
    points, their losses and which problems moved."""
    t = np.ones(len(x))
    x_new, f_new = x.copy(), f.copy()
    pending = np.ones(len(x), dtype=bool)
    for _ in range(max_halvings):
        pi = np.flatnonzero(pending)
        if not len(pi):
            break
        xt = np.clip(x[pi] + t[pi, None] * d[pi], lo, hi)
        ft = loss(xt, pi)
        ok = ft <= f[pi] + 1e-4 * ((xt - x[pi]) * g[pi]).sum(1)
        x_new[pi[ok]] = xt[ok]
        f_new[pi[ok]] = ft[ok]
        pending[pi[ok]] = False
        t[pi[~ok]] *= 0.5
    return x_new, f_new, ~pending


def lbfgs_batch(model: Law, th0: np.ndarray, z, ly, w: np.ndarray, delta: float, bounds,
                m: int = 10, max_iter: int = 3000, ftol: float = 1e-15, gtol: float = 1e-11,
                max_halvings: int = 30):
    """L-BFGS run on many independent problems at once (one per row of ``th0`` and ``w``).

    Same loss, scaling and stopping rules as :func:`lbfgs` (relative decrease <= ftol or largest
    projected-gradient entry <= gtol); backtracking Armijo line search; iterates are projected onto
    the box. Returns the parameters (B, P) and the unscaled losses (B,).
    """
    scale = _scale(delta)
    lo = np.array([b[0] for b in bounds])
    hi = np.array([b[1] for b in bounds])

    def proj_grad(x, g):
        return np.where(((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0)), 0.0, g)

    x = np.clip(np.array(th0, dtype=float), lo, hi)
    f, g = model.loss_and_grad(x, z, ly, w, delta)
    f, g = f * scale, g * scale
    hist = _History(m, *x.shape)
    active = np.abs(proj_grad(x, g)).max(axis=1) > gtol
    for _ in range(max_iter):
        if not active.any():
            break
        a = np.flatnonzero(active)
        d = hist.direction(g[a], a)
        x_new, f_new, moved = _armijo(lambda xt, rows: model.loss(xt, z, ly, w[a[rows]], delta) * scale,
                                      x[a], f[a], g[a], d, lo, hi, max_halvings)
        g_new = model.loss_and_grad(x_new, z, ly, w[a], delta)[1] * scale
        s_k, y_k = x_new - x[a], g_new - g[a]
        sy = (s_k * y_k).sum(1)
        hist.add(a, moved & (sy > 1e-12 * np.sqrt((s_k ** 2).sum(1) * (y_k ** 2).sum(1))), s_k, y_k, sy)
        rel = (f[a] - f_new) / np.maximum(np.maximum(np.abs(f[a]), np.abs(f_new)), 1.0)
        x[a], f[a], g[a] = x_new, f_new, g_new
        done = ~moved | (rel <= ftol) | (np.abs(proj_grad(x_new, g_new)).max(1) <= gtol)
        active[a[done]] = False
    return x, f / scale
