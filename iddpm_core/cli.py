"""`iddpm-train` and `iddpm-sample`: thin click front ends over iddpm_core.train / sample."""

from __future__ import annotations

import json

import click
from click.core import ParameterSource

# flag name -> (config section, field, converter)
def _ints(s):
    s = s.strip()
    return tuple(int(v) for v in s.split(",")) if s else ()


def _opt_ints(s):
    """'' -> None (the default for the image size), else a tuple of ints."""
    return _ints(s) or None


def _floats(s):
    s = s.strip()
    return tuple(float(v) for v in s.split(",")) if s else ()


def _opt_int(s):
    return None if str(s).lower() in ("", "none", "0") else int(s)


_EXPECTED = {_ints: "comma-separated integers such as 1,2,2", _opt_ints: "comma-separated integers such as 1,2,2",
             _floats: "comma-separated numbers such as 0.9999", _opt_int: "an integer or 'none'",
             int: "an integer", float: "a number"}


def _convert(name: str, value, conv):
    """A flag's value converted for the config; a bad value is refused naming the flag."""
    if value is None or isinstance(value, bool):
        return value
    try:
        return conv(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not {_EXPECTED.get(conv, 'a valid value')}",
                                 param_hint=f"--{name.replace('_', '-')}") from None


FLAGS = {
    # model
    "model_kind": ("model", "kind", str), "image_size": ("model", "image_size", int),
    "in_channels": ("model", "in_channels", int), "base_channels": ("model", "base_channels", int),
    "channel_mult": ("model", "channel_mult", _opt_ints), "num_res_blocks": ("model", "num_res_blocks", int),
    "attention_resolutions": ("model", "attention_resolutions", _ints), "num_heads": ("model", "num_heads", int),
    "dropout": ("model", "dropout", float), "learn_sigma": ("model", "learn_sigma", bool),
    "num_classes": ("model", "num_classes", _opt_int), "scale_shift": ("model", "use_scale_shift_norm", bool),
    "solver": ("model", "solver", str), "solver_steps": ("model", "solver_steps", int),
    # diffusion
    "diffusion_steps": ("diffusion", "steps", int), "schedule": ("diffusion", "schedule", str),
    "mean_type": ("diffusion", "mean_type", str), "var_type": ("diffusion", "var_type", str),
    "loss": ("diffusion", "loss", str),
    # train
    "data": ("train", "data", str), "data_root": ("train", "data_root", str), "flip": ("train", "flip", bool),
    "batch_size": ("train", "batch_size", int), "microbatch": ("train", "microbatch", int),
    "lr": ("train", "lr", float), "weight_decay": ("train", "weight_decay", float),
    "lr_warmup_steps": ("train", "lr_warmup_steps", int), "ema_rates": ("train", "ema_rates", _floats),
    "ema_warmup": ("train", "ema_warmup", bool), "grad_clip": ("train", "grad_clip", float),
    "timestep_sampler": ("train", "timestep_sampler", str), "seed": ("train", "seed", int),
    "steps": ("train", "steps", int), "log_interval": ("train", "log_interval", int),
    "sample_interval": ("train", "sample_interval", int), "save_interval": ("train", "save_interval", int),
    "sample_num": ("train", "sample_num", int), "sample_steps": ("train", "sample_steps", str),
    "device": ("train", "device", str), "precision": ("train", "precision", str),
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="iddpm")
def train_main():
    """Train Improved-DDPM diffusion models."""


@train_main.command("run")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Run config (.json or .toml with [model], [diffusion], [train]); flags override it.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: tb/, metrics.csv, samples/, checkpoints/.")
@click.option("--resume", default=None, help="'auto' (OUT/checkpoints/latest.pt if present) or a checkpoint path.")
@click.option("--progress/--no-progress", default=True, show_default=True)
# model
@click.option("--model-kind", type=click.Choice(["unet", "cunet"]), default="unet", show_default=True)
@click.option("--image-size", type=int, default=None, help="Default: the data's.")
@click.option("--in-channels", type=int, default=None, help="Default: the data's.")
@click.option("--base-channels", type=int, default=32, show_default=True)
@click.option("--channel-mult", default="", help="e.g. '1,2,2' (default: per image size).")
@click.option("--num-res-blocks", type=int, default=1, show_default=True)
@click.option("--attention-resolutions", default=None,
              help="e.g. '16' or '' for none (default: 16 when the model has that level, else the largest level below 16).")
@click.option("--num-heads", type=int, default=4, show_default=True)
@click.option("--dropout", type=float, default=0.0, show_default=True)
@click.option("--learn-sigma/--no-learn-sigma", default=True, show_default=True)
@click.option("--num-classes", default="none", help="Class-conditional model with this many classes.")
@click.option("--scale-shift/--no-scale-shift", default=True, show_default=True)
@click.option("--solver", default="rk4", show_default=True, help="cunet ODE solver.")
@click.option("--solver-steps", type=int, default=1, show_default=True)
# diffusion
@click.option("--diffusion-steps", type=int, default=1000, show_default=True, help="T.")
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default="cosine", show_default=True)
@click.option("--mean-type", type=click.Choice(["epsilon", "x0", "xprev"]), default="epsilon", show_default=True)
@click.option("--var-type", type=click.Choice(["fixed_small", "fixed_large", "learned", "learned_range"]),
              default="learned_range", show_default=True)
@click.option("--loss", default="hybrid", show_default=True, help="simple, hybrid, vlb, mse, rescaled_mse, kl, rescaled_kl.")
# train
@click.option("--data", default="digits", show_default=True,
              help="digits, fashion-mnist:train, cifar10:train:FOLDER, an image folder or an .npz batch.")
@click.option("--data-root", default=None, help="Folder of the Fashion-MNIST IDX files.")
@click.option("--flip/--no-flip", default=False, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Per process.")
@click.option("--microbatch", type=int, default=0, show_default=True, help="0 = no split.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--lr-warmup-steps", type=int, default=0, show_default=True)
@click.option("--ema-rates", default="0.9999", show_default=True, help="Comma-separated EMA rates.")
@click.option("--ema-warmup/--no-ema-warmup", default=False, show_default=True)
@click.option("--grad-clip", type=float, default=0.0, show_default=True, help="0 = off.")
@click.option("--timestep-sampler", type=click.Choice(["uniform", "loss-second-moment"]), default="uniform",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=1000, show_default=True, help="Total optimiser steps.")
@click.option("--log-interval", type=int, default=10, show_default=True)
@click.option("--sample-interval", type=int, default=500, show_default=True, help="0 = only at the end.")
@click.option("--save-interval", type=int, default=1000, show_default=True, help="0 = only at the end.")
@click.option("--sample-num", type=int, default=64, show_default=True)
@click.option("--sample-steps", default="50", show_default=True, help="Grid sampler steps; 'ddimK' for DDIM.")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: the network under bfloat16 autocast (off by default: it was slower than fp32 on an "
                   "AVX-512-BF16 CPU without AMX; see benchmarks/train_sample.py).")
@click.pass_context
def run(ctx, config_file, out_dir, resume, progress, **flags):
    """Train a model (single process, or under torchrun for several)."""
    from pathlib import Path

    from iddpm_core.config import RunConfig
    from iddpm_core.train import ResumeError, check_resume_changes, complete_model_config, load_run_config, train

    explicit = {k for k in flags if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE,
                                                                    ParameterSource.ENVIRONMENT)}
    try:
        resume_ckpt = None
        if resume is not None:
            from iddpm_core.checkpoint import load_checkpoint
            path = Path(out_dir) / "checkpoints" / "latest.pt" if resume == "auto" else Path(resume)
            if path.exists() or resume != "auto":
                resume_ckpt = load_checkpoint(path)
        if resume_ckpt is not None:
            if config_file:
                raise click.UsageError("--config cannot be combined with resuming; the checkpoint holds the config")
            base = load_run_config(resume_ckpt, str(path)).to_dict()
            use = explicit
        else:
            base = RunConfig.read_file(config_file) if config_file else None
            if base is None:
                base = {"model": {}, "diffusion": {}, "train": {}}
                use = set(flags)  # defaults of the flags define the run
                for k in ("image_size", "in_channels", "attention_resolutions"):
                    if k not in explicit:
                        use.discard(k)
            else:
                use = explicit
        given = {"model": {}, "diffusion": {}, "train": {}}
        for name in use:
            section, field, conv = FLAGS[name]
            given[section][field] = _convert(name, flags[name], conv)
        if resume_ckpt is not None:  # before the merged config is validated, so the message names the flags
            check_resume_changes(base, given)
        for section, fields in given.items():
            base[section].update(fields)
        if resume_ckpt is None:
            complete_model_config(base)
        config = RunConfig.from_dict(base, where="command line")
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


# `iddpm-train sweep` lives in its own module, which builds on `run`'s flags above.
from iddpm_core.cli_sweep import sweep as _sweep  # noqa: E402

train_main.add_command(_sweep)
