"""`iddpm-eval scaling`: power-law fits of a sweep table with bootstrap intervals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import numpy as np
import pandas as pd

from iddpm_core.io import atomic_path
from iddpm_core.provenance import json_clean

from iddpm_eval import plots, scaling


def _safe(name: str) -> str:
    """A file name from column names: anything but letters, digits, '.', '-', '_' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


@click.command("scaling")
@click.argument("table", type=click.Path(exists=True, dir_okay=False))
@click.option("--x", "x", default="compute", show_default=True,
              help="Any column name; when the table has no column of that name, compute means train_flops "
                   "and images means images_seen.")
@click.option("--y", "y", default="fid", show_default=True, help="fid, nll or any column name.")
@click.option("--fit", "form", type=click.Choice(scaling.FORMS), default=None,
              help="saturating: E + A x^-alpha (default); power: A x^-alpha; fixed-E: E0 + A x^-alpha.")
@click.option("--fixed-E", "fixed_e", type=float, default=None,
              help="The known constant E0 of the fixed-E form (e.g. an entropy estimate); implies --fit fixed-E.")
@click.option("--points", type=click.Choice(scaling.POINTS), default="frontier", show_default=True,
              help="Rows fitted: the lower envelope of y as x grows, every row, or the last checkpoint per run.")
@click.option("--joint", is_flag=True,
              help="Fit y = E + A/N^alpha + B/D^beta on every row (N = params, D = images_seen); --x is ignored.")
@click.option("--budget", "budgets", type=float, multiple=True,
              help="With --joint: a compute budget C in FLOPs for the compute-optimal N and D (repeatable).")
@click.option("--extrapolate", is_flag=True,
              help="Held-out check: fit on all but the largest model size (params), predict the largest run's last "
                   "checkpoint, report the error with its interval.")
@click.option("--isoflop", "isoflop", default=None,
              help="IsoFLOP profiles at these compute budgets, e.g. '1e13,3e13' (checkpoints saved by iddpm-train "
                   "sweep --flop-budgets): the optimum size per budget by spline interpolation, and size vs budget.")
@click.option("--budget-tol", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="With --isoflop: a run's first checkpoint at or above a budget counts if within this fraction.")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=0), default=4000, show_default=True,
              help="Bootstrap resamples over runs (0: no intervals).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ci", "level", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.95,
              show_default=True, help="Interval level.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results/scaling", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the fit as JSON.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def scaling_cmd(table, x, y, form, fixed_e, points, joint, budgets, extrapolate, isoflop, budget_tol, n_boot, seed,
                level, out_dir, as_json, no_progress):
    """Fit a scaling law to a sweep TABLE (CSV) and write DIR/fit_<y>_vs_<x>.csv and .png."""
    if fixed_e is not None and form not in (None, "fixed-E"):
        raise click.UsageError(f"--fixed-E goes with --fit fixed-E, not --fit {form}")
    if form is None:
        form = "fixed-E" if fixed_e is not None else "saturating"
    if form == "fixed-E" and fixed_e is None:
        raise click.UsageError("--fit fixed-E needs --fixed-E VALUE")
    if budgets and not joint:
        raise click.UsageError("--budget needs --joint")
    if extrapolate or isoflop:
        return _checks(table, x, y, form, fixed_e, points, extrapolate, isoflop, budget_tol, n_boot, seed, level,
                       out_dir, as_json, no_progress)
    try:
        df = scaling.read_table(table)
        if joint:
            res = scaling.joint_fit(df, y, budgets=budgets, n_boot=n_boot, seed=seed, level=level,
                                    progress=not no_progress)
            stem = _safe(f"fit_{y}_joint")
        else:
            res = scaling.scaling_fit(df, x, y, form=form, fixed_E=fixed_e, points=points, n_boot=n_boot,
                                      seed=seed, level=level, progress=not no_progress)
            stem = _safe(f"fit_{y}_vs_{x}")
    except ValueError as e:
        raise click.UsageError(f"{table}: {e}") from e
    failed = int(np.isnan(res.boot).any(axis=1).sum())
    if failed:
        click.echo(f"warning: {failed} of {n_boot} resamples had too few points and were left out", err=True)
    out = Path(out_dir)
    csv_path = scaling.write_csv(res.table, out / f"{stem}.csv")
    png_path = (plots.plot_joint if joint else plots.plot_scaling)(res, out / f"{stem}.png")
    if as_json:
        doc = res.to_json()
        doc.update(csv=str(csv_path), png=str(png_path))
        click.echo(json.dumps(json_clean(doc), indent=2))
    else:
        click.echo(res.table.to_string(index=False))
        click.echo(f"wrote {csv_path} and {png_path}")


def _checks(table, x, y, form, fixed_e, points, extrapolate, isoflop, budget_tol, n_boot, seed, level, out_dir,
            as_json, no_progress):
    """--extrapolate and --isoflop (iddpm_eval.scaling.checks)."""
    from iddpm_eval.scaling import checks

    doc = {}
    try:
        df = scaling.read_table(table)
        if extrapolate:
            doc["extrapolation"] = checks.extrapolation_check(
                df, x, y, form=form, fixed_E=fixed_e, points=points, n_boot=n_boot, seed=seed, level=level,
                progress=not no_progress)
        if isoflop:
            try:
                cs = [float(v) for v in isoflop.split(",") if v.strip()]
            except ValueError:
                raise click.UsageError(f"--isoflop takes comma-separated budgets, got {isoflop!r}") from None
            res = checks.isoflop_profiles(df, cs, y, rel_tol=budget_tol, seed=seed, level=level)
            out = Path(out_dir)
            png = plots.plot_isoflop(res, out / _safe(f"isoflop_{y}.png"))
            prof = pd.DataFrame(res["profiles"]).drop(columns=["N_tried"])
            csv = out / _safe(f"isoflop_{y}.csv")
            with atomic_path(csv) as tmp:
                prof.to_csv(tmp, index=False, float_format="%.10g")
            doc["isoflop"] = {k: v for k, v in res.items() if k != "rows"} | {"png": str(png), "csv": str(csv)}
    except ValueError as e:
        raise click.UsageError(f"{table}: {e}") from e
    if as_json:
        click.echo(json.dumps(json_clean(doc), indent=2, default=float))
        return
    if "extrapolation" in doc:
        e = doc["extrapolation"]
        click.echo(f"held out: {e['holdout']} = {e['held_out_size']:g} at {e['x']} = {e['x_held_out']:.4g}; "
                   f"measured {e['measured']:.4g}, predicted {e['predicted']:.4g} "
                   f"({100 * level:g}% CI {e['predicted_ci_low']:.4g} .. {e['predicted_ci_high']:.4g}); "
                   f"error {e['error']:+.4g} ({e['error_ci_low']:+.4g} .. {e['error_ci_high']:+.4g}), "
                   f"{100 * e['rel_error']:+.2f}%")
    if "isoflop" in doc:
        for p in doc["isoflop"]["profiles"]:
            click.echo(f"C = {p['budget']:.4g}: N_opt {p['N_opt']:.4g} ({p['N_opt_ci_low']:.4g} .. {p['N_opt_ci_high']:.4g}), "
                       f"{y} {p['y_opt']:.4g}" + ("" if p["bracketed"] else "  [at the edge of the sizes tried]"))
        if "exponent" in doc["isoflop"]:
            click.echo(f"N_opt ~ C^{doc['isoflop']['exponent']:.4f}")
        click.echo(f"wrote {doc['isoflop']['csv']} and {doc['isoflop']['png']}")
