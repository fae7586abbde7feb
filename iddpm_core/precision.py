"""Arithmetic precision of the denoiser's forward pass: ``fp32`` (default) or ``bf16`` autocast.

Under ``bf16`` the convolutions, linear layers and attention run in bfloat16 (fast on CPUs with AMX or
AVX-512 BF16 and on recent GPUs) while GroupNorm and softmax stay in float32; the model's output is
returned as float32, so the diffusion maths, the losses and the optimiser (fp32 master weights, as
autocast keeps the parameters in float32) are unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast(precision: str, device_type: str = "cpu"):
    """A context running the forward pass in ``precision`` (no-op for fp32)."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def with_precision(model: Callable, precision: str, device_type: str = "cpu") -> Callable:
    """``model`` itself for fp32; otherwise a callable running it under autocast with float32 output."""
    if check_precision(precision) == "fp32":
        return model

    def run(*args, **kwargs):
        with autocast(precision, device_type):
            out = model(*args, **kwargs)
        return out.float()

    return run
