"""Gaussian diffusion of Improved DDPM: schedules, respacing, losses, timestep samplers, samplers.

Typical use::

    cfg = DiffusionConfig(steps=1000, schedule="cosine", var_type="learned_range", loss="hybrid")
    diffusion = build_diffusion(cfg)                       # training chain
    t, w = create_sampler("loss-second-moment", diffusion.num_timesteps).sample(batch, generator=g)
    terms = diffusion.training_losses(model, x0, t)       # {"loss", "mse", "vb"}, each [N]
    fast = build_diffusion(cfg, respacing="ddim50")        # 50 of the 1000 steps
    x = ddim_sample_loop(fast, model, (n, 3, 32, 32), generator=g, eta=0.0)
    vb = diffusion.vb_terms_bpd(model, x0, diffusion.q_sample(x0, t), t)["output"]  # term t, bits/dim
"""

from .config import DiffusionConfig, build_diffusion
from .gaussian import (LOSS_ALIASES, LOSS_TYPES, MEAN_TYPES, VAR_TYPES, GaussianDiffusion, mean_flat,
                       randn)
from .losses import (approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl,
                     standard_normal_cdf)
from .respace import SpacedDiffusion, space_timesteps
from .samplers import (ddim_sample, ddim_sample_loop, ddim_sample_loop_progressive, p_sample,
                       p_sample_loop, p_sample_loop_progressive)
from .schedules import SCHEDULES, cosine_alpha_bar, cosine_betas, get_betas, linear_betas
from .timesteps import (LossSecondMomentSampler, ScheduleSampler, UniformSampler, create_sampler)

__all__ = [
    "DiffusionConfig", "build_diffusion", "GaussianDiffusion", "SpacedDiffusion", "space_timesteps",
    "MEAN_TYPES", "VAR_TYPES", "LOSS_TYPES", "LOSS_ALIASES", "mean_flat", "randn",
    "normal_kl", "approx_standard_normal_cdf", "standard_normal_cdf", "discretized_gaussian_log_likelihood",
    "p_sample", "p_sample_loop", "p_sample_loop_progressive", "ddim_sample", "ddim_sample_loop",
    "ddim_sample_loop_progressive", "SCHEDULES", "get_betas", "linear_betas", "cosine_betas",
    "cosine_alpha_bar", "ScheduleSampler", "UniformSampler", "LossSecondMomentSampler", "create_sampler",
]
