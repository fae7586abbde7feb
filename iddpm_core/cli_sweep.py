"""`iddpm-train sweep`: a grid of training runs over width x depth, evaluated at checkpoint steps
into one sweep table. Flags only; the work is :func:`iddpm_core.sweep.run_sweep`.

Every model / diffusion / training flag of ``iddpm-train run`` is accepted too (shared with it),
except those the sweep sets per run: ``--base-channels`` (from ``--widths``), ``--num-res-blocks``
(from ``--depths``) and ``--steps`` (the checkpoint steps here).
"""

from __future__ import annotations

import importlib
import shlex
import sys
from pathlib import Path

import click
from click.core import ParameterSource

DEFAULT_HOOK = "iddpm_eval.sweep_eval:evaluate_checkpoint"
# Flags of `iddpm-train run` that the sweep does not take (it sets them per run, or has its own).
_NOT_SHARED = {"base_channels", "num_res_blocks", "steps", "out_dir", "resume", "progress"}


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


def resolve_hook(spec: str, explicit: bool):
    """``MODULE:FUNC`` -> the function; ``none`` -> None. When the default hook's module is not
    installed, warn and return None (only the training columns are then filled)."""
    if spec.lower() in ("none", ""):
        return None
    if ":" not in spec:
        raise click.UsageError(f"--eval-hook must be MODULE:FUNC or 'none', got {spec!r}")
    mod_name, func_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if not explicit and exc.name and mod_name.startswith(exc.name):
            click.echo(f"warning: {mod_name} is not installed: the sweep fills the training columns only "
                       "(rerun with iddpm_eval installed to add FID and bits/dim)", err=True)
            return None
        raise click.UsageError(f"--eval-hook {spec}: cannot import {mod_name} ({exc})") from exc
    fn = mod
    for part in func_name.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise click.UsageError(f"--eval-hook {spec}: {mod_name} has no callable {func_name}")
    return fn


def command_line() -> str:
    """This process's command line as typed: ``iddpm-train sweep ...`` or
    ``python -m iddpm_core.cli_sweep ...`` (program paths shortened to their names)."""
    if not sys.argv:
        return ""
    prog = Path(sys.argv[0])
    head = (["python", "-m", "iddpm_core.cli_sweep"] if prog.name == "cli_sweep.py" else [prog.name])
    return shlex.join(head + sys.argv[1:])


def _base_config(ctx, config_file, flags) -> dict:
    """The base run config as in `iddpm-train run`: config file, then flags (all flags' defaults
    without a file; only explicit flags over a file); image size and channels from the data."""
    from iddpm_core.cli import FLAGS
    from iddpm_core.config import RunConfig
    from iddpm_core.train import complete_model_config

    explicit = {k for k in flags if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE,
                                                                    ParameterSource.ENVIRONMENT)}
    if config_file:
        base = RunConfig.read_file(config_file)
        use = explicit
    else:
        base = {"model": {}, "diffusion": {}, "train": {}}
        use = set(flags) - ({"image_size", "in_channels", "attention_resolutions"} - explicit)
    if not str(flags.get("channel_mult") or "").strip():
        use.discard("channel_mult")  # empty = the default for the image size
    for name in use:
        section, field, conv = FLAGS[name]
        base[section][field] = flags[name] if isinstance(flags[name], bool) else conv(flags[name])
    base["model"].setdefault("base_channels", 32)  # placeholders; each run sets its own
    complete_model_config(base)
    return base


def _float_list(value, flag: str):
    """'1e13,3e13' -> (1e13, 3e13); None stays None."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{flag} takes comma-separated numbers, got {value!r}") from None


@click.command("sweep")
@click.option("--widths", required=True, callback=_int_list, help="Base channel counts, e.g. '16,32,64'.")
@click.option("--depths", default="1", show_default=True, callback=_int_list, help="Res blocks per level, e.g. '1,2'.")
@click.option("--steps", "ckpt_steps", required=True, callback=_int_list,
              help="Checkpoint steps evaluated along every run, e.g. '250,500,1000' (trains to the largest).")
@click.option("--flop-budgets", default=None, callback=lambda ctx, param, v: _float_list(v, "--flop-budgets"),
              help="Also save (and evaluate) a checkpoint where each run's training compute first reaches each "
                   "budget, e.g. '1e13,3e13,1e14' (IsoFLOP profiles: iddpm-eval scaling --isoflop).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Sweep folder: sweep.csv, sweep.json, runs/<run>/.")
@click.option("--table", "table_copy", type=click.Path(dir_okay=False), default=None,
              help="Also write the merged sweep table here (e.g. results/scaling/sweep.csv).")
@click.option("--eval-hook", default=DEFAULT_HOOK, show_default=True,
              help="MODULE:FUNC called as FUNC(checkpoint_path, run_info) -> dict of columns; 'none' = training "
                   "columns only (also what happens when iddpm_eval is not installed).")
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
@click.option("--worker", type=click.IntRange(min=0), default=0, show_default=True,
              help="This worker's number: it takes the runs whose grid index is WORKER mod WORKERS.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Number of workers sharing --out (see --worker); or start the same command several times: "
                   "runs are claimed with lock files.")
@click.option("--only", default=None, help="Comma-separated run names (e.g. 'w32_d1') to do; others are left alone.")
@click.option("--break-locks", is_flag=True, help="Take over run locks left by other hosts (after a crash).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.pass_context
def sweep(ctx, widths, depths, ckpt_steps, flop_budgets, out_dir, table_copy, eval_hook, fid_num, fid_steps, fid_sampler, fid_ref,
          fid_ref_num, fid_bootstrap, fid_mode, fid_fd_inf, fid_weights, nll_num, nll_estimate, nll_data, eval_seed, worker,
          workers, only, break_locks, progress, config_file, **flags):
    """Train a width x depth grid of runs to each of --steps and evaluate every checkpoint
    (FID with a bootstrap interval, bits/dim with its standard error) into OUT/sweep.csv: one row
    per run and checkpoint with params, train_flops, images_seen, fid, nll, the config, the command
    line and the git commit. Finished checkpoints are skipped on rerun; an interrupted sweep
    continues where it stopped. Fit it with `iddpm-eval scaling OUT/sweep.csv`.

    The evaluation runs through --eval-hook; without iddpm_eval installed only the training columns
    are filled. Spread the runs over processes or machines sharing OUT with --worker/--workers, or
    start the same command several times (each run is claimed by a lock file)."""
    from iddpm_core.config import RunConfig
    from iddpm_core.sweep import SweepError, make_grid, run_sweep

    hook_explicit = ctx.get_parameter_source("eval_hook") == ParameterSource.COMMANDLINE
    evaluate = resolve_hook(eval_hook, hook_explicit)
    if worker >= workers:
        raise click.UsageError(f"--worker {worker} must be smaller than --workers {workers}")
    eval_settings = {"fid_num": fid_num, "fid_steps": fid_steps, "fid_sampler": fid_sampler, "fid_ref": fid_ref,
                     "fid_ref_num": fid_ref_num, "fid_bootstrap": fid_bootstrap, "fid_mode": fid_mode,
                     "fid_weights": fid_weights, "nll_num": nll_num, "nll_estimate": nll_estimate,
                     "nll_data": nll_data, "seed": eval_seed}
    if fid_fd_inf:  # only when asked, so sweeps started before the setting existed keep their settings
        eval_settings["fid_fd_inf"] = True
    if evaluate is None:
        eval_settings = {}
    command = command_line()
    try:
        base = RunConfig.from_dict(_base_config(ctx, config_file, flags), where="command line")
        runs = make_grid(base, widths, depths, ckpt_steps)
        if flop_budgets:
            from iddpm_core.sweep import with_budget_steps

            runs = with_budget_steps(runs, flop_budgets)
        res = run_sweep(out_dir, runs, evaluate, eval_settings=eval_settings,
                        eval_hook=eval_hook if evaluate is not None else None, worker=worker, num_workers=workers,
                        only=[s.strip() for s in only.split(",") if s.strip()] if only else None, command=command,
                        table_copy=table_copy, break_locks=break_locks, progress=progress)
    except (SweepError, ValueError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"sweep table: {res.table} ({res.rows} rows)" + (f", copied to {table_copy}" if table_copy else ""))
    click.echo(f"trained {len(res.trained)} segment(s), evaluated {len(res.evaluated)} checkpoint(s), "
               f"{len(res.skipped)} run(s) already complete" + (f", busy elsewhere: {', '.join(res.busy)}"
                                                               if res.busy else ""))


# The model / diffusion / training flags of `iddpm-train run`, shared so the two stay in step.
# Imported here, after `sweep` exists: iddpm_core.cli imports this module at its end to register
# `sweep`, so either module may be imported first.
from iddpm_core.cli import run as _run_cmd  # noqa: E402

sweep.params.extend(p for p in _run_cmd.params if p.name not in _NOT_SHARED)


if __name__ == "__main__":  # `python -m iddpm_core.cli_sweep ...` until `iddpm-train sweep` is registered
    sweep()
