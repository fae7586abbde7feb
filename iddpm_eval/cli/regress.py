"""`iddpm-eval regress`: compare a results table with a baseline; exit 0 pass, 1 regression, 2 error."""

from __future__ import annotations

import sys

import click

from iddpm_eval import regress as rg


@click.command("regress")
@click.option("--baseline", required=True, type=click.Path(dir_okay=False),
              help="Baseline results CSV (e.g. results/ci/baseline.csv).")
@click.option("--current", required=True, type=click.Path(dir_okay=False), help="Current results CSV.")
@click.option("--tolerances", type=click.Path(dir_okay=False), default=None,
              help="Tolerance file (TOML or JSON); default: the built-in table, which has no [default].")
@click.option("--allow-missing", is_flag=True, help="Rows only in the baseline do not fail the gate.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Also write the comparison table to this CSV.")
@click.option("--update-baseline", is_flag=True,
              help="After printing the comparison, copy CURRENT over BASELINE and exit 0.")
def regress(baseline, current, tolerances, allow_missing, output, update_baseline):
    """Compare CURRENT with BASELINE row by row (matched by experiment and metric).

    A change beyond the metric's tolerance, max(abs, rel*|baseline|), is a regression unless (with
    ci = true) it is within the noise of the two measurements: |d| <= 1.96 sqrt(se_b^2 + se_c^2),
    each se read from the row's 95% interval. With higher_is_better in the tolerance file only
    the worse direction counts. Rows in only one table are listed (missing ones fail unless
    --allow-missing). Exit 0 pass, 1 regression, 2 when the tables cannot be compared
    (unreadable, missing columns, unknown metric, different mode or weights, a row whose
    interval does not contain its value).
    """
    try:
        comp = rg.compare_files(baseline, current, tolerances, allow_missing=allow_missing)
    except rg.RegressError as err:
        if not update_baseline:
            click.echo(f"regress: error: {err}", err=True)
            sys.exit(rg.EXIT_INCOMPARABLE)
        click.echo(f"regress: note: no comparison ({err})", err=True)
        comp = None
    if comp is not None:
        click.echo(rg.format_comparison(comp))
        if output:
            rg.write_comparison(comp, output)
    if update_baseline:
        try:
            rg.update_baseline(current, baseline)
        except rg.RegressError as err:
            click.echo(f"regress: error: {err}", err=True)
            sys.exit(rg.EXIT_INCOMPARABLE)
        click.echo(f"baseline updated: {current} -> {baseline}")
        try:
            uncovered = rg.metrics_without_tolerance(baseline, tolerances)
        except rg.RegressError:
            uncovered = []  # the tolerance file's own error was printed above
        if uncovered:
            click.echo(f"regress: warning: no tolerance for metric(s) {uncovered}: comparing against this "
                       f"baseline will exit 2 until they get an entry", err=True)
        sys.exit(rg.EXIT_OK)
    sys.exit(comp.exit_code)
