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
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from iddpm_core import distributed as dist_utils
from iddpm_core.config import RunConfig, TrainConfig
from iddpm_core.ema import EMA
from iddpm_core.io import write_text
from iddpm_core.sample import seed_from

CSV_COLUMNS = ("step", "images_seen", "train_flops", "loss", "mse", "vb", "loss_q0", "loss_q1", "loss_q2",
               "loss_q3", "grad_norm", "lr", "images_per_sec", "wall_time")
# Train-config fields that may change when a run is resumed; the others must match the checkpoint.
RESUMABLE_FIELDS = ("steps", "log_interval", "sample_interval", "save_interval", "sample_num", "sample_steps",
                    "device", "precision")
LATEST = "latest.pt"


class ResumeError(ValueError):
    """A run cannot be resumed as asked; the message names the file or the fields."""


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then constant."""
    if cfg.lr_warmup_steps > 0:
        return cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps)
    return cfg.lr


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


def rng_state() -> dict:
    """This process's RNG states (torch, numpy, python, cuda) as plain numpy/Python objects, which
    gather across processes by pickling (tensors in ``all_gather_object`` fail to unpickle in some
    torch versions); :func:`_to_safe` turns them into tensors for the checkpoint."""
    st = {"torch": torch.get_rng_state().numpy(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = [s.numpy() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(torch.as_tensor(np.asarray(st["torch"], dtype=np.uint8)))
    np_state = st["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.as_tensor(np.asarray(c, dtype=np.uint8)) for c in st["cuda"]])


def seed_process(seed: int, rank: int) -> None:
    s = seed_from(seed, rank, 2)
    torch.manual_seed(s)
    np.random.seed(s % (2 ** 32))
    random.seed(s)


def _quarter_stats(t: torch.Tensor, loss: torch.Tensor, T: int) -> torch.Tensor:
    """[sum of loss per quarter (4), count per quarter (4)] for timesteps t of a T-step chain
    (on the tensors' device, without a host sync)."""
    q = (t.long() * 4 // T).clamp(0, 3)
    sums = torch.zeros(4, dtype=torch.float64, device=loss.device).index_add_(0, q, loss.detach().double())
    counts = torch.bincount(q, minlength=4).double()
    return torch.cat([sums, counts])


class _MetricsCSV:
    """metrics.csv: rows appended (and flushed) as they come; on resume, rows after the resumed step
    (written before a crash, after the last checkpoint) are dropped by an atomic rewrite."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh)
                        if r.get("step", "").isdigit() and int(r["step"]) <= resume_step
                        and len(r) == len(CSV_COLUMNS) and None not in r.values()]
            lines = [",".join(CSV_COLUMNS)] + [",".join(r[c] for c in CSV_COLUMNS) for r in rows]
            write_text(path, "\n".join(lines) + "\n")
        elif resume_step is None or not path.exists():
            write_text(path, ",".join(CSV_COLUMNS) + "\n")

    def append(self, row: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(",".join(_fmt(row.get(c)) for c in CSV_COLUMNS) + "\n")
            fh.flush()


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


# ----------------------------------------------------------------------------- one optimiser step

def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters; its fused kernel (one pass per tensor) where torch has one for
    the parameters' device, which gives the same update as the per-tensor loop up to float rounding."""
    params = list(model.parameters())
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def forward_backward(model, diffusion, x, t, w, noise, y, microbatch: int, acc: torch.Tensor,
                     has_terms: set, precision: str = "fp32") -> list[torch.Tensor]:
    """Zero the gradients, then forward and backward over micro-batches of ``microbatch`` examples:
    each micro-batch's importance-weighted loss summed and divided by the batch size, so gradients sum
    to the batch mean. Adds the weighted loss/mse/vb sums, the example count and the quarter statistics
    to ``acc`` (no host sync) and returns the per-example losses of each micro-batch. ``precision``
    "bf16" runs the model's forward under bfloat16 autocast (losses stay float32)."""
    from iddpm_core.precision import with_precision

    B, T = x.shape[0], diffusion.num_timesteps
    model.zero_grad(set_to_none=True)
    net = with_precision(model, precision, x.device.type)
    local_losses = []
    for i in range(0, B, microbatch):
        j = slice(i, min(i + microbatch, B))
        kwargs = {"y": y[j]} if y is not None else None
        terms = diffusion.training_losses(net, x[j], t[j], noise=noise[j], model_kwargs=kwargs)
        ((terms["loss"] * w[j]).sum() / B).backward()
        local_losses.append(terms["loss"].detach())
        with torch.no_grad():
            wj = w[j].double()
            for n, key in enumerate(("loss", "mse", "vb")):
                if key in terms:
                    has_terms.add(key)
                    acc[n] += (terms[key].detach().double() * wj).sum()
            acc[3] += j.stop - j.start
            acc[4:12] += _quarter_stats(t[j], terms["loss"], T)
    return local_losses


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA,
                   grad_clip: float) -> torch.Tensor:
    """Global gradient norm (returned, a 0-d tensor), clipping to ``grad_clip`` when > 0, the optimiser
    step and the EMA update."""
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0 or not hasattr(torch.nn.utils, "get_total_norm"):
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    else:  # the norm only: scaling every gradient by 1 would be a wasted pass
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    optimizer.step()
    ema.update(model)
    return grad_norm


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


def complete_model_config(d: dict) -> dict:
    """Fill a run-config dict's missing model fields from the data: ``image_size`` and ``in_channels``
    from the images' shape; ``attention_resolutions`` = (16,) when the model has a 16-pixel level, else
    the largest level below 16 that is not the full image (none for a one-level model). In place."""
    from iddpm_core.models import ModelConfig

    model, train_d = d.setdefault("model", {}), d.setdefault("train", {})
    if "image_size" not in model or "in_channels" not in model:
        from iddpm_core.data import load_source

        tcfg = TrainConfig.from_dict(train_d)
        h, w, c = load_source(tcfg.data, root=tcfg.data_root).shape
        if h != w:
            raise ValueError(f"data {tcfg.data!r} holds {h}x{w} images; the models need square images")
        model.setdefault("image_size", int(h))
        model.setdefault("in_channels", int(c))
    if "attention_resolutions" not in model:
        probe = ModelConfig.from_dict({k: v for k, v in model.items() if k != "attention_resolutions"}
                                      | {"attention_resolutions": ()})
        levels = probe.resolutions()
        below = [r for r in levels if r <= 16 and r != probe.image_size]
        model["attention_resolutions"] = [16] if 16 in levels else ([max(below)] if below else [])
    return d


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


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def check_resume_changes(stored: dict, given: dict) -> None:
    """Refuse, naming each setting with both values, every field of ``given`` ({section: {field:
    value}}, possibly partial) that differs from the run-config dict ``stored`` of the checkpoint,
    except the train fields in RESUMABLE_FIELDS."""
    diffs = []
    for section in ("model", "diffusion", "train"):
        for k, v in sorted((given.get(section) or {}).items()):
            old = (stored.get(section) or {}).get(k)
            if not (section == "train" and k in RESUMABLE_FIELDS) and _plain(old) != _plain(v):
                diffs.append(f"{section}.{k} (checkpoint {_plain(old)!r}, given {_plain(v)!r})")
    if diffs:
        raise ResumeError(f"cannot resume with a different config: {', '.join(diffs)} differ from the "
                          f"checkpoint (only train.{', train.'.join(RESUMABLE_FIELDS)} may change)")


def merge_resume_config(stored: RunConfig, given: RunConfig | None) -> RunConfig:
    """The config of a resumed run: the stored one, with the given train fields in RESUMABLE_FIELDS.
    Any other difference is refused, naming the fields."""
    if given is None:
        return stored
    check_resume_changes(stored.to_dict(), given.to_dict())
    merged = copy.deepcopy(stored)
    for k in RESUMABLE_FIELDS:
        setattr(merged.train, k, getattr(given.train, k))
    merged.train.validate()
    return merged


def load_run_config(ckpt: dict, where: str) -> RunConfig:
    for key in ("diffusion_config", "train_config"):
        if key not in ckpt:
            raise ResumeError(f"{where}: checkpoint has no {key}; it was not written by the trainer")
    return RunConfig.from_dict({"model": ckpt["model_config"], "diffusion": ckpt["diffusion_config"],
                                "train": ckpt["train_config"]}, where=where)


# ----------------------------------------------------------------------------- the trainer

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
        return _train(run_config, out, resume, callback, progress, device)
    finally:
        if created:
            dist_utils.cleanup()


def _train(run_config, out: Path, resume, callback, progress, device) -> dict:
    from tqdm.auto import tqdm

    from iddpm_core.checkpoint import load_checkpoint, load_weights
    from iddpm_core.data import to_model_range
    from iddpm_core.diffusion import LossSecondMomentSampler, build_diffusion, create_sampler
    from iddpm_core.models import build_model
    from iddpm_core.models.cost import count_parameters, training_flops_per_image

    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    ckpt_dir = out / "checkpoints"
    resume_path = _resolve_resume(resume, ckpt_dir)
    ckpt = None
    if resume_path is not None:
        try:
            ckpt = load_checkpoint(resume_path, map_location="cpu")
        except (FileNotFoundError, ValueError) as exc:
            raise ResumeError(f"cannot resume from {resume_path}: {exc}") from exc
        for key in ("step", "optimizer", "ema", "sampler_state"):
            if key not in ckpt:
                raise ResumeError(f"cannot resume from {resume_path}: checkpoint has no '{key}' entry")
        run_config = merge_resume_config(load_run_config(ckpt, str(resume_path)), run_config)
    elif run_config is None:
        raise ValueError("train() needs a run_config for a fresh run")
    mcfg, dcfg, tcfg = run_config.model, run_config.diffusion, run_config.train

    source = _open_data(tcfg, mcfg)
    diffusion = build_diffusion(dcfg)
    T = diffusion.num_timesteps
    torch.manual_seed(seed_from(tcfg.seed, 0))
    model = build_model(mcfg).to(device)
    model.train()
    # Measured once, on a copy so this model's gradients stay untouched, and before the per-process
    # RNG is seeded below, so the measurement's dropout draws do not shift the training noise.
    flops_per_image = int(training_flops_per_image(copy.deepcopy(model)))
    n_params = count_parameters(model)
    dist_utils.broadcast_module(model)
    optimizer = build_optimizer(model, tcfg)
    ema = EMA(model, tcfg.ema_rates, warmup=tcfg.ema_warmup)
    sampler = create_sampler(tcfg.timestep_sampler, T)
    learns_from_losses = isinstance(sampler, LossSecondMomentSampler)

    step, images_seen, train_flops = 0, 0, 0
    if ckpt is not None:
        step = int(ckpt["step"])
        load_weights(model, ckpt["model"], str(resume_path))
        optimizer.load_state_dict(ckpt["optimizer"])
        ema.load_state_dict({"shadows": ckpt["ema"], "num_updates": ckpt.get("ema_num_updates", step)})
        sampler.load_state_dict(ckpt["sampler_state"])
        images_seen, train_flops = int(ckpt.get("images_seen", 0)), int(ckpt.get("train_flops", 0))
        states = ckpt.get("rng") or []
        if len(states) == world:
            set_rng_state(states[rank])
        else:
            warnings.warn(f"{resume_path} holds RNG states of {len(states)} process(es), this run has {world}: "
                          "reseeding the per-process RNG (dropout noise will differ from an unbroken run)")
            seed_process(tcfg.seed + step, rank)
    else:
        seed_process(tcfg.seed, rank)
    resume_step = step if ckpt is not None else None

    B, G = tcfg.batch_size, tcfg.batch_size * world
    mb = tcfg.microbatch or B
    size, channels = mcfg.image_size, mcfg.in_channels
    data_info = {"spec": tcfg.data, "name": getattr(source, "name", str(tcfg.data)), "num_images": len(source),
                 "shape": list(source.shape), "has_labels": bool(source.has_labels)}

    writer = csv_log = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        run_config.save(out / "run_config.json")
        from torch.utils.tensorboard import SummaryWriter
        # TensorBoard keeps what metrics.csv keeps: the points up to the resumed step (its own point
        # included); later ones, logged after the checkpoint by a run that was killed, are purged. A
        # fresh run purges everything an earlier attempt logged before it was killed without a checkpoint.
        writer = SummaryWriter(str(out / "tb"), purge_step=0 if resume_step is None else resume_step + 1)
        csv_log = _MetricsCSV(out / "metrics.csv", resume_step)
        _trim_callback_csv(out / "callback_metrics.csv", resume_step)

    def save(step_done: int, periodic: bool) -> Path:
        states = _to_safe(dist_utils.all_gather_object(rng_state()))
        path = ckpt_dir / LATEST
        if rank == 0:
            from iddpm_core.checkpoint import save_checkpoint
            extra = dict(diffusion_config=dcfg.to_dict(), train_config=tcfg.to_dict(),
                         ema={k: {n: t.detach().cpu() for n, t in v.items()} for k, v in ema.shadows.items()},
                         ema_num_updates=ema.num_updates, optimizer=optimizer.state_dict(),
                         sampler_state=_to_safe(sampler.state_dict()), rng=states, step=step_done,
                         images_seen=images_seen, train_flops=train_flops, flops_per_image=flops_per_image,
                         num_parameters=n_params, world_size=world, data=data_info)
            if periodic:
                save_checkpoint(ckpt_dir / f"ckpt_{step_done:06d}.pt", model, mcfg, **extra)
            save_checkpoint(path, model, mcfg, **extra)
        dist_utils.barrier()
        return path

    def write_grid(step_done: int) -> None:
        from iddpm_core.sample import SamplingModel, grid_scale, make_grid, sample_images, save_png

        src_model = ema.copy_model(model, tcfg.ema_rates[0]) if tcfg.ema_rates else copy.deepcopy(model)
        spec = tcfg.sample_steps
        sampler_name = "ddim" if spec.startswith("ddim") else "ddpm"
        k = int(spec[4:]) if sampler_name == "ddim" else (int(spec) if spec else None)
        sm = SamplingModel(src_model, mcfg, dcfg, precision=tcfg.precision)
        imgs = sample_images(sm, tcfg.sample_num, k, sampler=sampler_name, seed=tcfg.seed,
                             batch_size=tcfg.sample_num, progress=False)
        save_png(out / "samples" / f"step_{step_done:06d}.png", make_grid(imgs), scale=grid_scale(size))

    # interval accumulators: weighted loss/mse/vb sums, example count, quarter sums/counts, grad norm sum
    # (kept on the device: no host sync per step)
    acc = torch.zeros(4 + 8 + 2, dtype=torch.float64, device=device)
    has_terms = set()
    last_row, last_log_time, last_log_images = None, time.time(), images_seen
    start_time = time.time()
    last_saved = step if ckpt is not None else -1
    first_step = step
    bar = tqdm(total=tcfg.steps, initial=step, desc="train", disable=not (progress and rank == 0),
               dynamic_ncols=True)
    while step < tcfg.steps:
        # ---- the global batch of this step, identical on every process; take our slice
        gen = torch.Generator().manual_seed(seed_from(tcfg.seed, step, 3))
        idx = batch_indices(len(source), tcfg.seed, step, G)
        t_all, w_all = sampler.sample(G, generator=gen)
        noise_all = torch.randn((G, channels, size, size), generator=gen)
        flip_all = torch.rand(G, generator=gen) < 0.5 if tcfg.flip else None
        sl = slice(rank * B, (rank + 1) * B)
        images, labels = source.batch(idx[sl])
        x = to_model_range(images)
        if flip_all is not None:
            x = torch.where(flip_all[sl, None, None, None], x.flip(-1), x)
        x, t, w, noise = x.to(device), t_all[sl].to(device), w_all[sl].to(device), noise_all[sl].to(device)
        y = torch.as_tensor(labels, device=device) if mcfg.num_classes else None

        # ---- forward/backward over micro-batches; gradients sum to the batch mean
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, tcfg)
        local_losses = forward_backward(model, diffusion, x, t, w, noise, y, mb, acc, has_terms,
                                        tcfg.precision)
        dist_utils.average_gradients(model.parameters())
        if learns_from_losses:
            sampler.update_with_local_losses(t, torch.cat(local_losses))
        grad_norm = optimizer_step(model, optimizer, ema, tcfg.grad_clip)
        acc[12] += grad_norm.double()
        acc[13] += 1
        step += 1
        images_seen += G
        train_flops += flops_per_image * G
        bar.update(1)

        # ---- logs
        if step % tcfg.log_interval == 0 or step == tcfg.steps:
            tot = dist_utils.all_reduce_sum(acc).cpu().clone()
            tot[12:] = acc[12:].cpu()  # the gradient norm is already global
            now = time.time()
            n = max(float(tot[3]), 1.0)
            row = {"step": step, "images_seen": images_seen, "train_flops": train_flops,
                   "grad_norm": float(tot[12] / max(float(tot[13]), 1.0)), "lr": lr_at(step - 1, tcfg),
                   "images_per_sec": (images_seen - last_log_images) / max(now - last_log_time, 1e-9),
                   "wall_time": now - start_time}
            for k, key in enumerate(("loss", "mse", "vb")):
                row[key] = float(tot[k]) / n if key in has_terms else float("nan")
            for q in range(4):
                row[f"loss_q{q}"] = float(tot[4 + q] / tot[8 + q]) if tot[8 + q] > 0 else float("nan")
            acc.zero_()
            last_log_time, last_log_images, last_row = now, images_seen, row
            if rank == 0:
                for key, v in row.items():
                    if key not in ("step", "wall_time") and not (isinstance(v, float) and math.isnan(v)):
                        writer.add_scalar(f"train/{key}", v, step)
                writer.flush()
                csv_log.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")

        if rank == 0 and tcfg.sample_interval and step % tcfg.sample_interval == 0:
            write_grid(step)
        if tcfg.save_interval and step % tcfg.save_interval == 0:
            save(step, periodic=True)
            last_saved = step
        if callback is not None:
            info = {"diffusion": diffusion, "run_config": run_config, "out_dir": out, "rank": rank,
                    "world_size": world, "images_seen": images_seen, "train_flops": train_flops,
                    "metrics": last_row, "optimizer": optimizer, "timestep_sampler": sampler}
            extra = callback(step, model, ema, info)
            if rank == 0 and isinstance(extra, dict) and extra:
                _log_callback(out, writer, step, extra)
    bar.close()

    if last_saved != step:
        save(step, periodic=False)
    if rank == 0 and step > first_step and (not tcfg.sample_interval or step % tcfg.sample_interval):
        write_grid(step)
    if writer is not None:
        writer.close()
    summary = {"out_dir": str(out), "step": step, "images_seen": images_seen, "train_flops": train_flops,
               "flops_per_image": flops_per_image, "num_parameters": n_params, "world_size": world,
               "checkpoint": str(ckpt_dir / LATEST), "metrics_csv": str(out / "metrics.csv"),
               "tb_dir": str(out / "tb"), "samples_dir": str(out / "samples"),
               "last_metrics": last_row, "resumed_from": str(resume_path) if resume_path else None,
               "run_config": run_config.to_dict()}
    if rank == 0:
        write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _trim_callback_csv(path: Path, resume_step: int | None) -> None:
    """callback_metrics.csv as TensorBoard will show it: rows up to ``resume_step``; none for a fresh run."""
    if not path.exists():
        return
    if resume_step is None:
        path.unlink()
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines[1:] if line.split(",", 1)[0].isdigit() and int(line.split(",", 1)[0]) <= resume_step]
    write_text(path, "\n".join(lines[:1] + keep) + "\n")


def _log_callback(out: Path, writer, step: int, values: dict) -> None:
    path = out / "callback_metrics.csv"
    new = not path.exists()
    with open(path, "a") as fh:
        if new:
            fh.write("step,name,value\n")
        for k, v in values.items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            writer.add_scalar(f"callback/{k}", v, step)
            fh.write(f"{step},{k},{v!r}\n")
    writer.flush()
