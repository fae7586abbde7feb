"""Checks every command makes before it computes anything, and the one way results are recorded.

A user error in an output path (a read-only or missing-permission folder, a malformed results
table, a ``.parquet`` given as --results, a newline in --experiment) is reported at once as a
usage error naming the flag and the path; a measurement is printed before it is written, and a
write that still fails is reported in one line, saying the printed result was not recorded.
"""

from __future__ import annotations

import click


def check_output(path, flag: str, *, folder: bool = False) -> None:
    """Refuse an output ``path`` (file, or folder) that cannot be written, naming ``flag``."""
    from iddpm_core.io import NotWritableError, check_writable

    if path is None:
        return
    try:
        check_writable(path, folder=folder, what=flag)
    except NotWritableError as err:
        raise click.UsageError(str(err)) from None


def check_results(results, experiment: str | None, flag: str = "--results") -> None:
    """Refuse a results table (and experiment name) that :func:`record` would refuse later."""
    from iddpm_eval.tables import check_table

    if results is None:
        return
    if experiment is not None and not experiment.strip():
        raise click.UsageError("--experiment must not be empty")
    try:
        check_table(results, experiment)
    except ValueError as err:
        raise click.UsageError(f"{flag}: {err}") from None


def record(results, rows: list[dict]) -> None:
    """Append one command's rows to the results table in one atomic write, replacing the rows of an
    identical earlier run (see :mod:`iddpm_eval.tables`); a failure is one line, no traceback."""
    from iddpm_eval.tables import append_results

    if results is None or not rows:
        return
    try:
        replaced = append_results(results, rows, replace=True)
    except (OSError, ValueError) as err:
        raise click.ClickException(f"results table {results} not written, the result above is not recorded: "
                                   f"{err}") from None
    if replaced:
        click.echo(f"note: replaced {replaced} row(s) of an identical earlier run in {results}", err=True)
