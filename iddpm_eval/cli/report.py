"""`iddpm-eval report`: Markdown or HTML report of results tables, grouped by experiment."""

from __future__ import annotations

from pathlib import Path

import click

from iddpm_eval.report import write_report


@click.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Report file (default report.md, or report.html with --html).")
@click.option("--html", "as_html", is_flag=True, help="Write standalone HTML with the figures embedded.")
@click.option("--title", default="Results report", show_default=True)
def report(results, output, as_html, title):
    """Write a report of RESULTS (one or more results CSVs): a table per experiment with its
    figures (rows' extra.figure paths and PNGs beside the tables)."""
    if output is None:
        output = "report.html" if as_html else "report.md"
    out = Path(output)
    if as_html and out.suffix.lower() == ".md":
        raise click.UsageError(f"--html with an output ending in .md: {output}")
    try:
        path = write_report(results, out, html_output=True if as_html else None, title=title)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {path}")
