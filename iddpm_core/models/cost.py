"""Cost accounting of a denoiser: parameters, FLOPs (forward, training, sampling), ODE function evaluations.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``: 2 per multiply-add of convolutions, linear
layers and matmuls (attention included, every ODE solver evaluation included); normalisations and
activations are not counted. Per-image figures are the batch total divided by the batch size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode passes shapes in place of tensors
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    # the gradients of the two matmuls (two matmuls each); the kernel's recomputation of the scores is
    # an implementation detail left out, so training FLOPs stay those of the explicit attention
    return 2 * flop_counter.sdpa_flop_count(query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one: count it as the explicit
# attention (two matmuls, 2 FLOPs per multiply-add), so the fast path counts as the reference one.
_CUSTOM = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    _CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops


def flop_counter_mode() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts the CPU attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=_CUSTOM)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _inputs(model: nn.Module, image_size: int | None, in_channels: int | None, batch: int, seed: int = 0):
    cfg = getattr(model, "config", None)
    image_size = image_size if image_size is not None else getattr(cfg, "image_size", None)
    in_channels = in_channels if in_channels is not None else getattr(cfg, "in_channels", None)
    if image_size is None or in_channels is None:
        raise ValueError("image_size and in_channels are needed for a model without a .config")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, image_size, image_size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).float().to(device)
    num_classes = getattr(model, "num_classes", None)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device) if num_classes else None
    return x, t, y


def forward_flops(model: nn.Module, image_size: int | None = None, in_channels: int | None = None,
                  batch: int = 1) -> int:
    """FLOPs of one forward pass per image (no gradients). Sizes default to ``model.config``."""
    x, t, y = _inputs(model, image_size, in_channels, batch)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), flop_counter_mode() as counter:
            model(x, t, y)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // batch


def training_flops_per_image(model: nn.Module, image_size: int | None = None, in_channels: int | None = None,
                             batch: int = 2) -> int:
    """FLOPs of forward plus backward (gradients for every parameter, none for the input) per image.

    Measured, not estimated: compare with ``3 * forward_flops`` (the usual rule of thumb). The loss is a
    mean square of the output, whose own cost is not counted by FlopCounterMode.
    """
    x, t, y = _inputs(model, image_size, in_channels, batch)
    was_training = model.training
    model.train()
    try:
        with flop_counter_mode() as counter:
            out = model(x, t, y)
            out.float().square().mean().backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return int(counter.get_total_flops()) // batch


def function_evaluations(model: nn.Module, image_size: int | None = None, in_channels: int | None = None,
                         batch: int = 1) -> int:
    """ODE function evaluations in one forward pass (0 for a model without ODE blocks).

    Fixed-step solvers give a constant; an adaptive solver (dopri5) gives the count for this input.
    """
    if not hasattr(model, "nfe"):
        return 0
    x, t, y = _inputs(model, image_size, in_channels, batch)
    with torch.no_grad():
        model(x, t, y)
    return int(model.nfe)


def sampling_flops(model: nn.Module, steps: int, evals_per_step: int = 1, image_size: int | None = None,
                   in_channels: int | None = None) -> int:
    """FLOPs to sample one image: steps x network evaluations per step x forward FLOPs.

    ``evals_per_step`` is the sampler's calls to the network per step (1 for DDPM/DDIM); the ODE
    evaluations inside a continuous U-Net are already part of its forward FLOPs.
    """
    if steps < 1 or evals_per_step < 1:
        raise ValueError(f"steps and evals_per_step must be >= 1, got {steps}, {evals_per_step}")
    return steps * evals_per_step * forward_flops(model, image_size, in_channels)


def cost_summary(model: nn.Module, image_size: int | None = None, in_channels: int | None = None) -> dict:
    """Parameters, forward and training FLOPs per image, their ratio, and ODE evaluations per forward."""
    fwd = forward_flops(model, image_size, in_channels)
    train = training_flops_per_image(model, image_size, in_channels)
    return {
        "parameters": count_parameters(model),
        "forward_flops": fwd,
        "training_flops": train,
        "training_over_forward": train / fwd,
        "function_evaluations": function_evaluations(model, image_size, in_channels),
    }
