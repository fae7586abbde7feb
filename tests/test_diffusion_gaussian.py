"""GaussianDiffusion: posterior, parameterisations, variances, losses and bits/dim against closed forms."""

import math

import numpy as np
import pytest
import torch

from iddpm_core.diffusion import GaussianDiffusion, get_betas, mean_flat, normal_kl
from iddpm_core.diffusion import discretized_gaussian_log_likelihood as dgll

from bpd_loop import calc_bpd_loop

D64 = torch.float64


def random_betas(T, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(1e-4, 0.3, size=T)


class ConstModel(torch.nn.Module):
    """Returns a fixed tensor (any t), recording the timesteps it was given."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        return self.out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_posterior_equals_product_of_gaussians(seed):
    T = 25
    betas = random_betas(T, seed)
    d = GaussianDiffusion(betas)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(T, 2, 3, 3, generator=g, dtype=D64)
    xt = torch.randn(T, 2, 3, 3, generator=g, dtype=D64)
    t = torch.arange(T)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    abar = np.cumprod(1 - betas)
    for i in range(1, T):
        a_prev, a = abar[i - 1], 1 - betas[i]
        # route 1: product of N(x_{t-1}; sqrt(abar_{t-1}) x0, 1-abar_{t-1}) and N(x_t; sqrt(a) x_{t-1}, beta)
        prec = 1 / (1 - a_prev) + a / betas[i]
        m1 = (math.sqrt(a_prev) * x0[i] / (1 - a_prev) + math.sqrt(a) * xt[i] / betas[i]) / prec
        torch.testing.assert_close(mean[i], m1, rtol=1e-10, atol=1e-12)
        assert var[i].item() == pytest.approx(1 / prec, rel=1e-10)
        # route 2: condition the joint Gaussian of (x_{t-1}, x_t) given x0
        c11, c12, c22 = 1 - a_prev, math.sqrt(a) * (1 - a_prev), a * (1 - a_prev) + betas[i]
        m2 = math.sqrt(a_prev) * x0[i] + c12 / c22 * (xt[i] - math.sqrt(a * a_prev) * x0[i])
        torch.testing.assert_close(mean[i], m2, rtol=1e-10, atol=1e-12)
        assert var[i].item() == pytest.approx(c11 - c12 ** 2 / c22, rel=1e-10)
        assert logvar[i].item() == pytest.approx(math.log(1 / prec), rel=1e-10)
    # t = 0: the posterior is a point mass at x0; its log-variance is clipped to the t = 1 value
    torch.testing.assert_close(mean[0], x0[0], rtol=0, atol=1e-15)
    assert var[0].item() == 0.0
    assert logvar[0].item() == pytest.approx(logvar[1].item(), rel=1e-12)


def test_q_sample_and_moments_from_betas():
    betas = random_betas(12, 5)
    d = GaussianDiffusion(betas)
    x0 = torch.linspace(-1, 1, 12 * 4, dtype=D64).reshape(12, 1, 2, 2)
    noise = torch.randn(12, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=D64)
    t = torch.arange(12)
    abar = [float(np.prod([1 - b for b in betas[: i + 1]])) for i in range(12)]
    ab = torch.tensor(abar, dtype=D64).reshape(12, 1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    mean, var, logvar = d.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, ab.sqrt() * x0)
    torch.testing.assert_close(var, 1 - ab)
    torch.testing.assert_close(logvar, torch.log(1 - ab))
    # float32 data gives float32 results (constants kept in float64 until indexed)
    assert d.q_sample(x0.float(), t, noise.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="timesteps must lie in"):
        d.q_sample(x0, t + 1, noise)
    with pytest.raises(ValueError, match="one timestep per example"):
        d.q_sample(x0, t[:3], noise)
    with pytest.raises(ValueError, match="noise shape"):
        d.q_sample(x0, t, noise[:, :, :1])


def test_mean_parameterisations_agree():
    """An x0-model, the matching epsilon-model and the matching x_{t-1}-model give one p(x_{t-1}|x_t)."""
    betas = get_betas("cosine", 30)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 3, 4, 4, generator=g, dtype=D64)
    x0_pred = torch.randn(30, 3, 4, 4, generator=g, dtype=D64) * 0.5
    t = torch.arange(30)
    ref = GaussianDiffusion(betas, mean_type="x0")
    out_x0 = ref.p_mean_variance(ConstModel(x0_pred), x, t, clip_denoised=False)
    eps = ref.predict_eps_from_xstart(x, t, x0_pred)
    out_eps = GaussianDiffusion(betas, mean_type="epsilon").p_mean_variance(ConstModel(eps), x, t, clip_denoised=False)
    post_mean = ref.q_posterior_mean_variance(x0_pred, x, t)[0]
    out_prev = GaussianDiffusion(betas, mean_type="xprev").p_mean_variance(ConstModel(post_mean), x, t, clip_denoised=False)
    for out in (out_eps, out_prev):
        torch.testing.assert_close(out["pred_xstart"], x0_pred, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out["mean"], out_x0["mean"], rtol=1e-9, atol=1e-9)
    # clipping acts on x0 before the posterior mean is formed
    clipped = ref.p_mean_variance(ConstModel(x0_pred * 10), x, t, clip_denoised=True)
    torch.testing.assert_close(clipped["pred_xstart"], (x0_pred * 10).clamp(-1, 1))
    torch.testing.assert_close(clipped["mean"], ref.q_posterior_mean_variance((x0_pred * 10).clamp(-1, 1), x, t)[0])
    # denoised_fn acts on x0 before clipping
    shifted = ref.p_mean_variance(ConstModel(x0_pred), x, t, clip_denoised=True, denoised_fn=lambda z: z + 3)
    torch.testing.assert_close(shifted["pred_xstart"], (x0_pred + 3).clamp(-1, 1))


def test_variance_types():
    T = 20
    betas = get_betas("cosine", T)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post = betas * (1 - abar_prev) / (1 - abar)
    x = torch.zeros(T, 2, 3, 3, dtype=D64)
    t = torch.arange(T)

    def logvar(var_type, v=None):
        d = GaussianDiffusion(betas, var_type=var_type)
        out = torch.zeros(T, 2, 3, 3, dtype=D64) if v is None else torch.cat([torch.zeros_like(x), v], 1)
        return d.p_mean_variance(ConstModel(out), x, t)["log_variance"][:, 0, 0, 0].numpy()

    np.testing.assert_allclose(logvar("fixed_small")[1:], np.log(post[1:]), rtol=1e-12)
    assert logvar("fixed_small")[0] == pytest.approx(np.log(post[1]))
    np.testing.assert_allclose(logvar("fixed_large")[1:], np.log(betas[1:]), rtol=1e-12)
    assert logvar("fixed_large")[0] == pytest.approx(np.log(post[1]))
    v = torch.rand(T, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=D64) * 2 - 1
    np.testing.assert_allclose(logvar("learned", v), v[:, 0, 0, 0].numpy())
    np.testing.assert_allclose(logvar("learned_range", torch.ones_like(x)), np.log(betas), rtol=1e-12)
    clipped = np.log(np.append(post[1], post[1:]))
    np.testing.assert_allclose(logvar("learned_range", -torch.ones_like(x)), clipped, rtol=1e-12)
    frac = (v[:, 0, 0, 0].numpy() + 1) / 2
    np.testing.assert_allclose(logvar("learned_range", v), frac * np.log(betas) + (1 - frac) * clipped, rtol=1e-12)
    d = GaussianDiffusion(betas, var_type="learned")
    with pytest.raises(ValueError, match="expected .* for variance type 'learned'"):
        d.p_mean_variance(ConstModel(torch.zeros_like(x)), x, t)


def test_bad_types():
    betas = get_betas("cosine", 10)
    with pytest.raises(ValueError, match="unknown mean type"):
        GaussianDiffusion(betas, mean_type="eps")
    with pytest.raises(ValueError, match="unknown variance type"):
        GaussianDiffusion(betas, var_type="small")
    with pytest.raises(ValueError, match="unknown loss type"):
        GaussianDiffusion(betas, loss_type="l2")
    with pytest.raises(ValueError, match="needs a learned variance"):
        GaussianDiffusion(betas, loss_type="hybrid", var_type="fixed_small")
    with pytest.raises(ValueError, match="betas must lie"):
        GaussianDiffusion(np.array([0.1, 1.5]))


def test_model_receives_original_rescaled_timesteps():
    betas = get_betas("cosine", 40)
    x = torch.zeros(3, 1, 2, 2)
    for rescale, scale in [(True, 1000 / 40), (False, 1.0)]:
        d = GaussianDiffusion(betas, rescale_timesteps=rescale)
        m = ConstModel(torch.zeros_like(x))
        d.p_mean_variance(m, x, torch.tensor([0, 7, 39]))
        torch.testing.assert_close(m.seen[0], torch.tensor([0.0, 7.0, 39.0]) * scale)
        assert m.seen[0].dtype == torch.float32


def hybrid_model(C):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(0.3, dtype=D64))
            self.b = torch.nn.Parameter(torch.tensor(0.2, dtype=D64))

        def forward(self, x, t):
            return torch.cat([self.a * x, self.b * torch.tanh(x)], dim=1)
    return M()


def test_hybrid_vb_sends_no_gradient_to_mean():
    T = 50
    d = GaussianDiffusion(get_betas("cosine", T), var_type="learned_range", loss_type="hybrid")
    m = hybrid_model(2)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 2, 4, 4, generator=g, dtype=D64) * 2 - 1
    t = torch.tensor([0, 1, 10, 25, 40, 49])
    terms = d.training_losses(m, x0, t, generator=g)
    assert set(terms) == {"loss", "mse", "vb"} and terms["loss"].shape == (6,)
    ga, gb = torch.autograd.grad(terms["vb"].sum(), [m.a, m.b], allow_unused=True,
                                 retain_graph=True)
    assert ga is None or ga.abs().item() == 0.0
    assert gb.abs().item() > 0
    # the mean is trained by the mse alone
    la = torch.autograd.grad(terms["loss"].sum(), m.a, retain_graph=True)[0]
    ma = torch.autograd.grad(terms["mse"].sum(), m.a)[0]
    torch.testing.assert_close(la, ma)


def test_loss_scalings_and_terms():
    T = 40
    betas = get_betas("cosine", T)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(5, 2, 4, 4, generator=g, dtype=D64) * 2 - 1
    noise = torch.randn(5, 2, 4, 4, generator=g, dtype=D64)
    t = torch.tensor([0, 3, 17, 30, 39])
    m = hybrid_model(2)
    x_t = GaussianDiffusion(betas).q_sample(x0, t, noise)
    kw = dict(var_type="learned_range")
    plain = GaussianDiffusion(betas, loss_type="mse", **kw).training_losses(m, x0, t, noise=noise)
    hyb = GaussianDiffusion(betas, loss_type="hybrid", **kw).training_losses(m, x0, t, noise=noise)
    kl = GaussianDiffusion(betas, loss_type="kl", **kw).training_losses(m, x0, t, noise=noise)
    rkl = GaussianDiffusion(betas, loss_type="rescaled_kl", **kw).training_losses(m, x0, t, noise=noise)
    # independent: the vb term is the per-t VLB term of the model at x_t (no clipping)
    vb = GaussianDiffusion(betas, **kw).vb_terms_bpd(m, x0, x_t, t, clip_denoised=False)["output"]
    torch.testing.assert_close(plain["vb"], vb)
    torch.testing.assert_close(hyb["vb"], vb * T / 1000)  # lambda = 0.001 on L_vlb = T * E_t[L_t]
    torch.testing.assert_close(hyb["loss"], hyb["mse"] + vb * T / 1000)
    torch.testing.assert_close(plain["mse"], mean_flat((noise - m.a.detach() * x_t) ** 2))
    torch.testing.assert_close(kl["loss"], vb)
    torch.testing.assert_close(rkl["loss"], vb * T)
    # L_simple with a fixed variance has no vb term; x0 and xprev targets
    simple = GaussianDiffusion(betas, loss_type="simple").training_losses(lambda x, t: x * 0.5, x0, t, noise=noise)
    assert set(simple) == {"loss", "mse"}
    torch.testing.assert_close(simple["loss"], mean_flat((noise - 0.5 * x_t) ** 2))
    dx0 = GaussianDiffusion(betas, mean_type="x0").training_losses(lambda x, t: x * 0.5, x0, t, noise=noise)
    torch.testing.assert_close(dx0["mse"], mean_flat((x0 - 0.5 * x_t) ** 2))
    dprev = GaussianDiffusion(betas, mean_type="xprev")
    post = dprev.q_posterior_mean_variance(x0, x_t, t)[0]
    torch.testing.assert_close(dprev.training_losses(lambda x, t: x * 0.5, x0, t, noise=noise)["mse"],
                               mean_flat((post - 0.5 * x_t) ** 2))


def test_vb_terms_closed_forms():
    T = 30
    betas = get_betas("cosine", T)
    d = GaussianDiffusion(betas, var_type="learned_range")
    g = torch.Generator().manual_seed(2)
    x0 = (torch.randint(0, 256, (4, 3, 4, 4), generator=g).double() * 2 / 255 - 1)
    x_t = torch.randn(4, 3, 4, 4, generator=g, dtype=D64)
    out = torch.randn(4, 6, 4, 4, generator=g, dtype=D64) * 0.3
    for t in (torch.tensor([5, 9, 20, 29]), torch.zeros(4, dtype=torch.long)):
        res = d.vb_terms_bpd(ConstModel(out), x0, x_t, t, clip_denoised=True)
        p = d.p_mean_variance(ConstModel(out), x_t, t, clip_denoised=True)
        if t[0] > 0:
            qm, qv, _ = d.q_posterior_mean_variance(x0, x_t, t)
            kl = torch.distributions.kl_divergence(torch.distributions.Normal(qm, qv.sqrt()),
                                                   torch.distributions.Normal(p["mean"], p["variance"].sqrt()))
            expected = kl.mean(dim=(1, 2, 3)) / math.log(2)
        else:
            expected = -dgll(x0, p["mean"], 0.5 * p["log_variance"]).mean(dim=(1, 2, 3)) / math.log(2)
        torch.testing.assert_close(res["output"], expected, rtol=1e-10, atol=1e-12)
    # the exact CDF option reaches the decoder term
    t0 = torch.zeros(4, dtype=torch.long)
    p = d.p_mean_variance(ConstModel(out), x_t, t0)
    b = d.vb_terms_bpd(ConstModel(out), x0, x_t, t0, exact_cdf=True)["output"]
    expected = -dgll(x0, p["mean"], 0.5 * p["log_variance"], exact_cdf=True).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(b, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(b, d.vb_terms_bpd(ConstModel(out), x0, x_t, t0)["output"])


def test_prior_bpd_closed_form():
    d = GaussianDiffusion(get_betas("linear", 100))
    x0 = torch.linspace(-1, 1, 2 * 3 * 5, dtype=D64).reshape(2, 3, 5)
    abar = float(np.prod(1 - get_betas("linear", 100)))
    m, v = math.sqrt(abar) * x0, 1 - abar
    expected = (0.5 * (-math.log(v) + v + m ** 2 - 1)).mean(dim=(1, 2)) / math.log(2)
    torch.testing.assert_close(d.prior_bpd(x0), expected)
    torch.testing.assert_close(d.prior_bpd(x0), normal_kl(m, torch.full_like(m, math.log(v)), 0.0, 0.0).mean((1, 2)) / math.log(2))


def test_calc_bpd_loop_with_oracle_x0_model():
    """With the true x0 as prediction, every KL term is 0; total = prior + decoder NLL with sigma^2 = beta~_1."""
    T = 15
    betas = get_betas("cosine", T)
    d = GaussianDiffusion(betas, mean_type="x0", var_type="fixed_small")
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 256, (3, 1, 4, 4), generator=g).double() * 2 / 255 - 1
    res = calc_bpd_loop(d, lambda x, t: x0, x0, generator=torch.Generator().manual_seed(0))
    assert res["vb"].shape == (3, T) and res["mse"].shape == (3, T) and res["xstart_mse"].shape == (3, T)
    torch.testing.assert_close(res["vb"][:, 1:], torch.zeros(3, T - 1, dtype=D64), rtol=0, atol=1e-12)
    torch.testing.assert_close(res["xstart_mse"], torch.zeros(3, T, dtype=D64))
    torch.testing.assert_close(res["mse"], torch.zeros(3, T, dtype=D64), rtol=0, atol=1e-16)
    abar = np.cumprod(1 - betas)
    post1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    decoder = -dgll(x0, x0, torch.full_like(x0, 0.5 * math.log(post1))).mean((1, 2, 3)) / math.log(2)
    torch.testing.assert_close(res["vb"][:, 0], decoder)
    torch.testing.assert_close(res["total_bpd"], decoder + d.prior_bpd(x0))


def test_calc_bpd_loop_equals_batched_vb_terms():
    """The loop over t equals one batched call of vb_terms_bpd with a different t per example."""
    T = 8
    d = GaussianDiffusion(get_betas("cosine", T), var_type="learned_range")
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 2, 3, 3, generator=g, dtype=D64) * 2 - 1
    m = hybrid_model(2)
    with torch.no_grad():
        res = calc_bpd_loop(d, m, x0, generator=torch.Generator().manual_seed(9), exact_cdf=True, progress=False)
        g2 = torch.Generator().manual_seed(9)
        noises = {i: torch.randn(x0.shape, generator=g2, dtype=D64) for i in range(T - 1, -1, -1)}
        t = torch.arange(T).repeat_interleave(2)
        xs = x0.repeat(T, 1, 1, 1)
        x_t = d.q_sample(xs, t, torch.cat([noises[i] for i in range(T)]))
        batched = d.vb_terms_bpd(m, xs, x_t, t, exact_cdf=True)["output"].reshape(T, 2).T
    torch.testing.assert_close(res["vb"], batched)
    torch.testing.assert_close(res["total_bpd"], batched.sum(1) + d.prior_bpd(x0))


def test_same_seed_same_losses():
    d = GaussianDiffusion(get_betas("cosine", 20), var_type="learned_range", loss_type="hybrid")
    m = hybrid_model(1)
    x0 = torch.rand(4, 1, 3, 3, dtype=D64)
    t = torch.tensor([0, 5, 10, 19])
    a = d.training_losses(m, x0, t, generator=torch.Generator().manual_seed(7))["loss"]
    b = d.training_losses(m, x0, t, generator=torch.Generator().manual_seed(7))["loss"]
    c = d.training_losses(m, x0, t, generator=torch.Generator().manual_seed(8))["loss"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_vlb_terms_for_gaussian_data_with_optimal_denoiser():
    """Data x0 ~ N(0, s^2) per pixel and the Bayes-optimal x0-predictor E[x0|x_t] = c_t x_t: with the
    posterior variance, E[KL_t] = coef1_t^2 Var(x0|x_t) / (2 beta~_t) nats, and E[prior KL] is closed form."""
    T, s2 = 20, 0.3
    betas = get_betas("cosine", T)
    d = GaussianDiffusion(betas, mean_type="x0", var_type="fixed_small")
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post = betas * (1 - abar_prev) / (1 - abar)
    coef1 = betas * np.sqrt(abar_prev) / (1 - abar)
    c = np.sqrt(abar) * s2 / (abar * s2 + 1 - abar)
    cond_var = s2 * (1 - abar) / (abar * s2 + 1 - abar)

    def model(x, t):
        idx = torch.round(t * T / 1000).long()
        return torch.from_numpy(c)[idx].to(x.dtype).reshape(-1, 1, 1, 1) * x

    x0 = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(11), dtype=D64) * math.sqrt(s2)
    res = calc_bpd_loop(d, model, x0, clip_denoised=False, generator=torch.Generator().manual_seed(12))
    expected_kl = (coef1 ** 2 * cond_var)[1:] / (2 * post[1:]) / math.log(2)  # bits per dim, t >= 1
    got = res["vb"][:, 1:].mean(0).numpy()
    np.testing.assert_allclose(got, expected_kl, rtol=0.05)
    v = 1 - abar[-1]
    expected_prior = 0.5 * (-math.log(v) + v + abar[-1] * s2 - 1) / math.log(2)
    assert res["prior_bpd"].mean().item() == pytest.approx(expected_prior, rel=0.05)
    # a mis-scaled denoiser is worse (same noise)
    worse = calc_bpd_loop(d, lambda x, t: 0.8 * model(x, t), x0, clip_denoised=False,
                             generator=torch.Generator().manual_seed(12))
    assert worse["vb"][:, 1:].sum().item() > res["vb"][:, 1:].sum().item() * 1.05
