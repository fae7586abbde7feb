"""Diffusion configuration (stored in checkpoints) and the factory that builds a diffusion from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from iddpm_core.checks import refuse_unknown

from .gaussian import GaussianDiffusion
from .respace import SpacedDiffusion, space_timesteps
from .schedules import get_betas


@dataclass
class DiffusionConfig:
    """Settings of a Gaussian diffusion; defaults are Improved DDPM's L_hybrid recipe."""

    steps: int = 1000
    schedule: str = "cosine"
    mean_type: str = "epsilon"
    var_type: str = "learned_range"
    loss: str = "hybrid"
    rescale_timesteps: bool = True
    timestep_respacing: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiffusionConfig":
        refuse_unknown(d, {f.name for f in dataclasses.fields(cls)},
                       template="unknown diffusion config keys {unknown}; expected some of {known}")
        return cls(**d)


def build_diffusion(config: DiffusionConfig, respacing: str | None = None) -> GaussianDiffusion:
    """A diffusion for ``config``; ``respacing`` (if not None) overrides ``config.timestep_respacing``.

    An empty respacing gives a plain :class:`GaussianDiffusion` over all steps, otherwise a
    :class:`SpacedDiffusion` whose model still sees the original step indices.
    """
    spec = config.timestep_respacing if respacing is None else respacing
    betas = get_betas(config.schedule, config.steps)
    kwargs = dict(mean_type=config.mean_type, var_type=config.var_type, loss_type=config.loss,
                  rescale_timesteps=config.rescale_timesteps)
    if not spec:
        return GaussianDiffusion(betas, **kwargs)
    return SpacedDiffusion(space_timesteps(config.steps, spec), betas, **kwargs)
