"""Checks of scaling laws: a held-out extrapolation and IsoFLOP profiles.

Held-out extrapolation (:func:`extrapolation_check`): the runs of the largest size (``holdout``
column, default ``params``) are left out, the law is fitted on the smaller runs
(:func:`iddpm_eval.scaling.scaling_fit`, bootstrap over runs), and its prediction at the held-out
run's last checkpoint is compared with the measured value: error = measured - predicted, with the
prediction's bootstrap percentile interval turned into an interval of the error
[measured - pred_high, measured - pred_low]. When the table holds an interval of the measured
value (``<y>_ci_low``/``<y>_ci_high``) it is reported too, and ``consistent`` says whether the
two intervals overlap.

IsoFLOP profiles (:func:`isoflop_profiles`, Hoffmann et al. 2022, approach 2): for each compute
budget C, the checkpoints of every run that reached C (the first checkpoint with ``train_flops``
>= C, within ``rel_tol`` of it: ``iddpm-train sweep --flop-budgets`` saves exactly those) give y
against model size N. The optimum is the minimum of a natural cubic spline through (log N, y), not
of a fitted parabola: a parabola's vertex is biased when the profile is asymmetric in log N (it
usually is). When the measured values carry intervals, the optimum's interval comes from redrawing
each y from a normal distribution with the interval's spread (sd = width / (2 z)) and taking the
percentiles of the redrawn optima. An optimum at the edge of the sizes tried is flagged
(``bracketed`` False): the profile does not show where y turns up. Across budgets, log N_opt =
a + b log C is fitted by least squares (the compute-optimal size against budget).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sstats
from scipy.interpolate import CubicSpline
from scipy.optimize import minimize_scalar

from iddpm_eval.scaling.table import resolve_column, scaling_fit


def _y_interval_columns(table: pd.DataFrame, y: str) -> tuple[str, str] | None:
    lo, hi = f"{y}_ci_low", f"{y}_ci_high"
    return (lo, hi) if lo in table.columns and hi in table.columns else None


def extrapolation_check(table: pd.DataFrame, x: str = "compute", y: str = "fid", *, holdout: str = "params",
                        form: str = "saturating", fixed_E: float | None = None, points: str = "frontier",
                        n_boot: int = 1000, seed: int = 0, level: float = 0.95, progress: bool = False) -> dict:
    """Fit on the runs smaller than the largest ``holdout`` value, predict the largest run's last
    checkpoint, report the error with its interval (module doc)."""
    if holdout not in table.columns:
        raise ValueError(f"holdout column {holdout!r} is not in the table; columns: {list(table.columns)}")
    sizes = pd.to_numeric(table[holdout], errors="coerce")
    if sizes.isna().any():
        raise ValueError(f"holdout column {holdout!r} has missing or non-numeric values")
    largest = sizes.max()
    held, train = table[sizes == largest], table[sizes < largest]
    n_train_sizes = sizes[sizes < largest].nunique()
    if n_train_sizes < 2:
        raise ValueError(f"an extrapolation check needs at least 2 smaller {holdout} values besides the largest "
                         f"({largest:g}); the table has {n_train_sizes}")
    xc, yc = resolve_column(table, x, "x"), resolve_column(table, y, "y")
    res = scaling_fit(train, x, y, form=form, fixed_E=fixed_E, points=points, n_boot=n_boot, seed=seed,
                              level=level, progress=progress)
    last = held.loc[pd.to_numeric(held[xc]).idxmax()]
    xh, yh = float(last[xc]), float(last[yc])
    pred = float(res.fit.predict(np.array([xh]))[0])
    if n_boot:
        lo, hi = (float(v[0]) for v in res.band(np.array([xh])))
    else:
        lo = hi = float("nan")
    out = dict(x=xc, y=yc, holdout=holdout, held_out_size=float(largest), x_held_out=xh, measured=yh,
               predicted=pred, predicted_ci_low=lo, predicted_ci_high=hi, error=yh - pred,
               error_ci_low=yh - hi, error_ci_high=yh - lo, rel_error=(yh - pred) / yh,
               n_train_runs=int(train["run"].nunique()) if "run" in train.columns else len(train),
               train_sizes=sorted(float(v) for v in sizes[sizes < largest].unique()), form=form, points=points,
               n_boot=n_boot, ci_level=level, fit=res.to_json())
    cols = _y_interval_columns(table, yc)
    if cols is not None and not pd.isna(last[cols[0]]):
        out.update(measured_ci_low=float(last[cols[0]]), measured_ci_high=float(last[cols[1]]))
        out["consistent"] = bool(max(lo, out["measured_ci_low"]) <= min(hi, out["measured_ci_high"]))
    elif n_boot:
        out["consistent"] = bool(lo <= yh <= hi)
    return out


def interpolated_minimum(log_n, y) -> tuple[float, float, bool]:
    """Minimum of the natural cubic spline through (log N, y) over the sampled range:
    (log N at the minimum, y there, whether it lies strictly inside the range)."""
    log_n, y = np.asarray(log_n, float), np.asarray(y, float)
    order = np.argsort(log_n)
    log_n, y = log_n[order], y[order]
    if len(log_n) < 3 or len(np.unique(log_n)) != len(log_n):
        raise ValueError(f"an IsoFLOP profile needs at least 3 distinct model sizes, got {len(np.unique(log_n))}")
    spline = CubicSpline(log_n, y, bc_type="natural")
    grid = np.linspace(log_n[0], log_n[-1], 2001)
    i = int(np.argmin(spline(grid)))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best_x, best_y = grid[i], float(spline(grid[i]))
    if b > a:
        r = minimize_scalar(lambda t: float(spline(t)), bounds=(a, b), method="bounded",
                            options={"xatol": 1e-10})
        if r.fun <= best_y:
            best_x, best_y = float(r.x), float(r.fun)
    inside = log_n[0] < best_x < log_n[-1] and i not in (0, len(grid) - 1)
    return float(best_x), best_y, bool(inside)


def budget_rows(table: pd.DataFrame, budgets, *, flops: str = "train_flops", rel_tol: float = 0.05,
                run: str = "run") -> pd.DataFrame:
    """For each budget and run, the first checkpoint with ``flops`` >= budget, if within ``rel_tol``
    of it; a column ``budget`` says which budget each row serves."""
    df = table.copy()
    df[flops] = pd.to_numeric(df[flops], errors="coerce")
    if run not in df.columns:
        raise ValueError(f"IsoFLOP profiles need a {run!r} column naming each checkpoint's run")
    out = []
    for c in budgets:
        for _, g in df.groupby(run):
            above = g[g[flops] >= c]
            if len(above):
                r = above.loc[above[flops].idxmin()]
                if r[flops] <= c * (1 + rel_tol):
                    out.append(r.to_dict() | {"budget": float(c)})
    return pd.DataFrame(out)


def isoflop_profiles(table: pd.DataFrame, budgets, y: str = "fid", *, n: str = "params", flops: str = "train_flops",
                     rel_tol: float = 0.05, draws: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """IsoFLOP optimum per budget (module doc) and the fit of log N_opt against log C."""
    budgets = sorted(float(c) for c in budgets)
    if not budgets:
        raise ValueError("give at least one compute budget")
    rows = budget_rows(table, budgets, flops=flops, rel_tol=rel_tol)
    cols = _y_interval_columns(table, y)
    z = sstats.norm.ppf(0.5 + level / 2)
    rng = np.random.default_rng(seed)
    profiles = []
    for c in budgets:
        g = rows[rows["budget"] == c] if len(rows) else rows
        if len(g) < 3:
            raise ValueError(f"budget {c:g}: {len(g)} run(s) reached it within {rel_tol:.0%} (need checkpoints of at "
                             f"least 3 model sizes; iddpm-train sweep --flop-budgets saves them)")
        ln = np.log(pd.to_numeric(g[n]).to_numpy(float))
        yv = pd.to_numeric(g[y]).to_numpy(float)
        lopt, yopt, inside = interpolated_minimum(ln, yv)
        row = dict(budget=c, n_points=len(g), N_opt=float(np.exp(lopt)), y_opt=yopt, bracketed=inside,
                   N_tried=[float(v) for v in np.exp(np.sort(ln))], N_opt_ci_low=np.nan, N_opt_ci_high=np.nan,
                   y_opt_ci_low=np.nan, y_opt_ci_high=np.nan)
        if cols is not None and draws:
            sd = (pd.to_numeric(g[cols[1]]).to_numpy(float) - pd.to_numeric(g[cols[0]]).to_numpy(float)) / (2 * z)
            if np.all(np.isfinite(sd)):
                sims = np.array([interpolated_minimum(ln, yv + sd * rng.standard_normal(len(yv)))[:2]
                                 for _ in range(draws)])
                q = [(1 - level) / 2, (1 + level) / 2]
                nl, nh = np.exp(np.quantile(sims[:, 0], q))
                yl, yh = np.quantile(sims[:, 1], q)
                row.update(N_opt_ci_low=float(nl), N_opt_ci_high=float(nh), y_opt_ci_low=float(yl),
                           y_opt_ci_high=float(yh))
        profiles.append(row)
    out = dict(y=y, n=n, flops=flops, rel_tol=rel_tol, level=level, method="natural cubic spline in log N",
               profiles=profiles, rows=rows)
    ok = [p for p in profiles if p["bracketed"]]
    if len(ok) >= 2:
        lc, lnopt = np.log([p["budget"] for p in ok]), np.log([p["N_opt"] for p in ok])
        b, a = np.polyfit(lc, lnopt, 1)
        out.update(exponent=float(b), log_coef=float(a), fit_budgets=[p["budget"] for p in ok])
    return out
