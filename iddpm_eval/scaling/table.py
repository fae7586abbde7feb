"""Scaling fits on a sweep table: columns, the fit with its bootstrap, the parameter table and its CSV."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from iddpm_core.io import atomic_path
from iddpm_eval.scaling.bootstrap import bootstrap, percentile_ci
from iddpm_eval.scaling.fit import Fit, compute_optimal, fit_logs, one_thread
from iddpm_eval.scaling.law import DELTA, FORMS
from iddpm_eval.scaling.points import POINTS, frontier_mask, select_points

X_ALIASES = {"compute": "train_flops", "params": "params", "images": "images_seen"}

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


@one_thread
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
    used = select_points(points, xv, yv, groups, step, everything)
    fit = fit_logs(form, lx[used], ly[used], np.ones(int(used.sum())), fixed_E=fixed_E, delta=delta,
                      n_starts=n_starts)
    names = list(fit.params)

    boot = bootstrap(fit, lx, ly, groups, lambda present: select_points(points, xv, yv, groups, step, present),
                      n_boot, seed, fixed_E=fixed_E, delta=delta, boot_starts=boot_starts, progress=progress)
    out = df.assign(used=used)
    fr = df[frontier_mask(xv, yv)].sort_values(xc)
    return ScalingResult(fit=fit, table=_param_table(fit, names, boot, level), boot=boot, names=names, data=out,
                         x=xc, y=yc, points=points, level=level, frontier=fr)


def estimate_k(table: pd.DataFrame, flops: str = "train_flops", n: str = "params", d: str = "images_seen") -> float:
    """FLOPs per parameter per image, k in C = k N D: the median of train_flops / (params * images_seen)."""
    df = _clean(table, [flops, n, d])
    return float(np.median(df[flops] / (df[n] * df[d])))


@one_thread
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
    fit = fit_logs("joint", lx, ly, np.ones(len(df)), delta=delta, n_starts=n_starts)
    names = list(fit.params)

    boot = bootstrap(fit, lx, ly, df["run"].to_numpy(), lambda present: present, n_boot, seed, delta=delta,
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

