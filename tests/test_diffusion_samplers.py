"""Ancestral and DDIM sampling: exact recovery of a one-image data set, marginals, DDIM/posterior identity, seeds."""

import math

import numpy as np
import pytest
import torch

from iddpm_core.diffusion import (SpacedDiffusion, ddim_sample, ddim_sample_loop,
                                  ddim_sample_loop_progressive, get_betas, p_sample, p_sample_loop,
                                  p_sample_loop_progressive, space_timesteps)

from bpd_loop import calc_bpd_loop

D64 = torch.float64
T = 200


class OneImageEps(torch.nn.Module):
    """Optimal epsilon predictor when the data set is the single image x0: eps = (x_t - sqrt(abar) x0)/sqrt(1 - abar),
    with abar of the ORIGINAL T-step chain at the (rescaled) original index the model receives."""

    def __init__(self, x0, T_orig, rescaled=True):
        super().__init__()
        self.x0 = x0
        self.abar = torch.from_numpy(np.cumprod(1 - get_betas("cosine", T_orig)))
        self.scale = 1000 / T_orig if rescaled else 1.0

    def forward(self, x, t):
        idx = t / self.scale
        assert torch.allclose(idx, idx.round(), atol=1e-3)
        ab = self.abar[idx.round().long()].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


def one_image():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(1, 2, 4, 4, generator=g, dtype=D64) * 1.8 - 0.9)


def spaced(spec, var_type="fixed_small", rescale=True):
    return SpacedDiffusion(space_timesteps(T, spec), get_betas("cosine", T), var_type=var_type,
                           rescale_timesteps=rescale)


@pytest.mark.parametrize("spec", ["", "25", "3,2,4", "ddim20", "1"])
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_ancestral_recovers_the_one_image(spec, var_type):
    x0 = one_image()
    d = spaced(spec, var_type)
    out = p_sample_loop(d, OneImageEps(x0, T), (3, 2, 4, 4), generator=torch.Generator().manual_seed(1), dtype=D64)
    torch.testing.assert_close(out, x0.expand(3, -1, -1, -1), rtol=0, atol=1e-9)


@pytest.mark.parametrize("spec", ["", "10", "ddim50", "1"])
def test_ddim_eta0_recovers_the_one_image(spec):
    x0 = one_image()
    d = spaced(spec, "learned_range" if spec == "10" else "fixed_small", rescale=spec != "ddim50")
    model = OneImageEps(x0, T, rescaled=spec != "ddim50")
    if d.learns_sigma:  # DDIM ignores the learned variance: give it garbage
        base = model
        model = lambda x, t: torch.cat([base(x, t), torch.full_like(x, 0.7)], 1)  # noqa: E731
    out = ddim_sample_loop(d, model, (2, 2, 4, 4), generator=torch.Generator().manual_seed(2), dtype=D64, eta=0.0)
    torch.testing.assert_close(out, x0.expand(2, -1, -1, -1), rtol=0, atol=1e-9)


@pytest.mark.parametrize("sampler,eta", [("ancestral", None), ("ddim", 0.5), ("ddim", 1.0)])
def test_chain_marginals_match_q(sampler, eta):
    """Started from x_T ~ q(x_T | x0) with the exact denoiser, each kept step has x_t ~ q(x_t | x0):
    checks the respaced posterior variance and the DDIM noise scale."""
    x0 = one_image()
    d = spaced("12")
    n = 1000
    g = torch.Generator().manual_seed(3)
    t_last = torch.full((n,), d.num_timesteps - 1)
    xT = d.q_sample(x0.expand(n, -1, -1, -1), t_last, generator=g)
    model = OneImageEps(x0, T)
    if sampler == "ancestral":
        steps = p_sample_loop_progressive(d, model, xT.shape, generator=g, noise=xT, dtype=D64)
    else:
        steps = ddim_sample_loop_progressive(d, model, xT.shape, generator=g, noise=xT, eta=eta, dtype=D64)
    m = n * x0.numel()
    for step in steps:
        k = step["t"] - 1  # the sample is x_{k}
        if k < 0:
            continue
        ab = d.alphas_cumprod[k]
        z = (step["sample"] - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        assert abs(z.mean().item()) < 5 / math.sqrt(m)
        assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / m)


def test_ddim_eta1_step_equals_ancestral_step():
    """With eta = 1, a DDIM step is the posterior step: same mean and standard deviation as fixed_small."""
    d = spaced("20")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 2, 4, 4, generator=g, dtype=D64)
    x0 = torch.rand(20, 2, 4, 4, generator=g, dtype=D64) * 2 - 1
    noise = torch.randn(20, 2, 4, 4, generator=g, dtype=D64)
    t = torch.arange(20)
    model = lambda x, t: x0  # noqa: E731  (an x0 output read as epsilon is fine: both paths share it)
    a = p_sample(d, model, x, t, noise=noise)
    b = ddim_sample(d, model, x, t, eta=1.0, noise=noise)
    torch.testing.assert_close(a["pred_xstart"], b["pred_xstart"])
    torch.testing.assert_close(a["sample"], b["sample"], rtol=1e-9, atol=1e-9)
    # no noise is added at t = 0
    t0 = torch.zeros(1, dtype=torch.long)
    model0 = lambda x, t: x0[:1]  # noqa: E731
    c = p_sample(d, model0, x[:1], t0, noise=noise[:1] * 100)
    torch.testing.assert_close(c["sample"], d.p_mean_variance(model0, x[:1], t0)["mean"])


def test_same_seed_same_samples():
    d = spaced("10", "learned_range")

    def model(x, t):  # any deterministic network
        return torch.cat([torch.sin(x + t[:, None, None, None] / 1000), torch.tanh(x)], 1)

    shape = (2, 1, 3, 3)
    for loop, kw in ((p_sample_loop, {}), (ddim_sample_loop, {"eta": 0.3})):
        a = loop(d, model, shape, generator=torch.Generator().manual_seed(5), **kw)
        b = loop(d, model, shape, generator=torch.Generator().manual_seed(5), progress=True, **kw)
        c = loop(d, model, shape, generator=torch.Generator().manual_seed(6), **kw)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.dtype == torch.float32 and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="initial noise has shape"):
        p_sample_loop(d, model, shape, noise=torch.zeros(1, 1, 3, 3))


def test_model_kwargs_reach_the_model():
    """Class labels (or any keyword) pass through sampling, losses and bits/dim unchanged."""
    d = spaced("4", "learned_range")
    y = torch.tensor([3, 5])
    seen = []

    def model(x, t, y=None):
        seen.append(y)
        return torch.cat([x * 0.1 + y.reshape(-1, 1, 1, 1) / 10, torch.zeros_like(x)], 1)

    p_sample_loop(d, model, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0), model_kwargs={"y": y})
    ddim_sample_loop(d, model, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0), model_kwargs={"y": y})
    x0 = torch.zeros(2, 1, 2, 2)
    d.training_losses(model, x0, torch.tensor([0, 3]), model_kwargs={"y": y})
    calc_bpd_loop(d, model, x0, model_kwargs={"y": y})
    assert len(seen) == 4 + 4 + 1 + 4 and all(s is y for s in seen)
