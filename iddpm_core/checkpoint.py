"""Checkpoints that carry their model configuration, so loading needs no flags."""

from __future__ import annotations

import os
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
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} file (no 'format': '{FORMAT}' entry)")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')!r} is not supported (expected {VERSION})")
    for key in ("model_config", "model"):
        if key not in ckpt:
            raise ValueError(f"{path}: checkpoint has no '{key}' entry")
    return ckpt


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu",
               weights_only: bool = True) -> tuple[nn.Module, ModelConfig, dict]:
    """Rebuild the model from the stored config, load its weights, put it in eval mode."""
    ckpt = load_checkpoint(path, map_location, weights_only)
    try:
        config = ModelConfig.from_dict(ckpt["model_config"])
        model = build_model(config)
        model.load_state_dict(ckpt["model"])
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: stored model does not load ({e})") from e
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    return model, config, ckpt
