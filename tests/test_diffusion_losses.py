"""Gaussian KL and the discretized Gaussian decoder against closed forms and peers."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from iddpm_core.diffusion import (approx_standard_normal_cdf, discretized_gaussian_log_likelihood,
                                  normal_kl, standard_normal_cdf)


def test_normal_kl_equals_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    peer = torch.distributions.kl_divergence(torch.distributions.Normal(m1, torch.exp(0.5 * lv1)),
                                             torch.distributions.Normal(m2, torch.exp(0.5 * lv2)))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), peer, rtol=1e-12, atol=1e-12)
    # scalars broadcast (the prior term uses N(0, 1))
    peer0 = torch.distributions.kl_divergence(torch.distributions.Normal(m1, torch.exp(0.5 * lv1)),
                                              torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(normal_kl(m1, lv1, 0.0, 0.0), peer0, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError):
        normal_kl(0.0, 0.0, 0.0, 0.0)


def test_cdfs_against_scipy():
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    ref = torch.from_numpy(norm.cdf(x.numpy()))
    torch.testing.assert_close(standard_normal_cdf(x), ref, rtol=0, atol=1e-14)
    err = (approx_standard_normal_cdf(x) - ref).abs().max().item()
    assert 1e-6 < err < 3e-4  # an approximation, and a close one


@pytest.mark.parametrize("exact", [False, True])
def test_decoder_bins_sum_to_one(exact):
    g = torch.Generator().manual_seed(1)
    n = 64
    means = (torch.rand(n, generator=g, dtype=torch.float64) * 2.4 - 1.2)
    log_scales = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 5.0  # sigma in e^-5 .. e^-1
    bins = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1
    x = bins[None, :].expand(n, 256)
    ll = discretized_gaussian_log_likelihood(x, means[:, None].expand(n, 256),
                                             log_scales[:, None].expand(n, 256), exact_cdf=exact)
    total = torch.exp(ll).sum(dim=1)
    torch.testing.assert_close(total, torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-8)


def test_decoder_exact_matches_scipy_bins():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (500,), generator=g).double() * 2 / 255 - 1
    mean = torch.randn(500, generator=g, dtype=torch.float64) * 0.5
    log_scale = torch.rand(500, generator=g, dtype=torch.float64) * 3 - 4
    ours = discretized_gaussian_log_likelihood(x, mean, log_scale, exact_cdf=True).numpy()
    xs, m, s = x.numpy(), mean.numpy(), np.exp(log_scale.numpy())
    hi = np.where(xs > 0.999, 1.0, norm.cdf((xs + 1 / 255 - m) / s))
    lo = np.where(xs < -0.999, 0.0, norm.cdf((xs - 1 / 255 - m) / s))
    # scipy's survival function avoids the cancellation of 1 - 1 in the upper tail
    hi_sf = np.where(xs > 0.999, 0.0, norm.sf((xs + 1 / 255 - m) / s))
    lo_sf = np.where(xs < -0.999, 1.0, norm.sf((xs - 1 / 255 - m) / s))
    mass = np.where(xs > m, lo_sf - hi_sf, hi - lo)
    expected = np.log(np.maximum(mass, 1e-12))
    likely = expected > -15  # bins with mass > 3e-7: float64 differences of CDFs are exact enough
    assert likely.sum() > 100
    np.testing.assert_allclose(ours[likely], expected[likely], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_decoder_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="share a shape"):
        discretized_gaussian_log_likelihood(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 2))
