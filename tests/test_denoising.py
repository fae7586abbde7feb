"""Noise robustness: timestep matching in closed form, an oracle denoiser, PSNR of pure noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iddpm_core.diffusion import DiffusionConfig, build_diffusion
from iddpm_eval.denoising import (denoise_one_step, denoising_rows, image_scores, matching_timestep,
                                  noise_to_signal, t_interval)

DIFF = build_diffusion(DiffusionConfig(steps=1000, schedule="cosine", var_type="fixed_large", loss="simple"), "")


@pytest.mark.parametrize("sigma", [0.03, 0.1, 0.3, 1.0])
def test_matching_timestep_is_the_nearest_and_exact_on_the_grid(sigma):
    m = matching_timestep(DIFF.alphas_cumprod, sigma)
    r = noise_to_signal(DIFF.alphas_cumprod)
    t = m["t"]
    # nearest on the grid: no other t has a noise-to-signal ratio closer to 2 sigma
    assert abs(r[t] - 2 * sigma) == np.abs(r - 2 * sigma).min()
    # closed form: abar = 1 / (1 + 4 sigma^2) lies between the grid's neighbours of t (r_t increases in t)
    assert 0 < t < 999
    assert DIFF.alphas_cumprod[t + 1] <= m["abar_exact"] <= DIFF.alphas_cumprod[t - 1]
    assert m["abar_exact"] == pytest.approx(1 / (1 + 4 * sigma ** 2))
    # exactness at sigma_t: sqrt(abar_t) (x0 + 2 sigma_t eps) is q_sample(x0, t, eps)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.rand(2, 1, 6, 6, generator=g) * 2 - 1, torch.randn(2, 1, 6, 6, generator=g)
    ours = math.sqrt(m["abar_t"]) * (x0 + 2 * m["sigma_t"] * eps)
    ref = DIFF.q_sample(x0, torch.full((2,), t, dtype=torch.long), noise=eps)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)  # float32 products of O(1) numbers
    # the grid's mismatch is small where the schedule is fine: relative step of r between neighbours
    # nearest of a monotone grid: |r_t - 2 sigma| is at most half the larger neighbouring gap
    assert abs(m["sigma_t"] - sigma) <= (r[t + 1] - r[t - 1]) / 4


def test_t_interval_against_scipy():
    from scipy import stats

    v = np.random.default_rng(0).normal(3.0, 2.0, 50)
    ci = t_interval(v)
    lo, hi = stats.t.interval(0.95, 49, loc=v.mean(), scale=stats.sem(v))
    assert (ci["low"], ci["high"]) == pytest.approx((lo, hi), rel=1e-12)


def test_psnr_of_pure_noise_matches_its_closed_form():
    # PSNR of x + sigma n against x, data range 1: 10 log10(1 / mse) with mse ~ sigma^2 chi2_D / D;
    # per image std ~ (10 / ln 10) sqrt(2 / D) = 0.22 dB at D = 784, mean of 200 images 0.016 dB
    rng = np.random.default_rng(0)
    clean = rng.uniform(0.2, 0.8, (200, 28, 28, 1))
    for sigma in (0.05, 0.2):
        psnr, ssim = image_scores(clean, clean + sigma * rng.standard_normal(clean.shape))
        assert psnr.mean() == pytest.approx(-20 * math.log10(sigma), abs=0.1)
        assert np.all(ssim < 1)


class _Oracle(torch.nn.Module):
    """The exact epsilon predictor for a one-image data set: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar),
    so the posterior mean E[x0 | x_t] is the image itself."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y=None):
        a = torch.from_numpy(DIFF.alphas_cumprod).float()[t.round().long()][:, None, None, None]
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


def test_oracle_denoiser_returns_the_clean_image():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (1, 12, 12, 1), dtype=np.uint8)
    images = np.repeat(image, 6, axis=0)
    x0 = torch.from_numpy(image.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    rows = denoising_rows(_Oracle(x0), DIFF, images, sigmas=(0.05, 0.3), seed=0, batch_size=4)
    for r in rows:
        assert r["denoised_psnr"] > 80  # float32 round-off only (exact: infinite)
        assert r["denoised_ssim"] == pytest.approx(1.0, abs=1e-6)
        assert r["noisy_psnr"] == pytest.approx(-20 * math.log10(r["sigma"]), abs=1.5)  # 6 small images
        assert r["noisy_psnr_low"] <= r["noisy_psnr"] <= r["noisy_psnr_high"]
    assert rows[1]["t"] > rows[0]["t"]


def test_zero_predictor_returns_the_rescaled_noisy_image():
    # eps = 0 predicts x0 = x_t / sqrt(abar) = 2 y - 1: the denoised image is the noisy one, clipped
    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, y=None):
            return torch.zeros_like(x)

    noisy = torch.rand(3, 1, 5, 5) * 1.4 - 0.2
    out = denoise_one_step(Zero(), DIFF, noisy, matching_timestep(DIFF.alphas_cumprod, 0.1)["t"])
    torch.testing.assert_close(out, noisy.clamp(0, 1), rtol=0, atol=1e-6)


def test_denoising_rows_refuses_float_images():
    with pytest.raises(ValueError, match="uint8 NHWC"):
        denoising_rows(torch.nn.Linear(1, 1), DIFF, np.zeros((2, 4, 4, 1), np.float32))


def test_checkpoint_rows_use_the_ema_weights_on_the_first_images(tmp_path):
    from iddpm_core.checkpoint import save_checkpoint
    from iddpm_core.data import load_source
    from iddpm_core.ema import rate_key
    from iddpm_core.models import ModelConfig, build_model
    from iddpm_eval.denoising import denoising_of_checkpoint

    cfg = ModelConfig(kind="unet", image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2),
                      attention_resolutions=(4,), num_heads=2, learn_sigma=True)
    dcfg = DiffusionConfig(steps=10)
    torch.manual_seed(0)
    raw, ema = build_model(cfg), build_model(cfg)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "ck.pt"
    save_checkpoint(path, raw, cfg, diffusion_config=dcfg.to_dict(), step=3,
                    ema={rate_key(0.999): ema.state_dict()})
    rows = denoising_of_checkpoint(str(path), "digits", num=3, sigmas=(0.2,), seed=1, batch_size=2)
    images = load_source("digits").batch([0, 1, 2])[0]
    want = denoising_rows(ema.eval(), build_diffusion(dcfg, ""), images, (0.2,), 1, 2)
    raw_rows = denoising_rows(raw.eval(), build_diffusion(dcfg, ""), images, (0.2,), 1, 2)
    assert len(rows) == 1 and rows[0]["step"] == 3 and rows[0]["kind"] == "unet" and rows[0]["n"] == 3
    assert rows[0]["denoised_psnr"] == pytest.approx(want[0]["denoised_psnr"], rel=1e-6)
    assert rows[0]["denoised_psnr"] != pytest.approx(raw_rows[0]["denoised_psnr"], rel=1e-6)
