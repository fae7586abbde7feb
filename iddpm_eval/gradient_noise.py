"""Gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"):
``B_simple = tr(Sigma) / |G|^2``, the per-example gradient variance against the squared norm of
the mean gradient. Improved DDPM (sec. 3.3, fig. 2) compares it for L_vlb with uniform and
importance-sampled timesteps and for L_hybrid.

Both quantities are estimated without bias, from two independent draws of training examples:

* ``|G|^2`` from ``M`` groups of ``b`` examples (``N = M b`` in all): with group-mean gradients
  ``g_m``, the U-statistic ``sum_{m != m'} <g_m, g_m'> / (M (M - 1))`` has expectation ``|G|^2``
  (distinct groups are independent). Its standard error is the jackknife over groups.
* ``tr(Sigma)`` from ``n`` further per-example gradients ``g_i``: ``d_i = |g_i - gbar|^2`` with
  ``gbar`` the mean of the ``N`` group examples has ``E[d_i] = tr(Sigma) (1 + 1/N)`` (``g_i`` is
  independent of ``gbar``), so ``mean(d) / (1 + 1/N)`` is unbiased; its standard error is that of
  the mean of the ``d_i``.

The ratio's interval is the delta method on ``log B`` (the two estimates are independent):
``exp(log B +- z sqrt((se_tr / tr)^2 + (se_G / G)^2))``. When the ``|G|^2`` estimate is not
positive (the mean gradient is lost in the noise: ``N`` is too small) ``B_simple`` is reported as
infinite with no interval.

The per-example gradient of a weighted objective is the gradient of ``w_i L_i``: with importance-
sampled timesteps (``t ~ p``, ``w = 1 / (T p_t)``) the mean of these is the gradient of the
objective, and the noise is that of the sampled estimator, which is what the sampler changes.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

Z95 = 1.959963984540054


def flat_grad(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradients of ``params`` as one float64 vector (zeros for parameters without a gradient)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double()
                      for p in params])


def grad_sq_unbiased(group_means: np.ndarray) -> tuple[float, float]:
    """``(estimate, jackknife standard error)`` of ``|G|^2`` from ``M >= 3`` independent group-mean
    gradients ``(M, P)`` (see the module docstring)."""
    g = np.asarray(group_means, dtype=np.float64)
    m = g.shape[0]
    if g.ndim != 2 or m < 3:
        raise ValueError(f"need at least 3 group means as an (M, P) array, got shape {g.shape}")
    k = g @ g.T
    off = k.sum() - np.trace(k)
    est = off / (m * (m - 1))
    loo = (off - 2.0 * (k.sum(axis=1) - np.diag(k))) / ((m - 1) * (m - 2))
    se = math.sqrt((m - 1) / m * float(((loo - loo.mean()) ** 2).sum()))
    return float(est), se


def trace_cov_unbiased(dev_sq: np.ndarray, big_n: int) -> tuple[float, float]:
    """``(estimate, standard error)`` of ``tr(Sigma)`` from ``d_i = |g_i - gbar|^2`` of ``n >= 2``
    per-example gradients independent of ``gbar``, the mean of ``big_n`` examples."""
    d = np.asarray(dev_sq, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need at least 2 per-example deviations, got shape {d.shape}")
    c = 1.0 + 1.0 / big_n
    return float(d.mean() / c), float(d.std(ddof=1) / math.sqrt(len(d)) / c)


def noise_scale(trace_cov: float, trace_cov_se: float, grad_sq: float, grad_sq_se: float,
                z: float = Z95) -> dict:
    """``B_simple`` with its delta-method interval on the log scale (infinite, no interval, when
    the ``|G|^2`` estimate is not positive)."""
    out = {"trace_cov": trace_cov, "trace_cov_se": trace_cov_se, "grad_sq": grad_sq, "grad_sq_se": grad_sq_se}
    if grad_sq <= 0 or trace_cov <= 0:
        return {**out, "b_simple": math.inf, "b_simple_low": math.nan, "b_simple_high": math.nan}
    b = trace_cov / grad_sq
    rel = math.sqrt((trace_cov_se / trace_cov) ** 2 + (grad_sq_se / grad_sq) ** 2)
    return {**out, "b_simple": b, "b_simple_low": b * math.exp(-z * rel), "b_simple_high": b * math.exp(z * rel)}


def measure(params: Sequence[torch.Tensor], group_loss: Callable[[int], torch.Tensor],
            example_loss: Callable[[int], torch.Tensor], groups: int, group_size: int, examples: int) -> dict:
    """Gradient noise scale of an objective: ``group_loss(m)`` is the mean loss of the ``m``-th
    group of ``group_size`` examples, ``example_loss(i)`` the loss of the ``i``-th further example
    (each drawn independently by the caller; each a scalar tensor depending on ``params``)."""
    params = [p for p in params if p.requires_grad]

    def grad_of(loss: torch.Tensor) -> torch.Tensor:
        for p in params:
            p.grad = None
        loss.backward()
        return flat_grad(params)

    means = torch.stack([grad_of(group_loss(m)) for m in range(groups)])
    gbar = means.mean(0)
    dev = np.array([float(((grad_of(example_loss(i)) - gbar) ** 2).sum()) for i in range(examples)])
    for p in params:
        p.grad = None
    g2, g2_se = grad_sq_unbiased(means.numpy())
    tr, tr_se = trace_cov_unbiased(dev, groups * group_size)
    return {**noise_scale(tr, tr_se, g2, g2_se), "gn_groups": groups, "gn_group_size": group_size,
            "gn_examples": examples}


def measure_diffusion(model: torch.nn.Module, diffusion, timestep_sampler, images: torch.Tensor, *, groups: int,
                      group_size: int, examples: int, seed: int = 0) -> dict:
    """Gradient noise scale of a diffusion training objective at ``model``'s weights: examples are
    images drawn from ``images`` (N, C, H, W in [-1, 1]) with replacement, timesteps and weights from
    ``timestep_sampler`` (its state as in training), fresh noise; the loss of an example is
    ``w * diffusion.training_losses(...)["loss"]``, as the trainer weights it."""
    g = torch.Generator().manual_seed(int(seed))
    n_img = images.shape[0]

    def draw(k: int):
        idx = torch.randint(0, n_img, (k,), generator=g)
        t, w = timestep_sampler.sample(k, generator=g)
        noise = torch.randn((k, *images.shape[1:]), generator=g)
        return images[idx], t, w, noise

    group_draws = [draw(group_size) for _ in range(groups)]
    example_draws = [draw(1) for _ in range(examples)]

    def loss_of(d) -> torch.Tensor:
        x, t, w, noise = d
        return (diffusion.training_losses(model, x, t, noise=noise)["loss"] * w).mean()

    was = model.training
    model.train()
    try:
        return measure(list(model.parameters()), lambda m: loss_of(group_draws[m]),
                       lambda i: loss_of(example_draws[i]), groups, group_size, examples)
    finally:
        model.train(was)
