"""Fitting a law to arrays: starts from a data-scaled grid, the best few polished by L-BFGS-B."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from iddpm_eval.scaling.law import DELTA, FORMS, Law, box_bounds, model_for
from iddpm_eval.scaling.lbfgs import lbfgs

_ALPHA_GRID = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0)
_ALPHA_GRID_JOINT = (0.05, 0.15, 0.3, 0.5, 0.8, 1.2)
_E_FRACTIONS = (1e-4, 0.3, 0.6, 0.8, 0.9, 0.97)


def one_thread(fn):
    """Run ``fn`` with BLAS limited to one thread: the fits are tiny, and BLAS threads only add
    contention (ten times slower on a busy machine)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with threadpool_limits(1):
            return fn(*args, **kwargs)

    return wrapped


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


def _check_xy(xs: Sequence[np.ndarray], y: np.ndarray, names: Sequence[str], yname: str) -> None:
    for v, name in list(zip(xs, names)) + [(y, yname)]:
        if not np.all(np.isfinite(v)):
            raise ValueError(f"column {name!r} has non-finite values")
        if np.any(v <= 0):
            raise ValueError(f"column {name!r} must be positive for a log-space fit; "
                             f"found {int(np.sum(v <= 0))} value(s) <= 0 (min {v.min():g})")


def _grid(model: Law, z: np.ndarray, ly: np.ndarray) -> np.ndarray:
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


def _fit_centered(model: Law, z, ly, w, delta, n_starts):
    """Best L-BFGS-B result from the ``n_starts`` best grid points, and those grid points."""
    bounds = box_bounds(model, ly)
    lo = np.array([b[0] for b in bounds])
    hi = np.array([b[1] for b in bounds])
    grid = np.clip(_grid(model, z, ly), lo, hi)
    losses = np.concatenate([model.loss(grid[i:i + 512], z, ly, w, delta) for i in range(0, len(grid), 512)])
    starts = grid[np.argsort(losses, kind="stable")[:n_starts]]
    best = None
    for th0 in starts:
        res = lbfgs(model, th0, z, ly, w, delta, bounds)
        if best is None or res.fun < best.fun:
            best = res
    return best, starts


def fit_logs(form: str, logx: np.ndarray, ly: np.ndarray, w: np.ndarray, *, fixed_E=None,
             delta=DELTA, n_starts=5) -> Fit:
    """Fit a form to log inputs ``logx`` ((n,) or (n, J)) and log outputs ``ly`` with row
    multiplicities ``w`` (0 leaves a row out); the inputs are centred on their weighted mean."""
    model = model_for(form, fixed_E)
    n_eff = int(np.count_nonzero(w))
    if n_eff <= model.n_params:
        raise ValueError(f"too few points for the {form} form: {n_eff} distinct point(s), "
                         f"need at least {model.n_params + 1}")
    logx = logx.reshape(len(ly), -1)
    center = (logx * w[:, None]).sum(0) / w.sum()
    res, starts = _fit_centered(model, logx - center, ly, w, delta, n_starts)
    return Fit(form=form, params=model.params(res.x, center),
               loss=float(res.fun) * min(delta, 1.0) ** 2, n_points=n_eff, converged=bool(res.success),
               theta=res.x.copy(), center=np.asarray(center, float), starts=starts)


@one_thread
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
    return fit_logs(form, np.log(x), np.log(y), w, fixed_E=fixed_E, delta=delta, n_starts=n_starts)


@one_thread
def fit_joint(n, d, y, *, weights=None, delta: float = DELTA, n_starts: int = 5) -> Fit:
    """Fit y = E + A N^(-alpha) + B D^(-beta) by Huber loss in log space."""
    n, d, y = (np.asarray(v, dtype=float).ravel() for v in (n, d, y))
    if not (n.shape == d.shape == y.shape):
        raise ValueError(f"N, D and y differ in length: {n.shape[0]}, {d.shape[0]}, {y.shape[0]}")
    _check_xy([n, d], y, ["N", "D"], "y")
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise ValueError("the joint form needs several model sizes N and several data lengths D")
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float).ravel()
    return fit_logs("joint", np.log(np.column_stack([n, d])), np.log(y), w, delta=delta, n_starts=n_starts)


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
