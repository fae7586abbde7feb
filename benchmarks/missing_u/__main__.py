"""The Missing-U comparison: ``python -m benchmarks.missing_u PAIRING [--preset smoke|full] [--out DIR]``
with PAIRING one of paper, params, flops (specs in this folder, written by
``python -m benchmarks.missing_u.pairings``); the same as ``iddpm-eval experiment PAIRING --suite missing_u``."""

import sys

from iddpm_eval.cli.experiment import experiment

if __name__ == "__main__":
    experiment.main(args=[*sys.argv[1:], "--suite", "missing_u"], prog_name="python -m benchmarks.missing_u")
