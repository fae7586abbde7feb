"""`iddpm-eval`: the measuring command line. Each subcommand lives in its own module here and
only parses flags and calls library functions."""

import os
import sys

import click

# Subcommands that run across processes under torchrun (each rank a shard; rank 0 writes).
DISTRIBUTED = ("fid", "stats", "nll")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="iddpm")
@click.pass_context
def main(ctx):
    """Measure diffusion models: FID, precision/recall, bits/dim, scaling fits, reports.

    fid, stats and nll also run under `torchrun --nproc_per_node N`: each process takes a shard
    of the images and rank 0 prints and writes the results."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if ctx.invoked_subcommand not in DISTRIBUTED:
            raise click.UsageError(f"`iddpm-eval {ctx.invoked_subcommand}` does not run under torchrun "
                                   f"(WORLD_SIZE > 1); these do: {', '.join(DISTRIBUTED)}")
        from iddpm_eval import distributed as dist

        if dist.init():
            ctx.call_on_close(dist.D.cleanup)
        if not dist.is_main():  # one process prints (every rank computes the same numbers)
            shown, sys.stdout = sys.stdout, open(os.devnull, "w")

            def restore():
                sys.stdout.close()
                sys.stdout = shown

            ctx.call_on_close(restore)


# Subcommands register themselves below, one import per module.
from iddpm_eval.cli.regress import regress as _regress; main.add_command(_regress)
from iddpm_eval.cli.report import report as _report; main.add_command(_report)
from iddpm_eval.cli.scaling import scaling_cmd as _scaling; main.add_command(_scaling)
from iddpm_eval.cli.fid import fid as _fid; main.add_command(_fid)
from iddpm_eval.cli.stats import stats as _stats; main.add_command(_stats)
from iddpm_eval.cli.recall import recall as _recall; main.add_command(_recall)
from iddpm_eval.cli.nll import nll as _nll; main.add_command(_nll)
from iddpm_eval.cli.experiment import experiment as _experiment; main.add_command(_experiment)
