"""`iddpm-eval`: the measuring command line. Each subcommand lives in its own module here and
only parses flags and calls library functions."""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="iddpm")
def main():
    """Measure diffusion models: FID, precision/recall, bits/dim, scaling fits, reports."""


# Subcommands register themselves below, one import per module.
from iddpm_eval.cli.regress import regress as _regress; main.add_command(_regress)
from iddpm_eval.cli.report import report as _report; main.add_command(_report)
from iddpm_eval.cli.scaling import scaling_cmd as _scaling; main.add_command(_scaling)
from iddpm_eval.cli.fid import fid as _fid; main.add_command(_fid)
from iddpm_eval.cli.stats import stats as _stats; main.add_command(_stats)
from iddpm_eval.cli.recall import recall as _recall; main.add_command(_recall)
from iddpm_eval.cli.nll import nll as _nll; main.add_command(_nll)
