"""Sampling from trained checkpoints: images as uint8 NHWC, sharded ``.npz`` output, grids.

Seeding: the images are cut into shards of ``batch_size``; shard k draws its class labels, its
starting noise and every step's noise from a CPU generator seeded from (seed, k). The result
therefore depends on (seed, batch_size, steps, sampler, eta) only: not on the device order, the
number of processes or interruptions. :func:`sample_images` and :func:`sample_to_dir` with the
same arguments give the same images.

Quantisation to uint8: ``"round"`` = ``((x + 1) * 127.5).round().clamp(0, 255)`` (default);
``"truncate"`` = Improved DDPM's ``((x + 1) * 127.5).clamp(0, 255).to(uint8)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from iddpm_core import distributed as dist_utils
from iddpm_core.checkpoint import SamplingModel, load_model
from iddpm_core.io import atomic_path, check_writable, file_sha256, save_npz, write_text
from iddpm_core.precision import check_precision, with_precision
from iddpm_core.seeding import seed_from

SAMPLERS = ("ddpm", "ddim")
QUANTIZE = ("round", "truncate")


def quantize(x: torch.Tensor, mode: str = "round") -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC by rounding or truncation (see module docstring)."""
    from iddpm_core.data import from_model_range

    if mode not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {mode!r}")
    return from_model_range(x, rounding=mode)


def respacing_for(steps: int | None, sampler: str, total: int) -> str:
    """Respacing spec for ``steps`` sampling steps: "K" for ddpm, "ddimK" for ddim, "" = all (None);
    0 steps is refused, not read as the full chain."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if steps is None:
        return ""
    if not 1 <= int(steps) <= total:
        raise ValueError(f"steps must lie in [1, {total}] (the model was trained with {total} steps), got {steps}")
    return f"ddim{int(steps)}" if sampler == "ddim" else str(int(steps))


def _resolve(checkpoint_or_model, diffusion_config, ema_rate, device) -> SamplingModel:
    if isinstance(checkpoint_or_model, SamplingModel):
        sm = checkpoint_or_model
    elif isinstance(checkpoint_or_model, nn.Module):
        if diffusion_config is None:
            raise ValueError("sampling from a model object needs diffusion_config")
        sm = SamplingModel(checkpoint_or_model, getattr(checkpoint_or_model, "config", None), diffusion_config)
    else:
        sm = load_model(checkpoint_or_model, ema=ema_rate, device=device or "cpu")
    if device is not None:
        sm.model.to(device)
    return sm


def _model_dims(sm: SamplingModel) -> tuple[int, int, int | None]:
    cfg = sm.model_config
    if cfg is None:
        raise ValueError("the model has no .config; pass a SamplingModel with model_config")
    return int(cfg.image_size), int(cfg.in_channels), getattr(cfg, "num_classes", None)


# ----------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample_shard(sm: SamplingModel, diffusion, n: int, seed: int, shard: int, sampler: str = "ddpm",
                 eta: float = 0.0, quantize_mode: str = "round", progress: bool = False
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Images of shard ``shard`` (n of them) as uint8 NHWC, with labels for class-conditional models."""
    from iddpm_core.diffusion import ddim_sample_loop, p_sample_loop

    size, channels, num_classes = _model_dims(sm)
    device = next(sm.model.parameters()).device
    net = with_precision(sm.model, sm.precision, device.type)
    g = torch.Generator().manual_seed(seed_from(seed, shard))
    kwargs, labels = {}, None
    if num_classes:
        y = torch.randint(0, num_classes, (n,), generator=g)
        labels = y.numpy().astype(np.int64)
        kwargs = {"y": y.to(device)}
    was_training = sm.model.training
    sm.model.eval()
    try:
        shape = (n, channels, size, size)
        if sampler == "ddim":
            x = ddim_sample_loop(diffusion, net, shape, generator=g, model_kwargs=kwargs, eta=eta,
                                 device=device, progress=progress)
        elif sampler == "ddpm":
            x = p_sample_loop(diffusion, net, shape, generator=g, model_kwargs=kwargs, device=device,
                              progress=progress)
        else:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    finally:
        sm.model.train(was_training)
    return quantize(x, quantize_mode), labels


def sample_images(checkpoint_or_model, num: int, steps: int | None, sampler: str = "ddpm", eta: float = 0.0,
                  seed: int = 0, batch_size: int = 64, progress: bool = True, *, diffusion_config=None,
                  ema_rate: float | str | None = None, quantize: str = "round", device=None,
                  return_labels: bool = False, precision: str | None = None):
    """Draw ``num`` images as uint8 NHWC from a checkpoint path (EMA weights by default), a
    :class:`SamplingModel`, or a model (then ``diffusion_config`` is required). ``steps``: sampling
    steps (respaced chain; None = the full chain). With ``return_labels`` returns (images, labels).
    ``precision`` ("fp32" or "bf16") overrides the SamplingModel's."""
    from iddpm_core.diffusion import build_diffusion

    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num}, {batch_size}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    sm = _resolve(checkpoint_or_model, diffusion_config, ema_rate, device)
    if precision is not None:
        sm = dataclasses.replace(sm, precision=check_precision(precision))
    diffusion = build_diffusion(sm.diffusion_config, respacing_for(steps, sampler, sm.diffusion_config.steps))
    images, labels = [], []
    shards = math.ceil(num / batch_size)
    for k in tqdm(range(shards), desc="sampling", disable=not progress):
        n = min(batch_size, num - k * batch_size)
        imgs, labs = sample_shard(sm, diffusion, n, seed, k, sampler, eta, quantize)
        images.append(imgs)
        if labs is not None:
            labels.append(labs)
    out = np.concatenate(images)
    if return_labels:
        return out, (np.concatenate(labels) if labels else None)
    return out


# ----------------------------------------------------------------------------- grids

def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC image (``ncol`` columns, default about sqrt(N))."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"make_grid needs uint8 NHWC images, got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = images[i]
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray, scale: int = 1) -> None:
    """Write an HWC uint8 image as PNG atomically; ``scale`` enlarges it by pixel repetition."""
    from PIL import Image

    img = np.asarray(image)
    if scale > 1:
        img = img.repeat(scale, axis=0).repeat(scale, axis=1)
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    with atomic_path(path, suffix=".png") as tmp:
        pil.save(tmp, format="PNG")


def grid_scale(image_size: int) -> int:
    """Pixel repetition that makes small images visible in a grid (8 px -> x4, 16 -> x2)."""
    return max(1, 32 // max(image_size, 1))


# ----------------------------------------------------------------------------- sharded output



def _shard_ok(path: Path, n: int, shape: tuple, has_labels: bool) -> bool:
    try:
        with np.load(path) as z:
            arr = z["arr_0"]
            ok = arr.dtype == np.uint8 and arr.shape == (n,) + shape
            if has_labels:
                ok = ok and "arr_1" in z.files and z["arr_1"].shape == (n,)
            return bool(ok)
    except Exception:
        return False


def sample_to_dir(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, num: int, steps: int | None,
                  sampler: str = "ddpm", eta: float = 0.0, seed: int = 0, batch_size: int = 64,
                  quantize: str = "round", ema_rate: float | str | None = None, device=None,
                  progress: bool = True, on_shard: Callable[[int, Path], None] | None = None,
                  precision: str = "fp32") -> dict:
    """Sample ``num`` images from ``checkpoint`` into ``out_dir``:

    - ``shards/shard_KKKKKK.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels when class-conditional),
      written atomically; a rerun keeps every valid shard and makes only the missing ones;
    - ``samples.npz`` with all images in order (plus ``meta``, a JSON string of the settings),
      ``samples.json`` beside it and ``grid.png`` (the first 64 images).

    Under torchrun the missing shards are dealt round-robin to the processes; rank 0 merges.
    ``settings.json`` records the settings; a rerun with other settings into the same folder is
    refused. ``on_shard(k, path)`` is called after each shard this process writes. ``precision``
    "bf16" runs the network under bfloat16 autocast (recorded in the settings).
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"--num and --batch-size must be >= 1, got {num}, {batch_size}")
    if quantize not in QUANTIZE:
        raise ValueError(f"--quantize must be one of {QUANTIZE}, got {quantize!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "ddpm" and eta != 0.0:
        raise ValueError("--eta applies to the ddim sampler only")
    check_precision(precision)
    check_writable(out_dir, folder=True, what="output folder")  # before loading or sampling anything
    dev = dist_utils.pick_device("auto" if device is None else str(device))
    created = dist_utils.init_from_env(dev)
    try:
        return _sample_to_dir(Path(checkpoint), Path(out_dir), num, steps, sampler, float(eta), int(seed),
                              int(batch_size), quantize, ema_rate, dev, progress, on_shard, precision)
    finally:
        if created:
            dist_utils.cleanup()


def _check_settings(out: Path, settings: dict, rank: int) -> None:
    """Rank 0 writes ``settings.json``, or compares it with the folder's: a rerun with other settings
    (the checkpoint's path aside) is refused on every process, naming the settings that differ."""
    settings_path = out / "settings.json"
    error = None
    if rank == 0:
        if settings_path.exists():
            try:
                old = json.loads(settings_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                old = {"unreadable": str(exc)}
            diff = sorted(k for k in set(settings) | set(old)
                          if k != "checkpoint" and old.get(k) != settings.get(k))
            if diff:
                error = (f"{out} already holds samples made with other settings "
                         f"({', '.join(f'{k}: {old.get(k)!r} -> {settings.get(k)!r}' for k in diff)}); "
                         "use another --out folder or remove it")
        else:
            write_text(settings_path, json.dumps(settings, indent=2) + "\n")
    error = dist_utils.broadcast_object(error)
    if error:
        raise ValueError(error)


def _merge_shards(out: Path, paths: list, sizes: list, shape: tuple, has_labels: bool, settings: dict) -> None:
    """``samples.npz`` (all shards in order, with the settings as ``meta``), ``samples.json`` and
    ``grid.png`` from the shards, each checked first."""
    images, labels = [], []
    for path, n in zip(paths, sizes):
        if not _shard_ok(path, n, shape, has_labels):
            raise RuntimeError(f"{path} is missing or unreadable after sampling")
        with np.load(path) as z:
            images.append(z["arr_0"])
            if has_labels:
                labels.append(z["arr_1"])
    arrays = {"arr_0": np.concatenate(images)}
    if has_labels:
        arrays["arr_1"] = np.concatenate(labels)
    meta = json.dumps(settings, sort_keys=True)
    save_npz(out / "samples.npz", **arrays, meta=np.array(meta))
    write_text(out / "samples.json", json.dumps(settings, indent=2) + "\n")
    save_png(out / "grid.png", make_grid(arrays["arr_0"][:64]), scale=grid_scale(shape[0]))


def _sample_to_dir(checkpoint, out, num, steps, sampler, eta, seed, batch_size, quantize_mode, ema_rate, dev,
                   progress, on_shard, precision="fp32") -> dict:
    from iddpm_core.diffusion import build_diffusion

    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    sm = load_model(checkpoint, ema=ema_rate, device=dev)
    sm.precision = precision
    size, channels, num_classes = _model_dims(sm)
    respacing = respacing_for(steps, sampler, sm.diffusion_config.steps)
    settings = {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": file_sha256(checkpoint),
                "checkpoint_step": sm.step, "ema_rate": sm.ema_rate, "num": num, "steps": steps,
                "respacing": respacing, "sampler": sampler, "eta": eta, "seed": seed, "shard_size": batch_size,
                "quantize": quantize_mode, "clip_denoised": True,
                "image_shape": [size, size, channels], "class_conditional": bool(num_classes)}
    if precision != "fp32":  # recorded only when not the default, so earlier fp32 folders still resume
        settings["precision"] = precision
    _check_settings(out, settings, rank)

    diffusion = build_diffusion(sm.diffusion_config, respacing)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(num / batch_size)
    sizes = [min(batch_size, num - k * batch_size) for k in range(n_shards)]
    paths = [shard_dir / f"shard_{k:06d}.npz" for k in range(n_shards)]
    shape = (size, size, channels)
    # Every process checks the same files at the same moment, so they agree on what is missing.
    missing = [k for k in range(n_shards) if not _shard_ok(paths[k], sizes[k], shape, bool(num_classes))]
    dist_utils.barrier()
    mine = [k for i, k in enumerate(missing) if i % world == rank]
    made = []
    for k in tqdm(mine, desc=f"shards (rank {rank})" if world > 1 else "shards", disable=not progress):
        imgs, labels = sample_shard(sm, diffusion, sizes[k], seed, k, sampler, eta, quantize_mode)
        arrays = {"arr_0": imgs} if labels is None else {"arr_0": imgs, "arr_1": labels}
        save_npz(paths[k], **arrays)
        made.append(k)
        if on_shard is not None:
            on_shard(k, paths[k])
    dist_utils.barrier()

    summary = {"out_dir": str(out), "num": num, "shards": n_shards, "shards_made": made,
               "shards_reused": n_shards - len(missing), "samples": str(out / "samples.npz"),
               "grid": str(out / "grid.png"), "settings": settings}
    if rank == 0:
        _merge_shards(out, paths, sizes, shape, bool(num_classes), settings)
    dist_utils.barrier()
    return summary
