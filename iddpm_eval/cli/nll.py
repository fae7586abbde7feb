"""`iddpm-eval nll --checkpoint C --data D`: bits/dim of a checkpoint on a dataset (full variational bound)."""

from __future__ import annotations

import json
import math

import click


@click.command("nll")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training checkpoint (holds the model and diffusion configs).")
@click.option("--data", required=True,
              help="Images: digits, fashion-mnist:test, a folder, an .npz batch (arr_0), cifar10:SPLIT:FOLDER.")
@click.option("--num", type=click.IntRange(min=1), default=None, help="Use the first N images (default all).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="(image, timestep) pairs per forward pass (images per pass with --method loop).")
@click.option("--exact-cdf", is_flag=True,
              help="Exact normal CDF (erf) in the decoder instead of Improved DDPM's tanh approximation.")
@click.option("--clip/--no-clip", "clip_denoised", default=True, show_default=True,
              help="Clip the predicted x_0 to [-1, 1], as improved-diffusion's NLL script does.")
@click.option("--estimate", type=click.IntRange(min=2), default=None, metavar="K",
              help="Unbiased estimate from K sampled timesteps t >= 1 per image (plus the prior and decoder). "
                   "Uniform draws are heavy-tailed at small K (their standard error is optimistic): prefer "
                   "--pilot or --profile.")
@click.option("--profile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="With --estimate: importance-sample t from a breakdown CSV of an earlier run (nll_terms.csv) "
                   "or a checkpoint's loss-second-moment sampler state.")
@click.option("--pilot", type=click.IntRange(min=1), default=None, metavar="M",
              help="With --estimate: importance-sample t from the exact terms of the first M images (computed once, "
                   "saved as pilot_terms.csv in --out).")
@click.option("--uniform-mix", type=click.FloatRange(0, 1, min_open=True), default=0.05, show_default=True,
              help="Share of the uniform distribution mixed into the --profile proposal.")
@click.option("--method", type=click.Choice(["batched", "loop"]), default="batched", show_default=True,
              help="batched: a forward pass holds many timesteps of an image; loop: one timestep at a time.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--ema", default=None, help="EMA rate to load (default: the run's first), or 'raw'.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (per-image CSV for resume, breakdown CSV and plot, nll.json). "
                   "Default: beside the checkpoint.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--results", type=click.Path(dir_okay=False), default=None, help="Append the result to this table.")
@click.option("--experiment", default="nll", show_default=True, help="Experiment name in --results.")
@click.option("--no-progress", is_flag=True)
def nll(checkpoint, data, num, batch_size, exact_cdf, clip_denoised, estimate, profile, pilot, uniform_mix, method,
        seed, ema, out_dir, device, as_json, results, experiment, no_progress):
    """Negative log-likelihood in bits/dim: prior KL + every KL term + the discretized decoder NLL,
    per image, with the mean and its standard error. Reruns with the same --out resume."""
    from iddpm_core.data import DataError
    from iddpm_eval.cli.outputs import check_output, check_results, record
    from iddpm_eval.nll import NLLError, check_options, default_out_dir, evaluate, results_row

    try:
        check_options(method, estimate, profile, pilot)
    except NLLError as exc:
        raise click.UsageError(str(exc)) from None
    ema = _ema_rate(ema)
    check_results(results, experiment)
    if out_dir is not None:
        check_output(out_dir, "--out", folder=True)
    else:
        check_output(default_out_dir(checkpoint, data, estimate), "output folder (the default beside the checkpoint; "
                     "choose another with --out)", folder=True)
    try:
        out = evaluate(checkpoint, data, out_dir=out_dir, num=num, batch_size=batch_size, seed=seed,
                       exact_cdf=exact_cdf, clip_denoised=clip_denoised, estimate=estimate, profile=profile,
                       pilot=pilot, uniform_mix=uniform_mix, method=method, ema=ema, device=device,
                       progress=not no_progress)
    except (DataError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    _echo(out, as_json)
    if results:  # printed first, so a failed write loses nothing the user has not seen
        record(results, [results_row(out, experiment)])


def _ema_rate(ema: str | None) -> str | float | None:
    if ema is None or ema == "raw":
        return ema
    try:
        return float(ema)
    except ValueError:
        raise click.UsageError(f"--ema must be a rate such as 0.9999 or 'raw', got {ema!r}") from None


def _echo(out: dict, as_json: bool) -> None:
    """The summary as JSON (non-finite numbers as null) or as three lines of text."""
    if as_json:
        click.echo(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                               for k, v in out.items()}, sort_keys=True))
        return
    se = out["bpd_stderr"]
    se_txt = f" +- {se:.4f}" if se is not None and math.isfinite(se) else ""
    what = ("exact bound" if not out["estimate"]
            else f"estimate from K={out['estimate']} timesteps (MC stderr {out['mc_stderr']:.4f})")
    click.echo(f"{out['bpd']:.4f}{se_txt} bits/dim over {out['n']} images, T = {out['T']}, {what}, "
               f"{out['cdf']} CDF")
    click.echo(f"prior {out['prior_bpd']:.6f}  decoder {out['decoder_bpd']:.4f}  KL terms {out['kl_bpd']:.4f}")
    click.echo(f"outputs in {out['out_dir']}")
