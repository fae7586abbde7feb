"""Reference statistics in other formats and detector provenance: EDM2 .pkl (read without running
code, written readable by plain pickle), ADM reference batches, the detector recorded in
statistics files and result rows, mismatches refused with both names, FD_DINOv2 end to end on
random official-layout weights, and regress refusing rows of different detectors."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from iddpm_eval import refstats as R
from iddpm_eval import sources
from iddpm_eval import stats as S
from iddpm_eval.cli import main
from iddpm_eval.fid import frechet_distance
from test_stats_fid import FakeExtractor


@pytest.fixture
def fake(monkeypatch):
    def make(mode="legacy-tf", weights=None, batch_size=64, sfid=False, device=None):
        fx = FakeExtractor(spatial=sfid)
        fx.mode = mode
        return fx

    monkeypatch.setattr(sources, "make_extractor", make)


def _run(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + repr(r.exception)
    else:
        assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    return r


def _stats(rng, d=12, n=50):
    f = rng.normal(size=(n, d))
    return S.stats_from_features(f)


def _edm2_pickle(path, **entries):
    """What EDM2's calculate_metrics.py save_stats writes: pickle.dump of a plain dict."""
    with open(path, "wb") as f:
        pickle.dump(dict(num_images=50, **{k: dict(mu=m, sigma=s) for k, (m, s) in entries.items()}), f)


# ----------------------------------------------------------------------------- EDM2 .pkl

def test_edm2_pkl_read_matches_arrays(tmp_path):
    rng = np.random.default_rng(0)
    (m1, s1), (m2, s2) = _stats(rng), _stats(rng)
    _edm2_pickle(tmp_path / "ref.pkl", fid=(m1, s1), fd_dinov2=(m2, s2))
    st = R.load_edm2_pkl(tmp_path / "ref.pkl")
    assert np.array_equal(st.mu, m1) and np.array_equal(st.sigma, s1)
    assert (st.count, st.mode, st.detector) == (50, "legacy-tf", S.INCEPTION)
    dn = R.load_edm2_pkl(tmp_path / "ref.pkl", "dinov2-vitl14")
    assert np.array_equal(dn.mu, m2) and (dn.mode, dn.detector) == ("edm2", "dinov2-vitl14")
    for proto in (2, 5):  # other pickle protocols (5: numpy's out-of-band-capable _frombuffer path)
        with open(tmp_path / f"p{proto}.pkl", "wb") as f:
            pickle.dump(dict(num_images=np.int64(50), fid=dict(mu=m1, sigma=s1)), f, protocol=proto)
        assert np.array_equal(R.load_edm2_pkl(tmp_path / f"p{proto}.pkl").sigma, s1)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pkl_that_would_run_code_is_refused_without_running(tmp_path):
    evil = _Evil()
    evil.target = str(tmp_path / "pwned")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"fid": {"mu": evil}}))
    with pytest.raises(S.StatsError, match=r"evil.pkl: refusing to load (posix|os)\.system"):
        R.load_edm2_pkl(tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(S.StatsError, match="junk.pkl: not a readable pickle"):
        R.load_edm2_pkl(tmp_path / "junk.pkl")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(S.StatsError, match="list.pkl: not an EDM2 reference statistics file"):
        R.load_edm2_pkl(tmp_path / "list.pkl")


def test_pkl_of_another_detector_refused(tmp_path, fake):
    rng = np.random.default_rng(1)
    _edm2_pickle(tmp_path / "fid_only.pkl", fid=_stats(rng))
    with pytest.raises(S.StatsError, match=r"fid_only.pkl holds EDM2 statistics of inception-2015-12-05, "
                                           r"not of dinov2-vitl14"):
        R.load_edm2_pkl(tmp_path / "fid_only.pkl", "dinov2-vitl14")
    np.savez(tmp_path / "b.npz", np.random.default_rng(2).integers(0, 255, (20, 8, 8, 3), dtype=np.uint8))
    r = _run("fid", tmp_path / "fid_only.pkl", tmp_path / "b.npz", "--features", "dinov2-vitl14", ok=False)
    assert "fid_only.pkl holds EDM2 statistics of inception-2015-12-05, not of dinov2-vitl14" in r.output


def test_pkl_as_fid_source_and_written_by_stats(tmp_path, fake):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 255, (30, 8, 8, 3), dtype=np.uint8)
    b = rng.integers(20, 255, (25, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", a)
    np.savez(tmp_path / "b.npz", b)
    _run("stats", tmp_path / "a.npz", "-o", tmp_path / "a.pkl", "--no-progress")
    with open(tmp_path / "a.pkl", "rb") as f:  # EDM2 reads it with plain pickle
        obj = pickle.load(f)
    fx = FakeExtractor()
    mu, sigma = S.stats_from_features(fx(a)["pool"])
    assert obj["num_images"] == 30 and set(obj) == {"num_images", "fid"}
    assert np.allclose(obj["fid"]["mu"], mu, rtol=1e-12) and obj["fid"]["sigma"].dtype == np.float64
    out = json.loads(_run("fid", tmp_path / "a.pkl", tmp_path / "b.npz", "--json", "--no-progress").stdout)
    mb, sb = S.stats_from_features(fx(b)["pool"])
    assert out["fid"] == pytest.approx(frechet_distance(mu, sigma, mb, sb), rel=1e-9)
    assert out["detector"] == S.INCEPTION


# ----------------------------------------------------------------------------- ADM batches

def test_adm_batch_written_and_read_back(tmp_path, fake):
    rng = np.random.default_rng(4)
    a = rng.integers(0, 255, (30, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", a)
    _run("stats", tmp_path / "a.npz", "-o", tmp_path / "ref_batch.npz", "--adm-batch", "--no-progress")
    with np.load(tmp_path / "ref_batch.npz") as z:  # the evaluator's keys
        assert np.array_equal(z["arr_0"], a)
        fx = FakeExtractor(spatial=True)
        f = fx(a)
        for key, feats in (("mu", "pool"), ("mu_s", "spatial")):
            assert np.allclose(z[key], f[feats].astype(np.float64).mean(0), rtol=1e-10, atol=1e-12)
        assert np.allclose(z["sigma"], np.cov(f["pool"].astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
        assert str(z["detector"]) == S.INCEPTION and str(z["mode"]) == "legacy-tf"
    st = S.load_stats(tmp_path / "ref_batch.npz")
    assert st.mu_s is not None and st.detector == S.INCEPTION
    r = _run("stats", tmp_path / "a.npz", "-o", tmp_path / "x.npz", "--adm-batch", "--mode", "clean", ok=False)
    assert "ADM reference batches hold Inception legacy-tf statistics" in r.output


# ----------------------------------------------------------------------------- detector provenance

def test_stats_files_of_different_detectors_refused_naming_both(tmp_path):
    rng = np.random.default_rng(5)
    for name, det, mode in (("inc.npz", S.INCEPTION, "legacy-tf"), ("dino.npz", "dinov2-vitb14", "edm2")):
        m, s = _stats(rng)
        S.save_stats(tmp_path / name, S.FeatureStats(m, s, count=50, mode=mode, weights_sha256="a" * 64, detector=det))
    assert S.load_stats(tmp_path / "dino.npz").detector == "dinov2-vitb14"
    r = _run("fid", tmp_path / "inc.npz", tmp_path / "dino.npz", ok=False)
    assert "dino.npz holds dinov2-vitb14 statistics, but this run uses the inception-2015-12-05 detector" in r.output
    r = _run("fid", tmp_path / "dino.npz", tmp_path / "inc.npz", "--features", "dinov2-vitb14", ok=False)
    assert "inc.npz holds inception-2015-12-05 statistics" in r.output
    # legacy files without the field: mode legacy-tf implies Inception
    m, s = _stats(rng)
    np.savez(tmp_path / "old.npz", mu=m, sigma=s, mode=np.str_("legacy-tf"))
    assert S.load_stats(tmp_path / "old.npz").detector == S.INCEPTION
    # same detector, different weights hash: both files named
    m, s = _stats(rng)
    S.save_stats(tmp_path / "dino2.npz", S.FeatureStats(m, s, count=50, mode="edm2", weights_sha256="b" * 64,
                                                         detector="dinov2-vitb14"))
    r = _run("fid", tmp_path / "dino.npz", tmp_path / "dino2.npz", "--features", "dinov2-vitb14", ok=False)
    assert "dino.npz: aaaaaaaaaaaa" in r.output and "dino2.npz: bbbbbbbbbbbb" in r.output


def test_regress_refuses_rows_of_different_detectors(tmp_path):
    from iddpm_eval import regress as rg
    from iddpm_eval.tables import append_results, read_results

    prov = {"package_version": "0", "git_commit": "c", "time": "t", "machine": "m"}

    def row(det, mode):
        extra = json.dumps({"detector": det}) if det else None
        return {"experiment": "e", "metric": "fd", "value": 5.0, "mode": mode, "weights_sha256": "w", "extra": extra,
                **prov}

    for name, r in (("b.csv", row("dinov2-vitb14", "edm2")), ("c.csv", row("dinov2-vitl14", "edm2")),
                    ("d.csv", row("dinov2-vitb14", "edm2")), ("old.csv", row(None, "legacy-tf"))):
        append_results(tmp_path / name, [r])
    tol = rg.parse_tolerances({"default": {"rel": 0.1}}, "test")
    comp = rg.compare_tables(read_results(tmp_path / "b.csv"), read_results(tmp_path / "c.csv"), tol)
    assert comp.exit_code == rg.EXIT_INCOMPARABLE
    assert "detector 'dinov2-vitb14' vs 'dinov2-vitl14'" in comp.errors[0]
    assert rg.compare_tables(read_results(tmp_path / "b.csv"), read_results(tmp_path / "d.csv"), tol).exit_code == 0
    old = rg.compare_tables(read_results(tmp_path / "old.csv"), read_results(tmp_path / "b.csv"), tol)
    assert old.exit_code == rg.EXIT_INCOMPARABLE and "inception-2015-12-05" in old.errors[0]


# ----------------------------------------------------------------------------- FD_DINOv2 end to end

def test_fd_dinov2_cli_end_to_end(tmp_path):
    pytest.importorskip("timm")
    from test_dinov2 import _official_random_state

    from iddpm_eval.dinov2 import DinoV2Extractor

    wpath = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(_official_random_state("dinov2-vitb14"), wpath)
    rng = np.random.default_rng(6)
    a = rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    b = rng.integers(30, 255, (5, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", a)
    np.savez(tmp_path / "b.npz", b)
    r = _run("fid", tmp_path / "a.npz", tmp_path / "b.npz", "--features", "dinov2-vitb14", "--dinov2-weights", wpath,
             "--json", "--no-progress", "--batch-size", "4", "--results", tmp_path / "r.csv")
    out = json.loads(r.stdout)
    fx = DinoV2Extractor("dinov2-vitb14", weights=wpath, batch_size=6)
    ma, sa = S.stats_from_features(fx(a)["pool"])
    mb, sb = S.stats_from_features(fx(b)["pool"])
    # batches of 4 vs 6 change float32 summation order only: ~1e-6 relative on the features
    assert out["fid"] == pytest.approx(frechet_distance(ma, sa, mb, sb), rel=1e-4)
    assert (out["detector"], out["mode"], out["weights_sha256"]) == ("dinov2-vitb14", "edm2", fx.weights_sha256)
    import pandas as pd

    rows = pd.read_csv(tmp_path / "r.csv")
    assert list(rows["metric"]) == ["fd_dinov2"] and json.loads(rows["extra"][0])["detector"] == "dinov2-vitb14"
    bad = _run("fid", tmp_path / "a.npz", tmp_path / "b.npz", "--features", "dinov2-vitb14", "--dinov2-weights",
               wpath, "--dinov2-sha256", "ab" * 32, ok=False)
    assert f"sha256 {fx.weights_sha256} but {'ab' * 32} was expected" in bad.output
    help_text = _run("fid", "--help").output
    assert "inception|dinov2-vitb14|dinov2-vitl14" in help_text
    # statistics of the DINOv2 features: recorded with their detector, reused as a source
    _run("stats", tmp_path / "a.npz", "-o", tmp_path / "a_dino.npz", "--detector", "dinov2-vitb14",
         "--dinov2-weights", wpath, "--no-progress")
    st = S.load_stats(tmp_path / "a_dino.npz")
    assert (st.detector, st.mode, st.weights_sha256, st.count) == ("dinov2-vitb14", "edm2", fx.weights_sha256, 6)
    again = json.loads(_run("fid", tmp_path / "a_dino.npz", tmp_path / "b.npz", "--features", "dinov2-vitb14",
                            "--dinov2-weights", wpath, "--json", "--no-progress").stdout)
    assert again["fid"] == pytest.approx(out["fid"], rel=1e-4)
    # EDM2's .pkl has an entry for ViT-L/14 only
    r = _run("stats", tmp_path / "a.npz", "-o", tmp_path / "a.pkl", "--detector", "dinov2-vitb14",
             "--dinov2-weights", wpath, "--no-progress", ok=False)
    assert "EDM2 .pkl files hold only inception-2015-12-05 (legacy-tf), dinov2-vitl14 (edm2)" in r.output


def test_edm2_and_adm_writers_refuse_what_the_format_cannot_hold(tmp_path):
    mu, sigma = _stats(np.random.default_rng(0))
    assert R.check_edm2_writable("x.pkl", S.INCEPTION, "legacy-tf") == "fid"
    assert R.check_edm2_writable("x.pkl", "dinov2-vitl14", "edm2") == "fd_dinov2"
    with pytest.raises(S.StatsError, match="x.pkl: EDM2 .pkl files hold only"):
        R.check_edm2_writable("x.pkl", S.INCEPTION, "clean")
    st = S.FeatureStats(mu, sigma, count=50, mode="legacy-tf", detector=S.INCEPTION)
    R.save_edm2_pkl(tmp_path / "r.pkl", st)
    with open(tmp_path / "r.pkl", "rb") as f:
        obj = pickle.load(f)
    assert obj["num_images"] == 50 and np.array_equal(obj["fid"]["sigma"], sigma)
    images = np.zeros((3, 4, 4, 3), np.uint8)
    R.save_adm_batch(tmp_path / "b.npz", images, st)
    assert S.load_stats(tmp_path / "b.npz").origin == "adm"
    with pytest.raises(S.StatsError, match=r"uint8 \(N, H, W, 3\)"):
        R.save_adm_batch(tmp_path / "c.npz", images[..., :1], st)
