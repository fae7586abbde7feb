"""Generative side of iddpm: Gaussian diffusion of Improved DDPM, denoisers, trainer and sampler.

Never imports :mod:`iddpm_eval`.
"""

__version__ = "0.1.0"
