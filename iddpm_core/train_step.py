"""The pieces of one optimiser step: the learning rate, AdamW, forward-backward over micro-batches
with the logged statistics, and the clipped step with the EMA update. :class:`iddpm_core.train.TrainLoop`
runs them; the speed benchmarks time them alone."""

from __future__ import annotations

import torch

from iddpm_core.config import TrainConfig
from iddpm_core.ema import EMA


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then constant."""
    if cfg.lr_warmup_steps > 0:
        return cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps)
    return cfg.lr


def _quarter_stats(t: torch.Tensor, loss: torch.Tensor, T: int) -> torch.Tensor:
    """[sum of loss per quarter (4), count per quarter (4)] for timesteps t of a T-step chain
    (on the tensors' device, without a host sync)."""
    q = (t.long() * 4 // T).clamp(0, 3)
    sums = torch.zeros(4, dtype=torch.float64, device=loss.device).index_add_(0, q, loss.detach().double())
    counts = torch.bincount(q, minlength=4).double()
    return torch.cat([sums, counts])


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
