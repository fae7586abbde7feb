"""Checkpoints that carry their model configuration, so loading needs no flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .io import torch_save
from .models import ModelConfig, build_model

FORMAT = "iddpm-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, model: nn.Module, model_config: ModelConfig, **extra) -> None:
    """Write {"format", "version", "model_config", "model": state_dict, **extra} atomically to ``path``."""
    reserved = {"format", "version", "model_config", "model"} & set(extra)
    if reserved:
        raise ValueError(f"extra keys {sorted(reserved)} are reserved by the checkpoint format")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save({"format": FORMAT, "version": VERSION, "model_config": model_config.to_dict(), "model": state,
                **extra}, path)


def torch_load_reason(exc: BaseException) -> str:
    """One line saying why ``torch.load`` refused a file: the first sentence of torch's reason,
    without its advice to retry with ``weights_only=False`` (which would run the file's code)."""
    paragraphs = [" ".join(p.split()) for p in str(exc).split("\n\n")]
    # torch's weights-only refusal wraps the reason in paragraphs of advice that all name weights_only
    reason = [p for p in paragraphs if p and "weights_only" not in p and "torch.load" not in p]
    text = (reason or paragraphs or [""])[0]
    first = text.split(". ", 1)[0].rstrip(".")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_weights(model: nn.Module, state: dict, where: str) -> None:
    """``model.load_state_dict(state)``, refused in one line naming ``where`` and the first
    mismatches (missing, unexpected, other shapes) when the weights do not fit the model."""
    own = model.state_dict()
    if not isinstance(state, dict):
        raise ValueError(f"{where}: weights are a {type(state).__name__}, not a state dict")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(getattr(state[k], 'shape', ()))} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    parts = [f"{len(v)} {what} (first: {v[0]})" for what, v in
             (("with another shape, stored vs model", shapes), ("missing", missing), ("unexpected", unexpected)) if v]
    if parts:
        raise ValueError(f"{where}: stored weights do not fit the stored model config: {'; '.join(parts)}")
    model.load_state_dict(state)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    weights_only: bool = True) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; clear errors for missing or unreadable files.

    ``weights_only=True`` (default) refuses arbitrary pickled objects; pass False only for trusted files
    whose extras hold other Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({torch_load_reason(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} file (no 'format': '{FORMAT}' entry)")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')!r} is not supported (expected {VERSION})")
    for key in ("model_config", "model"):
        if key not in ckpt:
            raise ValueError(f"{path}: checkpoint has no '{key}' entry")
    return ckpt


@dataclass
class SamplingModel:
    """A model ready to sample: weights (EMA by default), its configs and where they came from."""

    model: nn.Module
    model_config: object
    diffusion_config: object
    ema_rate: float | None = None       # None = the raw (non-EMA) weights
    step: int | None = None
    path: str | None = None
    info: dict = field(default_factory=dict)
    precision: str = "fp32"             # "bf16": the forward passes under bfloat16 autocast


def load_model(path: str | os.PathLike, ema: float | str | None = None,
               device: str | torch.device = "cpu") -> SamplingModel:
    """Rebuild the model of a training checkpoint from its stored configs, load the weights, put it
    in eval mode on ``device``. ``ema``: None = the first EMA rate of the run (the raw weights when
    the run kept no EMA), a rate such as 0.9999, or "raw" for the raw weights."""
    from iddpm_core.diffusion import DiffusionConfig
    from iddpm_core.ema import rate_key

    ckpt = load_checkpoint(path, map_location="cpu")
    if "diffusion_config" not in ckpt:
        raise ValueError(f"{path}: checkpoint has no diffusion_config; it was not written by the trainer")
    try:
        model_config = ModelConfig.from_dict(ckpt["model_config"])
        diffusion_config = DiffusionConfig.from_dict(ckpt["diffusion_config"])
        model = build_model(model_config)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: stored model does not load ({e})") from e
    emas = ckpt.get("ema") or {}
    if ema == "raw" or (ema is None and not emas):
        state, rate = ckpt["model"], None
    else:
        key = next(iter(emas)) if ema is None else rate_key(float(ema))
        if key not in emas:
            raise ValueError(f"{path}: no EMA with rate {ema}; it holds {list(emas) or 'none'} (or use 'raw')")
        state, rate = emas[key], float(key)
    load_weights(model, state, f"{path}" + (f" (EMA {rate})" if rate is not None else ""))
    model.to(device).eval()
    return SamplingModel(model, model_config, diffusion_config, rate, ckpt.get("step"), str(path),
                         {"images_seen": ckpt.get("images_seen"), "train_flops": ckpt.get("train_flops")})
