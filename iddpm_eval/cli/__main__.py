"""`python -m iddpm_eval.cli ...` (what torchrun's `-m` runs): the `iddpm-eval` command."""

from iddpm_eval.cli import main

main()
