"""Noise robustness ("The Missing U"'s denoising experiment, done with many images and intervals):
Gaussian noise of standard deviation sigma is added to held-out images, a trained diffusion model
removes it in one step, and PSNR / SSIM (scikit-image) against the clean images are reported with
95% t-intervals over images, beside the same numbers for the noisy input (doing nothing).

Ranges. Images are taken in [0, 1] (uint8 / 255), the authors' range, and sigma is in those units
(their sigmas 0.03 ... 0.3). Noise is not clamped (the authors clamp to [0, 1], which makes the
noise non-Gaussian near black and white; ``clamp=True`` does what they did). The model sees
[-1, 1], where the image is x0 = 2 x - 1 and the noise 2 sigma.

Matching timestep. q(x_t | x0): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, so
x_t / sqrt(abar_t) = x0 + sqrt((1 - abar_t) / abar_t) eps: the noisy image y = x0 + 2 sigma eps is
a scaled x_t exactly when sqrt((1 - abar) / abar) = 2 sigma, i.e. abar = 1 / (1 + 4 sigma^2). On
the discrete chain we take the t whose noise-to-signal ratio r_t = sqrt((1 - abar_t) / abar_t) is
nearest to 2 sigma and feed the model sqrt(abar_t) y (the residual mismatch, r_t against 2 sigma,
is reported as ``sigma_t``: the sigma that t matches exactly). The one-step denoiser is the model's
x0 prediction at t (clipped to [-1, 1]), mapped back to [0, 1].
"""

from __future__ import annotations

import math

import numpy as np
import torch

DEFAULT_SIGMAS = (0.03, 0.05, 0.1, 0.2, 0.3)


def _skimage_metrics():
    try:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("PSNR / SSIM need scikit-image: pip install 'iddpm[denoise]' "
                          "(or pip install scikit-image)") from exc
    return peak_signal_noise_ratio, structural_similarity


def noise_to_signal(alphas_cumprod: np.ndarray) -> np.ndarray:
    """r_t = sqrt((1 - abar_t) / abar_t): the noise std of x_t / sqrt(abar_t) around x0."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - a) / a)


def matching_timestep(alphas_cumprod: np.ndarray, sigma: float, scale: float = 2.0) -> dict:
    """The t whose noise matches pixel noise ``sigma`` (``scale`` = model units per pixel unit, 2 for
    [0, 1] -> [-1, 1]): nearest r_t to scale * sigma. Returns t, abar_t, the exact continuous
    abar = 1 / (1 + (scale sigma)^2), and sigma_t = r_t / scale (the sigma t matches exactly)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    r = noise_to_signal(alphas_cumprod)
    t = int(np.argmin(np.abs(r - scale * sigma)))
    return {"t": t, "abar_t": float(alphas_cumprod[t]), "abar_exact": 1.0 / (1.0 + (scale * sigma) ** 2),
            "sigma_t": float(r[t] / scale)}


def t_interval(values, level: float = 0.95) -> dict:
    """Mean with a Student-t interval over the values (images) and the standard error."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n < 2:
        raise ValueError(f"an interval needs at least 2 values, got {n}")
    mean, se = float(v.mean()), float(v.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    return {"mean": mean, "low": mean - half, "high": mean + half, "stderr": se, "n": n}


def image_scores(clean: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (dB) and SSIM of ``other`` against ``clean``, both float NHWC in [0, 1]
    (scikit-image, data_range 1; SSIM with its default 7x7 window, channels averaged)."""
    psnr_fn, ssim_fn = _skimage_metrics()
    if clean.shape != other.shape or clean.ndim != 4:
        raise ValueError(f"expected two NHWC arrays of one shape, got {clean.shape} and {other.shape}")
    multichannel = clean.shape[-1] > 1
    psnr, ssim = [], []
    for a, b in zip(clean.astype(np.float64), other.astype(np.float64)):
        psnr.append(psnr_fn(a, b, data_range=1.0))
        if multichannel:
            ssim.append(ssim_fn(a, b, data_range=1.0, channel_axis=-1))
        else:
            ssim.append(ssim_fn(a[..., 0], b[..., 0], data_range=1.0))
    return np.asarray(psnr), np.asarray(ssim)


@torch.no_grad()
def denoise_one_step(model, diffusion, noisy01: torch.Tensor, t: int, model_kwargs: dict | None = None) -> torch.Tensor:
    """The model's clipped x0 prediction from ``noisy01`` (NCHW in [0, 1] units) read as x_t at ``t``;
    returned in [0, 1]."""
    abar = float(diffusion.alphas_cumprod[t])
    x_t = math.sqrt(abar) * (2.0 * noisy01 - 1.0)
    tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    out = diffusion.p_mean_variance(model, x_t, tt, clip_denoised=True, model_kwargs=model_kwargs)
    return (out["pred_xstart"] + 1.0) / 2.0


def denoising_rows(model, diffusion, images: np.ndarray, sigmas=DEFAULT_SIGMAS, seed: int = 0, batch_size: int = 64,
                   clamp: bool = False, level: float = 0.95) -> list[dict]:
    """One row per sigma: the matched timestep, PSNR and SSIM of the denoised and of the noisy images
    (mean, t-interval, standard error over images). ``images``: uint8 NHWC held-out images;
    ``model``: an epsilon-predicting denoiser with its ``diffusion`` (full chain)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 NHWC, got {images.dtype} with shape {images.shape}")
    clean = images.astype(np.float32) / 255.0
    device = next(model.parameters()).device if hasattr(model, "parameters") else torch.device("cpu")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    rows = []
    try:
        for k, sigma in enumerate(sigmas):
            m = matching_timestep(diffusion.alphas_cumprod, float(sigma))
            g = torch.Generator().manual_seed(seed * 1000 + k)
            noisy_all, den_all = [], []
            for i in range(0, len(clean), batch_size):
                x = torch.from_numpy(clean[i:i + batch_size]).permute(0, 3, 1, 2)
                noisy = x + float(sigma) * torch.randn(x.shape, generator=g)
                if clamp:
                    noisy = noisy.clamp(0.0, 1.0)
                den = denoise_one_step(model, diffusion, noisy.to(device), m["t"]).cpu()
                noisy_all.append(noisy.permute(0, 2, 3, 1).numpy())
                den_all.append(den.permute(0, 2, 3, 1).numpy())
            noisy_np, den_np = np.concatenate(noisy_all), np.concatenate(den_all)
            row = {"sigma": float(sigma), **m, "n": len(clean), "clamp": clamp, "seed": seed}
            for name, arr in (("denoised", den_np), ("noisy", noisy_np)):
                psnr, ssim = image_scores(clean, arr)
                for metric, vals in (("psnr", psnr), ("ssim", ssim)):
                    ci = t_interval(vals, level)
                    row.update({f"{name}_{metric}": ci["mean"], f"{name}_{metric}_low": ci["low"],
                                f"{name}_{metric}_high": ci["high"], f"{name}_{metric}_stderr": ci["stderr"]})
            rows.append(row)
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    return rows


def denoising_of_checkpoint(checkpoint: str, data: str, num: int = 500, sigmas=DEFAULT_SIGMAS, seed: int = 0,
                            batch_size: int = 64, clamp: bool = False, ema_rate=None) -> list[dict]:
    """:func:`denoising_rows` for a trainer checkpoint (EMA weights by default) on the first ``num``
    images of ``data`` (e.g. ``fashion-mnist:test``: held out from training)."""
    from iddpm_core.data import load_source
    from iddpm_core.diffusion import build_diffusion
    from iddpm_core.checkpoint import load_model

    sm = load_model(checkpoint, ema=ema_rate)
    src = load_source(data)
    n = min(int(num), len(src))
    if n < 2:
        raise ValueError(f"{data}: need at least 2 images for an interval, it holds {len(src)}")
    images, _ = src.batch(list(range(n)))
    diffusion = build_diffusion(sm.diffusion_config, "")
    rows = denoising_rows(sm.model, diffusion, images, sigmas, seed, batch_size, clamp)
    for r in rows:
        r.update(checkpoint=str(checkpoint), kind=sm.model_config.kind, data=str(data), step=sm.step)
    return rows
