"""Maths of iddpm_eval.stats / fid / kid on random features (instant), against closed forms,
an independent path (eigenvalue form, np.cov) and peers (pytorch-fid, clean-fid, torch-fidelity)."""

import numpy as np
import pytest
from PIL import Image

from iddpm_core.data import FolderSource, NpzSource
from iddpm_eval import fid as F
from iddpm_eval import kid as K
from iddpm_eval import stats as S


def _feats(n, d, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix + shift).astype(np.float32)


class FakeExtractor:
    """Same interface as iddpm_eval.features.FeatureExtractor; cheap deterministic features."""

    mode, weights_sha256, dims = "legacy-tf", "f" * 64, 12  # fewer dims than most test sets: full-rank covariances

    def __init__(self, spatial=False):
        self.spatial, self.calls = spatial, []
        self.w = np.random.default_rng(123).normal(size=(3 * 16, self.dims))

    def __call__(self, images):
        self.calls.append(len(images))
        x = images.astype(np.float64)
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, -1)
        n, h, w, _ = x.shape
        grid = x[:, : h // 4 * 4, : w // 4 * 4].reshape(n, 4, h // 4, 4, w // 4, 3).mean((2, 4))
        pool = np.tanh(grid.reshape(n, -1) / 128 - 1) @ self.w
        out = {"pool": pool.astype(np.float32)}
        if self.spatial:
            out["spatial"] = (grid.reshape(n, -1)[:, :10] / 255).astype(np.float32)
        return out


# ----------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("batch", [1, 7, 50, 103])
def test_running_stats_equal_np_cov(batch):
    x = _feats(103, 20, shift=1e4).astype(np.float64)
    rs = S.RunningStats()
    for i in range(0, len(x), batch):
        rs.update(x[i:i + batch])
    assert rs.n == 103
    np.testing.assert_allclose(rs.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(rs.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_running_stats_errors():
    rs = S.RunningStats(4)
    with pytest.raises(S.StatsError, match="3 dimensions"):
        rs.update(np.zeros((2, 3)))
    with pytest.raises(S.StatsError, match="NaN"):
        rs.update(np.full((2, 4), np.nan))
    rs.update(np.zeros((1, 4)))
    with pytest.raises(S.StatsError, match="at least 2"):
        rs.cov


def test_extract_independent_of_batch_size_and_format(tmp_path):
    rng = np.random.default_rng(5)
    imgs = rng.integers(0, 256, (23, 8, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "b.npz", imgs)
    (tmp_path / "f").mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / "f" / f"{i:03d}.png")
    fx = FakeExtractor(spatial=True)
    whole = fx(imgs)
    results = [S.extract(NpzSource(tmp_path / "b.npz"), fx, batch_size=bs, progress=False) for bs in (1, 4, 64)]
    results.append(S.extract(FolderSource(tmp_path / "f"), fx, batch_size=5, progress=False, keep_features=True))
    ref_mu, ref_sigma = whole["pool"].astype(np.float64).mean(0), np.cov(whole["pool"].astype(np.float64), rowvar=False)
    for r in results:
        assert r.count == 23
        np.testing.assert_allclose(r.stats.mu, ref_mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(r.stats.sigma, ref_sigma, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r.stats.sigma_s, np.cov(whole["spatial"].astype(np.float64), rowvar=False),
                                   rtol=1e-10, atol=1e-14)
    assert len({r.fingerprint for r in results[1:]}) == 1  # same pixels and order, any file format
    np.testing.assert_array_equal(results[-1].pool, whole["pool"])
    assert max(fx.calls) <= 64


def test_extract_num_subset_is_seeded(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "b.npz", imgs)
    src, fx = NpzSource(tmp_path / "b.npz"), FakeExtractor()
    r1 = S.extract(src, fx, num=10, seed=3, progress=False, keep_features=True)
    r2 = S.extract(src, fx, num=10, seed=3, progress=False, batch_size=4)
    r3 = S.extract(src, fx, num=10, seed=4, progress=False)
    np.testing.assert_allclose(r1.stats.mu, r2.stats.mu, rtol=1e-12, atol=1e-15)
    assert r1.fingerprint == r2.fingerprint != r3.fingerprint
    np.testing.assert_array_equal(r1.pool, fx(imgs[r1.indices])["pool"])
    with pytest.raises(S.StatsError, match="larger"):
        S.extract(src, fx, num=31, progress=False)


def test_stats_files_round_trip_and_foreign_formats(tmp_path):
    x, y = _feats(50, 6, 1).astype(np.float64), _feats(40, 6, 2).astype(np.float64)
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    st = S.FeatureStats(mu, sigma, count=50, mode="clean", weights_sha256="ab" * 32, fingerprint="cd" * 32,
                        source="x", mu_s=y.mean(0), sigma_s=np.cov(y, rowvar=False))
    S.save_stats(tmp_path / "ours.npz", st, features=x)
    back = S.load_stats(tmp_path / "ours.npz")
    np.testing.assert_array_equal(back.mu, mu)
    np.testing.assert_array_equal(back.sigma_s, st.sigma_s)
    assert (back.count, back.mode, back.weights_sha256, back.fingerprint, back.origin) == \
        (50, "clean", "ab" * 32, "cd" * 32, "iddpm")
    np.testing.assert_array_equal(S.load_features(tmp_path / "ours.npz").pool, x.astype(np.float32))
    # pytorch-fid (np.savez mu, sigma) and clean-fid (savez_compressed mu, sigma)
    np.savez(tmp_path / "ptfid.npz", mu=mu.astype(np.float32), sigma=sigma)
    np.savez_compressed(tmp_path / "cleanfid.npz", mu=mu, sigma=sigma)
    for name in ("ptfid.npz", "cleanfid.npz"):
        b = S.load_stats(tmp_path / name)
        np.testing.assert_allclose(b.mu, mu, rtol=1e-6)
        assert b.mode is None and b.count is None and b.mu.dtype == np.float64
    # ADM reference batch: arr_0 plus mu/sigma/mu_s/sigma_s
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((3, 4, 4, 3), np.uint8), mu=mu, sigma=sigma,
             mu_s=st.mu_s, sigma_s=st.sigma_s)
    b = S.load_stats(tmp_path / "adm.npz")
    assert b.origin == "adm" and b.mu_s is not None
    np.savez(tmp_path / "feats.npz", feats=x.astype(np.float32))  # clean-fid features file
    np.testing.assert_array_equal(S.load_features(tmp_path / "feats.npz").pool, x.astype(np.float32))


@pytest.mark.parametrize("arrays,msg", [
    (dict(mu=np.array([0.0, np.nan]), sigma=np.eye(2)), "NaN"),
    (dict(mu=np.zeros(3), sigma=np.eye(2)), r"\[D, D\]"),
    (dict(sigma=np.eye(2)), "'mu' and 'sigma'"),
])
def test_bad_stats_files(tmp_path, arrays, msg):
    np.savez(tmp_path / "s.npz", **arrays)
    with pytest.raises(S.StatsError, match=msg):
        S.load_stats(tmp_path / "s.npz")


def test_bad_feature_files(tmp_path):
    np.savez(tmp_path / "n.npz", pool=np.array([[0.0, np.inf], [1, 2]], np.float32))
    with pytest.raises(S.StatsError, match="NaN or infinite"):
        S.load_features(tmp_path / "n.npz")
    np.savez(tmp_path / "i.npz", pool=np.zeros((3, 2), np.uint8))
    with pytest.raises(S.StatsError, match="float"):
        S.load_features(tmp_path / "i.npz")


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_closed_form_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T  # same eigenvectors: sqrt(s1 s2) = Q sqrt(ab) Q^T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert F.frechet_distance_eig(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert abs(F.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert F.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, rel=1e-12)


@pytest.mark.parametrize("n,d", [(400, 64), (30, 256)])  # well conditioned; fewer images than dims
def test_frechet_matches_pytorch_fid_and_cleanfid(n, d):
    from cleanfid.fid import frechet_distance as cf_fd
    from pytorch_fid.fid_score import calculate_frechet_distance as pt_fd

    x, y = _feats(n, d, 1).astype(np.float64), _feats(n, d, 2, shift=0.3).astype(np.float64)
    m1, s1 = S.stats_from_features(x)
    m2, s2 = S.stats_from_features(y)
    ours = F.frechet_distance(m1, s1, m2, s2)
    assert ours == pytest.approx(pt_fd(m1, s1, m2, s2), rel=1e-6)
    assert ours == pytest.approx(cf_fd(m1, s1, m2, s2), rel=1e-6)
    assert F.frechet_distance_eig(m1, s1, m2, s2) == pytest.approx(ours, rel=1e-6)
    assert F.fid_from_features(x, y) == pytest.approx(ours, rel=1e-12)


def test_frechet_retry_adds_eps(monkeypatch):
    x, y = _feats(40, 8, 1).astype(np.float64), _feats(40, 8, 2).astype(np.float64)
    m1, s1 = S.stats_from_features(x)
    m2, s2 = S.stats_from_features(y)
    real = F._sqrtm
    calls = []

    def first_fails(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real(m)

    monkeypatch.setattr(F, "_sqrtm", first_fails)
    got = F.frechet_distance(m1, s1, m2, s2)
    eps = 1e-6 * np.eye(8)
    np.testing.assert_allclose(calls[1], (s1 + eps) @ (s2 + eps))
    expected = F.frechet_distance_eig(m1, s1 + eps, m2, s2 + eps) - 2 * 8 * 1e-6  # traces include eps
    assert len(calls) == 2 and got == pytest.approx(expected, rel=1e-8)


def test_frechet_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        F.frechet_distance(np.zeros(2), np.eye(2), np.array([0, np.inf]), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        F.frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))
    with pytest.raises(F.FIDError, match="different dimensions: 2 vs 3"):
        F.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_bootstrap_resamples_images():
    x, y = _feats(60, 5, 1).astype(np.float64), _feats(50, 5, 2, shift=0.5).astype(np.float64)
    r = F.bootstrap_fid(x, y, 20, seed=4)
    assert r["resampled"] == ["a", "b"] and len(r["values"]) == 20
    rng = np.random.default_rng(4)  # first round, recomputed independently
    xa, yb = x[rng.integers(0, 60, 60)], y[rng.integers(0, 50, 50)]
    assert r["values"][0] == pytest.approx(F.fid_from_features(xa, yb), rel=1e-10)
    assert r["low"] == pytest.approx(np.quantile(r["values"], 0.025)) and r["low"] < r["high"]
    # a side given as statistics stays fixed
    m2, s2 = S.stats_from_features(y)
    r2 = F.bootstrap_fid(x, None, 5, stats2=(m2, s2), seed=4)
    rng = np.random.default_rng(4)
    assert r2["resampled"] == ["a"]
    m1, s1 = S.stats_from_features(x[rng.integers(0, 60, 60)])
    assert r2["values"][0] == pytest.approx(F.frechet_distance(m1, s1, m2, s2), rel=1e-10)


# ----------------------------------------------------------------------------- KID

def test_mmd2_unbiased_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.2
    kxx, kxy, kyy = (K.polynomial_kernel(u, v) for u, v in ((a, a), (a, b), (b, b)))
    m = 6
    brute = sum(kxx[i, j] + kyy[i, j] for i in range(m) for j in range(m) if i != j) / (m * (m - 1)) \
        - 2 * sum(kxy[i, j] for i in range(m) for j in range(m)) / m ** 2
    assert K.mmd2_unbiased(kxx, kxy, kyy) == pytest.approx(brute, rel=1e-12)
    np.testing.assert_allclose(kxy, (a @ b.T / 3 + 1) ** 3)


def test_kid_matches_torch_fidelity():
    import torch
    from torch_fidelity.metric_kid import kid_features_to_metric

    x, y = _feats(60, 16, 1), _feats(50, 16, 2, shift=0.2)
    ours = K.kid(x, y, subsets=10, subset_size=25, seed=7)
    theirs = kid_features_to_metric(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(y.astype(np.float64)),
                                    kid_subsets=10, kid_subset_size=25, rng_seed=7, verbose=False)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-10)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-10)
    # float32 features as torch-fidelity gets them from its extractor: agreement to float32 round-off
    theirs32 = kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subsets=10,
                                      kid_subset_size=25, rng_seed=7, verbose=False)
    assert ours["kid_mean"] == pytest.approx(theirs32["kernel_inception_distance_mean"], rel=1e-4)


def test_kid_subset_size_shrinks_and_errors():
    x, y = _feats(12, 4, 1), _feats(9, 4, 2)
    assert K.kid(x, y, subsets=3)["subset_size"] == 9
    with pytest.raises(ValueError, match="same D"):
        K.kid(x, _feats(9, 5))
    with pytest.raises(ValueError, match="NaN"):
        K.kid(np.full((4, 4), np.nan), y)


def test_lowrank_fid_equals_sqrtm_and_eig_when_fewer_images_than_dims():
    # 40 and 30 images of 96-d features: singular covariances, the case of small-N FID at 2048 dims.
    x, y = _feats(40, 96, 11).astype(np.float64), _feats(30, 96, 12, shift=0.3).astype(np.float64)
    m1, s1 = S.stats_from_features(x)
    m2, s2 = S.stats_from_features(y)
    low = F.fid_lowrank(x, y)
    assert low == pytest.approx(F.frechet_distance(m1, s1, m2, s2), rel=1e-6)
    assert low == pytest.approx(F.frechet_distance_eig(m1, s1, m2, s2), rel=1e-6)
    x[:20] = x[0]  # repeated rows, as in a bootstrap resample
    m1, s1 = S.stats_from_features(x)
    assert F.fid_lowrank(x, y) == pytest.approx(F.frechet_distance_eig(m1, s1, m2, s2), rel=1e-6)
    with pytest.raises(F.FIDError, match="NaN"):
        F.fid_lowrank(np.full((3, 4), np.nan), y[:, :4])


def test_lowrank_gram_form_within_its_error_bound():
    # The Gram form loses singular values below sqrt(eps) ||M||: the nuclear norm moves by at most
    # n sqrt(eps) ||M|| / sqrt(c), FID by twice that. Checked on a decaying spectrum, with repeated
    # rows (a bootstrap resample: rank-deficient M), and with n1 > n2 (the other Gram).
    rng = np.random.default_rng(5)
    scale = 1.0 / np.arange(1, 257) ** 1.5
    x = rng.standard_normal((200, 256)) * scale
    y = rng.standard_normal((150, 256)) * scale + 0.01
    for a, b in ((x, y), (y, x), (x[rng.integers(0, 200, 200)], y)):
        a1, b1 = a - a.mean(0), b - b.mean(0)
        norm = np.linalg.norm(a1 @ b1.T, 2) / np.sqrt((len(a) - 1) * (len(b) - 1))
        bound = 2 * min(len(a), len(b)) * np.sqrt(np.finfo(float).eps) * norm
        exact, gram = F.fid_lowrank(a, b), F.fid_lowrank(a, b, gram=True)
        assert abs(gram - exact) <= bound and bound < 1e-3 * exact
    # the bootstrap's rounds use it: each round equals the Gram form on its resample
    r = F.bootstrap_fid(x, y, 3, seed=1)
    d = S.bootstrap_draws(200, 150, 3, 1)
    assert r["method"] == "lowrank"
    assert r["values"][0] == F.fid_lowrank(x[d[0][0]], y[d[0][1]], gram=True)


def test_bootstrap_auto_uses_lowrank_with_the_same_rounds_as_sqrtm():
    x, y = _feats(20, 48, 13).astype(np.float64), _feats(25, 48, 14, shift=0.2).astype(np.float64)
    auto = F.bootstrap_fid(x, y, 6, seed=3)
    slow = F.bootstrap_fid(x, y, 6, seed=3, method="sqrtm")
    assert auto["method"] == "lowrank" and slow["method"] == "sqrtm"
    np.testing.assert_allclose(auto["values"], slow["values"], rtol=1e-6)
    # more images than dimensions: auto falls back to sqrtm
    assert F.bootstrap_fid(_feats(30, 4, 1), _feats(30, 4, 2), 3, seed=0)["method"] == "sqrtm"


def test_bootstrap_interval_is_shifted_by_the_bootstrap_bias():
    x, y = _feats(30, 64, 15).astype(np.float64), _feats(30, 64, 16, shift=0.1).astype(np.float64)
    est = F.fid_lowrank(x, y)
    r = F.bootstrap_fid(x, y, 40, seed=1, estimate=est)
    bias = r["values"].mean() - est
    assert bias > 0  # resampling repeats images, which inflates FID
    assert r["bias"] == pytest.approx(bias)
    assert (r["low"], r["high"]) == pytest.approx((r["pct_low"] - bias, r["pct_high"] - bias))
    assert r["pct_low"] == pytest.approx(np.quantile(r["values"], 0.025))
    assert r["low"] <= est <= r["high"]


def test_stats_helpers_detector_indices_keys_checks(tmp_path):
    assert S.implied_detector("dinov2-vitl14", "edm2") == "dinov2-vitl14"
    assert S.implied_detector(None, "clean") == S.INCEPTION and S.implied_detector(None, None, 2048) == S.INCEPTION
    assert S.implied_detector(None, None, 768) is None and S.implied_detector(None, "edm2") is None
    idx = S.choose_indices(50, 10, 3)
    assert len(set(idx)) == 10 and list(idx) == sorted(idx) and (idx == S.choose_indices(50, 10, 3)).all()
    assert S.choose_indices(50, None, 3) is None and S.choose_indices(50, 50, 3) is None
    with pytest.raises(S.StatsError, match="larger than the source src"):
        S.choose_indices(5, 6, 0, "src")
    np.savez(tmp_path / "k.npz", mu=np.zeros(2), pool=np.zeros((2, 2)))
    assert S.npz_keys(tmp_path / "k.npz") == {"mu", "pool"}
    mu, sigma = S.check_stats([1, 2], np.eye(2), "x")
    assert mu.dtype == np.float64 and sigma.shape == (2, 2)
    with pytest.raises(S.StatsError, match="x: mu must be"):
        S.check_stats(np.zeros(3), np.eye(2), "x")
