"""An unbiased estimate of the bound from K timesteps per image.

K timesteps t >= 1 are drawn per image, uniformly or from a proposal p; the KL sum is estimated by
mean_j L_{t_j} / p_{t_j}, and the prior and the decoder term (t = 0) are always computed. The terms
shrink by orders of magnitude from t = 1 to T - 1, so uniform draws are heavy-tailed at small K
and their sample standard error is optimistic; a proposal proportional to the per-t RMS of a pilot
run (:func:`proposal`, :func:`load_profile`) cut the error 30-fold or more at T = 1000 and kept the
standard error honest (results/benchmarks/nll.csv).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from iddpm_core.diffusion import GaussianDiffusion
from iddpm_core.seeding import seed_from
from iddpm_eval.nll.bound import NLLError, _even_cuts, _image_indices, _noise_for, _run_pairs


def proposal(num_timesteps: int, profile: np.ndarray | None = None, uniform_mix: float = 0.05) -> np.ndarray:
    """Sampling probabilities over t = 1 .. T-1 (array [T] with p[0] = 0): uniform without a profile,
    else proportional to ``profile`` (a per-t loss scale, e.g. the RMS of the term over images),
    mixed with ``uniform_mix`` of the uniform so that every t keeps a positive probability."""
    T = int(num_timesteps)
    if T < 2:
        raise NLLError(f"a {T}-step chain has no KL terms to sample")
    p = np.zeros(T, np.float64)
    if profile is None:
        p[1:] = 1.0 / (T - 1)
        return p
    prof = np.asarray(profile, np.float64).reshape(-1)
    if prof.shape != (T,):
        raise NLLError(f"the loss profile has {prof.shape[0]} entries but the diffusion has T = {T} steps")
    w = np.abs(prof[1:])
    if not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise NLLError("the loss profile must be finite and not all zero on t >= 1")
    if not 0.0 < uniform_mix <= 1.0:
        raise NLLError(f"uniform_mix must lie in (0, 1], got {uniform_mix}")
    p[1:] = (1.0 - uniform_mix) * w / w.sum() + uniform_mix / (T - 1)
    return p


def sample_timesteps(p: np.ndarray, k: int, seed: int, index: int) -> np.ndarray:
    """K timesteps drawn with replacement from ``p`` for image ``index`` (generator seeded by
    (seed, index, 0, 1), apart from the noise seeds)."""
    g = torch.Generator().manual_seed(seed_from(seed, index, 0, 1))
    return torch.multinomial(torch.from_numpy(p), k, replacement=True, generator=g).numpy().astype(np.int64)


def _check_proposal(p: np.ndarray | None, T: int) -> np.ndarray:
    p = proposal(T) if p is None else np.asarray(p, np.float64)
    if p.shape != (T,) or p[0] != 0 or np.any(p < 0) or not math.isclose(p.sum(), 1.0, rel_tol=1e-9):
        raise NLLError(f"p must be probabilities [T={T}] over t >= 1 (p[0] = 0) summing to 1")
    return p


@torch.no_grad()
def estimate_bound(diffusion: GaussianDiffusion, model: Callable, x0: torch.Tensor, k: int,
                   indices: Sequence[int] | None = None, *, p: np.ndarray | None = None, seed: int = 0,
                   sample_seed: int | None = None, batch_size: int = 64, clip_denoised: bool = True,
                   exact_cdf: bool = False, labels: torch.Tensor | None = None, progress: bool = False) -> dict:
    """Unbiased estimate of the bound of each image from ``k`` timesteps t >= 1 drawn from ``p``
    (default uniform; see :func:`proposal`): kl = mean_j L_{t_j} / p_{t_j}, plus the prior and the
    decoder term (t = 0), which are always computed. The terms use the same noise as
    ``bound_terms`` with the same ``seed``; the timesteps come from ``sample_seed`` (default
    ``seed``).

    Returns float64 arrays [N]: "total_bpd", "prior_bpd", "decoder_bpd", "kl_bpd" and "kl_var",
    the estimated variance of "kl_bpd" over the timestep draws (sample variance / k); and
    "timesteps" [N, k].
    """
    idx = _image_indices(x0, indices)
    N, T = x0.shape[0], diffusion.num_timesteps
    if k < 2:
        raise NLLError(f"--estimate needs K >= 2 timesteps per image to report a standard error, got {k}")
    p = _check_proposal(p, T)
    sseed = seed if sample_seed is None else sample_seed
    drawn = np.stack([sample_timesteps(p, k, sseed, int(i)) for i in idx])
    rows = np.repeat(np.arange(N, dtype=np.int64), k + 1)
    ts = np.concatenate([np.zeros((N, 1), np.int64), drawn], axis=1).reshape(-1)
    vb, _, _ = _run_pairs(diffusion, model, x0, rows, ts, idx, _noise_for(seed), _even_cuts(len(rows), batch_size),
                          clip_denoised=clip_denoised, exact_cdf=exact_cdf, labels=labels, progress=progress,
                          desc=f"bpd estimate K={k}")
    vb = vb.reshape(N, k + 1)
    ratio = vb[:, 1:] / p[drawn]
    kl = ratio.mean(axis=1)
    prior = diffusion.prior_bpd(x0).double().cpu().numpy()
    return {"total_bpd": prior + vb[:, 0] + kl, "prior_bpd": prior, "decoder_bpd": vb[:, 0], "kl_bpd": kl,
            "kl_var": ratio.var(axis=1, ddof=1) / k, "timesteps": drawn}


def _profile_from_csv(path: Path, T: int) -> np.ndarray:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    col = "vb_rms" if rows and "vb_rms" in rows[0] else "vb"
    if not rows or col not in rows[0] or "t" not in rows[0]:
        raise NLLError(f"{path}: expected a breakdown CSV with columns t and vb (or vb_rms)")
    prof = np.full(T, np.nan)
    for r in rows:
        t = int(r["t"])
        if not 0 <= t < T:
            raise NLLError(f"{path}: timestep {t} outside [0, {T}); the profile is for another T")
        prof[t] = float(r[col])
    if np.isnan(prof).any() or len(rows) != T:
        raise NLLError(f"{path}: has {len(rows)} timesteps, the diffusion has T = {T}")
    return prof


def _profile_from_checkpoint(path: Path, T: int) -> np.ndarray:
    from iddpm_core.checkpoint import load_checkpoint

    st = load_checkpoint(path).get("sampler_state") or {}
    if "loss_history" not in st:
        raise NLLError(f"{path}: checkpoint holds no loss-second-moment sampler state (trained with a uniform "
                       "sampler?); give a breakdown CSV from a pilot run instead")
    hist = np.asarray(st["loss_history"], np.float64)
    counts = np.asarray(st["loss_counts"])
    if hist.shape[0] != T:
        raise NLLError(f"{path}: sampler state is for T = {hist.shape[0]} steps, the diffusion has T = {T}")
    if not (counts == hist.shape[1]).all():
        raise NLLError(f"{path}: the sampler has not recorded {hist.shape[1]} losses for every t yet")
    return np.sqrt((hist ** 2).mean(axis=1))


def load_profile(path: str | os.PathLike, num_timesteps: int) -> np.ndarray:
    """A per-t loss profile [T] for :func:`proposal`, from a breakdown CSV written by a previous run
    (column ``vb_rms``, else ``vb``) or a training checkpoint with a warmed-up loss-second-moment
    sampler (sqrt of the mean squared recorded loss per t)."""
    path = Path(path)
    if not path.is_file():
        raise NLLError(f"loss profile not found: {path}")
    read = _profile_from_csv if path.suffix == ".csv" else _profile_from_checkpoint
    return read(path, int(num_timesteps))
