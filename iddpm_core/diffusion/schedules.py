"""Noise schedules of Improved DDPM: betas as float64 numpy arrays."""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("linear", "cosine")
COSINE_S = 0.008
MAX_BETA = 0.999


def linear_betas(T: int) -> np.ndarray:
    """DDPM's linear schedule, rescaled so any T spans the same range as T = 1000."""
    scale = 1000.0 / T
    if scale * 0.02 >= 1.0:
        raise ValueError(f"linear schedule needs T > 20 steps (its last beta is 20/T), got T={T}")
    return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)


def cosine_alpha_bar(t: np.ndarray | float, s: float = COSINE_S) -> np.ndarray:
    """abar(t) = cos^2(((t + s)/(1 + s)) * pi/2) for t in [0, 1] (continuous time)."""
    return np.cos((np.asarray(t, dtype=np.float64) + s) / (1.0 + s) * math.pi / 2) ** 2


def betas_from_alpha_bar(alpha_bar, T: int, max_beta: float = MAX_BETA) -> np.ndarray:
    """beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta) for i = 0 .. T-1."""
    grid = np.arange(T + 1, dtype=np.float64) / T
    ab = np.asarray(alpha_bar(grid), dtype=np.float64)
    return np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)


def cosine_betas(T: int, s: float = COSINE_S, max_beta: float = MAX_BETA) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule (s = 0.008, betas clipped at 0.999)."""
    return betas_from_alpha_bar(lambda t: cosine_alpha_bar(t, s), T, max_beta)


def get_betas(name: str, T: int) -> np.ndarray:
    """Betas of the named schedule ("linear" or "cosine") for T steps, float64, shape [T]."""
    if not isinstance(T, (int, np.integer)) or isinstance(T, bool) or T < 1:
        raise ValueError(f"number of diffusion steps must be a positive integer, got {T!r}")
    if name == "linear":
        return linear_betas(int(T))
    if name == "cosine":
        return cosine_betas(int(T))
    raise ValueError(f"unknown noise schedule {name!r}; expected one of {SCHEDULES}")
