"""Per-element likelihood terms: Gaussian KL and the discretized Gaussian decoder.

All functions work elementwise (natural log units) and never reduce; callers average over
dimensions and convert to bits.
"""

from __future__ import annotations

import math

import torch

Tensorish = torch.Tensor | float


def _as_tensor(x: Tensorish, like: torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=like.dtype, device=like.device)


def normal_kl(mean1: Tensorish, logvar1: Tensorish, mean2: Tensorish, logvar2: Tensorish) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasts)."""
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    mean1, logvar1, mean2, logvar2 = (_as_tensor(a, ref) for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Tanh approximation of the standard normal CDF used by Improved DDPM."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Exact standard normal CDF via erf."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                                        exact_cdf: bool = False) -> torch.Tensor:
    """Log-probability (nats) of uint8-valued data scaled to [-1, 1] under a Gaussian binned into 256 bins.

    Bins have half-width 1/255; the first and last bins take the whole tails (x < -0.999, x > 0.999).
    ``log_scales`` is the log standard deviation. ``exact_cdf`` switches from the tanh approximation
    (Improved DDPM's choice, the default) to the erf form. Returns a tensor shaped like ``x``.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"x, means and log_scales must share a shape, got {tuple(x.shape)}, "
                         f"{tuple(means.shape)}, {tuple(log_scales.shape)}")
    cdf = standard_normal_cdf if exact_cdf else approx_standard_normal_cdf
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (centered - 1.0 / 255.0))
    tiny = 1e-12
    log_cdf_plus = torch.log(cdf_plus.clamp(min=tiny))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=tiny))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=tiny))),
    )
