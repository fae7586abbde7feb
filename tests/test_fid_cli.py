"""`iddpm-eval fid | stats | recall` end to end. Most tests swap in a cheap fake extractor (same
interface as FeatureExtractor) so the plumbing is tested fast; the peer tests at the bottom use
the real Inception weights against torch-fidelity and clean-fid."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from iddpm_eval import sources
from iddpm_eval import stats as S
from iddpm_eval.cli import main
from iddpm_eval.fid import frechet_distance
from test_stats_fid import FakeExtractor


@pytest.fixture
def fake(monkeypatch):
    made = []

    def make(mode="legacy-tf", weights=None, batch_size=64, sfid=False, device=None):
        fx = FakeExtractor(spatial=sfid)
        fx.mode = mode
        made.append(fx)
        return fx

    monkeypatch.setattr(sources, "make_extractor", make)
    return made


def _images(n, seed, h=8, w=8, c=3, shift=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, h, w, c)) + shift, 0, 255).astype(np.uint8)


def _folder(path, imgs):
    path.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(path / f"{i:04d}.png")
    return path


def _run(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def _expected_fid(a, b):
    fx = FakeExtractor()
    fa, fb = fx(a)["pool"], fx(b)["pool"]
    ma, sa = S.stats_from_features(fa)
    mb, sb = S.stats_from_features(fb)
    return frechet_distance(ma, sa, mb, sb)


def test_fid_json_folder_vs_npz(tmp_path, fake):
    a, b = _images(20, 1), _images(16, 2, shift=40)
    _folder(tmp_path / "a", a)
    np.savez(tmp_path / "b.npz", b)
    out = json.loads(_run("fid", tmp_path / "a", tmp_path / "b.npz", "--json", "--no-progress").stdout)
    assert out["fid"] == pytest.approx(_expected_fid(a, b), rel=1e-9)
    assert (out["n_a"], out["n_b"], out["mode"], out["weights_sha256"]) == (20, 16, "legacy-tf", "f" * 64)
    for key in ("seed", "iddpm_version", "a_fingerprint", "b_fingerprint"):
        assert key in out
    assert len(fake) == 1  # one extractor serves both sources
    from iddpm_eval.measure import compare

    eig = compare(str(tmp_path / "a"), str(tmp_path / "b.npz"), method="eig", progress=False)
    assert eig["fid"] == pytest.approx(out["fid"], rel=1e-8) and eig["fid_method"] == "eig"
    text = _run("fid", tmp_path / "a", tmp_path / "b.npz", "--batch-size", "3", "--no-progress").output
    assert f"FID {out['fid']:.4f}" in text


def test_one_pass_metrics_cached_features_and_stats(tmp_path, fake):
    a, b = _images(24, 3), _images(22, 4, shift=30)
    np.savez(tmp_path / "a.npz", a)
    np.savez(tmp_path / "b.npz", b)
    cache = tmp_path / "cache"
    out = json.loads(_run("fid", tmp_path / "a.npz", tmp_path / "b.npz", "--json", "--kid", "--kid-subsets", "5",
                          "--bootstrap", "4", "--pr", "--sfid", "--save-features", cache, "--no-progress").stdout)
    assert out["fid_ci_low"] <= out["fid_ci_high"] and out["bootstrap_resampled"] == ["a", "b"]
    assert out["kid_subset_size"] == 22 and "kid_mean" in out and "sfid" in out
    assert out["reference"] == "a" and (out["n_real"], out["n_fake"], out["k"]) == (24, 22, 3)
    # the same numbers from the peers on the same features
    import torch
    from prdc import compute_prdc
    from torch_fidelity.metric_kid import kid_features_to_metric

    fx = FakeExtractor()
    fa, fb = fx(a)["pool"], fx(b)["pool"]
    ref = compute_prdc(fa, fb, 3)
    for key in ("precision", "recall", "density", "coverage"):
        assert out[key] == pytest.approx(ref[key], abs=1e-9)
    kid = kid_features_to_metric(torch.from_numpy(fa.astype(np.float64)), torch.from_numpy(fb.astype(np.float64)),
                                 kid_subsets=5, kid_subset_size=22, rng_seed=0, verbose=False)
    assert out["kid_mean"] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-9)
    # cached features reused as sources: no extraction, same FID
    n_made = len(fake)
    again = json.loads(_run("fid", cache / "a.npz", cache / "b.npz", "--json", "--kid", "--kid-subsets", "5").stdout)
    assert len(fake) == n_made
    assert again["fid"] == pytest.approx(out["fid"], rel=1e-9)
    assert again["kid_mean"] == pytest.approx(out["kid_mean"], rel=1e-9)
    assert again["weights_sha256"] == "f" * 64
    # statistics written by `stats` give the same FID against images
    s = json.loads(_run("stats", tmp_path / "a.npz", "-o", tmp_path / "ref.npz", "--json", "--no-progress").stdout)
    assert s["n"] == 24 and s["fingerprint"] == out["a_fingerprint"] and s["weights_sha256"] == "f" * 64
    with np.load(tmp_path / "ref.npz") as z:
        assert str(z["mode"]) == "legacy-tf" and int(z["count"]) == 24
    r = json.loads(_run("fid", tmp_path / "ref.npz", tmp_path / "b.npz", "--json", "--no-progress").stdout)
    assert r["fid"] == pytest.approx(out["fid"], rel=1e-9) and r["a_kind"] == "stats"
    # statistics alone cannot feed KID
    r = _run("fid", tmp_path / "ref.npz", tmp_path / "b.npz", "--kid", ok=False)
    assert r.exit_code != 0 and "statistics only" in r.output
    # bootstrap with a statistics side resamples only the other side
    r = json.loads(_run("fid", tmp_path / "ref.npz", tmp_path / "b.npz", "--json", "--bootstrap", "3").stdout)
    assert r["bootstrap_resampled"] == ["b"]


def test_recall_command_names_reference(tmp_path, fake):
    a, b = _images(12, 5), _images(10, 6, shift=20)
    np.savez(tmp_path / "a.npz", a)
    np.savez(tmp_path / "b.npz", b)
    out = json.loads(_run("recall", tmp_path / "a.npz", tmp_path / "b.npz", "--json", "--k", "2").stdout)
    for key in ("precision", "recall", "density", "coverage", "k", "n_real", "n_fake", "weights_sha256", "mode"):
        assert key in out
    assert out["k"] == 2 and out["n_real"] == 12 and out["reference"] == "a"
    text = _run("recall", tmp_path / "a.npz", tmp_path / "b.npz", "--no-progress").output
    assert f"reference (real) set: A = {tmp_path / 'a.npz'}" in text


def test_results_rows(tmp_path, fake):
    from iddpm_eval.tables import read_results

    np.savez(tmp_path / "a.npz", _images(10, 7))
    np.savez(tmp_path / "b.npz", _images(10, 8))
    table = tmp_path / "res.csv"
    out = json.loads(_run("fid", tmp_path / "a.npz", tmp_path / "b.npz", "--json", "--bootstrap", "3",
                          "--results", table, "--experiment", "e1").stdout)
    df = read_results(table)
    assert list(df["metric"]) == ["fid"] and df["value"].iloc[0] == pytest.approx(out["fid"])
    assert df["ci_low"].iloc[0] == pytest.approx(out["fid_ci_low"]) and df["weights_sha256"].iloc[0] == "f" * 64


def test_num_and_seed(tmp_path, fake):
    np.savez(tmp_path / "a.npz", _images(30, 9))
    np.savez(tmp_path / "b.npz", _images(30, 10))
    args = ("fid", tmp_path / "a.npz", tmp_path / "b.npz", "--json", "--num", "12")
    r1, r2 = (json.loads(_run(*args, "--seed", "1").stdout) for _ in range(2))
    r3 = json.loads(_run(*args, "--seed", "2").stdout)
    assert r1["n_a"] == 12 and r1["fid"] == r2["fid"] != r3["fid"]
    r = _run(*args[:-1], "31", ok=False)
    assert "larger than the source" in r.output


def test_bad_inputs_clear_errors_no_output(tmp_path, fake):
    good = tmp_path / "good.npz"
    np.savez(good, _images(6, 11))
    (tmp_path / "empty").mkdir()
    bad_img = _folder(tmp_path / "badimg", _images(3, 12))
    (bad_img / "0001.png").write_bytes(b"not a png")
    mixed = _folder(tmp_path / "mixed", _images(2, 13))
    Image.fromarray(_images(1, 14, h=9)[0]).save(mixed / "big.png")
    np.savez(tmp_path / "nan.npz", arr_0=np.full((4, 8, 8, 3), np.nan, np.float32))
    np.savez(tmp_path / "shape.npz", arr_0=np.zeros((4, 8, 8), np.float64))
    np.savez(tmp_path / "stats8.npz", mu=np.zeros(8), sigma=np.eye(8))
    np.savez(tmp_path / "statsnan.npz", mu=np.full(12, np.nan), sigma=np.eye(12))
    cases = [(tmp_path / "empty", "no images"), (bad_img, "0001.png"), (mixed, "different sizes"),
             (tmp_path / "nan.npz", "uint8"), (tmp_path / "shape.npz", "uint8"),
             (tmp_path / "stats8.npz", "8-dimensional"), (tmp_path / "statsnan.npz", "NaN"),
             ("fashion-mnist:valid", "train' or 'test"), (tmp_path / "nothing", "no such file")]
    for src, msg in cases:
        r = _run("fid", good, src, "--json", "--save-features", tmp_path / "feat", ok=False)
        assert r.exit_code == 1 and msg in r.output, (src, r.output)
        if src == tmp_path / "stats8.npz":
            continue  # a valid statistics file on its own: `stats` may convert it
        out = tmp_path / "out.npz"
        r = _run("stats", src, "-o", out, ok=False)
        assert r.exit_code == 1 and msg in r.output, (src, r.output)
        assert not out.exists()
    assert not (tmp_path / "feat").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_mode_mismatch_refused(tmp_path, fake):
    np.savez(tmp_path / "a.npz", _images(6, 15))
    _run("stats", tmp_path / "a.npz", "-o", tmp_path / "ref.npz", "--mode", "clean", "--no-progress")
    r = _run("fid", tmp_path / "ref.npz", tmp_path / "a.npz", ok=False)
    assert "mode 'clean'" in r.output
    assert json.loads(_run("fid", tmp_path / "ref.npz", tmp_path / "a.npz", "--mode", "clean", "--json").stdout)["fid"] \
        == pytest.approx(0, abs=1e-4)  # 6 images, 12 dims: singular sqrtm, round-off ~1e-6


def test_adm_reference_batch_uses_stored_stats(tmp_path, fake):
    a, b = _images(10, 16), _images(10, 17)
    fa = FakeExtractor()(a)["pool"]
    mu, sigma = S.stats_from_features(fa)
    np.savez(tmp_path / "adm.npz", arr_0=a, mu=mu + 1.0, sigma=sigma)  # shifted: shows which was used
    np.savez(tmp_path / "b.npz", b)
    stored = json.loads(_run("fid", tmp_path / "adm.npz", tmp_path / "b.npz", "--json").stdout)
    recomputed = json.loads(_run("fid", tmp_path / "adm.npz", tmp_path / "b.npz", "--json", "--kid",
                                 "--kid-subsets", "2").stdout)
    assert stored["a_kind"] == "stats" and recomputed["a_kind"] == "images"
    assert recomputed["fid"] == pytest.approx(_expected_fid(a, b), rel=1e-9)
    assert stored["fid"] != pytest.approx(recomputed["fid"], rel=1e-3)


# ----------------------------------------------------------------------------- peers, real weights

@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    """Two sets of 24 RGB 16x16 PNGs: smooth blobs, and the same blobs with noise and a shift."""
    root = tmp_path_factory.mktemp("peer_images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:16]
    blobs = []
    for _ in range(24):
        cy, cx, r = rng.uniform(3, 13), rng.uniform(3, 13), rng.uniform(2, 6)
        color = rng.integers(40, 256, 3)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)[..., None]
        blobs.append(np.where(mask, color, 20).astype(np.uint8))
    a = np.stack(blobs)
    b = np.clip(a.astype(int) + rng.integers(-50, 50, a.shape) + 15, 0, 255).astype(np.uint8)
    return _folder(root / "a", a), _folder(root / "b", b), root


@pytest.mark.slow
def test_legacy_tf_fid_equals_torch_fidelity(two_folders):
    import peers
    import torch_fidelity

    from iddpm_eval.measure import compare

    dir_a, dir_b, root = two_folders
    ours = compare(str(dir_a), str(dir_b), mode="legacy-tf", batch_size=8, progress=False)
    theirs = torch_fidelity.calculate_metrics(input1=str(dir_b), input2=str(dir_a), fid=True,
                                              **peers.torch_fidelity_kwargs(root))
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    from iddpm_core.io import file_sha256

    assert ours["n_a"] == ours["n_b"] == 24 and ours["weights_sha256"] == file_sha256(peers.nvidia_weights())


@pytest.mark.slow
def test_clean_fid_equals_cleanfid(two_folders):
    import peers
    import torch
    from cleanfid import fid as cleanfid

    from iddpm_eval.measure import compare

    dir_a, dir_b, root = two_folders
    # eigenvalue form on our side (saves one 2048x2048 sqrtm; sqrtm == eig is tested in test_stats_fid)
    ours = compare(str(dir_a), str(dir_b), mode="clean", batch_size=8, progress=False, method="eig")
    with peers.cleanfid_offline(root / "cleanfid"):
        theirs = cleanfid.compute_fid(str(dir_a), str(dir_b), mode="clean", num_workers=0, batch_size=8,
                                      device=torch.device("cpu"), verbose=False, use_dataparallel=False)
    assert ours["mode"] == "clean"
    assert ours["fid"] == pytest.approx(theirs, rel=1e-3)


def test_checkpoint_source_samples_like_sample_images(tmp_path, fake):
    from iddpm_core.config import RunConfig, TrainConfig
    from iddpm_core.diffusion import DiffusionConfig
    from iddpm_core.models import ModelConfig
    from iddpm_core.sample import sample_images
    from iddpm_core.train import train

    rc = RunConfig(model=ModelConfig(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2),
                                     attention_resolutions=()),
                   diffusion=DiffusionConfig(steps=20),
                   train=TrainConfig(batch_size=4, steps=1, lr=1e-2, ema_rates=(0.5,), sample_interval=0,
                                     save_interval=0, sample_num=2, sample_steps="2", log_interval=1))
    train(rc, tmp_path / "run", progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "latest.pt"
    b = _images(6, 18, c=1)  # --num 6 applies to both sources: all of B
    np.savez(tmp_path / "b.npz", b)
    out = json.loads(_run("fid", ckpt, tmp_path / "b.npz", "--num", "6", "--sample-steps", "3", "--seed", "2",
                          "--batch-size", "4", "--json", "--no-progress").stdout)
    imgs = sample_images(ckpt, 6, steps=3, seed=2, batch_size=4, progress=False)
    ref = json.loads(_run("fid", tmp_path / "b.npz", tmp_path / "b.npz", "--json").stdout)  # sanity: 0 for same
    assert abs(ref["fid"]) < 1e-3
    fa = FakeExtractor()(imgs)["pool"]
    fb = FakeExtractor()(b)["pool"]
    ma, sa = S.stats_from_features(fa)
    mb, sb = S.stats_from_features(fb)
    assert out["n_a"] == 6 and out["fid"] == pytest.approx(frechet_distance(ma, sa, mb, sb), rel=1e-6)
    r = _run("fid", ckpt, tmp_path / "b.npz", ok=False)
    assert "needs --num" in r.output
