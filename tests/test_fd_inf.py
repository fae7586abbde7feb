"""FD-infinity (iddpm_eval.fd_inf): bias removal on Gaussian features with a known Frechet
distance, agreement with plain FID on real (non-Gaussian) features, the regression interval
against scipy, the bootstrap interval's width against the spread of independent repeats, errors."""

import json

import numpy as np
import pytest
from scipy import stats as sstats

from iddpm_eval.fd_inf import FDInfError, fd_infinity, linear_fit, subset_sizes
from iddpm_eval.fid import fid_from_features

D = 64


def _gauss_pair(rng, n):
    """X ~ N(0, I), Y ~ N(m, diag(s^2)): Frechet distance |m|^2 + sum (1 - s_i)^2 in closed form."""
    m, s = np.full(D, 0.1), np.linspace(0.7, 1.3, D)
    true = float(m @ m + ((1 - s) ** 2).sum())
    return rng.standard_normal((n, D)), m + s * rng.standard_normal((n, D)), true


@pytest.fixture(scope="module")
def repeats():
    """20 independent draws of 500 + 500 Gaussian features: plain FID and FD-infinity of each."""
    rng = np.random.default_rng(1)
    plain, inf, last = [], [], None
    for r in range(20):
        x, y, true = _gauss_pair(rng, 500)
        plain.append(fid_from_features(x, y))
        last = fd_infinity(x, y, seed=r)
        inf.append(last["fd_inf"])
    return np.array(plain), np.array(inf), true, (x, y, last)


def test_bias_at_500_is_a_small_fraction_of_plain_fids(repeats):
    plain, inf, true, _ = repeats
    bias_plain, bias_inf = plain.mean() - true, inf.mean() - true
    # measured: true 2.621, plain FID bias +4.39 (167%), FD-inf bias +0.04 (1% of plain's);
    # the mean of 20 FD-inf values has a standard error ~0.09, so 10% of plain's bias (0.44) is > 4 SE.
    assert bias_plain > 3.0
    assert abs(bias_inf) < 0.1 * bias_plain


def test_regression_interval_equals_scipy_linregress():
    rng = np.random.default_rng(2)
    x = 1 / np.linspace(50, 500, 9)
    y = 3 + 40 * x + rng.normal(0, 0.05, 9)
    fit = linear_fit(x, y)
    ref = sstats.linregress(x, y)
    t = sstats.t.ppf(0.975, 7)
    assert fit["intercept"] == pytest.approx(ref.intercept, rel=1e-12)
    assert fit["slope"] == pytest.approx(ref.slope, rel=1e-12)
    assert fit["se"] == pytest.approx(ref.intercept_stderr, rel=1e-10)
    assert fit["low"] == pytest.approx(ref.intercept - t * ref.intercept_stderr, rel=1e-10)


def test_noise_free_line_recovered_exactly():
    x = 1 / np.array([10.0, 20, 40, 80])
    fit = linear_fit(x, 2.5 + 7 * x)
    assert fit["intercept"] == pytest.approx(2.5, abs=1e-12) and fit["se"] < 1e-10


def test_bootstrap_interval_width_matches_spread_of_repeats(repeats):
    _, inf, _, (x, y, last) = repeats
    r = fd_infinity(x, y, seed=5, bootstrap=100)
    assert r["ci_method"] == "bootstrap" and r["low"] <= r["fd_inf"] <= r["high"]
    # A 95% interval spans about 3.92 standard deviations of the estimator (repeats: sd 0.30-0.39).
    # Measured over 10 draws: bootstrap width 1.77 vs 3.92 sd = 1.18 (conservative by ~1.5x: the
    # resamples' repeated images add subset noise), covering the true value 10/10; the regression
    # interval is 0.67 wide and covered it 28/40 times (subset noise only). The bounds below allow the
    # sd estimate's ~16% error (20 draws) on top of that.
    width, spread = r["high"] - r["low"], 3.92 * inf.std(ddof=1)
    assert spread / 1.2 < width < spread * 2.5
    assert r["regression_high"] - r["regression_low"] < width


def test_largest_subset_is_plain_fid_and_on_the_trend_real_features():
    """Real, non-Gaussian features (sklearn digits pixels, 64 dims): even vs odd images. The last
    point is the plain FID of the full sets; it lies on the fitted line within 3 residual SDs."""
    from sklearn.datasets import load_digits

    px = load_digits().data.astype(np.float64)
    px = px[:, px.std(0) > 0]  # always-blank pixels would make the covariances singular
    a, b = px[0::2], px[1::2]
    r = fd_infinity(a, b, seed=0)
    assert r["fid_at_largest"] == pytest.approx(fid_from_features(a, b), rel=1e-10)
    assert abs(r["fid_at_largest"] - r["line_at_largest"]) <= 3 * r["resid_std"]
    assert r["sizes"][-1] == len(b) and r["fd_inf"] < r["fid_at_largest"]
    assert r["low"] < r["fd_inf"] < r["high"] and r["ci_method"] == "regression" and r["note"] is None


def test_fixed_statistics_side_and_small_sets_note():
    rng = np.random.default_rng(3)
    x, y, _ = _gauss_pair(rng, 300)
    mu, sig = np.zeros(D), np.eye(D)
    r = fd_infinity(None, y, stats1=(mu, sig), seed=0, points=5)
    assert r["fixed_sides"] == ["a"] and len(r["fids"]) == 5
    small = fd_infinity(x[:120], y[:120], seed=0, points=5)
    assert "smaller than the feature dimension (64)" in small["note"]


def test_too_few_samples_error_names_the_numbers():
    with pytest.raises(FDInfError, match=r"second set has 30 images \(smallest subset 6\).*at least 50"):
        fd_infinity(np.zeros((200, 4)) + np.arange(4), np.ones((30, 4)), points=5)
    with pytest.raises(FDInfError, match="3 subset sizes"):
        subset_sizes(100, 2, 0.2)
    with pytest.raises(FDInfError, match="15 distinct subsets"):
        subset_sizes(20, 15, 0.5)


def test_cli_fd_inf(tmp_path):
    from click.testing import CliRunner

    from iddpm_eval.cli import main
    from iddpm_eval.stats import FeatureStats, save_stats, stats_from_features

    rng = np.random.default_rng(4)
    x, y, _ = _gauss_pair(rng, 400)
    for name, f in (("a", x), ("b", y)):
        mu, sig = stats_from_features(f)
        save_stats(tmp_path / f"{name}.npz", FeatureStats(mu, sig, count=len(f), mode="legacy-tf",
                                                          weights_sha256="e" * 64), features=f)
    run = CliRunner().invoke(main, ["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--fd-inf", "--json",
                                    "--no-progress", "--fd-inf-points", "6", "--results", str(tmp_path / "r.csv")])
    assert run.exit_code == 0, run.output
    out = json.loads(run.stdout)
    ref = fd_infinity(x.astype(np.float32), y.astype(np.float32), points=6, seed=0)  # files hold float32 features
    assert out["fd_inf"] == pytest.approx(ref["fd_inf"], rel=1e-9)
    assert out["fd_inf_ci_low"] < out["fd_inf"] < out["fd_inf_ci_high"]
    import pandas as pd

    rows = pd.read_csv(tmp_path / "r.csv")
    assert "fid_inf" in set(rows["metric"])  # FD_DINOv2 rows: fd_dinov2_inf
    bad = CliRunner().invoke(main, ["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--fd-inf",
                                    "--num", "40", "--no-progress"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    assert f"{tmp_path / 'a.npz'} has 40 images (smallest subset 8)" in bad.output.replace("\n", "")


def test_sweep_eval_fd_inf_columns():
    from iddpm_eval import sweep_eval

    s = sweep_eval.settings({"eval": {"fid_fd_inf": True, "fid_fd_inf_points": 5, "fid_fd_inf_bootstrap": 0},
                             "data": "digits"})
    rng = np.random.default_rng(6)
    x, y, _ = _gauss_pair(rng, 300)
    cols = sweep_eval.fd_inf_columns(y, x, s)
    ref = fd_infinity(x, y, points=5, seed=0)
    assert cols["fd_inf"] == ref["fd_inf"] and cols["fd_inf_ci_low"] == ref["low"]
    assert cols["fd_inf_ci_method"] == "regression" and cols["fd_inf_min_n"] == 60
