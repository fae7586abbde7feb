"""The variational bound of each image in bits/dim, every term computed.

Bound of one image: the prior KL(q(x_T|x_0) || N(0, I)), the KL terms
KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t = 1 .. T-1 and the discretized Gaussian decoder
NLL at t = 0, each divided by D log 2. Term t uses one draw x_t ~ q(x_t | x_0).

The noise of term t of image ``index`` comes from its own generator seeded by (seed, index, t)
(:func:`pair_noise`), so the numbers do not depend on how the terms are grouped into forward
passes, on the batch size, on the device or on interruptions. That leaves the grouping free:
by default the (image, t) pairs are flattened and cut into passes of ``batch_size`` pairs, so one
image's timesteps share a pass; ``by_timestep`` runs improved-diffusion's order instead, one
timestep per pass for t = T-1 .. 0.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from iddpm_core.diffusion import GaussianDiffusion, mean_flat
from iddpm_core.io import write_text
from iddpm_core.seeding import seed_from


class NLLError(ValueError):
    """Bad input to the bits/dim computation; the message names the file, shape or setting."""


NoiseFn = Callable[[int, int, tuple], torch.Tensor]
TERMS = ("vb", "xstart_mse", "mse")  # per (image, t): the bound's term, x_0 MSE, epsilon MSE


def pair_noise(seed: int, index: int, t: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise (float32, CPU) of term ``t`` of image ``index``, from a generator seeded
    by (seed, index, t)."""
    g = torch.Generator().manual_seed(seed_from(seed, index, t))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def _noise_for(seed: int, noise_fn: NoiseFn | None = None) -> NoiseFn:
    """``noise_fn(index, t, shape)`` if given, else :func:`pair_noise` with ``seed``."""
    return noise_fn if noise_fn is not None else (lambda i, t, shape: pair_noise(seed, i, t, shape))


def _image_indices(x0: torch.Tensor, indices: Sequence[int] | None) -> np.ndarray:
    """The index of each image of ``x0`` ([N, C, H, W]; default 0 .. N-1), checked."""
    if not isinstance(x0, torch.Tensor) or x0.ndim != 4:
        raise NLLError(f"images must be a tensor [N, C, H, W], got {getattr(x0, 'shape', type(x0).__name__)}")
    idx = np.arange(x0.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.shape[0] != x0.shape[0]:
        raise NLLError(f"got {x0.shape[0]} images but {idx.shape[0]} indices")
    return idx


@torch.no_grad()
def _pair_terms(diffusion: GaussianDiffusion, model: Callable, x0: torch.Tensor, rows: torch.Tensor,
                ts: torch.Tensor, keys: np.ndarray, noise_fn: NoiseFn, clip_denoised: bool, exact_cdf: bool,
                labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VLB term, x_0 MSE and epsilon MSE of the pairs (x0[rows[j]], ts[j]); ``keys[j]`` is the image
    index handed to ``noise_fn``. One forward pass."""
    shape = tuple(x0.shape[1:])
    noise = torch.stack([noise_fn(int(k), int(t), shape) for k, t in zip(keys, ts.tolist())])
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    start = x0[rows.to(x0.device)]
    t = ts.to(x0.device)
    x_t = diffusion.q_sample(start, t, noise=noise)
    kwargs = None if labels is None else {"y": labels.to(x0.device)[rows.to(x0.device)]}
    out = diffusion.vb_terms_bpd(model, start, x_t, t, clip_denoised=clip_denoised, model_kwargs=kwargs,
                                 exact_cdf=exact_cdf)
    xstart_mse = mean_flat((out["pred_xstart"] - start) ** 2)
    eps = diffusion.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
    return out["output"], xstart_mse, mean_flat((eps - noise) ** 2)


def _run_pairs(diffusion, model, x0, rows: np.ndarray, ts: np.ndarray, idx: np.ndarray, noise_fn: NoiseFn,
              cuts: Sequence[int], *, clip_denoised: bool = True, exact_cdf: bool = False, labels=None,
              progress: bool = False, desc: str = "bpd terms") -> tuple[np.ndarray, ...]:
    """The terms of the pairs (x0[rows[j]], ts[j]), one forward pass per run cuts[i] .. cuts[i+1];
    ``idx[rows[j]]`` names the image for the noise. Returns vb, xstart_mse, mse as float64 [P]."""
    P = len(rows)
    vb, xm, em = (np.empty(P, np.float64) for _ in range(3))
    bar = tqdm(total=P, desc=desc, unit="term", disable=not progress, leave=False)
    for s, e in zip(cuts[:-1], cuts[1:]):
        out = _pair_terms(diffusion, model, x0, torch.from_numpy(rows[s:e]), torch.from_numpy(ts[s:e]),
                          idx[rows[s:e]], noise_fn, clip_denoised, exact_cdf, labels)
        for dst, src in zip((vb, xm, em), out):
            dst[s:e] = src.double().cpu().numpy()
        bar.update(e - s)
    bar.close()
    return vb, xm, em


def _even_cuts(n: int, batch_size: int) -> list[int]:
    """Boundaries of runs of ``batch_size`` (the last may be shorter) over ``n`` items."""
    if batch_size < 1:
        raise NLLError(f"batch_size must be >= 1, got {batch_size}")
    return list(range(0, n, batch_size)) + [n]


def _layout(N: int, T: int, batch_size: int, by_timestep: bool) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Rows, timesteps and pass boundaries of every (image, t) pair, t = T-1 .. 0: image after image
    in passes of ``batch_size`` pairs, or timestep after timestep in passes of ``batch_size`` images."""
    down = np.arange(T - 1, -1, -1, dtype=np.int64)
    if not by_timestep:
        return np.repeat(np.arange(N, dtype=np.int64), T), np.tile(down, N), _even_cuts(N * T, batch_size)
    per_t = _even_cuts(N, batch_size)[:-1]
    cuts = [j * N + s for j in range(T) for s in per_t] + [N * T]
    return np.tile(np.arange(N, dtype=np.int64), T), np.repeat(down, N), cuts


def _totals(diffusion: GaussianDiffusion, x0: torch.Tensor, vb: np.ndarray) -> dict:
    """Per image [N]: "total_bpd" (prior + every term), "prior_bpd", "decoder_bpd" (t = 0) and
    "kl_bpd" (the terms t >= 1), from the terms ``vb`` [N, T]."""
    prior = diffusion.prior_bpd(x0).double().cpu().numpy()
    decoder = vb[:, 0]
    kl = vb[:, 1:].sum(axis=1)
    return {"total_bpd": prior + decoder + kl, "prior_bpd": prior, "decoder_bpd": decoder, "kl_bpd": kl}


@torch.no_grad()
def bound_terms(diffusion: GaussianDiffusion, model: Callable, x0: torch.Tensor,
                indices: Sequence[int] | None = None, *, seed: int = 0, batch_size: int = 64,
                clip_denoised: bool = True, exact_cdf: bool = False, labels: torch.Tensor | None = None,
                progress: bool = False, noise_fn: NoiseFn | None = None, by_timestep: bool = False) -> dict:
    """Every term of the bound of each image in ``x0`` ([N, C, H, W] in [-1, 1]). ``batch_size``
    pairs per forward pass, each image's timesteps t = T-1 .. 0 in a row; with ``by_timestep``,
    ``batch_size`` images per pass, one timestep after the other. ``indices`` (default 0..N-1) name
    the images for the noise seeds; ``noise_fn(index, t, shape)`` replaces :func:`pair_noise`
    (tests feed another path's noise).

    Returns float64 numpy arrays: "vb" [N, T] (bits/dim; column 0 is the decoder NLL),
    "xstart_mse" and "mse" (epsilon) [N, T], and per image "total_bpd", "prior_bpd",
    "decoder_bpd", "kl_bpd" (sum of the KL terms t >= 1) [N].
    """
    idx = _image_indices(x0, indices)
    N, T = x0.shape[0], diffusion.num_timesteps
    rows, ts, cuts = _layout(N, T, batch_size, by_timestep)
    got = _run_pairs(diffusion, model, x0, rows, ts, idx, _noise_for(seed, noise_fn), cuts,
                    clip_denoised=clip_denoised, exact_cdf=exact_cdf, labels=labels, progress=progress,
                    desc="bpd loop" if by_timestep else "bpd terms")
    out = {k: np.empty((N, T)) for k in TERMS}
    for k, v in zip(TERMS, got):
        out[k][rows, ts] = v
    out.update(_totals(diffusion, x0, out["vb"]))
    return out


def breakdown(vb: np.ndarray, xstart_mse: np.ndarray, mse: np.ndarray) -> dict:
    """Per-t means over images: vb (mean term), vb_stderr, vb_rms, xstart_mse, mse; arrays [T]."""
    n = vb.shape[0]
    se = vb.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full(vb.shape[1], np.nan)
    return {"t": np.arange(vb.shape[1]), "vb": vb.mean(axis=0), "vb_stderr": se,
            "vb_rms": np.sqrt((vb ** 2).mean(axis=0)), "xstart_mse": xstart_mse.mean(axis=0),
            "mse": mse.mean(axis=0)}


def write_breakdown(path: str | os.PathLike, table: dict) -> None:
    """The :func:`breakdown` table as CSV, one row per t (read back by ``estimate.load_profile``)."""
    cols = ("t", "vb", "vb_stderr", "vb_rms", "xstart_mse", "mse")
    lines = [",".join(cols)]
    for j in range(len(table["t"])):
        lines.append(",".join(str(int(table["t"][j])) if c == "t" else repr(float(table[c][j])) for c in cols))
    write_text(path, "\n".join(lines) + "\n")
