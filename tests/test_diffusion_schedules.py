"""Noise schedules against their closed forms and diffusers' schedulers."""

import math

import numpy as np
import pytest
import torch

from iddpm_core.diffusion import cosine_alpha_bar, get_betas


@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_cosine_matches_closed_form(T):
    betas = get_betas("cosine", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)

    def f(t):  # closed form evaluated with plain Python floats, independently of numpy
        return math.cos(((t / T + 0.008) / 1.008) * math.pi / 2) ** 2

    expected = [min(1 - f(i + 1) / f(i), 0.999) for i in range(T)]
    np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=0)
    # before any clipping, cumulative product telescopes to abar(t)/abar(0)
    abar = np.cumprod(1 - betas)
    unclipped = np.flatnonzero(betas < 0.999)
    last = unclipped[-1] if np.all(np.diff(unclipped) == 1) else None
    k = np.arange(last + 1)
    np.testing.assert_allclose(abar[k], [f(i + 1) / f(0) for i in k], rtol=1e-10)
    np.testing.assert_allclose(cosine_alpha_bar(k / T), [f(i) for i in k], rtol=1e-12)


@pytest.mark.parametrize("T", [1000, 4000])
def test_cosine_only_last_beta_clipped(T):
    betas = get_betas("cosine", T)
    assert betas[-1] == 0.999
    assert np.all(betas[:-1] < 0.999)


@pytest.mark.parametrize("T", [100, 1000])
def test_cosine_equals_diffusers_squaredcos_cap_v2(T):
    from diffusers import DDPMScheduler

    peer = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas
    ours = torch.from_numpy(get_betas("cosine", T))
    # diffusers computes in float64 python floats then stores float32
    torch.testing.assert_close(ours.float(), peer, rtol=1e-6, atol=1e-7)


def test_linear_matches_diffusers_and_scaling():
    from diffusers import DDPMScheduler

    peer = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02).betas
    torch.testing.assert_close(torch.from_numpy(get_betas("linear", 1000)).float(), peer)
    b = get_betas("linear", 4000)
    assert b[0] == pytest.approx(1e-4 / 4, rel=1e-12) and b[-1] == pytest.approx(0.02 / 4, rel=1e-12)
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 4 / 3999, rtol=1e-9)


def test_bad_schedule_inputs():
    with pytest.raises(ValueError, match="unknown noise schedule 'cosin'"):
        get_betas("cosin", 100)
    with pytest.raises(ValueError, match="positive integer"):
        get_betas("cosine", 0)
    with pytest.raises(ValueError, match="T > 20"):
        get_betas("linear", 10)
