"""`iddpm-train sweep`: a grid of training runs (from a TOML spec, ``--spec``, or from flags for
small width x depth grids), each a job (``--launcher local|slurm``), evaluated at checkpoint steps
into one sweep table; ``--status DIR`` shows the jobs. Flags only; the work is
:mod:`iddpm_core.sweep_spec` (the spec), :mod:`iddpm_core.launch` (the jobs) and
:mod:`iddpm_core.sweep` (one run, the table).

Every model / diffusion / training flag of ``iddpm-train run`` is accepted too (shared with it),
except those the sweep sets per run: ``--base-channels`` (from ``--widths``), ``--num-res-blocks``
(from ``--depths``) and ``--steps`` (the checkpoint steps here). With ``--spec`` such flags, and
the evaluation and launcher flags, override the spec when given explicitly.
"""

from __future__ import annotations


import click

from iddpm_core.cli_config import (build_run_config, config_file_option, config_flags, config_options, explicit,
                                   given_fields)
from iddpm_core.provenance import command_line

DEFAULT_HOOK = "iddpm_eval.sweep_eval:evaluate_checkpoint"
# Run-config flags that the sweep does not take (it sets them per run).
_NOT_SHARED = {"base_channels", "num_res_blocks", "steps"}


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        vals = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not vals:
        raise click.BadParameter("give at least one value")
    return vals


def resolve_hook(spec: str, explicit: bool) -> str | None:
    """``MODULE:FUNC`` checked importable -> the same string; ``none`` -> None. When the default
    hook's module is not installed, warn and return None (only the training columns are filled)."""
    from iddpm_core.sweep import SweepError, load_hook

    if spec.lower() in ("none", ""):
        return None
    if spec == "default":
        spec, explicit = DEFAULT_HOOK, False
    if ":" in spec and not explicit:
        try:
            import importlib
            importlib.import_module(spec.split(":", 1)[0])
        except ModuleNotFoundError as exc:
            if exc.name and spec.split(":", 1)[0].startswith(exc.name):
                click.echo(f"warning: {spec.split(':')[0]} is not installed: the sweep fills the training columns "
                           "only (rerun with iddpm_eval installed to add FID and bits/dim)", err=True)
                return None
    try:
        load_hook(spec)
    except SweepError as exc:
        raise click.UsageError(f"--eval-hook {exc}".replace("--eval-hook eval hook ", "--eval-hook ")) from exc
    return spec


def check_eval_settings(hook: str | None, settings: dict) -> dict:
    """The hook module's ``check_settings(settings) -> dict`` when it has one (unknown keys and
    wrong types are refused before any job starts); the settings unchanged otherwise."""
    if hook is None:
        return {}
    import importlib

    check = getattr(importlib.import_module(hook.split(":", 1)[0]), "check_settings", None)
    if check is None:
        return settings
    try:
        check(settings)
    except ValueError as exc:
        raise click.UsageError(f"evaluation settings: {exc}") from exc
    return settings


EVAL_FLAGS = {"fid_num": "fid_num", "fid_steps": "fid_steps", "fid_sampler": "fid_sampler", "fid_ref": "fid_ref",
              "fid_ref_num": "fid_ref_num", "fid_bootstrap": "fid_bootstrap", "fid_mode": "fid_mode",
              "fid_weights": "fid_weights", "nll_num": "nll_num", "nll_estimate": "nll_estimate",
              "nll_data": "nll_data", "eval_seed": "seed"}
LAUNCH_FLAGS = ("launcher", "max_parallel", "time", "partition", "account", "cpus_per_task", "gpus_per_task",
                "sbatch", "wait")


def _print_status(out_dir: str) -> None:
    from iddpm_core.launch import status
    from iddpm_core.sweep import SweepError

    try:
        rows = status(out_dir)
    except SweepError as exc:
        raise click.UsageError(f"--status {exc}") from exc
    cols = ("run", "rows", "last_step", "launcher", "job_id", "state", "submitted")
    width = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols}
    click.echo("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        click.echo("  ".join(str(r[c]).ljust(width[c]) for c in cols))
    for r in rows:
        if r["state"] not in ("COMPLETED", "never submitted") and r["stderr"]:
            click.echo(f"{r['run']}: {r['state']}" + (f" ({r['error']})" if r["error"] else "")
                       + f"; log {r['stderr']}")


def _float_list(value, flag: str):
    """'1e13,3e13' -> (1e13, 3e13); None stays None."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{flag} takes comma-separated numbers, got {value!r}") from None


@click.command("sweep")
@click.option("--spec", "spec_file", type=click.Path(dir_okay=False), default=None,
              help="TOML sweep spec: [grid], base [model]/[diffusion]/[train], [eval], [launcher] "
                   "(see iddpm_core/sweep_spec.py); explicit flags override it.")
@click.option("--status", "status_dir", type=click.Path(file_okay=False), default=None,
              help="Show the runs and jobs of this sweep folder (rows done, job id, state, logs) and exit.")
@click.option("--widths", callback=_int_list, default=None, help="Base channel counts, e.g. '16,32,64'.")
@click.option("--depths", default=None, callback=_int_list, help="Res blocks per level, e.g. '1,2' (default 1).")
@click.option("--steps", "ckpt_steps", default=None, callback=_int_list,
              help="Checkpoint steps evaluated along every run, e.g. '250,500,1000' (trains to the largest).")
@click.option("--flop-budgets", default=None, callback=lambda ctx, param, v: _float_list(v, "--flop-budgets"),
              help="Also save (and evaluate) a checkpoint where each run's training compute first reaches each "
                   "budget, e.g. '1e13,3e13,1e14' (IsoFLOP profiles: iddpm-eval scaling --isoflop).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Sweep folder: sweep.csv, sweep.json, runs/<run>/, jobs/, submitit/.")
@click.option("--table", "table_copy", type=click.Path(dir_okay=False), default=None,
              help="Also write the merged sweep table here (e.g. results/scaling/sweep.csv).")
@click.option("--eval-hook", default="default", show_default=True,
              help="MODULE:FUNC called as FUNC(checkpoint_path, run_info) -> dict of columns; 'none' = training "
                   f"columns only; 'default' = {DEFAULT_HOOK} (training columns only when iddpm_eval is missing).")
@click.option("--fid-num", type=click.IntRange(min=0), default=256, show_default=True,
              help="Samples per checkpoint for FID (0 = no FID).")
@click.option("--fid-steps", type=click.IntRange(min=1), default=25, show_default=True, help="Sampling steps for FID.")
@click.option("--fid-sampler", type=click.Choice(["ddpm", "ddim"]), default="ddim", show_default=True)
@click.option("--fid-ref", default=None, help="Reference images for FID (default: the training --data).")
@click.option("--fid-ref-num", type=click.IntRange(min=2), default=None,
              help="Reference images used (a seeded subset; default all).")
@click.option("--fid-bootstrap", type=click.IntRange(min=0), default=200, show_default=True,
              help="Bootstrap rounds for the FID interval (0 = none).")
@click.option("--fid-mode", type=click.Choice(["legacy-tf", "clean"]), default="legacy-tf", show_default=True)
@click.option("--fid-fd-inf", is_flag=True, help="Also FD-infinity per checkpoint (FID extrapolated to 1/N = 0).")
@click.option("--fid-weights", default=None, help="Inception weights (default: resolved as iddpm-eval fid does).")
@click.option("--nll-num", type=click.IntRange(min=0), default=64, show_default=True,
              help="Images for bits/dim (the first N of --nll-data; 0 = no NLL).")
@click.option("--nll-estimate", type=click.IntRange(min=0), default=16, show_default=True,
              help="Timesteps per image of the unbiased bits/dim estimate (0 = the exact bound over all T).")
@click.option("--nll-data", default=None, help="Images for bits/dim (default: the training --data).")
@click.option("--eval-seed", type=int, default=0, show_default=True, help="Seed of sampling, subsets and the NLL noise.")
@click.option("--launcher", type=click.Choice(["local", "slurm", "inline"]), default="local", show_default=True,
              help="local: each run a submitit job on this machine; slurm: each run a Slurm job (submitit); "
                   "inline: the runs one after the other in this process (debugging).")
@click.option("--max-parallel", type=click.IntRange(min=1), default=None,
              help="Jobs running at once (local: default 1; slurm: the array's %N limit, default none).")
@click.option("--time", type=click.IntRange(min=1), default=None,
              help="Minutes per job (Slurm --time; default 1440); a timed-out job is requeued and resumes.")
@click.option("--partition", default=None, help="Slurm partition.")
@click.option("--account", default=None, help="Slurm account.")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=None,
              help="Slurm --cpus-per-task (also the job's torch threads).")
@click.option("--gpus-per-task", type=click.IntRange(min=0), default=None, help="Slurm --gpus-per-task.")
@click.option("--sbatch", multiple=True, help="Extra sbatch flag, e.g. --sbatch=--qos=high (repeatable).")
@click.option("--wait/--no-wait", default=None,
              help="Wait for the jobs to end (default: local waits, slurm returns once they are submitted).")
@click.option("--only", default=None, help="Comma-separated run names (e.g. 'w32_d1') to do; others are left alone.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.pass_context
def sweep(ctx, **p):
    """Train a grid of runs to each checkpoint step and evaluate every checkpoint (FID with a
    bootstrap interval, bits/dim with its standard error) into OUT/sweep.csv: one row per run and
    checkpoint with params, train_flops, images_seen, fid, nll, the config, the command line, the
    git commit and the job id. Each run is a job: `--launcher local` (processes on this machine, at
    most --max-parallel at once) or `--launcher slurm`. Finished runs are skipped on rerun; a
    killed, cancelled or preempted job resumes from its last checkpoint. Fit the table with
    `iddpm-eval scaling OUT/sweep.csv`; `--status OUT` shows the jobs."""
    from iddpm_core.launch import LauncherOptions, launch
    from iddpm_core.sweep import load_hook, run_sweep
    from iddpm_core.sweep_grid import SweepError, select, with_budget_steps

    if p["status_dir"] is not None:
        _print_status(p["status_dir"])
        return
    if p["out_dir"] is None:
        raise click.UsageError("--out is required (the sweep folder)")
    command = command_line()
    try:
        runs, hook_spec, hook_explicit, launch_d, settings = _plan(ctx, p)
    except SweepError as exc:
        raise click.UsageError(str(exc)) from exc
    hook = resolve_hook(hook_spec, hook_explicit)
    settings = check_eval_settings(hook, settings)
    only_names = [s.strip() for s in p["only"].split(",") if s.strip()] if p["only"] else None
    opts = LauncherOptions(**{k: tuple(v) if k == "sbatch" else v for k, v in launch_d.items()})
    common = dict(eval_settings=settings, eval_hook=hook, command=command, table_copy=p["table_copy"])
    try:
        runs = select(runs, only_names)
        if p["flop_budgets"]:
            runs = with_budget_steps(runs, p["flop_budgets"])
        if opts.name == "inline":
            res = run_sweep(p["out_dir"], runs, load_hook(hook), progress=p["progress"], **common)
        else:
            res = launch(p["out_dir"], runs, opts, echo=click.echo if p["progress"] else None, **common)
    except (SweepError, ValueError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from exc
    _report(res, opts.name, p["table_copy"])


def _plan(ctx, p: dict) -> tuple:
    """(runs, eval hook spec, whether the hook was chosen explicitly, launcher options, evaluation
    settings) from the spec file or the grid flags, with explicit flags over the spec."""
    from iddpm_core.config import RunConfig
    from iddpm_core.sweep_grid import make_grid
    from iddpm_core.sweep_spec import check_launcher, load_spec

    flags = {k: v for k, v in p.items() if k in config_flags()}
    eval_flags = {flag: p[flag] for flag in EVAL_FLAGS}
    if p["spec_file"]:
        if p["widths"] or p["depths"] or p["ckpt_steps"]:
            raise click.UsageError("--widths/--depths/--steps come from the spec's [grid] with --spec")
        spec = load_spec(p["spec_file"], given_fields(ctx, flags))
        runs, hook_spec, launch_d = spec.runs, spec.eval_hook, dict(spec.launcher)
        hook_explicit = spec.eval_hook != "default"
        settings = dict(spec.eval_settings)
        settings.update({key: eval_flags[flag] for flag, key in EVAL_FLAGS.items() if explicit(ctx, flag)})
    else:
        if not p["widths"] or not p["ckpt_steps"]:
            raise click.UsageError("give --spec FILE, or --widths and --steps")
        base = RunConfig.from_dict(build_run_config(ctx, flags, p["config_file"]), where="command line")
        runs = make_grid(base, p["widths"], p["depths"] or (1,), p["ckpt_steps"])
        hook_spec, hook_explicit, launch_d = p["eval_hook"], explicit(ctx, "eval_hook"), {}
        settings = {key: eval_flags[flag] for flag, key in EVAL_FLAGS.items()}
    if p["fid_fd_inf"]:  # only when asked, so sweeps started before the setting existed keep their settings
        settings["fid_fd_inf"] = True
    if explicit(ctx, "eval_hook"):
        hook_spec, hook_explicit = p["eval_hook"], True
    for flag in LAUNCH_FLAGS:
        if explicit(ctx, flag):
            launch_d["name" if flag == "launcher" else flag] = list(p[flag]) if flag == "sbatch" else p[flag]
    return runs, hook_spec, hook_explicit, check_launcher("launcher options", launch_d), settings


def _report(res, launcher: str, table_copy) -> None:
    click.echo(f"sweep table: {res.table} ({res.rows} rows)" + (f", copied to {table_copy}" if table_copy else ""))
    if launcher == "inline":
        click.echo(f"trained {len(res.trained)} segment(s), evaluated {len(res.evaluated)} checkpoint(s), "
                   f"{len(res.skipped)} run(s) already complete")
        return
    click.echo(f"submitted {len(res.submitted)} job(s), {len(res.skipped)} run(s) already complete"
               + (f", still running: {', '.join(res.busy)}" if res.busy else ""))
    if res.failed:
        raise click.ClickException("jobs ended before their run was finished (rerun the same command to resume "
                                   "them):\n  " + "\n  ".join(res.failed))


sweep.params.append(config_file_option())
sweep.params.extend(config_options(skip=_NOT_SHARED))


if __name__ == "__main__":  # `python -m iddpm_core.cli_sweep ...` until `iddpm-train sweep` is registered
    sweep()
