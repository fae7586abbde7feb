"""Experiments: spec files (a set of runs on the sweep engine, their evaluation, their report)
run by one command into ``results/<suite>/<name>/``. ``spec`` reads them, ``run`` runs them,
``report`` writes the table, figures and README. Suites: ``benchmarks/paper/`` (Improved DDPM);
a sibling folder of specs (e.g. ``benchmarks/missing_u/``) plugs into the same runner."""
