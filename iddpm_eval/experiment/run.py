"""Run an experiment on the sweep engine and write its results folder.

The runs go to a work folder (``runs/<suite>/<name>/<preset>/`` by default: checkpoints,
samples, per-run rows, job logs; not committed), through :func:`iddpm_core.launch.launch` (each
run a submitit job: ``local`` or ``slurm``) or :func:`iddpm_core.sweep.run_sweep` (``inline``: one
after the other in this process). The engine skips finished checkpoints and resumes interrupted
ones, so a rerun of the same command only does what is missing and rewrites the report from the
same rows. The results folder (``results/<suite>/<name>/`` by default) gets ``table.csv``,
figures and ``README.md`` (:mod:`iddpm_eval.experiment.report`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from iddpm_core.io import write_text
from iddpm_core.sweep import SweepError, load_hook, merge_table, read_rows, run_sweep


def run_experiment(exp, work_dir, out_dir, *, launcher: str | None = None, max_parallel: int | None = None,
                   command: str = "", progress: bool = True, echo=print) -> dict:
    """Train and evaluate every run of ``exp`` (only what is missing), then write the report.
    Returns what was trained, evaluated and skipped, the wall time and the report's summary."""
    from iddpm_core.launch import LauncherOptions, launch
    from iddpm_eval.experiment.report import write_report

    work, out = Path(work_dir).resolve(), Path(out_dir)
    opts = dict(exp.launcher)
    if launcher:
        opts["name"] = launcher
    if max_parallel:
        opts["max_parallel"] = max_parallel
    load_avg = round(os.getloadavg()[0], 2)
    t0 = time.time()
    if opts.get("name", "local") == "inline":
        res = run_sweep(work, exp.runs, load_hook(exp.eval_hook), eval_settings=exp.eval_settings,
                        eval_hook=exp.eval_hook, command=command, progress=progress)
    else:
        res = launch(work, exp.runs, LauncherOptions(**{k: (tuple(v) if k == "sbatch" else v) for k, v in opts.items()}),
                     eval_hook=exp.eval_hook, eval_settings=exp.eval_settings, command=command, echo=echo)
    wall = time.time() - t0
    if res.failed:
        raise SweepError("runs ended unfinished: " + "; ".join(res.failed))
    if res.busy:
        echo("still running (rerun the command once they finish): " + "; ".join(res.busy))
    table = merge_table(work)
    if not read_rows(table):
        raise SweepError(f"{work}: no rows yet (the jobs were submitted; rerun once they finish)")
    info = {"wall_seconds": wall, "load_avg": load_avg, "launcher": opts.get("name", "local"),
            "trained": res.trained, "evaluated": res.evaluated, "skipped": res.skipped, "submitted": res.submitted}
    with open(work / "invocations.jsonl", "a") as fh:
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "preset": exp.preset,
                             "command": command, **info}) + "\n")
    summary = write_report(exp, table, out, info)
    write_text(out / "experiment.json", json.dumps({"name": exp.name, "kind": exp.kind, "preset": exp.preset,
                                                    "spec": os.path.relpath(exp.path), "work_dir": str(work),
                                                    "runs": [r.name for r in exp.runs]}, indent=2) + "\n")
    return {**info, "table": str(out / "table.csv"), "report": summary}
