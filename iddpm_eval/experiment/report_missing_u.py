"""Report of one Missing-U pairing (experiment kind ``missing-u``, ``benchmarks/missing_u/*.toml``):
the two sides (rows ``unet`` and ``cunet``) trained at equal compute, their curves against training
FLOPs and wall time, the inference measurements of the last checkpoints
(:mod:`iddpm_eval.missing_u_eval`), and the paper's claims judged with the intervals.

Files: ``table.csv`` (one row per checkpoint), ``latency.csv``, ``solvers.csv``, ``fid_steps.csv``,
``denoising.csv``, ``claims.csv``, figures, ``README.md``.

Judging. Lower is better for FID, bits/dim and latency, higher for PSNR / SSIM. A claim "holds"
when the continuous U-Net's 95% interval lies entirely on the better side of the U-Net's,
"reversed" when entirely on the worse side, "inconclusive" when they overlap
(:func:`iddpm_eval.experiment.report.judge`). Intervals: FID bootstrap, bits/dim summary
interval, Student-t over images for PSNR / SSIM, and for a latency median the distribution-free
order-statistic interval (:func:`median_interval`). Parameter and FLOP counts are exact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from iddpm_core.io import write_text
from iddpm_eval.experiment.report import (_ci, _fmt, _header, _md_table, _num, _plot_curves, _provenance,
                                          _with_nll_ci, _write_csv, judge)

SIDES = ("unet", "cunet")
STUDY_COLUMNS = {"latency": "mu_latency", "solvers": "mu_solvers", "fid_steps": "mu_fid_steps",
                 "denoising": "mu_denoising"}
COMPUTE_GAP = 0.05  # the "within 5%" for equal training compute


def median_interval(times, level: float = 0.95) -> dict:
    """The median of ``times`` with the distribution-free interval [x_(j), x_(n+1-j)] of order
    statistics: the largest j whose coverage P(j <= B <= n - j), B ~ Binomial(n, 1/2), is at least
    ``level`` (with too few values, j = 1: the range, and its smaller coverage is returned)."""
    from scipy.stats import binom

    x = np.sort(np.asarray(times, dtype=float))
    n = len(x)
    if n == 0:
        raise ValueError("no times")
    j, cover = 1, 1.0 - 2.0 * binom.cdf(0, n, 0.5)
    for k in range(1, n // 2 + 1):
        c = 1.0 - 2.0 * binom.cdf(k - 1, n, 0.5)
        if c >= level:
            j, cover = k, c
    return {"median": float(np.median(x)), "low": float(x[j - 1]), "high": float(x[n - j]), "coverage": float(cover),
            "n": n}


def _side(run: str) -> str:
    return "cunet" if "cunet" in str(run) else "unet"


def along_training(df: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint with the cumulative training wall time (the sum of the segments'
    ``train_seconds``; NaN once a segment was trained by an earlier invocation that is not timed)."""
    df = _with_nll_ci(df).copy()
    df["step"] = pd.to_numeric(df["step"])
    df["side"] = [_side(r) for r in df["run"]]
    df = df.sort_values(["run_index", "step"])
    ts = pd.to_numeric(df.get("train_seconds"), errors="coerce")
    df["wall_seconds"] = ts.groupby(df["run"]).cumsum(skipna=False)
    budget = pd.to_numeric(df["train_flops"]).groupby(df["run"]).transform("max")
    df["fraction"] = (pd.to_numeric(df["train_flops"]) / budget).round(3)
    df["point"] = df.groupby("run").cumcount() + 1  # the k-th checkpoint: the same planned fraction on both sides
    return df


def study_rows(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """The long table of one inference measurement from the JSON column of the runs' last rows."""
    col = STUDY_COLUMNS[name]
    out = []
    if col not in df:
        return pd.DataFrame()
    for _, r in df.iterrows():
        if not isinstance(r.get(col), str):
            continue
        for item in json.loads(r[col]):
            item = {k: v for k, v in item.items() if k not in ("times_s", "checkpoint")}
            out.append({"run": r["run"], "side": _side(r["run"]), "train_step": int(r["step"]), **item,
                        **{p: r.get(p) for p in ("git_commit", "config_hash", "seed", "checkpoint")}})
    return pd.DataFrame(out)


def latency_rows(df: pd.DataFrame) -> pd.DataFrame:
    """latency.csv: median seconds per image with its order-statistic interval, per side and batch."""
    out = []
    for _, r in df.iterrows():
        if not isinstance(r.get("mu_latency"), str):
            continue
        for item in json.loads(r["mu_latency"]):
            b = int(item["batch"])
            ci = median_interval(np.asarray(item["times_s"], dtype=float) / b)
            out.append({"run": r["run"], "side": _side(r["run"]), "train_step": int(r["step"]), "batch": b,
                        "per_image_s": ci["median"], "per_image_s_low": ci["low"], "per_image_s_high": ci["high"],
                        "coverage": round(ci["coverage"], 4), "repeats": ci["n"], "threads": item.get("threads"),
                        "nfe": item.get("nfe"), "forward_flops": r.get("forward_flops"),
                        **{p: r.get(p) for p in ("git_commit", "checkpoint")}})
    return pd.DataFrame(out)


def _triple(r, col: str, sign: float = 1.0) -> tuple:
    """(value, low, high) of a column with a 95% interval, negated for higher-is-better metrics."""
    v, lo, hi = (_num(r.get(c)) for c in (col, f"{col}_low" if f"{col}_low" in r else f"{col}_ci_low",
                                          f"{col}_high" if f"{col}_high" in r else f"{col}_ci_high"))
    return (sign * v, lo, hi) if sign > 0 else (-v, -hi, -lo)


def _verdict(cunet: tuple, unet: tuple) -> str:
    return judge(cunet, unet).replace(" (intervals overlap)", "")


def claims(train: pd.DataFrame, lat: pd.DataFrame, fid_steps: pd.DataFrame, den: pd.DataFrame) -> list[dict]:
    """The claims of "The Missing U" judged on this pairing: [{claim, unet, cunet, measured, holds}]."""
    out = []
    last = train.sort_values("step").groupby("side").tail(1).set_index("side")
    if not set(SIDES) <= set(last.index):
        return out
    u, c = last.loc["unet"], last.loc["cunet"]

    def add(claim, unet, cunet, measured, holds):
        out.append({"claim": claim, "unet": unet, "cunet": cunet, "measured": measured, "holds": holds})

    pr, fr = _num(c["params"]) / _num(u["params"]), _num(c["forward_flops"]) / _num(u["forward_flops"])
    add("fewer parameters (paper: about a quarter)", f"{int(_num(u['params'])):,}", f"{int(_num(c['params'])):,}",
        f"ratio {pr:.3f} (exact)", "yes" if pr < 1 else "no")
    add("fewer FLOPs per forward (paper: about 30%)", f"{_num(u['forward_flops']) / 1e9:.3f} GFLOP",
        f"{_num(c['forward_flops']) / 1e9:.3f} GFLOP (NFE {int(_num(c['nfe']))})", f"ratio {fr:.3f} (exact)",
        "yes" if fr < 1 else "no")
    gap = abs(_num(c["train_flops"]) - _num(u["train_flops"])) / max(_num(c["train_flops"]), _num(u["train_flops"]))
    add("equal training compute (this experiment's premise, within 5%)", f"{_num(u['train_flops']):.4g} FLOPs",
        f"{_num(c['train_flops']):.4g} FLOPs", f"gap {gap:.2%}", "yes" if gap <= COMPUTE_GAP else "no")
    for b in sorted(set(lat["batch"]) if len(lat) else []):
        lu, lc = (lat[(lat["side"] == s) & (lat["batch"] == b)] for s in SIDES)
        if not (len(lu) and len(lc)):
            continue
        ru, rc = lu.iloc[0], lc.iloc[0]
        tu, tc = _triple(ru, "per_image_s"), _triple(rc, "per_image_s")
        add(f"faster inference, batch {b} (seconds per image per forward, median and order-statistic interval)",
            f"{tu[0] * 1e3:.3g} ms [{tu[1] * 1e3:.3g}, {tu[2] * 1e3:.3g}]",
            f"{tc[0] * 1e3:.3g} ms [{tc[1] * 1e3:.3g}, {tc[2] * 1e3:.3g}]", f"ratio {tc[0] / tu[0]:.2f}",
            _verdict(tc, tu))
    fr_u = train[train["side"] == "unet"].set_index("point")
    fr_c = train[train["side"] == "cunet"].set_index("point")
    for metric, label in (("fid", "FID"), ("nll", "bits/dim")):
        verdicts = []
        for f in sorted(set(fr_u.index) & set(fr_c.index)):
            vu, vc = _triple(fr_u.loc[f], metric), _triple(fr_c.loc[f], metric)
            verdicts.append(f"{fr_c.loc[f, 'fraction']:.2f}: {_verdict(vc, vu)}")
        tu, tc = _triple(u, metric), _triple(c, metric)
        add(f"converges faster: {label} at equal training compute (fractions of the budget)",
            f"{_fmt(tu[0])} {_ci(tu[1], tu[2])}", f"{_fmt(tc[0])} {_ci(tc[1], tc[2])}", "; ".join(verdicts),
            _verdict(tc, tu))
    wu, wc = _num(u.get("wall_seconds")), _num(c.get("wall_seconds"))
    fid_v = _verdict(_triple(c, "fid"), _triple(u, "fid"))
    wall = ("not measured" if math.isnan(wu) or math.isnan(wc) else
            "holds" if wc <= wu and fid_v == "holds" else "reversed" if wc >= wu and fid_v == "reversed" else
            f"trade-off (FID {fid_v}, wall time ratio {wc / wu:.2f})")
    add("converges faster against wall time (the budget's training time and the FID it reaches)",
        f"{wu / 60:.1f} min", f"{wc / 60:.1f} min", f"FID at the end: {fid_v}", wall)
    for metric in ("psnr", "ssim"):
        verdicts = []
        for _, rc in den[den["side"] == "cunet"].iterrows() if len(den) else []:
            ru = den[(den["side"] == "unet") & (den["sigma"] == rc["sigma"])]
            if len(ru):
                verdicts.append((rc["sigma"], _verdict(_triple(rc, f"denoised_{metric}", -1),
                                                       _triple(ru.iloc[0], f"denoised_{metric}", -1))))
        if verdicts:
            counts = {k: sum(v == k for _, v in verdicts) for k in ("holds", "reversed", "inconclusive")}
            add(f"more robust to noise: one-step denoising {metric.upper()} (per sigma)", "-", "-",
                "; ".join(f"{s:g}: {v}" for s, v in verdicts),
                "holds" if counts["holds"] == len(verdicts) else "reversed" if counts["reversed"] == len(verdicts)
                else ", ".join(f"{k} at {n}/{len(verdicts)}" for k, n in counts.items() if n))
    out += _speedup_claims(fid_steps)
    return out


def _loss(g: pd.DataFrame, k: int) -> tuple | None:
    """FID(k steps) - FID(all steps) with an interval: the half-widths added in quadrature (the two
    cells are independent sample sets)."""
    g = g.set_index("steps")
    T = int(g.index.max())
    if k not in g.index or k == T:
        return None
    a, b = _triple(g.loc[k], "fid"), _triple(g.loc[T], "fid")
    d = a[0] - b[0]
    h = math.hypot((a[2] - a[1]) / 2, (b[2] - b[1]) / 2)
    return d, d - h, d + h


def _speedup_claims(fs: pd.DataFrame) -> list[dict]:
    out = []
    if not len(fs) or "trained_solver" not in fs:
        return out
    fs = fs[fs["trained_solver"].astype(bool)]
    for sampler, g in fs.groupby("sampler"):
        gu, gc = g[g["side"] == "unet"], g[g["side"] == "cunet"]
        if not (len(gu) and len(gc)):
            continue
        T = int(g["steps"].max())
        verdicts = []
        for k in sorted(set(gc["steps"]) - {T}):
            du, dc = _loss(gu, k), _loss(gc, k)
            if du and dc:
                verdicts.append((k, dc, du, _verdict(dc, du)))
        if verdicts:
            k, dc, du, v = verdicts[0]
            out.append({"claim": f"composes with fewer sampling steps ({sampler}): FID lost going from {T} to "
                                 f"{k} steps, no more than the U-Net's",
                        "unet": f"{_fmt(du[0], 2)} {_ci(du[1], du[2], 2)}", "cunet": f"{_fmt(dc[0], 2)} "
                        f"{_ci(dc[1], dc[2], 2)}", "measured": "; ".join(f"{k}: {v}" for k, _, _, v in verdicts),
                        "holds": "holds" if v == "holds" else "reversed" if v == "reversed"
                        else "consistent (intervals overlap)"})
    return out


def _plots(train: pd.DataFrame, lat: pd.DataFrame, fs: pd.DataFrame, out: Path) -> list[Path]:
    figs = [_plot_curves(train, "train_flops", "fid", "fid_ci_low", "fid_ci_high", out / "fid_vs_compute.png",
                         "training FLOPs", "FID (95% interval)", logy=False, group=("side",)),
            _plot_curves(train, "train_flops", "nll", "nll_ci_low", "nll_ci_high", out / "nll_vs_compute.png",
                         "training FLOPs", "bits/dim (95% interval)", logy=False, group=("side",))]
    if train["wall_seconds"].notna().all():
        figs.append(_plot_curves(train, "wall_seconds", "fid", "fid_ci_low", "fid_ci_high", out / "fid_vs_wall.png",
                                 "training wall time (s, 2 threads)", "FID (95% interval)", logy=False,
                                 group=("side",)))
    if len(fs) and len(lat):
        fs = fs[fs["trained_solver"].astype(bool)].copy()
        big = lat.sort_values("batch").groupby("side").tail(1).set_index("side")["per_image_s"]
        fs["sample_seconds_per_image"] = [big.get(s, np.nan) * k for s, k in zip(fs["side"], fs["steps"])]
        figs.append(_plot_curves(fs, "sample_seconds_per_image", "fid", "fid_ci_low", "fid_ci_high",
                                 out / "fid_vs_latency.png", "sampling seconds per image (largest latency batch)",
                                 "FID (95% interval)", logy=False, group=("side", "sampler")))
        figs.append(_plot_curves(fs, "steps", "fid", "fid_ci_low", "fid_ci_high", out / "fid_vs_steps.png",
                                 "sampling steps", "FID (95% interval)", logy=False, group=("side", "sampler")))
    return figs


def report_missing_u(exp, df: pd.DataFrame, out: Path, info: dict) -> dict:
    train = along_training(df)
    cols = ["run", "side", "step", "point", "fraction", "params", "forward_flops", "nfe", "train_flops", "images_seen",
            "train_seconds", "wall_seconds", "fid", "fid_ci_low", "fid_ci_high", "fid_n", "fid_ref_n", "fid_steps",
            "fid_sampler", "nll", "nll_stderr", "nll_ci_low", "nll_ci_high", "nll_n", "nll_method"]
    _write_csv(train[[c for c in cols if c in train] + _provenance(train)], out / "table.csv")
    lat = latency_rows(df)
    tables = {"latency": lat, **{k: study_rows(df, k) for k in ("solvers", "fid_steps", "denoising")}}
    for k, t in tables.items():
        if len(t):
            _write_csv(t, out / f"{k}.csv")
    cl = claims(train, lat, tables["fid_steps"], tables["denoising"])
    _write_csv(pd.DataFrame(cl, columns=["claim", "unet", "cunet", "measured", "holds"]), out / "claims.csv")
    figs = _plots(train, lat, tables["fid_steps"], out)
    text = _header(exp, df, info) + ["## Along training (equal compute; 95% intervals)", "",
                                     _md_table(["side", "step", "fraction", "training FLOPs", "wall (min)",
                                                "FID", "bits/dim"],
                                               [[r["side"], int(r["step"]), _fmt(r["fraction"]),
                                                 f"{_num(r['train_flops']):.4g}", _fmt(_num(r['wall_seconds']) / 60, 2),
                                                 f"{_fmt(r.get('fid'), 2)} {_ci(r.get('fid_ci_low'), r.get('fid_ci_high'), 2)}",
                                                 f"{_fmt(r.get('nll'))} {_ci(r.get('nll_ci_low'), r.get('nll_ci_high'))}"]
                                                for _, r in train.iterrows()]), ""]
    text += ["## Claims", "", _md_table(["claim", "U-Net", "continuous U-Net", "measured", "holds?"],
                                        [[c["claim"], c["unet"], c["cunet"], c["measured"], c["holds"]] for c in cl]), ""]
    text += _study_sections(tables)
    text += [f"![{f.stem}]({f.name})" for f in figs] + [""]
    write_text(out / "README.md", "\n".join(text))
    return {"claims": cl}


def _study_sections(tables: dict) -> list[str]:
    text = []
    lat, sol, fs, den = (tables[k] for k in ("latency", "solvers", "fid_steps", "denoising"))
    if len(lat):
        text += ["## Latency (last checkpoints; seconds per image per forward)", "", _md_table(
            ["side", "batch", "ms per image [interval]", "coverage", "repeats", "threads"],
            [[r["side"], int(r["batch"]), f"{r['per_image_s'] * 1e3:.3g} [{r['per_image_s_low'] * 1e3:.3g}, "
              f"{r['per_image_s_high'] * 1e3:.3g}]", f"{r['coverage']:.3f}", int(r["repeats"]), r["threads"]]
             for _, r in lat.iterrows()]), ""]
    if len(sol):
        text += ["## Solvers of the continuous U-Net (same weights)", "", _md_table(
            ["solver", "tolerance", "batch", "NFE per forward", "GFLOP per image", "ms per image"],
            [[r["solver"], _fmt(r.get("tol")), int(r["batch"]), int(r["nfe"]),
              f"{_num(r['forward_flops']) / _num(r['batch']) / 1e9:.3f}", f"{_num(r['per_image_s']) * 1e3:.3g}"]
             for _, r in sol.iterrows()]), ""]
    if len(fs):
        text += ["## FID against sampling steps and solvers", "", _md_table(
            ["side", "solver", "sampler", "steps", "FID [95%]", "n"],
            [[r["side"], r.get("solver") if isinstance(r.get("solver"), str) else "-", r["sampler"], int(r["steps"]),
              f"{_fmt(r['fid'], 2)} {_ci(r.get('fid_ci_low'), r.get('fid_ci_high'), 2)}", int(_num(r["fid_n"]))]
             for _, r in fs.iterrows()]), ""]
    if len(den):
        text += ["## One-step denoising (held-out images; 95% t-intervals over images)", "", _md_table(
            ["side", "sigma", "t", "PSNR denoised", "PSNR noisy", "SSIM denoised", "SSIM noisy", "n"],
            [[r["side"], _fmt(r["sigma"]), int(r["t"]),
              f"{_fmt(r['denoised_psnr'], 2)} {_ci(r['denoised_psnr_low'], r['denoised_psnr_high'], 2)}",
              _fmt(r["noisy_psnr"], 2),
              f"{_fmt(r['denoised_ssim'])} {_ci(r['denoised_ssim_low'], r['denoised_ssim_high'])}",
              _fmt(r["noisy_ssim"]), int(r["n"])] for _, r in den.iterrows()]), ""]
    return text
