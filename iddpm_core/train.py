"""The trainer: AdamW, EMA, micro-batches, timestep samplers, logs, checkpoints, exact resume, DDP.

``train(run_config, out_dir)`` writes

- ``OUT/tb/``: TensorBoard scalars ``train/loss``, ``train/mse``, ``train/vb``, ``train/loss_q0..3``,
  ``train/grad_norm``, ``train/lr``, ``train/images_per_sec``, ``train/train_flops``,
  ``train/images_seen``;
- ``OUT/metrics.csv``: the same numbers, one row per logging step;
- ``OUT/samples/step_XXXXXX.png``: grids of samples from the first EMA;
- ``OUT/checkpoints/latest.pt`` and ``ckpt_XXXXXX.pt``: model, EMA weights, optimiser,
  timestep-sampler state, RNG states, step, images seen, training FLOPs, configs, data description;
- ``OUT/run_config.json``, ``OUT/summary.json`` (the returned summary) and, when the callback
  returns numbers, ``OUT/callback_metrics.csv``.

Determinism. The data order, timesteps, noise and flips of step s are drawn for the whole global
batch (batch_size x processes) from generators seeded by (seed, s) (and the epoch), and each process
takes its slice. So a run gives the same updates whatever the number of processes (up to float
summation order, and dropout aside), and a resumed run continues exactly: nothing random depends on how many steps
ran in this process. The global torch RNG (dropout) is seeded per process and saved in checkpoints.

Gradients: each micro-batch's loss is the importance-weighted per-example loss summed and divided by
the per-process batch size, so gradients add up to the batch mean; processes then average theirs.

Logged values: ``loss``, ``mse`` and ``vb`` are importance-weighted means (unbiased estimates of
their uniform-timestep means); ``loss_qk`` is the plain mean loss of the examples whose t lies in the
k-th quarter of [0, T). Values are averaged over the logging interval and over processes.

Code: :class:`TrainLoop` holds one run (set-up, resume, step, log, save, grid); the pieces of one
optimiser step are in :mod:`iddpm_core.train_step`, the logs in :mod:`iddpm_core.train_logs`, the
seeds and RNG states in :mod:`iddpm_core.seeding` and the resume rules in :mod:`iddpm_core.config`.
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from iddpm_core import distributed as dist_utils
from iddpm_core.config import ResumeError, RunConfig, TrainConfig, load_run_config, merge_resume_config
from iddpm_core.ema import EMA
from iddpm_core.io import write_text
from iddpm_core.seeding import rng_state, seed_from, seed_process, set_rng_state
from iddpm_core.train_step import build_optimizer, forward_backward, lr_at, optimizer_step

LATEST = "latest.pt"


# ----------------------------------------------------------------------------- small pieces

def batch_indices(n: int, seed: int, step: int, global_batch: int) -> np.ndarray:
    """Dataset indices of the global batch of ``step``: consecutive positions in an endless stream of
    epochs, each a permutation of range(n) seeded by (seed, epoch)."""
    start = step * global_batch
    out = np.empty(global_batch, np.int64)
    filled, pos = 0, start
    while filled < global_batch:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng(seed_from(seed, epoch, 1)).permutation(n)
        take = min(global_batch - filled, n - offset)
        out[filled:filled + take] = perm[offset:offset + take]
        filled += take
        pos += take
    return out


def _to_safe(obj):
    """numpy arrays and scalars -> torch tensors / Python numbers, so checkpoints load with weights_only."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_safe(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------- set-up

def _open_data(cfg: TrainConfig, model_config):
    from iddpm_core.data import load_source

    src = load_source(cfg.data, root=cfg.data_root)
    want = (model_config.image_size, model_config.image_size, model_config.in_channels)
    if tuple(src.shape) != want:
        raise ValueError(f"data {cfg.data!r} holds images of shape {tuple(src.shape)} (H, W, C) but the model "
                         f"expects {want}: set the model's image_size/in_channels to match")
    if model_config.num_classes and not src.has_labels:
        raise ValueError(f"the model is class-conditional (num_classes={model_config.num_classes}) but data "
                         f"{cfg.data!r} has no labels")
    if model_config.num_classes and len(src) and int(np.max(src.labels)) >= model_config.num_classes:
        raise ValueError(f"data {cfg.data!r} has label {int(np.max(src.labels))} >= num_classes="
                         f"{model_config.num_classes}")
    return src


def _resolve_resume(resume, ckpt_dir: Path) -> Path | None:
    latest = ckpt_dir / LATEST
    if resume is None:
        if latest.exists():
            raise ResumeError(f"{latest} exists: resume it (resume='auto' / --resume auto) or use another "
                              "output folder")
        return None
    if resume == "auto":
        return latest if latest.exists() else None
    path = Path(resume)
    if not path.exists():
        raise ResumeError(f"checkpoint to resume not found: {path}")
    return path


def train(run_config: RunConfig | None, out_dir: str | os.PathLike, resume: str | os.PathLike | None = None,
          callback: Callable | None = None, progress: bool = True) -> dict:
    """Train per ``run_config`` into ``out_dir`` until ``run_config.train.steps`` steps in total.

    ``resume``: None (fresh run; refused if ``out_dir`` already holds a checkpoint), ``"auto"``
    (continue from ``out_dir/checkpoints/latest.pt`` if present), or a checkpoint path. The step is
    read from inside the checkpoint. With ``run_config`` None the stored config is used.

    ``callback(step, model, ema, info)`` runs on every process after each optimiser step (``step`` =
    steps done; ``info``: diffusion, run_config, out_dir, rank, world_size, images_seen, train_flops,
    metrics = the last logged row or None, optimizer, timestep_sampler). A returned dict of numbers
    is logged to TensorBoard as ``callback/<name>`` and to ``callback_metrics.csv`` (rank 0).

    Runs multi-process when started by torchrun (WORLD_SIZE > 1). Returns a summary dict.
    """
    out = Path(out_dir)
    device_spec = run_config.train.device if run_config is not None else "auto"
    device = dist_utils.pick_device(device_spec)
    created = dist_utils.init_from_env(device)
    try:
        return TrainLoop(run_config, out, resume, callback, progress, device).run()
    finally:
        if created:
            dist_utils.cleanup()


class TrainLoop:
    """One training run, in the order it happens: set-up (:meth:`__init__`: configs, data, model,
    optimiser, EMA, timestep sampler), :meth:`resume` or a fresh seed, then :meth:`run`, which
    repeats :meth:`run_step` (the global batch, forward-backward, the optimiser step) with
    :meth:`log`, :meth:`write_grid` and :meth:`save` at their intervals, and returns the summary."""

    def __init__(self, run_config: RunConfig | None, out: Path, resume, callback: Callable | None,
                 progress: bool, device: torch.device):
        from iddpm_core.diffusion import LossSecondMomentSampler, build_diffusion, create_sampler
        from iddpm_core.models import build_model
        from iddpm_core.models.cost import count_parameters, training_flops_per_image

        self.out, self.callback, self.progress, self.device = out, callback, progress, device
        self.rank, self.world = dist_utils.get_rank(), dist_utils.get_world_size()
        self.ckpt_dir = out / "checkpoints"
        self.resume_path = _resolve_resume(resume, self.ckpt_dir)
        ckpt = self._read_checkpoint(run_config)
        self.mcfg, self.dcfg, self.tcfg = self.run_config.model, self.run_config.diffusion, self.run_config.train

        self.source = _open_data(self.tcfg, self.mcfg)
        self.diffusion = build_diffusion(self.dcfg)
        torch.manual_seed(seed_from(self.tcfg.seed, 0))
        self.model = build_model(self.mcfg).to(device)
        self.model.train()
        # Measured once, on a copy so this model's gradients stay untouched, and before the per-process
        # RNG is seeded below, so the measurement's dropout draws do not shift the training noise.
        self.flops_per_image = int(training_flops_per_image(copy.deepcopy(self.model)))
        self.n_params = count_parameters(self.model)
        dist_utils.broadcast_module(self.model)
        self.optimizer = build_optimizer(self.model, self.tcfg)
        self.ema = EMA(self.model, self.tcfg.ema_rates, warmup=self.tcfg.ema_warmup)
        self.sampler = create_sampler(self.tcfg.timestep_sampler, self.diffusion.num_timesteps)
        self.learns_from_losses = isinstance(self.sampler, LossSecondMomentSampler)

        self.step, self.images_seen, self.train_flops = 0, 0, 0
        if ckpt is not None:
            self.resume(ckpt)
        else:
            seed_process(self.tcfg.seed, self.rank)
        self.resume_step = self.step if ckpt is not None else None
        self.data_info = {"spec": self.tcfg.data, "name": getattr(self.source, "name", str(self.tcfg.data)),
                          "num_images": len(self.source), "shape": list(self.source.shape),
                          "has_labels": bool(self.source.has_labels)}
        self.logger = None
        if self.rank == 0:
            from iddpm_core.train_logs import TrainLogger

            out.mkdir(parents=True, exist_ok=True)
            self.run_config.save(out / "run_config.json")
            self.logger = TrainLogger(out, self.resume_step)

    # ------------------------------------------------------------------------- resume

    def _read_checkpoint(self, run_config: RunConfig | None) -> dict | None:
        """Sets ``self.run_config`` (the given one, or the stored one merged with it) and returns the
        checkpoint to resume, None for a fresh run."""
        from iddpm_core.checkpoint import load_checkpoint

        self.run_config = run_config
        if self.resume_path is None:
            if run_config is None:
                raise ValueError("train() needs a run_config for a fresh run")
            return None
        try:
            ckpt = load_checkpoint(self.resume_path, map_location="cpu")
        except (FileNotFoundError, ValueError) as exc:
            raise ResumeError(f"cannot resume from {self.resume_path}: {exc}") from exc
        for key in ("step", "optimizer", "ema", "sampler_state"):
            if key not in ckpt:
                raise ResumeError(f"cannot resume from {self.resume_path}: checkpoint has no '{key}' entry")
        self.run_config = merge_resume_config(load_run_config(ckpt, str(self.resume_path)), run_config)
        return ckpt

    def resume(self, ckpt: dict) -> None:
        """Model, optimiser, EMA, timestep sampler, counters and this process's RNG from ``ckpt``."""
        from iddpm_core.checkpoint import load_weights

        self.step = int(ckpt["step"])
        load_weights(self.model, ckpt["model"], str(self.resume_path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.ema.load_state_dict({"shadows": ckpt["ema"], "num_updates": ckpt.get("ema_num_updates", self.step)})
        self.sampler.load_state_dict(ckpt["sampler_state"])
        self.images_seen, self.train_flops = int(ckpt.get("images_seen", 0)), int(ckpt.get("train_flops", 0))
        states = ckpt.get("rng") or []
        if len(states) == self.world:
            set_rng_state(states[self.rank])
        else:
            warnings.warn(f"{self.resume_path} holds RNG states of {len(states)} process(es), this run has "
                          f"{self.world}: reseeding the per-process RNG (dropout noise will differ from an "
                          "unbroken run)")
            seed_process(self.tcfg.seed + self.step, self.rank)

    # ------------------------------------------------------------------------- one step

    def global_batch(self):
        """This process's slice of step ``self.step``'s global batch (identical on every process):
        images (flipped where drawn), timesteps, importance weights, noise and labels, on the device."""
        from iddpm_core.data import to_model_range

        tcfg, B, size = self.tcfg, self.tcfg.batch_size, self.mcfg.image_size
        G = B * self.world
        gen = torch.Generator().manual_seed(seed_from(tcfg.seed, self.step, 3))
        idx = batch_indices(len(self.source), tcfg.seed, self.step, G)
        t_all, w_all = self.sampler.sample(G, generator=gen)
        noise_all = torch.randn((G, self.mcfg.in_channels, size, size), generator=gen)
        flip_all = torch.rand(G, generator=gen) < 0.5 if tcfg.flip else None
        sl = slice(self.rank * B, (self.rank + 1) * B)
        images, labels = self.source.batch(idx[sl])
        x = to_model_range(images)
        if flip_all is not None:
            x = torch.where(flip_all[sl, None, None, None], x.flip(-1), x)
        dev = self.device
        y = torch.as_tensor(labels, device=dev) if self.mcfg.num_classes else None
        return x.to(dev), t_all[sl].to(dev), w_all[sl].to(dev), noise_all[sl].to(dev), y

    def run_step(self) -> None:
        """One optimiser step: forward-backward over micro-batches (gradients sum to the batch mean),
        gradients averaged over processes, the timestep sampler fed, then the step and the EMA."""
        x, t, w, noise, y = self.global_batch()
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.step, self.tcfg)
        local_losses = forward_backward(self.model, self.diffusion, x, t, w, noise, y,
                                        self.tcfg.microbatch or self.tcfg.batch_size, self.acc, self.has_terms,
                                        self.tcfg.precision)
        dist_utils.average_gradients(self.model.parameters())
        if self.learns_from_losses:
            self.sampler.update_with_local_losses(t, torch.cat(local_losses))
        grad_norm = optimizer_step(self.model, self.optimizer, self.ema, self.tcfg.grad_clip)
        self.acc[12] += grad_norm.double()
        self.acc[13] += 1
        G = self.tcfg.batch_size * self.world
        self.step += 1
        self.images_seen += G
        self.train_flops += self.flops_per_image * G

    # ------------------------------------------------------------------------- logs, grids, checkpoints

    def log(self) -> dict:
        """The row of the interval just ended (averaged over it and over processes), to the logs on
        rank 0; the accumulators restart."""
        acc, step = self.acc, self.step
        tot = dist_utils.all_reduce_sum(acc).cpu().clone()
        tot[12:] = acc[12:].cpu()  # the gradient norm is already global
        now = time.time()
        n = max(float(tot[3]), 1.0)
        row = {"step": step, "images_seen": self.images_seen, "train_flops": self.train_flops,
               "grad_norm": float(tot[12] / max(float(tot[13]), 1.0)), "lr": lr_at(step - 1, self.tcfg),
               "images_per_sec": (self.images_seen - self.last_log_images) / max(now - self.last_log_time, 1e-9),
               "wall_time": now - self.start_time}
        for k, key in enumerate(("loss", "mse", "vb")):
            row[key] = float(tot[k]) / n if key in self.has_terms else float("nan")
        for q in range(4):
            row[f"loss_q{q}"] = float(tot[4 + q] / tot[8 + q]) if tot[8 + q] > 0 else float("nan")
        acc.zero_()
        self.last_log_time, self.last_log_images, self.last_row = now, self.images_seen, row
        if self.logger is not None:
            self.logger.metrics(row)
        return row

    def save(self, periodic: bool) -> Path:
        """``latest.pt`` (and ``ckpt_<step>.pt`` when ``periodic``), written by rank 0 with every
        process's RNG state; all processes wait for it."""
        from iddpm_core.checkpoint import save_checkpoint

        states = _to_safe(dist_utils.all_gather_object(rng_state()))
        path = self.ckpt_dir / LATEST
        if self.rank == 0:
            ema = self.ema
            extra = dict(diffusion_config=self.dcfg.to_dict(), train_config=self.tcfg.to_dict(),
                         ema={k: {n: t.detach().cpu() for n, t in v.items()} for k, v in ema.shadows.items()},
                         ema_num_updates=ema.num_updates, optimizer=self.optimizer.state_dict(),
                         sampler_state=_to_safe(self.sampler.state_dict()), rng=states, step=self.step,
                         images_seen=self.images_seen, train_flops=self.train_flops,
                         flops_per_image=self.flops_per_image, num_parameters=self.n_params,
                         world_size=self.world, data=self.data_info)
            if periodic:
                save_checkpoint(self.ckpt_dir / f"ckpt_{self.step:06d}.pt", self.model, self.mcfg, **extra)
            save_checkpoint(path, self.model, self.mcfg, **extra)
        dist_utils.barrier()
        self.last_saved = self.step
        return path

    def write_grid(self) -> None:
        """``samples/step_<step>.png``: a grid sampled from the first EMA (the raw weights without one)."""
        from iddpm_core.sample import SamplingModel, grid_scale, make_grid, sample_images, save_png

        tcfg = self.tcfg
        src = self.ema.copy_model(self.model, tcfg.ema_rates[0]) if tcfg.ema_rates else copy.deepcopy(self.model)
        spec = tcfg.sample_steps
        sampler_name = "ddim" if spec.startswith("ddim") else "ddpm"
        k = int(spec[4:]) if sampler_name == "ddim" else (int(spec) if spec else None)
        sm = SamplingModel(src, self.mcfg, self.dcfg, precision=tcfg.precision)
        imgs = sample_images(sm, tcfg.sample_num, k, sampler=sampler_name, seed=tcfg.seed,
                             batch_size=tcfg.sample_num, progress=False)
        save_png(self.out / "samples" / f"step_{self.step:06d}.png", make_grid(imgs),
                 scale=grid_scale(self.mcfg.image_size))

    def call_back(self) -> None:
        info = {"diffusion": self.diffusion, "run_config": self.run_config, "out_dir": self.out,
                "rank": self.rank, "world_size": self.world, "images_seen": self.images_seen,
                "train_flops": self.train_flops, "metrics": self.last_row, "optimizer": self.optimizer,
                "timestep_sampler": self.sampler}
        extra = self.callback(self.step, self.model, self.ema, info)
        if self.logger is not None and isinstance(extra, dict) and extra:
            self.logger.callback(self.step, extra)

    # ------------------------------------------------------------------------- the loop

    def run(self) -> dict:
        """Train to ``train.steps`` steps in total; returns the summary (also OUT/summary.json)."""
        from tqdm.auto import tqdm

        tcfg, rank = self.tcfg, self.rank
        # interval accumulators: weighted loss/mse/vb sums, example count, quarter sums/counts, grad norm
        # sum (kept on the device: no host sync per step)
        self.acc = torch.zeros(4 + 8 + 2, dtype=torch.float64, device=self.device)
        self.has_terms = set()
        self.last_row, self.last_log_time, self.last_log_images = None, time.time(), self.images_seen
        self.start_time = time.time()
        self.last_saved = self.step if self.resume_step is not None else -1
        first_step = self.step
        bar = tqdm(total=tcfg.steps, initial=self.step, desc="train",
                   disable=not (self.progress and rank == 0), dynamic_ncols=True)
        while self.step < tcfg.steps:
            self.run_step()
            bar.update(1)
            step = self.step
            if step % tcfg.log_interval == 0 or step == tcfg.steps:
                row = self.log()
                if rank == 0:
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
            if rank == 0 and tcfg.sample_interval and step % tcfg.sample_interval == 0:
                self.write_grid()
            if tcfg.save_interval and step % tcfg.save_interval == 0:
                self.save(periodic=True)
            if self.callback is not None:
                self.call_back()
        bar.close()
        return self.finish(first_step)

    def finish(self, first_step: int) -> dict:
        """The last checkpoint and grid when the loop did not just write them; logs closed; the summary."""
        step, tcfg = self.step, self.tcfg
        if self.last_saved != step:
            self.save(periodic=False)
        if self.rank == 0 and step > first_step and (not tcfg.sample_interval or step % tcfg.sample_interval):
            self.write_grid()
        if self.logger is not None:
            self.logger.close()
        out = self.out
        summary = {"out_dir": str(out), "step": step, "images_seen": self.images_seen,
                   "train_flops": self.train_flops, "flops_per_image": self.flops_per_image,
                   "num_parameters": self.n_params, "world_size": self.world,
                   "checkpoint": str(self.ckpt_dir / LATEST), "metrics_csv": str(out / "metrics.csv"),
                   "tb_dir": str(out / "tb"), "samples_dir": str(out / "samples"),
                   "last_metrics": self.last_row,
                   "resumed_from": str(self.resume_path) if self.resume_path else None,
                   "run_config": self.run_config.to_dict()}
        if self.rank == 0:
            write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        return summary
