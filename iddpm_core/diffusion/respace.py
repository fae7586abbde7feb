"""Respacing: run a T-step diffusion over a subset of its steps (fewer sampling steps, DDIM)."""

from __future__ import annotations

import numpy as np

from .gaussian import GaussianDiffusion


def space_timesteps(T: int, spec: str | int | None) -> list[int]:
    """Sorted original step indices to keep out of ``T``.

    ``spec``: "" / None (all steps); "K" (K evenly strided steps, both ends kept); "a,b,c"
    (split [0, T) into equal sections, keep a, b, c evenly strided steps in each); "ddimK" (the
    integer stride that gives exactly K steps, starting at 0).
    """
    if spec is None or (isinstance(spec, str) and spec.strip() == ""):
        return list(range(T))
    if isinstance(spec, int):
        spec = str(spec)
    spec = spec.strip()
    if spec.startswith("ddim"):
        try:
            want = int(spec[len("ddim"):])
        except ValueError:
            raise ValueError(f"bad respacing {spec!r}: expected 'ddimK' with an integer K") from None
        for stride in range(1, T + 1):
            if len(range(0, T, stride)) == want:
                return list(range(0, T, stride))
        raise ValueError(f"respacing {spec!r}: no integer stride gives exactly {want} of {T} steps")
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise ValueError(f"bad respacing {spec!r}: expected 'K', 'a,b,c' or 'ddimK'") from None
    n = len(counts)
    if n > T:
        raise ValueError(f"respacing {spec!r}: {n} sections for only {T} steps")
    base, extra = divmod(T, n)
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"respacing {spec!r}: section {i} has {size} steps, cannot keep {count}")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return kept


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over the kept steps of a base chain given by its betas.

    Betas are recomputed from alpha-bar at the kept steps, beta_i = 1 - abar(k_i)/abar(k_{i-1}), so
    alpha-bar is unchanged there (kept bit for bit); the model still receives the original step indices.
    """

    def __init__(self, use_timesteps, betas, **kwargs):
        base_betas = np.asarray(betas, dtype=np.float64)
        keep = sorted(set(int(k) for k in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= len(base_betas):
            raise ValueError(f"kept steps must be a non-empty subset of [0, {len(base_betas)})")
        abar = np.cumprod(1.0 - base_betas)[keep]
        abar_prev = np.append(1.0, abar[:-1])
        new_betas = 1.0 - abar / abar_prev
        self.use_timesteps = keep
        super().__init__(new_betas, timestep_map=np.array(keep), original_num_steps=len(base_betas),
                         alphas_cumprod=abar, **kwargs)
        self.base_alphas_cumprod = np.cumprod(1.0 - base_betas)
