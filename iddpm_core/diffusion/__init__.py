"""Gaussian diffusion of Improved DDPM: schedules, respacing, losses, timestep samplers, samplers."""

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
