"""The bits/dim bound computed the plain way, one timestep at a time (improved-diffusion's
``calc_bpd_loop``): the reference that the batched bound of :mod:`iddpm_eval.nll` is checked
against (import as ``from bpd_loop import ...``)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from iddpm_core.diffusion import mean_flat, randn
from iddpm_eval.nll import pair_noise


@torch.no_grad()
def calc_bpd_loop(diffusion, model, x_start, clip_denoised=True, exact_cdf=False, generator=None, progress=False,
                  model_kwargs=None, noise_fn=None, batch_size=None) -> dict:
    """Bits/dim of each image in ``x_start`` over the whole chain. For t = T-1 .. 0 and each run of
    ``batch_size`` images (all by default): x_t ~ q(x_t | x_0) with noise ``noise_fn(rows, t)`` or,
    without it, the next draw of ``generator`` for all images; term t from ``vb_terms_bpd``.

    Returns tensors "total_bpd" [N] (sum of terms + prior), "prior_bpd" [N], "vb", "xstart_mse" and
    "mse" (epsilon) [N, T], columns indexed by t."""
    N, T = x_start.shape[0], diffusion.num_timesteps
    bs = batch_size or N
    vb, xstart_mse, eps_mse = (torch.empty(N, T, dtype=x_start.dtype, device=x_start.device) for _ in range(3))
    for i in tqdm(range(T - 1, -1, -1), desc="bpd", disable=not progress, leave=False):
        drawn = None if noise_fn else randn(x_start.shape, generator, x_start.device, x_start.dtype)
        for s in range(0, N, bs):
            rows = torch.arange(s, min(s + bs, N))
            whole = len(rows) == N
            x0 = x_start if whole else x_start[rows]
            noise = noise_fn(rows, i) if noise_fn else drawn[rows]
            kwargs = model_kwargs if whole or not model_kwargs else {k: v[rows] for k, v in model_kwargs.items()}
            t = torch.full((len(rows),), i, dtype=torch.long, device=x_start.device)
            x_t = diffusion.q_sample(x0, t, noise=noise)
            out = diffusion.vb_terms_bpd(model, x0, x_t, t, clip_denoised=clip_denoised, model_kwargs=kwargs,
                                         exact_cdf=exact_cdf)
            vb[rows, i] = out["output"]
            xstart_mse[rows, i] = mean_flat((out["pred_xstart"] - x0) ** 2)
            eps = diffusion.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            eps_mse[rows, i] = mean_flat((eps - noise) ** 2)
    prior = diffusion.prior_bpd(x_start)
    return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb, "xstart_mse": xstart_mse,
            "mse": eps_mse}


def bound_terms_loop(diffusion, model, x0, indices=None, *, seed=0, batch_size=64, clip_denoised=True,
                     exact_cdf=False, labels=None) -> dict:
    """:func:`calc_bpd_loop` with the noise of ``iddpm_eval.nll.bound_terms`` (``pair_noise`` of
    image ``indices[j]``, default j) and its return: float64 numpy arrays, the total summed in float64."""
    idx = np.arange(x0.shape[0]) if indices is None else np.asarray(indices)
    shape = tuple(x0.shape[1:])

    def noise(rows, t):
        return torch.stack([pair_noise(seed, int(idx[r]), t, shape) for r in rows]).to(x0.device, x0.dtype)

    res = calc_bpd_loop(diffusion, model, x0, clip_denoised, exact_cdf, model_kwargs=None if labels is None
                        else {"y": labels}, noise_fn=noise, batch_size=batch_size)
    out = {k: v.double().cpu().numpy() for k, v in res.items()}
    out["total_bpd"] = out["prior_bpd"] + out["vb"].sum(axis=1)
    return out
