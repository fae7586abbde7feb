"""One feature pass, then every metric: the form FID is computed in (decided once), the metrics of
two measured sides as a request asks, the sweep's pipeline and columns, and the source helpers
both pipelines share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from iddpm_eval import measure, sources, sweep_eval
from iddpm_eval.fd_inf import fd_infinity
from iddpm_eval.fid import (bootstrap_fid, choose_method, fid_lowrank, fid_of, frechet_distance,
                            frechet_distance_eig)
from iddpm_eval.prdc import compute_prdc
from iddpm_eval.stats import INCEPTION, FeatureFile, FeatureStats, StatsError, stats_from_features
from test_stats_fid import FakeExtractor


def _feats(seed: int, n: int, d: int = 16, shift: float = 0.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, d)) + shift).astype(np.float32)


# ----------------------------------------------------------------------------- the form of FID

def test_choose_method_lowrank_only_with_both_features_and_fewer_images_than_dims():
    small, large = _feats(0, 10), _feats(1, 40)
    assert choose_method(small, small) == "lowrank"
    assert choose_method(small, large) == "sqrtm"  # the larger set decides
    assert choose_method(small, None) == "sqrtm"  # a side given as statistics
    assert choose_method(small, small, "eig") == "eig" and choose_method(large, large, "lowrank") == "lowrank"


def test_fid_of_each_form_agrees_and_uses_fixed_statistics():
    a, b = _feats(0, 12), _feats(1, 14, shift=0.3)
    sa, sb = stats_from_features(a), stats_from_features(b)
    exact = frechet_distance(*sa, *sb)
    assert fid_of(a, b, method="sqrtm") == exact
    assert fid_of(a, b) == fid_lowrank(a, b)  # auto: 14 images < 16 dims
    assert fid_of(a, b, method="eig") == pytest.approx(exact, rel=1e-7)
    assert fid_of(None, b, sa, None, "eig") == frechet_distance_eig(*sa, *sb)
    assert fid_of(a, None, None, sb) == exact  # one side statistics: auto is sqrtm


def test_bootstrap_method_auto_follows_choose_method():
    a, b = _feats(0, 12), _feats(1, 14, shift=0.3)
    assert bootstrap_fid(a, b, 3)["method"] == "lowrank"
    assert bootstrap_fid(a, None, 3, stats2=stats_from_features(b))["method"] == "sqrtm"


# ----------------------------------------------------------------------------- metrics of two sides

def test_metrics_of_a_request_match_each_metric_computed_alone():
    gen, ref = _feats(2, 30), _feats(3, 40, shift=0.2)
    ma, mb = measure.features_side("gen", gen), measure.features_side("ref", ref)
    req = measure.Request(method="auto", seed=4, bootstrap=5, intervals=("fid",), pr=True, k=3, fd_inf=True,
                          fd_inf_points=3, fd_inf_min_fraction=0.5, reference="b")
    assert req.resample_method == "auto" and req.both_features
    out = measure.metrics(ma, mb, req)
    assert out["fid_method"] == "sqrtm" and out["fid"] == frechet_distance(*stats_from_features(gen),
                                                                           *stats_from_features(ref))
    bs = bootstrap_fid(gen, ref, 5, seed=4, estimate=out["fid"])
    assert (out["fid_ci_low"], out["fid_ci_high"], out["bootstrap_bias"]) == (bs["low"], bs["high"], bs["bias"])
    pr = compute_prdc(ref, gen, k=3)  # the reference side is the real set
    assert all(out[k] == pr[k] for k in measure.PRDC) and out["reference"] == "b"
    assert "precision_ci_low" not in out  # no interval asked for precision/recall
    fd = fd_infinity(ref, gen, points=3, min_fraction=0.5, seed=4)  # the reference side first
    assert out["fd_inf"] == fd["fd_inf"] and out["fd_inf_sizes"] == fd["sizes"]
    assert measure.fd_inf_metrics(ma, mb, req)["fd_inf"] == fd["fd_inf"]


def test_metrics_eig_request_and_kid():
    a, b = _feats(5, 20), _feats(6, 20, shift=0.1)
    ma, mb = measure.features_side("a", a), measure.features_side("b", b)
    req = measure.Request(method="eig", bootstrap=3, kid=True, kid_subsets=2, kid_subset_size=5)
    out = measure.metrics(ma, mb, req)
    assert out["fid_method"] == "eig" and out["bootstrap_method"] == "eig" and req.resample_method == "eig"
    assert out["kid_subset_size"] == 5 and out["kid_subsets"] == 2 and np.isfinite(out["kid_mean"])


# ----------------------------------------------------------------------------- the sweep's pipeline

@pytest.fixture
def sampled(monkeypatch):
    """sample_images replaced by seeded random images, so no model runs."""
    import iddpm_core.sample

    def fake_sample(checkpoint, num, steps, sampler="ddpm", eta=0.0, seed=0, batch_size=64, progress=False,
                    device=None):
        return np.random.default_rng(seed + steps).integers(0, 256, (num, 16, 16, 3), dtype=np.uint8)

    monkeypatch.setattr(iddpm_core.sample, "sample_images", fake_sample)
    return fake_sample


def test_sample_features_keeps_samples_and_times(tmp_path, sampled):
    fx = FakeExtractor()
    pool, seconds = measure.sample_features("ckpt.pt", fx, num=6, steps=3, sampler="ddim", eta=0.0, seed=1,
                                            batch_size=4, device=None, samples_path=tmp_path / "s" / "samples.npz")
    with np.load(tmp_path / "s" / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], sampled("ckpt.pt", 6, 3, seed=1))
        np.testing.assert_array_equal(pool, fx(z["arr_0"])["pool"])
    assert set(seconds) == {"sample_seconds", "feature_seconds"} and min(seconds.values()) >= 0


def test_fid_of_checkpoint_columns(tmp_path, sampled, monkeypatch):
    fx = FakeExtractor()
    ref = _feats(7, 8, d=FakeExtractor.dims)
    monkeypatch.setattr(measure, "cached_extractor", lambda *a, **k: fx)
    monkeypatch.setattr(measure, "reference_features", lambda *a, **k: ref)
    s = sweep_eval.settings({"eval": {"fid_num": 10, "fid_bootstrap": 4, "fid_pr": 1, "seed": 2}, "data": "digits"})
    assert sweep_eval.request(s).reference == "b"
    cols = sweep_eval.fid_of_checkpoint("ckpt.pt", s, tmp_path, tmp_path / "cache")
    gen = fx(sampled("ckpt.pt", 10, 25, seed=2))["pool"]
    assert cols["fid"] == fid_lowrank(gen, ref) and cols["fid_method"] == "lowrank"  # 10 images < 12 dims
    assert cols["fid_n"] == 10 and cols["fid_ref_n"] == 8 and cols["fid_ref"] == "digits"
    bs = bootstrap_fid(gen, ref, 4, seed=2, estimate=cols["fid"])
    assert (cols["fid_ci_low"], cols["fid_boot_bias"], cols["fid_bootstrap"]) == (bs["low"], bs["bias"], 4)
    assert cols["pr_k"] == 3 and cols["precision"] == compute_prdc(ref, gen, k=3)["precision"]
    assert "fd_inf" not in cols


def test_nll_of_checkpoint_columns(tmp_path, monkeypatch):
    from iddpm_eval import nll

    seen = {}

    def fake_evaluate(checkpoint, data, **kw):
        seen.update(kw, data=data)
        return {"bpd": 3.5, "bpd_stderr": 0.1, "n": kw["num"], "T": 40, "seconds": 1.0}

    monkeypatch.setattr(nll, "evaluate", fake_evaluate)
    s = sweep_eval.settings({"eval": {"nll_num": 4, "nll_estimate": 0}, "data": "digits"})
    cols = sweep_eval.nll_of_checkpoint("ckpt.pt", s, tmp_path)
    assert cols["nll"] == 3.5 and cols["nll_n"] == 4 and cols["nll_method"] == "exact" and seen["estimate"] is None
    assert seen["data"] == "digits" and seen["out_dir"] == tmp_path


# ----------------------------------------------------------------------------- sources

def test_check_counts_refuses_before_any_pass(tmp_path):
    np.savez(tmp_path / "s.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(tmp_path / "i.npz", np.zeros((5, 8, 8, 3), np.uint8))
    st, im = sources.resolve(tmp_path / "s.npz"), sources.resolve(tmp_path / "i.npz")
    assert isinstance(im, sources.Resolved) and (st.kind, im.kind) == ("stats", "images")
    sources.check_counts([st, im])  # plain FID: fine
    with pytest.raises(StatsError, match="holds statistics only"):
        sources.check_counts([st, im], need_features=True)
    with pytest.raises(StatsError, match="--num 6 is larger"):
        sources.check_counts([im], num=6)
    with pytest.raises(StatsError, match="needs more than 5 images"):
        sources.check_counts([im], k=5)


def test_check_same_detector_and_weights_name_both_sides():
    st = FeatureStats(np.zeros(2), np.eye(2))
    a = sources.Measured("a", "stats", st, weights_sha256="1" * 64, detector=INCEPTION)
    b = sources.Measured("b", "stats", st, weights_sha256="2" * 64, detector="dinov2-vitl14")
    c = sources.Measured("c", "stats", st)
    assert sources.check_same_weights(a, c) == "1" * 64 and sources.check_same_detector(a, c) == INCEPTION
    with pytest.raises(StatsError, match=r"different weights \(a: 111111111111..., b: 222222222222...\)"):
        sources.check_same_weights(a, b)
    with pytest.raises(StatsError, match="different detectors .*a: inception.*b: dinov2"):
        sources.check_same_detector(a, b)


def test_make_feature_extractor_picks_the_network(monkeypatch):
    import iddpm_eval.dinov2

    monkeypatch.setattr(sources, "make_extractor", lambda *a: ("inception", a))
    monkeypatch.setattr(iddpm_eval.dinov2, "DinoV2Extractor", lambda name, **kw: (name, kw))
    assert sources.make_feature_extractor(INCEPTION, "clean", "w.pth", 8, True, "cpu") == (
        "inception", ("clean", "w.pth", 8, True, "cpu"))
    name, kw = sources.make_feature_extractor("dinov2-vitb14", batch_size=4, dinov2_weights="d.pth",
                                              dinov2_sha256="ab")
    assert name == "dinov2-vitb14" and kw["weights"] == "d.pth" and kw["expected_sha256"] == "ab"


def test_source_statistics_writes_what_it_returns(tmp_path, monkeypatch):
    from iddpm_core.data import NpzSource
    from iddpm_eval.stats import Extraction, extract, load_features, load_stats

    monkeypatch.setattr(sources, "make_extractor", lambda *a, **k: FakeExtractor())
    np.savez(tmp_path / "i.npz", np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
    st = sources.source_statistics(str(tmp_path / "i.npz"), tmp_path / "o.npz", num=15, seed=3, save_features=True,
                                   progress=False)
    back = load_stats(tmp_path / "o.npz")
    np.testing.assert_array_equal(back.sigma, st.sigma)
    assert back.count == st.count == 15 and back.detector == INCEPTION
    saved = load_features(tmp_path / "o.npz")
    assert isinstance(saved, FeatureFile) and len(saved.pool) == 15
    ex = extract(NpzSource(tmp_path / "i.npz"), FakeExtractor(), num=15, seed=3, progress=False)
    assert isinstance(ex, Extraction) and np.array_equal(ex.stats.sigma, st.sigma) and ex.fingerprint == st.fingerprint
    with pytest.raises(StatsError, match="EDM2 .pkl holds mu/sigma only"):
        sources.source_statistics(str(tmp_path / "i.npz"), tmp_path / "o.pkl", save_features=True)
    assert not Path(tmp_path / "o.pkl").exists()


def test_nll_of_checkpoint_carries_the_summary_interval(tmp_path, monkeypatch):
    from iddpm_eval import nll

    monkeypatch.setattr(nll, "evaluate", lambda checkpoint, data, **kw: {
        "bpd": 3.5, "bpd_stderr": 0.1, "bpd_ci_low": 3.304, "bpd_ci_high": 3.696, "n": kw["num"], "T": 40,
        "seconds": 1.0})
    s = sweep_eval.settings({"eval": {"nll_num": 4, "nll_estimate": 0}, "data": "digits"})
    cols = sweep_eval.nll_of_checkpoint("ckpt.pt", s, tmp_path)
    assert (cols["nll_ci_low"], cols["nll_ci_high"]) == (3.304, 3.696)
