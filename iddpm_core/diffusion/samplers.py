"""Ancestral and DDIM sampling over a (possibly respaced) Gaussian diffusion, seeded by a torch.Generator."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from .gaussian import GaussianDiffusion, randn


def _ts(diffusion: GaussianDiffusion, i: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)


def p_sample(diffusion: GaussianDiffusion, model: Callable, x: torch.Tensor, t: torch.Tensor,
             clip_denoised: bool = True, model_kwargs: dict | None = None,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> dict:
    """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (no noise where t = 0).
    Returns "sample" and "pred_xstart"."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    if noise is None:
        noise = randn(x.shape, generator, x.device, x.dtype)
    nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddim_sample(diffusion: GaussianDiffusion, model: Callable, x: torch.Tensor, t: torch.Tensor,
                eta: float = 0.0, clip_denoised: bool = True, model_kwargs: dict | None = None,
                generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> dict:
    """One DDIM step (Song et al. 2021, eq. 12) from t to the previous kept step; eta = 0 is
    deterministic, eta = 1 matches the posterior variance. The learned variance is ignored."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    x0 = out["pred_xstart"]
    eps = diffusion.predict_eps_from_xstart(x, t, x0)
    abar = diffusion._extract(diffusion.alphas_cumprod, t, x)
    abar_prev = diffusion._extract(diffusion.alphas_cumprod_prev, t, x)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
    mean = x0 * torch.sqrt(abar_prev) + torch.sqrt((1 - abar_prev - sigma ** 2).clamp(min=0)) * eps
    if eta != 0:
        if noise is None:
            noise = randn(x.shape, generator, x.device, x.dtype)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        mean = mean + nonzero * sigma * noise
    return {"sample": mean, "pred_xstart": x0}


def _progressive(step: Callable, diffusion: GaussianDiffusion, shape, generator, noise, device, dtype,
                 progress: bool, desc: str) -> Iterator[dict]:
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"initial noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        x = noise.to(device=device if device is not None else noise.device)
    else:
        x = randn(shape, generator, device, dtype)
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), desc=desc, disable=not progress, leave=False):
        with torch.no_grad():
            out = step(x, _ts(diffusion, i, x))
        out["t"] = i
        yield out
        x = out["sample"]


def p_sample_loop_progressive(diffusion: GaussianDiffusion, model: Callable, shape, generator=None, noise=None,
                              clip_denoised: bool = True, model_kwargs: dict | None = None, device=None,
                              dtype=torch.float32, progress: bool = False) -> Iterator[dict]:
    """Yield each ancestral step's dict ("sample", "pred_xstart", "t") from t = T-1 down to 0."""
    def step(x, t):
        return p_sample(diffusion, model, x, t, clip_denoised, model_kwargs, generator)
    yield from _progressive(step, diffusion, shape, generator, noise, device, dtype, progress, "sampling")


def p_sample_loop(diffusion: GaussianDiffusion, model: Callable, shape, generator=None, noise=None,
                  clip_denoised: bool = True, model_kwargs: dict | None = None, device=None,
                  dtype=torch.float32, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling from x_T ~ N(0, I) (or ``noise``) over the diffusion's chain; returns x_0."""
    out = None
    for out in p_sample_loop_progressive(diffusion, model, shape, generator, noise, clip_denoised,
                                         model_kwargs, device, dtype, progress):
        pass
    return out["sample"]


def ddim_sample_loop_progressive(diffusion: GaussianDiffusion, model: Callable, shape, generator=None,
                                 noise=None, clip_denoised: bool = True, model_kwargs: dict | None = None,
                                 eta: float = 0.0, device=None, dtype=torch.float32,
                                 progress: bool = False) -> Iterator[dict]:
    """Yield each DDIM step's dict ("sample", "pred_xstart", "t") from t = T-1 down to 0."""
    def step(x, t):
        return ddim_sample(diffusion, model, x, t, eta, clip_denoised, model_kwargs, generator)
    yield from _progressive(step, diffusion, shape, generator, noise, device, dtype, progress, "ddim")


def ddim_sample_loop(diffusion: GaussianDiffusion, model: Callable, shape, generator=None, noise=None,
                     clip_denoised: bool = True, model_kwargs: dict | None = None, eta: float = 0.0,
                     device=None, dtype=torch.float32, progress: bool = False) -> torch.Tensor:
    """DDIM sampling over the diffusion's chain (use a respaced diffusion for fewer steps); returns x_0."""
    out = None
    for out in ddim_sample_loop_progressive(diffusion, model, shape, generator, noise, clip_denoised,
                                            model_kwargs, eta, device, dtype, progress):
        pass
    return out["sample"]
