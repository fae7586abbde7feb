"""Power-law scaling fits with bootstrap intervals, the compute frontier and the joint (N, D) law.

Forms, all fitted in log space (Hoffmann et al. 2022, approach 3):

- ``saturating``: y = E + A x^(-alpha), log y = logsumexp(log E, log A - alpha log x);
- ``power``:      y = A x^(-alpha), log y = log A - alpha log x;
- ``fixed-E``:    y = E0 + A x^(-alpha) with E0 given (Improved DDPM sec. 6 trend lines);
- joint:          y = E + A N^(-alpha) + B D^(-beta) (N = parameters, D = images seen).

The loss is sum_i w_i Huber_delta(log y_i - log y_pred_i) with delta = 1e-3, minimised by L-BFGS-B
with an analytic gradient and tight tolerances from the best few points of a grid of starts.
Intervals are percentile intervals of a bootstrap over runs: whole runs are drawn with
replacement (a run's checkpoints stay together), the point selection (e.g. the frontier) is
recomputed on each resample, and the fit is repeated (Besiroglu et al. 2024: tolerances matter).
"""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from iddpm_core.io import atomic_path

X_ALIASES = {"compute": "train_flops", "params": "params", "images": "images_seen"}
FORMS = ("saturating", "power", "fixed-E")
POINTS = ("frontier", "all", "last")
DELTA = 1e-3

_ALPHA_GRID = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0)
_ALPHA_GRID_JOINT = (0.05, 0.15, 0.3, 0.5, 0.8, 1.2)
_E_FRACTIONS = (1e-4, 0.3, 0.6, 0.8, 0.9, 0.97)
_BOUND = 60.0  # box on centred log-amplitudes and exponents; keeps exp() finite


def _one_thread(fn):
    """Run ``fn`` with BLAS limited to one thread: the fits are tiny, and BLAS threads only add
    contention (ten times slower on a busy machine)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with threadpool_limits(1):
            return fn(*args, **kwargs)

    return wrapped


# --------------------------------------------------------------------------- loss


def huber(r: np.ndarray, delta: float = DELTA) -> np.ndarray:
    """Huber loss: r^2/2 for |r| <= delta, delta (|r| - delta/2) beyond."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _huber_grad(r: np.ndarray, delta: float) -> np.ndarray:
    return np.clip(r, -delta, delta)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class _Model:
    """log y = logsumexp(e, a_1 - alpha_1 z_1, ..., a_J - alpha_J z_J).

    ``e_mode`` is "free" (e fitted), "fixed" (e = ``e_fixed``) or "none" (no constant term).
    Parameters are [e?, a_1, alpha_1, ..., a_J, alpha_J]; z are (centred) log inputs, shape (n, J).
    """

    n_terms: int
    e_mode: str
    e_fixed: float = 0.0

    @property
    def n_params(self) -> int:
        return (self.e_mode == "free") + 2 * self.n_terms

    def split(self, theta: np.ndarray):
        """theta (G, P) -> e (G,) or None, a (G, J), alpha (G, J)."""
        off = 1 if self.e_mode == "free" else 0
        e = theta[:, 0] if off else (np.full(theta.shape[0], self.e_fixed) if self.e_mode == "fixed" else None)
        return e, theta[:, off::2], theta[:, off + 1::2]

    def log_terms(self, theta: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Per-term log values, shape (G, n, K) with K = J (+1 when there is a constant)."""
        e, a, alpha = self.split(theta)
        terms = a[:, None, :] - alpha[:, None, :] * z[None, :, :]
        if e is not None:
            terms = np.concatenate([np.broadcast_to(e[:, None, None], terms.shape[:2] + (1,)), terms], axis=2)
        return terms

    def log_pred(self, theta: np.ndarray, z: np.ndarray) -> np.ndarray:
        t = self.log_terms(theta, z)
        m = t.max(axis=2, keepdims=True)
        return (m + np.log(np.exp(t - m).sum(axis=2, keepdims=True)))[..., 0]

    def loss(self, theta: np.ndarray, z, ly, w, delta) -> np.ndarray:
        """Weighted Huber loss for a batch of parameter vectors, shape (G,); ``w`` is (n,) or (G, n)."""
        return (huber(ly[None, :] - self.log_pred(theta, z), delta) * np.atleast_2d(w)).sum(axis=1)

    def loss_and_grad(self, theta: np.ndarray, z, ly, w, delta):
        """Loss (G,) and analytic gradient (G, P) for a batch; ``w`` is (n,) or (G, n)."""
        t = self.log_terms(theta, z)  # (G, n, K)
        m = t.max(axis=2, keepdims=True)
        ex = np.exp(t - m)
        s = ex.sum(axis=2, keepdims=True)
        lp = (m + np.log(s))[..., 0]
        soft = ex / s  # d log_pred / d term
        r = ly[None, :] - lp
        w = np.broadcast_to(w, r.shape)
        f = (huber(r, delta) * w).sum(axis=1)
        psi = -_huber_grad(r, delta) * w  # d loss / d log_pred, (G, n)
        g = np.empty_like(theta)
        k = 0
        col = 0 if self.e_mode == "none" else 1
        if self.e_mode == "free":
            g[:, 0] = (psi * soft[:, :, 0]).sum(axis=1)
            k = 1
        for j in range(self.n_terms):
            wj = psi * soft[:, :, col + j]
            g[:, k + 2 * j] = wj.sum(axis=1)
            g[:, k + 2 * j + 1] = -(wj @ z[:, j])
        return f, g


# --------------------------------------------------------------------------- fitting


@dataclass
class Fit:
    """One fit. ``params`` are in the original units (E, A, alpha[, B, beta])."""

    form: str
    params: dict[str, float]
    loss: float
    n_points: int
    converged: bool
    theta: np.ndarray = field(repr=False)  # centred internal parameters
    center: np.ndarray = field(repr=False)  # centring of log x, one per input
    starts: np.ndarray = field(repr=False, default_factory=lambda: np.empty((0, 0)))  # best grid starts

    def predict(self, *xs: np.ndarray) -> np.ndarray:
        """Fitted y at the given input(s): x for one-variable forms, (N, D) for the joint form."""
        p = self.params
        if self.form == "joint":
            n, d = (np.asarray(v, dtype=float) for v in xs)
            return p["E"] + p["A"] * n ** (-p["alpha"]) + p["B"] * d ** (-p["beta"])
        (x,) = xs
        x = np.asarray(x, dtype=float)
        return p.get("E", 0.0) + p["A"] * x ** (-p["alpha"])


def _model_for(form: str, fixed_E: float | None) -> _Model:
    if form == "saturating":
        return _Model(1, "free")
    if form == "power":
        return _Model(1, "none")
    if form == "fixed-E":
        if fixed_E is None or not np.isfinite(fixed_E) or fixed_E <= 0:
            raise ValueError(f"form 'fixed-E' needs a positive fixed_E (the known constant), got {fixed_E!r}")
        return _Model(1, "fixed", float(np.log(fixed_E)))
    if form == "joint":
        return _Model(2, "free")
    raise ValueError(f"unknown form {form!r}; choose one of {FORMS + ('joint',)}")


def _check_xy(xs: Sequence[np.ndarray], y: np.ndarray, names: Sequence[str], yname: str) -> None:
    for v, name in list(zip(xs, names)) + [(y, yname)]:
        if not np.all(np.isfinite(v)):
            raise ValueError(f"column {name!r} has non-finite values")
        if np.any(v <= 0):
            raise ValueError(f"column {name!r} must be positive for a log-space fit; "
                             f"found {int(np.sum(v <= 0))} value(s) <= 0 (min {v.min():g})")


def _grid(model: _Model, z: np.ndarray, ly: np.ndarray) -> np.ndarray:
    """Data-scaled grid of starting points in centred coordinates, shape (G, P)."""
    y = np.exp(ly)
    if model.e_mode == "free":
        e_vals = np.log(y.min() * np.asarray(_E_FRACTIONS))
    elif model.e_mode == "fixed":
        e_vals = np.array([model.e_fixed])
    else:
        e_vals = np.array([-np.inf])
    alphas = _ALPHA_GRID if model.n_terms == 1 else _ALPHA_GRID_JOINT
    if model.n_terms == 1:
        fracs = [(0.5,), (1.0,), (2.0,)]
    else:
        fracs = [(f, g) for f in (0.2, 0.5, 0.8) for g in (0.2, 0.5, 0.8)]
    rows = []
    for e in e_vals:
        rest = np.maximum(y - np.exp(e), 1e-6 * y)  # what the power terms must explain
        for al in itertools.product(alphas, repeat=model.n_terms):
            al = np.asarray(al)
            # amplitude at the centre (z = 0): the median of log(rest) with the slope removed
            base = np.median(np.log(rest) + z @ al)
            for fr in fracs:
                row = [e] if model.e_mode == "free" else []
                for j in range(model.n_terms):
                    row += [base + np.log(fr[j]), al[j]]
                rows.append(row)
    return np.asarray(rows, dtype=float)


def _bounds(model: _Model, ly: np.ndarray):
    b = []
    if model.e_mode == "free":
        b.append((ly.min() - 40.0, ly.max() + 1.0))
    for _ in range(model.n_terms):
        b += [(-_BOUND, _BOUND), (-_BOUND / 4, _BOUND / 4)]
    return b


def _lbfgs(model, th0, z, ly, w, delta, bounds):
    scale = 1.0 / min(delta, 1.0) ** 2  # same minimiser; keeps tolerances meaningful for small delta

    def fun(th):
        f, g = model.loss_and_grad(th[None, :], z, ly, w, delta)
        return f[0] * scale, g[0] * scale

    return minimize(fun, th0, jac=True, method="L-BFGS-B", bounds=bounds,
                    options={"maxiter": 20000, "maxfun": 40000, "ftol": 1e-15, "gtol": 1e-11, "maxcor": 10})


def _lbfgs_batch(model: _Model, th0: np.ndarray, z, ly, w: np.ndarray, delta: float, bounds,
                 m: int = 10, max_iter: int = 3000, ftol: float = 1e-15, gtol: float = 1e-11,
                 max_halvings: int = 30):
    """L-BFGS run on many independent problems at once (one per row of ``th0`` and ``w``).

    Same loss, scaling and stopping rules as :func:`_lbfgs` (relative decrease <= ftol or largest
    projected-gradient entry <= gtol); backtracking Armijo line search; iterates are projected onto
    the box. Returns the parameters (B, P) and the unscaled losses (B,).
    """
    scale = 1.0 / min(delta, 1.0) ** 2
    lo = np.array([b[0] for b in bounds])
    hi = np.array([b[1] for b in bounds])

    def fg(th, ww):
        f, g = model.loss_and_grad(th, z, ly, ww, delta)
        return f * scale, g * scale

    x = np.clip(np.array(th0, dtype=float), lo, hi)
    nb, p = x.shape
    f, g = fg(x, w)
    S = np.zeros((m, nb, p))
    Y = np.zeros((m, nb, p))
    rho = np.zeros((m, nb))  # 0 marks an empty slot
    slot = np.zeros(nb, dtype=int)
    active = np.ones(nb, dtype=bool)
    rows = np.arange(nb)

    def proj_grad(x, g):
        return np.where(((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0)), 0.0, g)

    active &= np.abs(proj_grad(x, g)).max(axis=1) > gtol
    for _ in range(max_iter):
        if not active.any():
            break
        a = np.flatnonzero(active)
        # two-loop recursion over each problem's own history (newest first)
        q = g[a].copy()
        alph = np.zeros((m, len(a)))
        order = [(slot[a] - 1 - i) % m for i in range(m)]
        for i, idx in enumerate(order):
            s_i, y_i, r_i = S[idx, a], Y[idx, a], rho[idx, a]
            alph[i] = r_i * (s_i * q).sum(1)
            q -= alph[i][:, None] * y_i
        newest = order[0]
        sy = (S[newest, a] * Y[newest, a]).sum(1)
        yy = (Y[newest, a] ** 2).sum(1)
        gamma = np.where(rho[newest, a] > 0, sy / np.where(yy > 0, yy, 1.0),
                         1.0 / np.maximum(np.abs(g[a]).max(1), 1.0))
        q *= gamma[:, None]
        for i, idx in reversed(list(enumerate(order))):
            s_i, y_i, r_i = S[idx, a], Y[idx, a], rho[idx, a]
            beta = r_i * (y_i * q).sum(1)
            q += (alph[i] - beta)[:, None] * s_i
        d = -q
        gd = (g[a] * d).sum(1)
        bad = ~(gd < 0)  # not a descent direction: restart from steepest descent
        if bad.any():
            d[bad] = -g[a][bad] / np.maximum(np.abs(g[a][bad]).max(1, keepdims=True), 1.0)
            rho[:, a[bad]] = 0.0
            gd = (g[a] * d).sum(1)
        # backtracking Armijo line search, vectorised
        t = np.ones(len(a))
        x_new = x[a].copy()
        f_new = f[a].copy()
        pending = np.ones(len(a), dtype=bool)
        for _ls in range(max_halvings):
            pi = np.flatnonzero(pending)
            if not len(pi):
                break
            xt = np.clip(x[a[pi]] + t[pi, None] * d[pi], lo, hi)
            ft = model.loss(xt, z, ly, w[a[pi]], delta) * scale
            ok = ft <= f[a[pi]] + 1e-4 * ((xt - x[a[pi]]) * g[a[pi]]).sum(1)
            x_new[pi[ok]] = xt[ok]
            f_new[pi[ok]] = ft[ok]
            pending[pi[ok]] = False
            t[pi[~ok]] *= 0.5
        moved = ~pending
        _, g_new = fg(x_new, w[a])
        s_k = x_new - x[a]
        y_k = g_new - g[a]
        sy = (s_k * y_k).sum(1)
        keep = moved & (sy > 1e-12 * np.sqrt((s_k ** 2).sum(1) * (y_k ** 2).sum(1)))
        ki = a[keep]
        S[slot[ki], ki] = s_k[keep]
        Y[slot[ki], ki] = y_k[keep]
        rho[slot[ki], ki] = 1.0 / sy[keep]
        slot[ki] = (slot[ki] + 1) % m
        rel = (f[a] - f_new) / np.maximum(np.maximum(np.abs(f[a]), np.abs(f_new)), 1.0)
        x[a], f[a], g[a] = x_new, f_new, g_new
        done = ~moved | (rel <= ftol) | (np.abs(proj_grad(x_new, g_new)).max(1) <= gtol)
        active[a[done]] = False
    return x, f / scale


def _fit_centered(model: _Model, z, ly, w, delta, n_starts):
    """Best L-BFGS-B result from the ``n_starts`` best grid points, and those grid points."""
    bounds = _bounds(model, ly)
    lo = np.array([b[0] for b in bounds])
    hi = np.array([b[1] for b in bounds])
    grid = np.clip(_grid(model, z, ly), lo, hi)
    losses = np.concatenate([model.loss(grid[i:i + 512], z, ly, w, delta) for i in range(0, len(grid), 512)])
    starts = grid[np.argsort(losses, kind="stable")[:n_starts]]
    best = None
    for th0 in starts:
        res = _lbfgs(model, th0, z, ly, w, delta, bounds)
        if best is None or res.fun < best.fun:
            best = res
    return best, starts


def _params_from_theta(model: _Model, form: str, theta: np.ndarray, center: np.ndarray) -> dict[str, float]:
    e, a, alpha = model.split(theta[None, :])
    out: dict[str, float] = {}
    if e is not None:
        out["E"] = float(np.exp(e[0]))
    names = [("A", "alpha"), ("B", "beta")]
    for j in range(model.n_terms):
        # undo the centring: a' - alpha (log x - c) = (a' + alpha c) - alpha log x
        out[names[j][0]] = float(np.exp(a[0, j] + alpha[0, j] * center[j]))
        out[names[j][1]] = float(alpha[0, j])
    return out


def _fit_arrays(form: str, logx: np.ndarray, ly: np.ndarray, w: np.ndarray, *, fixed_E=None,
                delta=DELTA, n_starts=5) -> Fit:
    model = _model_for(form, fixed_E)
    n_eff = int(np.count_nonzero(w))
    if n_eff <= model.n_params:
        raise ValueError(f"too few points for the {form} form: {n_eff} distinct point(s), "
                         f"need at least {model.n_params + 1}")
    logx = logx.reshape(len(ly), -1)
    center = (logx * w[:, None]).sum(0) / w.sum()
    res, starts = _fit_centered(model, logx - center, ly, w, delta, n_starts)
    return Fit(form=form, params=_params_from_theta(model, form, res.x, center),
               loss=float(res.fun) * min(delta, 1.0) ** 2, n_points=n_eff, converged=bool(res.success),
               theta=res.x.copy(), center=np.asarray(center, float), starts=starts)


@_one_thread
def fit_power_law(x, y, form: str = "saturating", *, fixed_E: float | None = None, weights=None,
                  delta: float = DELTA, n_starts: int = 5) -> Fit:
    """Fit y = E + A x^(-alpha) (``saturating``), A x^(-alpha) (``power``) or E0 + A x^(-alpha)
    (``fixed-E``, E0 = ``fixed_E``) by Huber loss in log space; ``weights`` are row multiplicities."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.shape[0]} vs {y.shape[0]}")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {FORMS}")
    _check_xy([x], y, ["x"], "y")
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float).ravel()
    return _fit_arrays(form, np.log(x), np.log(y), w, fixed_E=fixed_E, delta=delta, n_starts=n_starts)


@_one_thread
def fit_joint(n, d, y, *, weights=None, delta: float = DELTA, n_starts: int = 5) -> Fit:
    """Fit y = E + A N^(-alpha) + B D^(-beta) by Huber loss in log space."""
    n, d, y = (np.asarray(v, dtype=float).ravel() for v in (n, d, y))
    if not (n.shape == d.shape == y.shape):
        raise ValueError(f"N, D and y differ in length: {n.shape[0]}, {d.shape[0]}, {y.shape[0]}")
    _check_xy([n, d], y, ["N", "D"], "y")
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise ValueError("the joint form needs several model sizes N and several data lengths D")
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float).ravel()
    return _fit_arrays("joint", np.log(np.column_stack([n, d])), np.log(y), w, delta=delta, n_starts=n_starts)


def compute_optimal(fit: Fit, budget, k: float) -> tuple[np.ndarray, np.ndarray]:
    """Compute-optimal (N, D) for budget C = k N D under the joint law (closed form).

    Minimising E + A N^-alpha + B (k N / C)^beta over N gives
    N* = (alpha A / (beta B))^(1/(alpha+beta)) (C/k)^(beta/(alpha+beta)), D* = C / (k N*).
    """
    p = fit.params
    c = np.asarray(budget, dtype=float)
    a, b = p["alpha"], p["beta"]
    n_opt = (a * p["A"] / (b * p["B"])) ** (1.0 / (a + b)) * (c / k) ** (b / (a + b))
    return n_opt, c / (k * n_opt)


# --------------------------------------------------------------------------- point selection


def frontier_mask(x, y) -> np.ndarray:
    """Rows not dominated by another row with smaller-or-equal x and strictly smaller y."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ux, inv = np.unique(x, return_inverse=True)
    group_min = np.full(len(ux), np.inf)
    np.minimum.at(group_min, inv, y)
    envelope = np.minimum.accumulate(group_min)  # min y over rows with x' <= x
    return y <= envelope[inv]


def last_mask(groups, step) -> np.ndarray:
    """The last checkpoint (largest step) of each run."""
    df = pd.DataFrame({"g": np.asarray(groups), "s": np.asarray(step, dtype=float)})
    return (df["s"] == df.groupby("g")["s"].transform("max")).to_numpy()


def _select(points: str, x, y, groups, step, present: np.ndarray) -> np.ndarray:
    """Mask of rows used for the fit, among the ``present`` ones."""
    if points == "all":
        return present.copy()
    idx = np.flatnonzero(present)
    m = np.zeros(len(present), dtype=bool)
    if points == "frontier":
        m[idx] = frontier_mask(x[idx], y[idx])
    elif points == "last":
        m[idx] = last_mask(groups[idx], step[idx])
    else:
        raise ValueError(f"unknown point selection {points!r}; choose one of {POINTS}")
    return m


# --------------------------------------------------------------------------- bootstrap


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


def _bootstrap(fit: Fit, logx: np.ndarray, ly: np.ndarray, groups, select: Callable[[np.ndarray], np.ndarray],
               n_boot: int, seed: int, *, fixed_E=None, delta=DELTA, boot_starts: int = 2, chunk: int = 256,
               progress: bool = True) -> np.ndarray:
    """(n_boot, P) parameter draws from a bootstrap over runs; NaN where a resample has too few points.

    Each resample draws whole runs with replacement, applies ``select`` (a mask over the rows that
    are present) and refits from the full-data optimum and the ``boot_starts - 1`` next best grid
    starts of the full fit; all resamples run together in :func:`_lbfgs_batch`.
    """
    model = _model_for(fit.form, fixed_E)
    logx = logx.reshape(len(ly), -1)
    z = logx - fit.center
    bounds = _bounds(model, ly)
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
        th, f = _lbfgs_batch(model, th0, z, ly, ww, delta, bounds)
        best = f.reshape(ns, len(idx)).argmin(axis=0)
        th = th.reshape(ns, len(idx), -1)[best, np.arange(len(idx))]
        for i, row in zip(idx, th):
            p = _params_from_theta(model, fit.form, row, fit.center)
            out[i] = [p[k] for k in names]
        bar.update(len(idx))
    bar.close()
    return out


# --------------------------------------------------------------------------- tables


@dataclass
class ScalingResult:
    """A fit on a table with its bootstrap. ``table`` has columns parameter, value, ci_low, ci_high."""

    fit: Fit
    table: pd.DataFrame
    boot: np.ndarray  # (n_boot, P) draws of the fitted parameters, NaN for failed resamples
    names: list[str]
    data: pd.DataFrame  # the rows read, with a boolean column "used" (selected for the full fit)
    x: str
    y: str
    points: str
    level: float
    frontier: pd.DataFrame = field(default_factory=pd.DataFrame)

    def band(self, *xs, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Percentile band of the fitted curve over the bootstrap draws."""
        level = self.level if level is None else level
        ok = ~np.isnan(self.boot).any(axis=1)
        p = {k: self.boot[ok, i][:, None] for i, k in enumerate(self.names)}
        if self.fit.form == "joint":
            n, d = (np.asarray(v, dtype=float)[None, :] for v in xs)
            curves = p["E"] + p["A"] * n ** (-p["alpha"]) + p["B"] * d ** (-p["beta"])
        else:
            x = np.asarray(xs[0], dtype=float)[None, :]
            curves = p.get("E", self.fit.params.get("E", 0.0)) + p["A"] * x ** (-p["alpha"])
        return percentile_ci(curves, level)

    def to_json(self) -> dict:
        out: dict = {"form": self.fit.form, "x": self.x, "y": self.y, "points": self.points,
                     "n_points": self.fit.n_points, "loss": self.fit.loss, "converged": self.fit.converged,
                     "n_boot": int(self.boot.shape[0]), "n_boot_failed": int(np.isnan(self.boot).any(axis=1).sum()),
                     "ci_level": self.level}
        for _, r in self.table.iterrows():
            out[r["parameter"]] = float(r["value"])
            out[f"{r['parameter']}_ci"] = [float(r["ci_low"]), float(r["ci_high"])]
        return out


def _param_table(fit: Fit, names: list[str], boot: np.ndarray, level: float, extra: dict | None = None) -> pd.DataFrame:
    if boot.shape[0] and not np.isnan(boot).all():
        lo, hi = percentile_ci(boot, level)
    else:
        lo = hi = np.full(len(names), np.nan)
    rows = [{"parameter": k, "value": fit.params[k], "ci_low": lo[i], "ci_high": hi[i]} for i, k in enumerate(names)]
    for k, (v, l, h) in (extra or {}).items():
        rows.append({"parameter": k, "value": v, "ci_low": l, "ci_high": h})
    return pd.DataFrame(rows, columns=["parameter", "value", "ci_low", "ci_high"])


def resolve_column(table: pd.DataFrame, name: str, what: str) -> str:
    """The table's column for ``name``: a column with that exact name wins; only when there is
    none does an x alias apply (compute -> train_flops, images -> images_seen)."""
    if name in table.columns:
        return name
    col = X_ALIASES.get(name, name) if what == "x" else name
    if col not in table.columns:
        raise ValueError(f"{what} column {col!r} (from {name!r}) is not in the table; columns: {list(table.columns)}")
    return col


def _clean(table: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    df = table.copy()
    for c in cols:
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any():
            bad = df.index[v.isna()].tolist()[:5]
            raise ValueError(f"column {c!r} has missing or non-numeric values (rows {bad})")
        if (v <= 0).any():
            raise ValueError(f"column {c!r} must be positive for a log-space fit; "
                             f"found {int((v <= 0).sum())} value(s) <= 0 (min {v.min():g})")
        df[c] = v.astype(float)
    if "run" not in df.columns:
        df["run"] = np.arange(len(df))  # each row its own run
    if "step" not in df.columns:
        df["step"] = np.arange(len(df), dtype=float)
    return df.reset_index(drop=True)


@_one_thread
def scaling_fit(table: pd.DataFrame, x: str = "compute", y: str = "fid", *, form: str = "saturating",
                fixed_E: float | None = None, points: str = "frontier", n_boot: int = 4000, seed: int = 0,
                level: float = 0.95, delta: float = DELTA, n_starts: int = 5, boot_starts: int = 2,
                progress: bool = True) -> ScalingResult:
    """Fit y against x on a sweep table and bootstrap over runs.

    ``points``: "frontier" (default; the lower envelope of y over all checkpoints as x grows, the
    usual choice for compute), "all" rows, or the "last" checkpoint of each run (largest ``step``,
    else the last row). Without a ``run`` column every row is its own run.
    """
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {FORMS}")
    if points not in POINTS:
        raise ValueError(f"unknown point selection {points!r}; choose one of {POINTS}")
    xc, yc = resolve_column(table, x, "x"), resolve_column(table, y, "y")
    df = _clean(table, [xc, yc])
    xv, yv = df[xc].to_numpy(), df[yc].to_numpy()
    lx, ly = np.log(xv), np.log(yv)
    groups, step = df["run"].to_numpy(), df["step"].to_numpy(dtype=float)
    everything = np.ones(len(df), dtype=bool)
    used = _select(points, xv, yv, groups, step, everything)
    fit = _fit_arrays(form, lx[used], ly[used], np.ones(int(used.sum())), fixed_E=fixed_E, delta=delta,
                      n_starts=n_starts)
    names = list(fit.params)

    boot = _bootstrap(fit, lx, ly, groups, lambda present: _select(points, xv, yv, groups, step, present),
                      n_boot, seed, fixed_E=fixed_E, delta=delta, boot_starts=boot_starts, progress=progress)
    out = df.assign(used=used)
    fr = df[frontier_mask(xv, yv)].sort_values(xc)
    return ScalingResult(fit=fit, table=_param_table(fit, names, boot, level), boot=boot, names=names, data=out,
                         x=xc, y=yc, points=points, level=level, frontier=fr)


def estimate_k(table: pd.DataFrame, flops: str = "train_flops", n: str = "params", d: str = "images_seen") -> float:
    """FLOPs per parameter per image, k in C = k N D: the median of train_flops / (params * images_seen)."""
    df = _clean(table, [flops, n, d])
    return float(np.median(df[flops] / (df[n] * df[d])))


@_one_thread
def joint_fit(table: pd.DataFrame, y: str = "fid", *, n: str = "params", d: str = "images_seen",
              budgets: Sequence[float] = (), k: float | None = None, n_boot: int = 4000, seed: int = 0,
              level: float = 0.95, delta: float = DELTA, n_starts: int = 5, boot_starts: int = 2,
              progress: bool = True) -> ScalingResult:
    """Fit y = E + A N^-alpha + B D^-beta on every row and bootstrap over runs; for each budget C
    (FLOPs) add rows N_opt@C and D_opt@C with C = k N D (k from the table unless given)."""
    for c in (n, d, y):
        resolve_column(table, c, "y")
    df = _clean(table, [n, d, y])
    nv, dv, yv = (df[c].to_numpy() for c in (n, d, y))
    if len(np.unique(nv)) < 2 or len(np.unique(dv)) < 2:
        raise ValueError(f"the joint form needs several sizes ({n!r}) and several lengths ({d!r}); "
                         f"found {len(np.unique(nv))} and {len(np.unique(dv))}")
    lx = np.log(np.column_stack([nv, dv]))
    ly = np.log(yv)
    fit = _fit_arrays("joint", lx, ly, np.ones(len(df)), delta=delta, n_starts=n_starts)
    names = list(fit.params)

    boot = _bootstrap(fit, lx, ly, df["run"].to_numpy(), lambda present: present, n_boot, seed, delta=delta,
                      boot_starts=boot_starts, progress=progress)
    extra = {}
    if len(budgets):
        if k is None:
            k = estimate_k(table, n=n, d=d)
        extra["k"] = (k, np.nan, np.nan)
        ok = ~np.isnan(boot).any(axis=1)
        for c in budgets:
            n_opt, d_opt = compute_optimal(fit, c, k)
            draws = []
            for row in boot[ok]:
                f = Fit("joint", dict(zip(names, row)), np.nan, 0, True, np.empty(0), np.empty(0))
                draws.append(compute_optimal(f, c, k))
            draws = np.asarray(draws, dtype=float).reshape(-1, 2)
            lo, hi = percentile_ci(draws, level) if len(draws) else (np.full(2, np.nan), np.full(2, np.nan))
            extra[f"N_opt@{c:g}"] = (float(n_opt), lo[0], hi[0])
            extra[f"D_opt@{c:g}"] = (float(d_opt), lo[1], hi[1])
    return ScalingResult(fit=fit, table=_param_table(fit, names, boot, level, extra), boot=boot, names=names,
                         data=df.assign(used=True), x=f"{n}+{d}", y=y, points="all", level=level)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a sweep table (CSV); a clear error when it cannot be read or is empty."""
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the table {str(path)!r}: {e}") from e
    if df.empty:
        raise ValueError(f"the table {str(path)!r} has no rows")
    return df


def write_csv(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a parameter table (parameter, value, ci_low, ci_high) as CSV, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.10g")
    return path

