"""`iddpm-eval experiment SPEC`: run an experiment spec (benchmarks/<suite>/NAME.toml) on the sweep
engine and write results/<suite>/<name>/ (table.csv, figures, README.md). Reruns skip finished
work; an interrupted run resumes. ``--estimate`` prints the expected time instead of running."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click


def resolve_spec(name: str, suite: str | None) -> tuple[Path, str]:
    """A path to a spec file, or NAME of ``benchmarks/<suite>/NAME.toml``; returns (path, suite)."""
    p = Path(name)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise click.UsageError(f"experiment spec {name}: no such file")
        return p, suite or p.parent.name
    if suite is None:
        raise click.UsageError(f"{name!r} is not a spec file; give a path or --suite (e.g. paper)")
    p = Path("benchmarks") / suite / f"{name.replace('-', '_')}.toml"
    if not p.is_file():
        have = sorted(f.stem.replace("_", "-") for f in p.parent.glob("*.toml"))
        raise click.UsageError(f"no experiment {name!r} in benchmarks/{suite}/ (it has: {', '.join(have) or 'none'})")
    return p, suite


def _command(name: str, options: dict) -> str:
    """The command that reruns this experiment: ``python -m benchmarks.SUITE ...`` when started that
    way, else ``iddpm-eval experiment ...``, with the options that were given."""
    argv0 = Path(sys.argv[0])
    prog = ["iddpm-eval", "experiment"]
    if argv0.name == "__main__.py" and argv0.parent.parent.name == "benchmarks":
        prog = ["python", "-m", f"benchmarks.{argv0.parent.name}"]
        options = {k: v for k, v in options.items() if k != "--suite"}  # the module gives it
    args = [name]
    for flag, value in options.items():
        if value not in (None, False):
            args += [flag] if value is True else [flag, str(value)]
    return shlex.join(prog + args)


@click.command("experiment")
@click.argument("name")
@click.option("--suite", default=None, help="folder of specs under benchmarks/ (paper, missing_u, ...)")
@click.option("--preset", default="full", show_default=True, help="preset of the spec (smoke = tiny budgets)")
@click.option("--out", "out_dir", default=None, help="results folder [results/SUITE/NAME for full, "
              "runs/SUITE/NAME/PRESET/results otherwise]")
@click.option("--work", "work_dir", default=None, help="work folder for checkpoints and rows [runs/SUITE/NAME/PRESET]")
@click.option("--launcher", type=click.Choice(["local", "slurm", "inline"]), default=None,
              help="override the spec's launcher")
@click.option("--max-parallel", type=click.IntRange(1), default=None)
@click.option("--estimate", is_flag=True, help="print the expected time from the measured per-unit costs, run nothing")
@click.option("--timing", default="results/paper/timing.csv", show_default=True,
              help="per-unit costs for --estimate (python -m benchmarks.paper.timing)")
@click.option("--no-progress", is_flag=True)
def experiment(name, suite, preset, out_dir, work_dir, launcher, max_parallel, estimate, timing, no_progress):
    """Run the experiment NAME (a spec file, or a name in benchmarks/SUITE/)."""
    from iddpm_core.sweep import SweepError
    from iddpm_eval.experiment.spec import load_experiment

    given_suite = suite
    path, suite = resolve_spec(name, suite)
    try:
        exp = load_experiment(path, preset)
    except SweepError as exc:
        raise click.UsageError(str(exc)) from exc
    if estimate:
        from iddpm_eval.experiment.estimate import estimate as est, load_costs

        if exp.kind == "missing-u":
            raise click.UsageError("--estimate: no cost model for the missing-u kind (its models are not the timed "
                                   "U-Net widths); results/missing_u/README.md gives the measured times")
        if not Path(timing).is_file():
            raise click.UsageError(f"--timing {timing}: no such file (python -m benchmarks.paper.timing writes it)")
        e = est(exp, load_costs(timing))
        for r in e["runs"]:
            click.echo(f"{r['run']}: train {r['train_s'] / 60:.1f} min, evaluate {r['eval_s'] / 60:.1f} min")
        click.echo(f"{exp.name} ({preset}): {e['total_s'] / 60:.1f} min serial on the timed threads "
                   f"(train {e['train_s'] / 60:.1f}, evaluate {e['eval_s'] / 60:.1f})")
        return
    stem = exp.name
    work = Path(work_dir or Path("runs") / suite / stem / preset)
    out = Path(out_dir or (Path("results") / suite / stem if preset == "full" else work / "results"))
    command = _command(name, {"--suite": given_suite, "--preset": preset,
                                   "--out": out_dir, "--work": work_dir, "--launcher": launcher,
                                   "--max-parallel": max_parallel})
    from iddpm_eval.experiment.run import run_experiment

    try:
        res = run_experiment(exp, work, out, launcher=launcher, max_parallel=max_parallel, command=command,
                             progress=not no_progress, echo=click.echo)
    except SweepError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{exp.name} ({preset}): trained {len(res['trained'])} segment(s), evaluated {len(res['evaluated'])} "
               f"checkpoint(s), skipped {len(res['skipped'])} finished run(s) in {res['wall_seconds'] / 60:.1f} min; "
               f"results in {out}/")
