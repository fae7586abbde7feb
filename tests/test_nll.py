"""Bits/dim: closed forms for Gaussian data, batched == the per-timestep reference loop (tests/bpd_loop.py),
unbiased K-step estimates with honest standard errors, training lowers the bound, CLI with resume."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import integrate, stats

from iddpm_core.checkpoint import save_checkpoint
from iddpm_core.diffusion import DiffusionConfig, GaussianDiffusion, build_diffusion, get_betas
from iddpm_core.models import ModelConfig, build_model
from iddpm_eval.nll import (NLLError, bound_terms, breakdown, check_options, estimate_bound, evaluate, load,
                            load_profile, pair_noise, proposal, results_row, sample_timesteps, write_breakdown)

from bpd_loop import bound_terms_loop, calc_bpd_loop

torch.set_num_threads(1)  # tiny models run faster single-threaded, and the machine is shared
LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------- Gaussian data, exact reverse process

class OptimalGaussian:
    """For data x0 ~ N(mu, s2) per dimension, the exact reverse process of the diffusion with ``betas``:
    output [E[x0 | x_t], log Var(x_{t-1} | x_t)] (mean type "x0", variance type "learned"). Written from
    the Gaussian formulas, not from the diffusion object."""

    def __init__(self, betas, mu, s2):
        b = np.asarray(betas, np.float64)
        self.ab = np.cumprod(1.0 - b)
        ab_prev = np.append(1.0, self.ab[:-1])
        self.mu, self.s2 = mu, s2
        # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps: Var(x_t) = ab s2 + 1 - ab, Cov(x0, x_t) = sqrt(ab) s2
        var_xt = self.ab * s2 + 1.0 - self.ab
        self.gain = np.sqrt(self.ab) * s2 / var_xt
        self.var_x0 = s2 * (1.0 - self.ab) / var_xt
        self.c1 = np.sqrt(ab_prev) * b / (1.0 - self.ab)          # posterior mean coefficients
        self.c2 = (1.0 - ab_prev) * np.sqrt(1.0 - b) / (1.0 - self.ab)
        self.post_var = b * (1.0 - ab_prev) / (1.0 - self.ab)
        self.rev_var = self.post_var + self.c1 ** 2 * self.var_x0  # Var(x_{t-1} | x_t)

    def x0_mean(self, x_t, t):
        return self.mu + self.gain[t] * (x_t - np.sqrt(self.ab[t]) * self.mu)

    def __call__(self, x, t_model):
        t = t_model.long().numpy()  # rescale_timesteps=False: the model sees the index itself
        shape = (-1,) + (1,) * (x.ndim - 1)
        gain = torch.from_numpy(self.gain[t]).reshape(shape)
        sab = torch.from_numpy(np.sqrt(self.ab[t])).reshape(shape)
        x0hat = self.mu + gain * (x - sab * self.mu)
        logvar = torch.from_numpy(np.log(self.rev_var[t])).reshape(shape).expand_as(x)
        return torch.cat([x0hat, logvar], dim=1)


def gaussian_setup(T=40, mu=0.1, s2=0.09):
    betas = get_betas("cosine", T)
    diff = GaussianDiffusion(betas, mean_type="x0", var_type="learned", rescale_timesteps=False)
    return diff, OptimalGaussian(betas, mu, s2), mu, s2


def test_gaussian_terms_match_closed_forms():
    """Every KL term and the prior against the two-Gaussian KL on the same x_t; the decoder against
    quadrature of the Gaussian density over each uint8 bin."""
    diff, opt, mu, s2 = gaussian_setup()
    T, seed = diff.num_timesteps, 5
    rng = np.random.default_rng(0)
    x = mu + math.sqrt(s2) * rng.standard_normal((6, 1, 3, 3))
    x0 = np.clip(np.round((x + 1) * 127.5), 0, 255) / 127.5 - 1.0  # on the 8-bit grid for the decoder
    res = bound_terms(diff, opt, torch.from_numpy(x0), seed=seed, batch_size=37, clip_denoised=False,
                      exact_cdf=True)
    for i in range(x0.shape[0]):
        for t in range(T):
            eps = pair_noise(seed, i, t, x0.shape[1:]).double().numpy()
            x_t = math.sqrt(opt.ab[t]) * x0[i] + math.sqrt(1 - opt.ab[t]) * eps
            m = opt.x0_mean(x_t, t)
            if t == 0:
                sd = math.sqrt(opt.rev_var[0])
                logp = []
                for xv, mv in zip(x0[i].ravel(), m.ravel()):
                    lo = -np.inf if xv < -0.999 else xv - 1 / 255
                    hi = np.inf if xv > 0.999 else xv + 1 / 255
                    p, _ = integrate.quad(lambda y: stats.norm.pdf(y, mv, sd), lo, hi, epsabs=0, epsrel=1e-12)
                    logp.append(math.log(p))
                want = -np.mean(logp) / LOG2
                assert res["vb"][i, 0] == pytest.approx(want, rel=1e-7)
            else:
                diff_mean = opt.c1[t] * (x0[i] - m)  # true posterior mean minus model mean
                v1, v2 = opt.post_var[t], opt.rev_var[t]
                kl = 0.5 * (math.log(v2 / v1) + v1 / v2 + diff_mean ** 2 / v2 - 1.0)
                assert res["vb"][i, t] == pytest.approx(kl.mean() / LOG2, rel=1e-9, abs=1e-13)
        abT = opt.ab[-1]
        prior = 0.5 * (-math.log(1 - abT) + (1 - abT) + abT * x0[i] ** 2 - 1.0)
        assert res["prior_bpd"][i] == pytest.approx(prior.mean() / LOG2, rel=1e-9, abs=1e-15)
    assert np.allclose(res["total_bpd"], res["prior_bpd"] + res["vb"].sum(axis=1), rtol=1e-12)
    # the tanh CDF (default) stays close to the exact one; only the decoder term changes
    approx = bound_terms(diff, opt, torch.from_numpy(x0), seed=seed, batch_size=64, clip_denoised=False)
    assert np.array_equal(approx["vb"][:, 1:], res["vb"][:, 1:])
    assert np.abs(approx["decoder_bpd"] - res["decoder_bpd"]).max() < 0.01


def test_gaussian_bound_equals_entropy_plus_prior_gap():
    """With the exact reverse process and a continuous decoder, the bound's expectation is
    H(x0) + KL(q(x_T) || N(0, 1)) per dimension: an identity of the whole chain, not term by term."""
    diff, opt, mu, s2 = gaussian_setup(T=40, mu=0.2, s2=0.25)
    seed, M = 11, 400
    rng = np.random.default_rng(1)
    x0 = mu + math.sqrt(s2) * rng.standard_normal((M, 1, 4, 4))
    res = bound_terms(diff, opt, torch.from_numpy(x0), seed=seed, batch_size=2000, clip_denoised=False)
    # continuous decoder -log N(x0; E[x0|x_1], Var(x0|x_1)) on the same x_1 as the code's t = 0 term
    dec = np.empty(M)
    for i in range(M):
        eps = pair_noise(seed, i, 0, x0.shape[1:]).double().numpy()
        x1 = math.sqrt(opt.ab[0]) * x0[i] + math.sqrt(1 - opt.ab[0]) * eps
        dec[i] = -stats.norm.logpdf(x0[i], opt.x0_mean(x1, 0), math.sqrt(opt.rev_var[0])).mean() / LOG2
    per_image = res["prior_bpd"] + res["kl_bpd"] + dec
    abT = opt.ab[-1]
    m_T, v_T = math.sqrt(abT) * mu, abT * s2 + 1 - abT
    want = (0.5 * math.log(2 * math.pi * math.e * s2) + 0.5 * (v_T + m_T ** 2 - 1 - math.log(v_T))) / LOG2
    se = per_image.std(ddof=1) / math.sqrt(M)
    assert se < 0.05 * abs(want)
    assert abs(per_image.mean() - want) < 4 * se


# ----------------------------------------------------------------------------- batched == loop == core

def tiny_model(kind="unet", learn_sigma=True, seed=0):
    cfg = ModelConfig(kind=kind, image_size=8, in_channels=1, base_channels=8 if kind == "cunet" else 16,
                      channel_mult=(1, 2), attention_resolutions=(4,) if kind == "unet" else (), num_heads=2,
                      learn_sigma=learn_sigma)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # zero-initialised output layers would make every term trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, cfg


def digits_batch(n, start=0):
    from iddpm_core.data import digits, to_model_range

    images, _ = digits().batch(np.arange(start, start + n))
    return to_model_range(images)


class AsMeanType(torch.nn.Module):
    """An epsilon network re-expressed as an x0 or x_{t-1} predictor, so untrained weights give sane
    bounds for every mean type."""

    def __init__(self, net, diff):
        super().__init__()
        self.net, self.diff = net, diff

    def forward(self, x, t_model):
        d, C = self.diff, x.shape[1]
        t = torch.round(t_model * d.num_timesteps / 1000.0).long()
        out = self.net(x, t_model)
        x0 = d.predict_xstart_from_eps(x, t, out[:, :C]).clamp(-1, 1)
        mean = x0 if d.mean_type == "x0" else d.q_posterior_mean_variance(x0, x, t)[0]
        return torch.cat([mean, out[:, C:]], dim=1)


@pytest.mark.parametrize("kind,mean_type,var_type", [
    ("unet", "epsilon", "learned_range"), ("unet", "x0", "fixed_large"),
    ("cunet", "epsilon", "fixed_small"), ("cunet", "xprev", "learned_range")])
def test_batched_equals_loop(kind, mean_type, var_type):
    model, _ = tiny_model(kind, learn_sigma=var_type.startswith("learned"))
    diff = GaussianDiffusion(get_betas("cosine", 24), mean_type=mean_type, var_type=var_type)
    if mean_type != "epsilon":
        model = AsMeanType(model, diff)
    x0 = digits_batch(3)
    a = bound_terms(diff, model, x0, [7, 8, 9], seed=3, batch_size=20)
    b = bound_terms_loop(diff, model, x0, [7, 8, 9], seed=3, batch_size=2)
    assert np.abs(a["total_bpd"] - b["total_bpd"]).max() < 1e-5  # bits/dim
    # float32 terms up to ~100: relative. The two paths run the network on batches of different
    # composition, so oneDNN may pick other kernels and summation orders (it blocks convolutions by
    # batch): the network output agrees to ~1e-6 relative (2e-6 with the fused attention), not bit for
    # bit, and which kernels differ depends on the CPU. The KL terms see that error unamplified. An x0
    # predicted from an epsilon output, x0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps, carries it
    # multiplied by up to sqrt(1/abar_t) (487 at t = T-1 here), and so do xstart_mse and, for mean
    # types other than epsilon, mse: scale their tolerance per t.
    np.testing.assert_allclose(a["vb"], b["vb"], rtol=1e-6, atol=1e-6, err_msg="vb")
    amp = np.sqrt(1.0 / diff.alphas_cumprod)[None, :]
    for k in ("xstart_mse", "mse"):
        scale = amp if (k == "xstart_mse" or mean_type != "epsilon") else 1.0
        assert (np.abs(a[k] - b[k]) <= 2e-6 * scale * (np.abs(b[k]) + 1.0)).all(), k
    # the noise belongs to (image index, t): another batch size or a subset gives the same numbers
    c = bound_terms(diff, model, x0[1:], [8, 9], seed=3, batch_size=7)
    np.testing.assert_allclose(c["vb"], a["vb"][1:], rtol=1e-6, atol=1e-6)
    assert 1 < a["total_bpd"].min() and a["total_bpd"].max() < 20 and np.isfinite(a["vb"]).all()


def test_class_labels_follow_their_images():
    """A class-conditional model: each image's terms in a mixed batch equal those of the image alone."""
    cfg = ModelConfig(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), attention_resolutions=(),
                      num_heads=2, num_classes=10)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    diff = build_diffusion(DiffusionConfig(steps=10))
    x0, labels = digits_batch(3), torch.tensor([3, 7, 1])
    both = bound_terms(diff, model, x0, seed=2, batch_size=7, labels=labels)
    loop = bound_terms_loop(diff, model, x0, seed=2, batch_size=3, labels=labels)
    np.testing.assert_allclose(both["vb"], loop["vb"], rtol=1e-6, atol=1e-6)
    for i in range(3):
        alone = bound_terms(diff, model, x0[i:i + 1], [i], seed=2, labels=labels[i:i + 1])
        np.testing.assert_allclose(alone["vb"][0], both["vb"][i], rtol=1e-6, atol=1e-6)
    other = bound_terms(diff, model, x0, seed=2, batch_size=7, labels=torch.tensor([0, 0, 0]))
    assert np.abs(other["vb"] - both["vb"]).max() > 1e-4  # the labels reach the model


def test_by_timestep_layout_runs_the_reference_loop():
    """``by_timestep`` forms the reference loop's forward passes (one t, ``batch_size`` images), so it
    gives its numbers bit for bit; the default layout (several t per pass) agrees to float32 noise."""
    model, _ = tiny_model()
    diff = build_diffusion(DiffusionConfig(steps=9))
    x0 = digits_batch(5, start=60)
    ref = bound_terms_loop(diff, model, x0, [4, 0, 9, 2, 7], seed=6, batch_size=2)
    ours = bound_terms(diff, model, x0, [4, 0, 9, 2, 7], seed=6, batch_size=2, by_timestep=True)
    for k in ("vb", "xstart_mse", "mse", "prior_bpd"):
        assert np.array_equal(ours[k], ref[k]), k
    assert np.allclose(ours["total_bpd"], ref["total_bpd"], rtol=1e-12, atol=0)
    flat = bound_terms(diff, model, x0, [4, 0, 9, 2, 7], seed=6, batch_size=11)
    np.testing.assert_allclose(flat["vb"], ours["vb"], rtol=1e-6, atol=1e-6)
    with pytest.raises(NLLError, match="batch_size must be >= 1"):
        bound_terms(diff, model, x0, batch_size=0, by_timestep=True)


def test_batched_equals_core_calc_bpd_loop():
    """iddpm_core's calc_bpd_loop draws its noise from one generator, t = T-1 .. 0; replaying those draws
    into the batched path must reproduce its every output."""
    model, _ = tiny_model()
    diff = build_diffusion(DiffusionConfig(steps=16))
    x0 = digits_batch(4, start=20)
    gen = torch.Generator().manual_seed(123)
    ref = calc_bpd_loop(diff, model, x0, generator=gen)
    gen = torch.Generator().manual_seed(123)
    table = {t: torch.randn(x0.shape, generator=gen) for t in range(diff.num_timesteps - 1, -1, -1)}
    ours = bound_terms(diff, model, x0, seed=0, batch_size=24, noise_fn=lambda i, t, shape: table[t][i])
    np.testing.assert_allclose(ours["total_bpd"], ref["total_bpd"].double().numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours["prior_bpd"], ref["prior_bpd"].double().numpy(), rtol=0, atol=1e-7)
    for k in ("vb", "xstart_mse", "mse"):
        np.testing.assert_allclose(ours[k], ref[k].double().numpy(), rtol=1e-6, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------- K-step estimates

def test_estimate_is_unbiased_and_its_stderr_is_honest():
    model, _ = tiny_model(seed=1)
    diff = build_diffusion(DiffusionConfig(steps=30))
    x0, idx, seed = digits_batch(4, start=40), [0, 1, 2, 3], 9
    exact = bound_terms(diff, model, x0, idx, seed=seed, batch_size=60)
    target = exact["total_bpd"].mean()
    pilot = breakdown(exact["vb"], exact["xstart_mse"], exact["mse"])
    spreads = {}
    for name, p in (("uniform", proposal(30)), ("importance", proposal(30, pilot["vb_rms"], 0.05))):
        ests, ses = [], []
        for s in range(150):
            r = estimate_bound(diff, model, x0, 4, idx, p=p, seed=seed, sample_seed=1000 + s, batch_size=20)
            ests.append(r["total_bpd"].mean())
            ses.append(math.sqrt(r["kl_var"].sum()) / len(idx))
            assert np.array_equal(r["prior_bpd"], exact["prior_bpd"])
            assert np.allclose(r["decoder_bpd"], exact["decoder_bpd"], atol=1e-6)
        ests = np.array(ests)
        spread = ests.std(ddof=1)
        assert abs(ests.mean() - target) < 3 * spread / math.sqrt(len(ests)), name
        # the reported standard error matches the spread the estimates show
        assert 0.75 < np.mean(ses) / spread < 1.33, (name, np.mean(ses), spread)
        spreads[name] = spread
    assert spreads["importance"] < spreads["uniform"]


def test_proposal_and_profile_checks(tmp_path):
    p = proposal(10)
    assert p[0] == 0 and np.allclose(p[1:], 1 / 9)
    q = proposal(10, np.r_[100.0, np.arange(1, 10)], uniform_mix=0.1)
    assert q[0] == 0 and q.sum() == pytest.approx(1) and q[9] > q[1] > 0
    with pytest.raises(NLLError, match="10 steps|T = 10"):
        proposal(10, np.ones(9))
    vb = np.abs(np.random.default_rng(0).standard_normal((3, 10)))
    table = breakdown(vb, vb, vb)
    write_breakdown(tmp_path / "terms.csv", table)
    np.testing.assert_allclose(load_profile(tmp_path / "terms.csv", 10), np.sqrt((vb ** 2).mean(0)), rtol=1e-15)
    with pytest.raises(NLLError, match="T = 12"):
        load_profile(tmp_path / "terms.csv", 12)
    # a trainer checkpoint's loss-second-moment state: sqrt(mean L^2) per t, refused until warmed up
    hist = np.abs(np.random.default_rng(1).standard_normal((10, 4)))
    model, cfg = tiny_model()
    state = {"loss_history": torch.from_numpy(hist), "loss_counts": torch.full((10,), 4)}
    save_checkpoint(tmp_path / "ck.pt", model, cfg, sampler_state=state)
    np.testing.assert_allclose(load_profile(tmp_path / "ck.pt", 10), np.sqrt((hist ** 2).mean(1)), rtol=1e-15)
    state["loss_counts"][3] = 2
    save_checkpoint(tmp_path / "ck2.pt", model, cfg, sampler_state=state)
    with pytest.raises(NLLError, match="not recorded"):
        load_profile(tmp_path / "ck2.pt", 10)
    with pytest.raises(NLLError, match="K >= 2"):
        estimate_bound(build_diffusion(DiffusionConfig(steps=10)), tiny_model()[0], digits_batch(1), 1)


def test_timestep_draws_follow_the_proposal_and_the_image():
    p = np.zeros(10)
    p[[2, 5]] = [0.25, 0.75]
    a = sample_timesteps(p, 400, seed=3, index=7)
    assert set(a.tolist()) == {2, 5} and 0.65 < (a == 5).mean() < 0.85
    assert np.array_equal(a, sample_timesteps(p, 400, seed=3, index=7))
    assert not np.array_equal(a, sample_timesteps(p, 400, seed=3, index=8))
    assert not np.array_equal(a, sample_timesteps(p, 400, seed=4, index=7))


# ----------------------------------------------------------------------------- checkpoints, CLI, resume

def write_checkpoint(path, steps=12):
    model, cfg = tiny_model()
    save_checkpoint(path, model, cfg, diffusion_config=DiffusionConfig(steps=steps).to_dict())
    return path


def run_cli(args):
    from iddpm_eval.cli.nll import nll

    res = CliRunner().invoke(nll, args, catch_exceptions=False)
    return res


def test_cli_outputs_resume_and_errors(tmp_path):
    ck = write_checkpoint(tmp_path / "m.pt")
    base = ["--checkpoint", str(ck), "--data", "digits", "--batch-size", "30", "--no-progress", "--json"]
    r = run_cli(base + ["--num", "3", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    first = json.loads(r.output)
    assert first["n"] == 3 and first["new_images"] == 3 and first["T"] == 12 and first["cdf"] == "tanh"
    r = run_cli(base + ["--num", "5", "--out", str(tmp_path / "a"), "--results", str(tmp_path / "res.csv")])
    resumed = json.loads(r.output)
    assert resumed["new_images"] == 2 and resumed["n"] == 5
    fresh = json.loads(run_cli(base + ["--num", "5", "--out", str(tmp_path / "b")]).output)
    for k in ("bpd", "bpd_stderr", "prior_bpd", "decoder_bpd", "kl_bpd"):
        assert resumed[k] == pytest.approx(fresh[k], abs=1e-6)
    rows = list(csv.DictReader(open(tmp_path / "a" / "nll_images.csv")))
    per_image = np.array([float(r["bpd"]) for r in rows])
    assert [int(r["index"]) for r in rows] == list(range(5))
    assert resumed["bpd"] == pytest.approx(per_image.mean())
    assert resumed["bpd_stderr"] == pytest.approx(per_image.std(ddof=1) / math.sqrt(5))
    terms = list(csv.DictReader(open(tmp_path / "a" / "nll_terms.csv")))
    assert len(terms) == 12
    assert sum(float(t["vb"]) for t in terms) + resumed["prior_bpd"] == pytest.approx(resumed["bpd"])
    assert (tmp_path / "a" / "nll_terms.png").stat().st_size > 1000
    # a run cut short (rows 3, 4 lost) redoes only what is missing; a smaller --num keeps the other rows
    lines = (tmp_path / "a" / "nll_images.csv").read_text().splitlines()
    (tmp_path / "a" / "nll_images.csv").write_text("\n".join(lines[:4]) + "\n")
    again = json.loads(run_cli(base + ["--num", "5", "--out", str(tmp_path / "a")]).output)
    assert again["new_images"] == 2 and again["bpd"] == pytest.approx(resumed["bpd"], abs=1e-9)
    small = json.loads(run_cli(base + ["--num", "2", "--out", str(tmp_path / "a")]).output)
    assert small["n"] == 2 and small["new_images"] == 0 and small["bpd"] == pytest.approx(per_image[:2].mean())
    assert len((tmp_path / "a" / "nll_images.csv").read_text().splitlines()) == 6
    from iddpm_eval.tables import read_results

    table = read_results(tmp_path / "res.csv")
    assert table["metric"].tolist() == ["bpd"] and table["value"][0] == pytest.approx(resumed["bpd"])
    assert table["ci_low"][0] < resumed["bpd"] < table["ci_high"][0]
    # the interval is the summary's (so the sweep and the paper runs report the same)
    assert resumed["bpd_ci_low"] == pytest.approx(resumed["bpd"] - 1.96 * resumed["bpd_stderr"], rel=1e-12)
    assert (table["ci_low"][0], table["ci_high"][0]) == pytest.approx((resumed["bpd_ci_low"], resumed["bpd_ci_high"]))
    # the loop method gives the same numbers; changed settings in the same folder are refused
    loop = json.loads(run_cli(base + ["--num", "5", "--method", "loop", "--out", str(tmp_path / "c")]).output)
    assert loop["bpd"] == pytest.approx(fresh["bpd"], abs=1e-5)
    r = run_cli(base + ["--num", "5", "--exact-cdf", "--out", str(tmp_path / "a")])
    assert r.exit_code != 0 and "cdf" in r.output
    exact = json.loads(run_cli(base + ["--num", "5", "--exact-cdf", "--out", str(tmp_path / "d")]).output)
    assert exact["cdf"] == "exact" and exact["kl_bpd"] == pytest.approx(fresh["kl_bpd"], abs=1e-9)
    assert exact["decoder_bpd"] != fresh["decoder_bpd"]
    r = run_cli(base + ["--num", "5000", "--out", str(tmp_path / "e")])
    assert r.exit_code != 0 and "1797 images" in r.output
    r = run_cli(base + ["--profile", str(tmp_path / "a" / "nll_terms.csv")])
    assert r.exit_code != 0 and "--estimate" in r.output
    # an estimate with the pilot's profile: same prior and decoder, a K-step estimate of the KL sum
    est = json.loads(run_cli(base + ["--num", "5", "--estimate", "4", "--profile",
                                     str(tmp_path / "b" / "nll_terms.csv"), "--out", str(tmp_path / "f")]).output)
    assert est["method"] == "estimate" and est["estimate"] == 4 and est["mc_stderr"] > 0
    assert est["decoder_bpd"] == pytest.approx(fresh["decoder_bpd"], abs=1e-6)
    assert abs(est["bpd"] - fresh["bpd"]) < 6 * est["mc_stderr"]
    # a pilot run's profile is the same as the pilot images' breakdown, so the same proposal and numbers
    args = base + ["--num", "5", "--estimate", "4", "--pilot", "5", "--out", str(tmp_path / "g")]
    piloted = json.loads(run_cli(args).output)
    assert piloted["pilot"] == 5 and piloted["bpd"] == pytest.approx(est["bpd"], abs=1e-6)
    rerun = json.loads(run_cli(args).output)
    assert rerun["new_images"] == 0 and rerun["bpd"] == piloted["bpd"]


def test_output_folder_files(tmp_path):
    from iddpm_eval.nll.files import (Settings, check_settings, default_out_dir, load_parts, read_images_csv,
                                      save_part, write_images_csv)

    assert default_out_dir("/r/ck/ckpt_000100.pt", "fashion-mnist:test", 16) == \
        Path("/r/ck/nll-ckpt_000100-fashion-mnist_test-est16")
    assert default_out_dir("ck.pt", "/data/my set/imgs.npz", None).name == "nll-ck-imgs.npz-exact"
    st = Settings(checkpoint_sha256="ab", data="digits", T=10, seed=0, cdf="tanh", clip_denoised=True, ema_rate=None)
    check_settings(tmp_path / "s.json", st)
    check_settings(tmp_path / "s.json", st)  # the same settings resume
    with pytest.raises(NLLError, match="other settings .*seed"):
        check_settings(tmp_path / "s.json", Settings(**{**st.__dict__, "seed": 1}))
    rows = {3: {"bpd": 1 / 3, "prior_bpd": 1e-9, "decoder_bpd": 0.1, "kl_bpd": 2.0, "kl_var": 0.0}, 0: {
        "bpd": math.pi, "prior_bpd": 0.0, "decoder_bpd": 0.2, "kl_bpd": 1.0, "kl_var": 1e-300}}
    write_images_csv(tmp_path / "i.csv", rows)
    assert read_images_csv(tmp_path / "i.csv") == rows and read_images_csv(tmp_path / "none.csv") == {}
    (tmp_path / "bad.csv").write_text("index,bpd\n0,1.0\n")
    with pytest.raises(NLLError, match="not a per-image"):
        read_images_csv(tmp_path / "bad.csv")
    terms = np.random.default_rng(0).standard_normal((3, 3, 10))
    save_part(tmp_path, np.array([4, 5, 6]), terms)
    got = load_parts(tmp_path, {5, 6, 9}, 10)
    assert sorted(got) == [5, 6] and np.array_equal(got[6], terms[2])
    with pytest.raises(NLLError, match="expected"):
        load_parts(tmp_path, {5}, 12)


def test_options_checked_once_for_every_caller():
    check_options("batched", None, None, None)
    check_options("batched", 4, "terms.csv", None)
    for args, msg in ((("loop", 4, None, None), "drop --method loop"), (("batched", None, "t.csv", None), "need --estimate"),
                      (("batched", None, None, 3), "need --estimate"), (("batched", 4, "t.csv", 3), "not both"),
                      (("fast", None, None, None), "'batched' or 'loop'")):
        with pytest.raises(NLLError, match=msg):
            check_options(*args)


def test_load_gives_the_saved_weights_and_the_full_chain(tmp_path):
    from iddpm_core.io import file_sha256

    ck = write_checkpoint(tmp_path / "m.pt", steps=7)
    lm = load(ck, ema="raw")
    model, _ = tiny_model()
    assert lm.diffusion.num_timesteps == 7 and lm.sha256 == file_sha256(ck) and lm.path == str(ck)
    for (name, a), b in zip(lm.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_results_row_carries_the_summary_interval():
    summary = {"bpd": 3.2, "bpd_stderr": 0.05, "bpd_ci_low": 3.2 - 1.96 * 0.05, "bpd_ci_high": 3.2 + 1.96 * 0.05,
               "n": 40, "T": 100, "prior_bpd": 1e-5, "decoder_bpd": 0.5, "kl_bpd": 2.7, "method": "estimate",
               "estimate": 8, "cdf": "tanh", "clip_denoised": True, "seed": 3, "data": "digits", "checkpoint": "m.pt",
               "checkpoint_sha256": "ab" * 32, "checkpoint_step": 10, "ema_rate": None, "mc_stderr": 0.01,
               "profile": None, "pilot": 4}
    row = results_row(summary, "exp")
    assert row["metric"] == "bpd_est8" and row["value"] == 3.2 and row["n"] == 40 and row["seed"] == 3
    assert (row["ci_low"], row["ci_high"]) == (summary["bpd_ci_low"], summary["bpd_ci_high"])
    extra = json.loads(row["extra"])
    assert extra["mc_stderr"] == 0.01 and extra["pilot"] == 4 and "profile" not in extra
    exact = results_row(dict(summary, estimate=None, method="batched", mc_stderr=None), "exp")
    assert exact["metric"] == "bpd" and exact["config_hash"] != row["config_hash"]
    assert results_row(dict(summary, bpd=3.3), "exp")["config_hash"] == row["config_hash"]


@pytest.mark.slow
def test_training_on_digits_lowers_bits_per_dim(tmp_path):
    from iddpm_core.config import RunConfig, TrainConfig
    from iddpm_core.train import train
    from iddpm_eval.nll import TrainingNLL

    model = ModelConfig(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2),
                        attention_resolutions=(4,), num_heads=2)
    rc = RunConfig(model=model, diffusion=DiffusionConfig(steps=20),
                   train=TrainConfig(data="digits", batch_size=32, steps=100, lr=2e-3, log_interval=50,
                                     sample_interval=0, save_interval=10, sample_num=4, sample_steps="5",
                                     ema_rates=(0.9,), device="cpu"))
    train(rc, tmp_path / "run", callback=TrainingNLL("digits", num=16, k=8, every=50), progress=False)
    res = {}
    for step in (10, 100):
        ck = tmp_path / "run" / "checkpoints" / f"ckpt_{step:06d}.pt"
        res[step] = evaluate(ck, "digits", out_dir=tmp_path / f"nll{step}", num=16, batch_size=80, ema="raw",
                             device="cpu", progress=False)
        assert res[step]["checkpoint_step"] == step
    a = np.loadtxt(tmp_path / "nll10" / "nll_images.csv", delimiter=",", skiprows=1)[:, 1]
    b = np.loadtxt(tmp_path / "nll100" / "nll_images.csv", delimiter=",", skiprows=1)[:, 1]
    gain = a - b  # same images, same noise: a paired comparison
    assert gain.mean() > 3 * gain.std(ddof=1) / math.sqrt(len(gain))
    # the in-training estimate (raw weights at step 100) equals the CLI's estimate from the checkpoint
    logged = {(int(r["step"]), r["name"]): float(r["value"])
              for r in csv.DictReader(open(tmp_path / "run" / "callback_metrics.csv"))}
    est = evaluate(tmp_path / "run" / "checkpoints" / "ckpt_000100.pt", "digits", out_dir=tmp_path / "est",
                   num=16, batch_size=64, estimate=8, ema="raw", device="cpu", progress=False)
    assert logged[(100, "bpd_est8")] == pytest.approx(est["bpd"], abs=1e-5)
    assert logged[(100, "bpd_est8_mc_stderr")] == pytest.approx(est["mc_stderr"], rel=1e-5)
    assert logged[(100, "bpd_est8")] < logged[(50, "bpd_est8")]
