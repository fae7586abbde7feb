"""Gradient noise scale: the estimators against explicit loops, their unbiasedness on a known
distribution, and B_simple of least squares against its closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iddpm_eval import gradient_noise as gn


def test_grad_sq_and_jackknife_equal_explicit_loops():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(6, 5)) + 0.3
    m = len(g)
    pairs = [g[a] @ g[b] for a in range(m) for b in range(m) if a != b]
    est, se = gn.grad_sq_unbiased(g)
    assert est == pytest.approx(sum(pairs) / (m * (m - 1)), rel=1e-12)
    loo = []
    for drop in range(m):
        h = np.delete(g, drop, axis=0)
        loo.append(sum(h[a] @ h[b] for a in range(m - 1) for b in range(m - 1) if a != b) / ((m - 1) * (m - 2)))
    loo = np.array(loo)
    assert se == pytest.approx(math.sqrt((m - 1) / m * ((loo - loo.mean()) ** 2).sum()), rel=1e-10)
    with pytest.raises(ValueError, match="at least 3"):
        gn.grad_sq_unbiased(g[:2])


def test_estimators_unbiased_on_a_known_gradient_distribution():
    # per-example gradients ~ N(G, diag(s)); tr(Sigma) = sum(s), |G|^2 known. Over R independent
    # trials the mean estimate must sit within 4 standard errors (of that mean) of the truth.
    rng = np.random.default_rng(1)
    G, s = np.array([0.5, -0.2, 0.1]), np.array([1.0, 2.0, 0.5])
    M, b, n, R = 4, 5, 6, 3000
    g2, tr = [], []
    for _ in range(R):
        ex = G + rng.normal(size=(M * b, 3)) * np.sqrt(s)
        means = ex.reshape(M, b, 3).mean(1)
        gbar = ex.mean(0)
        extra = G + rng.normal(size=(n, 3)) * np.sqrt(s)
        g2.append(gn.grad_sq_unbiased(means)[0])
        tr.append(gn.trace_cov_unbiased(((extra - gbar) ** 2).sum(1), M * b)[0])
    g2, tr = np.array(g2), np.array(tr)
    assert abs(g2.mean() - G @ G) < 4 * g2.std() / math.sqrt(R)
    assert abs(tr.mean() - s.sum()) < 4 * tr.std() / math.sqrt(R)
    # the biased plug-in |gbar|^2 is visibly off (E = |G|^2 + tr/N): the test can tell the two apart
    assert (G @ G + s.sum() / (M * b)) - G @ G > 8 * g2.std() / math.sqrt(R)


def test_least_squares_noise_scale_matches_closed_form():
    # y = <w*, x> + eps, x ~ N(0, I_P), eps ~ N(0, sigma^2), loss (<w, x> - y)^2 at w = w* + d:
    # g = 2 (x x^T d - eps x), G = 2 d, Sigma = 4 (|d|^2 I + d d^T + sigma^2 I), so
    # B_simple = ((P + 1) |d|^2 + P sigma^2) / |d|^2.
    torch.manual_seed(0)
    P, sigma = 4, 0.5
    w_star = torch.randn(P, dtype=torch.float64)
    d = torch.tensor([0.3, -0.2, 0.1, 0.25], dtype=torch.float64)
    w = torch.nn.Parameter(w_star + d)
    truth = ((P + 1) * float(d @ d) + P * sigma ** 2) / float(d @ d)
    gen = torch.Generator().manual_seed(1)
    M, b, n = 60, 50, 3000
    X = torch.randn(M * b + n, P, generator=gen, dtype=torch.float64)
    Y = X @ w_star + sigma * torch.randn(M * b + n, generator=gen, dtype=torch.float64)

    def group_loss(m):
        sl = slice(m * b, (m + 1) * b)
        return ((X[sl] @ w - Y[sl]) ** 2).mean()

    def example_loss(i):
        j = M * b + i
        return (X[j] @ w - Y[j]) ** 2

    # the per-example gradient is the analytic one
    w.grad = None
    example_loss(7).backward()
    j = M * b + 7
    np.testing.assert_allclose(gn.flat_grad([w]).numpy(),
                               (2 * (X[j] @ w - Y[j]) * X[j]).detach().numpy(), rtol=1e-12)
    res = gn.measure([w], group_loss, example_loss, M, b, n)
    assert res["b_simple_low"] < truth < res["b_simple_high"]
    assert res["trace_cov"] == pytest.approx(4 * ((P + 1) * float(d @ d) + P * sigma ** 2), rel=0.1)
    assert res["grad_sq"] == pytest.approx(4 * float(d @ d), rel=0.3)
    assert w.grad is None


def test_noise_scale_infinite_when_mean_gradient_lost():
    r = gn.noise_scale(2.0, 0.1, -0.01, 0.05)
    assert r["b_simple"] == math.inf and math.isnan(r["b_simple_low"])
    r = gn.noise_scale(2.0, 0.0, 0.5, 0.0)
    assert r["b_simple"] == pytest.approx(4.0) and r["b_simple_low"] == pytest.approx(4.0)


def test_measure_diffusion_weights_examples_like_the_trainer():
    # with the loss-second-moment sampler warmed up on skewed losses, the weights differ from 1;
    # the group gradient must equal the gradient of the trainer's weighted batch loss
    from iddpm_core.diffusion import LossSecondMomentSampler, build_diffusion
    from iddpm_core.diffusion.config import DiffusionConfig
    from iddpm_core.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2),
                                    attention_resolutions=(), num_heads=1, learn_sigma=True))
    diff = build_diffusion(DiffusionConfig(steps=30, schedule="cosine", loss="vlb"))
    smp = LossSecondMomentSampler(30)
    for _ in range(10):
        ts = torch.arange(30)
        smp.update_with_local_losses(ts, (ts.double() + 1) ** 2)
    assert smp.warmed_up()
    imgs = torch.rand(5, 1, 8, 8) * 2 - 1
    a = gn.measure_diffusion(model, diff, smp, imgs, groups=3, group_size=2, examples=3, seed=4)
    b = gn.measure_diffusion(model, diff, smp, imgs, groups=3, group_size=2, examples=3, seed=4)
    assert a == b and a["trace_cov"] > 0 and math.isfinite(a["grad_sq"])
    # the first group by hand: the same draws, the trainer's weighting
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 5, (2,), generator=g)
    t, w = smp.sample(2, generator=g)
    noise = torch.randn((2, 1, 8, 8), generator=g)
    assert not torch.allclose(w, torch.ones_like(w))
    loss = (diff.training_losses(model, imgs[idx], t, noise=noise)["loss"] * w).mean()
    model.zero_grad()
    loss.backward()
    first = gn.flat_grad(list(model.parameters()))
    captured = []
    orig = gn.measure

    def spy(params, group_loss, example_loss, *args):
        for p in params:
            p.grad = None
        group_loss(0).backward()
        captured.append(gn.flat_grad(params))
        return orig(params, group_loss, example_loss, *args)

    gn.measure = spy
    try:
        gn.measure_diffusion(model, diff, smp, imgs, groups=3, group_size=2, examples=3, seed=4)
    finally:
        gn.measure = orig
    # the same operations in the same order: bit-identical
    assert torch.equal(captured[0], first)
