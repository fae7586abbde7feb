"""`iddpm-train` (``run``, and ``sweep`` from :mod:`iddpm_core.cli_sweep`) and `iddpm-sample`: thin
click front ends over iddpm_core.train / sample; the run-config flags come from :mod:`iddpm_core.cli_config`."""

from __future__ import annotations

import json

import click

from iddpm_core.cli_config import build_run_config, config_file_option, config_options
from iddpm_core.cli_sweep import sweep


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="iddpm")
def train_main():
    """Train Improved-DDPM diffusion models."""


@train_main.command("run")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: tb/, metrics.csv, samples/, checkpoints/.")
@click.option("--resume", default=None, help="'auto' (OUT/checkpoints/latest.pt if present) or a checkpoint path.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.pass_context
def run(ctx, config_file, out_dir, resume, progress, **flags):
    """Train a model (single process, or under torchrun for several)."""
    from pathlib import Path

    from iddpm_core.config import ResumeError, RunConfig, load_run_config
    from iddpm_core.train import train

    try:
        stored = None
        if resume is not None:
            from iddpm_core.checkpoint import load_checkpoint
            path = Path(out_dir) / "checkpoints" / "latest.pt" if resume == "auto" else Path(resume)
            if path.exists() or resume != "auto":
                ckpt = load_checkpoint(path)
                if config_file:
                    raise click.UsageError("--config cannot be combined with resuming; the checkpoint holds the config")
                stored = load_run_config(ckpt, str(path)).to_dict()
        config = RunConfig.from_dict(build_run_config(ctx, flags, config_file, stored), where="command line")
        summary = train(config, out_dir, resume=resume, progress=progress)
    except (ValueError, ResumeError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from exc
    import os
    if int(os.environ.get("RANK", "0")) != 0:
        return
    click.echo(f"trained to step {summary['step']} ({summary['images_seen']} images, "
               f"{summary['train_flops']:.3e} training FLOPs)")
    click.echo(f"checkpoint:  {summary['checkpoint']}")
    click.echo(f"samples:     {summary['samples_dir']}")
    click.echo(f"tensorboard: tensorboard --logdir {summary['tb_dir']}")
    click.echo(f"metrics:     {summary['metrics_csv']}")


run.params[:0] = [config_file_option()]
run.params.extend(config_options())
train_main.add_command(sweep)


@click.command("iddpm-sample", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="iddpm")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="Training checkpoint.")
@click.option("--num", "--num-samples", "num", type=int, required=True,
              help="Number of images (--num-samples is the same flag; use it under torchrun, whose own "
                   "parser mistakes --num for an abbreviation of --numa-binding).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Sampling steps (respaced chain; default: all T).")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm", show_default=True)
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM eta.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per shard.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quantize", type=click.Choice(["round", "truncate"]), default="round", show_default=True)
@click.option("--ema", "ema", default=None, help="EMA rate to use (default: the run's first), or 'raw'.")
@click.option("--device", default=None, help="Default: cuda when present, else cpu.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: the network under bfloat16 autocast (off by default: it was slower than fp32 on an "
                   "AVX-512-BF16 CPU without AMX; see benchmarks/train_sample.py).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def sample_main(checkpoint, num, steps, sampler, eta, out_dir, batch_size, seed, quantize, ema, device, precision,
                progress):
    """Sample images from a checkpoint into OUT/shards/*.npz, OUT/samples.npz and OUT/grid.png.

    A rerun into the same folder makes only the missing shards. Under torchrun the shards are
    split across processes."""
    from iddpm_core.sample import sample_to_dir

    if ema not in (None, "raw"):
        try:
            ema = float(ema)
        except ValueError:
            raise click.UsageError(f"--ema must be a rate such as 0.9999 or 'raw', got {ema!r}") from None
    try:
        summary = sample_to_dir(checkpoint, out_dir, num, steps, sampler=sampler, eta=eta, seed=seed,
                                batch_size=batch_size, quantize=quantize, ema_rate=ema, device=device,
                                progress=progress, precision=precision)
    except (ValueError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from exc
    import os
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(json.dumps({k: summary[k] for k in ("samples", "grid", "shards", "shards_reused")}))
