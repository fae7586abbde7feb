"""The Improved DDPM experiments: ``python -m benchmarks.paper NAME [--preset smoke|full] [--out DIR]``
with NAME one of ablation, sampling-steps, importance-sampling, scaling (specs in this folder);
the same as ``iddpm-eval experiment NAME --suite paper``."""

import sys

from iddpm_eval.cli.experiment import experiment

if __name__ == "__main__":
    experiment.main(args=[*sys.argv[1:], "--suite", "paper"], prog_name="python -m benchmarks.paper")
