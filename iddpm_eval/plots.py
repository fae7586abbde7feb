"""Figures. Scaling plots: log-log data, compute frontier, fitted law and its bootstrap band;
isoFLOP profiles; the per-timestep breakdown of a bits/dim run.

Figures are drawn on a bare ``matplotlib.figure.Figure`` (no pyplot state, no GUI backend) and
written atomically as PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from iddpm_core.io import atomic_path


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically."""
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _plain_ticks_if_narrow(ax, values) -> None:
    """On a log axis spanning less than a decade, label ticks as plain numbers (3.2, not 3.2x10^0)."""
    v = np.asarray(values, dtype=float)
    if v.min() > 0 and v.max() / v.min() < 10:
        fmt = FuncFormatter(lambda t, _: f"{t:.4g}")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)


def _fmt_ci(result, name: str) -> str:
    row = result.table.set_index("parameter").loc[name]
    ci = "" if np.isnan(row["ci_low"]) else f" [{row['ci_low']:.3g}, {row['ci_high']:.3g}]"
    return f"{name} = {row['value']:.3g}{ci}"


def _finish_loglog(fig: Figure, ax, path, xlabel: str, ylabel: str, yvalues, lines: list[str], title: str,
                   legend_size: int) -> Path:
    """Log-log axes with their labels, the fitted parameters in a box at the lower left, the title,
    grid and legend; then the PNG."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _plain_ticks_if_narrow(ax, yvalues)
    ax.text(0.02, 0.02, "\n".join(lines), transform=ax.transAxes, fontsize=8, va="bottom",
            bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=legend_size, loc="upper right")
    return save_figure(fig, path)


def plot_scaling(result, path: str | os.PathLike, *, title: str | None = None, n_grid: int = 200) -> Path:
    """Log-log plot of a one-variable :class:`iddpm_eval.scaling.ScalingResult`: every row,
    the frontier, the rows used by the fit, the fitted curve and its bootstrap percentile band."""
    df, x, y = result.data, result.x, result.y
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(df[x], df[y], s=10, color="0.7", label="all checkpoints", zorder=1)
    fr = result.frontier
    if len(fr):
        ax.step(fr[x], fr[y], where="post", color="k", lw=1, label="frontier", zorder=2)
    used = df[df["used"]]
    ax.scatter(used[x], used[y], s=22, facecolors="none", edgecolors="tab:blue",
               label=f"fitted points ({result.points})", zorder=3)
    lo, hi = df[x].min(), df[x].max()
    span = np.log10(hi / lo) if hi > lo else 1.0
    grid = np.logspace(np.log10(lo) - 0.05 * span, np.log10(hi) + 0.05 * span, n_grid)
    p = result.fit.params
    label = {"saturating": "E + A x^-alpha", "power": "A x^-alpha", "fixed-E": "E0 + A x^-alpha"}[result.fit.form]
    ax.plot(grid, result.fit.predict(grid), color="tab:red", lw=1.5, label=f"fit {label}", zorder=4)
    if not np.isnan(result.boot).all() and result.boot.shape[0] > 1:
        b_lo, b_hi = result.band(grid)
        ax.fill_between(grid, b_lo, b_hi, color="tab:red", alpha=0.2, lw=0,
                        label=f"{100 * result.level:g}% bootstrap band", zorder=0)
    if "E" in p:
        ax.axhline(p["E"], color="tab:red", ls=":", lw=1, label="E (fixed)" if result.fit.form == "fixed-E" else "E")
    fixed = result.fit.form == "fixed-E"
    lines = [_fmt_ci(result, k) for k in ("alpha", "E", "A") if k in result.names and not (fixed and k == "E")]
    if fixed:
        lines.append(f"E0 = {p['E']:.3g} (fixed)")
    return _finish_loglog(fig, ax, path, x, y, df[y], lines, title or f"{y} vs {x}", legend_size=8)


def plot_joint(result, path: str | os.PathLike, *, n_col: str = "params", d_col: str = "images_seen",
               title: str | None = None, n_grid: int = 100) -> Path:
    """Log-log plot of the joint law: y against D, one colour per model size N, with the
    fitted curve E + A N^-alpha + B D^-beta for each N."""
    from matplotlib import colormaps

    df, y = result.data, result.y
    sizes = np.sort(df[n_col].unique())
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    d_lo, d_hi = df[d_col].min(), df[d_col].max()
    grid = np.logspace(np.log10(d_lo), np.log10(d_hi), n_grid)
    for i, n in enumerate(sizes):
        c = cmap(i / max(len(sizes) - 1, 1))
        sub = df[df[n_col] == n]
        ax.scatter(sub[d_col], sub[y], s=14, color=c, label=f"N = {n:.3g}")
        ax.plot(grid, result.fit.predict(np.full_like(grid, n), grid), color=c, lw=1)
    lines = [_fmt_ci(result, k) for k in ("E", "A", "alpha", "B", "beta")]
    return _finish_loglog(fig, ax, path, d_col, y, df[y], lines, title or f"{y} = E + A N^-alpha + B D^-beta",
                          legend_size=7)


def plot_isoflop(result: dict, path: str | os.PathLike, *, n_grid: int = 200) -> Path:
    """IsoFLOP profiles (:func:`iddpm_eval.scaling.checks.isoflop_profiles`): left, y against model
    size per budget with the interpolating spline and its minimum; right, the compute-optimal size
    against budget with intervals and the fitted power law."""
    from matplotlib import colormaps
    from scipy.interpolate import CubicSpline

    rows, profiles, y, n = result["rows"], result["profiles"], result["y"], result["n"]
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(11, 4.4))
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, p in enumerate(profiles):
        c = cmap(i / max(len(profiles) - 1, 1))
        g = rows[rows["budget"] == p["budget"]].sort_values(n)
        ln = np.log(g[n].to_numpy(float))
        ax.scatter(g[n], g[y], s=16, color=c, label=f"C = {p['budget']:.3g}")
        grid = np.linspace(ln[0], ln[-1], n_grid)
        ax.plot(np.exp(grid), CubicSpline(ln, g[y].to_numpy(float), bc_type="natural")(grid), color=c, lw=1)
        ax.scatter([p["N_opt"]], [p["y_opt"]], marker="*", s=90, color=c, edgecolors="k", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel(n)
    ax.set_ylabel(y)
    ax.set_title("IsoFLOP profiles (spline minimum: star)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
    cs = np.array([p["budget"] for p in profiles])
    nopt = np.array([p["N_opt"] for p in profiles])
    lo = np.array([p["N_opt_ci_low"] for p in profiles], float)
    hi = np.array([p["N_opt_ci_high"] for p in profiles], float)
    err = np.vstack([nopt - np.where(np.isnan(lo), nopt, lo), np.where(np.isnan(hi), nopt, hi) - nopt])
    brk = np.array([p["bracketed"] for p in profiles])
    bx.errorbar(cs[brk], nopt[brk], yerr=err[:, brk], fmt="o", color="tab:blue", capsize=3, label="optimum")
    if (~brk).any():
        bx.scatter(cs[~brk], nopt[~brk], marker="x", color="tab:red", label="at the edge of the sizes tried")
    if "exponent" in result:
        g = np.logspace(np.log10(cs.min()), np.log10(cs.max()), 50)
        bx.plot(g, np.exp(result["log_coef"]) * g ** result["exponent"], color="k", lw=1,
                label=f"N_opt ~ C^{result['exponent']:.3f}")
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("compute budget C (FLOPs)")
    bx.set_ylabel(f"compute-optimal {n}")
    bx.set_title("compute-optimal size against budget")
    bx.grid(True, which="both", alpha=0.25)
    bx.legend(fontsize=7)
    return save_figure(fig, path)


def plot_breakdown(path: str | os.PathLike, table: dict, title: str = "") -> Path:
    """Bits/dim breakdown (:func:`iddpm_eval.nll.breakdown`): left, the mean term per t (the decoder
    NLL at t = 0 marked apart); right, the epsilon and x_0 MSEs per t; log y axes."""
    t = np.asarray(table["t"])
    fig = Figure(figsize=(9, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.semilogy(t[1:], np.maximum(table["vb"][1:], 1e-12), lw=1, label="KL term (t >= 1)")
    ax1.semilogy([0], [max(table["vb"][0], 1e-12)], "o", label="decoder NLL (t = 0)")
    ax1.set_xlabel("t")
    ax1.set_ylabel("bits/dim")
    ax1.legend(fontsize=8)
    ax2.semilogy(t, np.maximum(table["mse"], 1e-12), lw=1, label="epsilon MSE")
    ax2.semilogy(t, np.maximum(table["xstart_mse"], 1e-12), lw=1, label="x0 MSE")
    ax2.set_xlabel("t")
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
