"""Bootstrap intervals of precision/recall/density/coverage (iddpm_eval.prdc_boot): the full-set
values equal compute_prdc's, the multiset rule against a brute-force reference with explicit
duplicates, closed forms on identical sets, coverage in simulation, the shared resamples with
FID's bootstrap, and the CLI."""

import json

import numpy as np
import pytest

from iddpm_eval.prdc import compute_prdc
from iddpm_eval.prdc_boot import METRICS, _consistent_sqdist, _Neighbours, bootstrap_prdc, prdc_counts
from iddpm_eval.stats import bootstrap_draws

D = 16


def _draw(rng, n):
    return rng.standard_normal((n, D)), 0.3 + 1.2 * rng.standard_normal((n, D))


def _brute(real, fake, cr, cf, k):
    """Independent path: materialise the multisets, radii = k-th smallest distance to the other
    entries after removing the entries that are copies of the same image (loops, no sorting tricks)."""
    ir, jf = np.repeat(np.arange(len(real)), cr), np.repeat(np.arange(len(fake)), cf)

    def radii(x, idx):
        out = []
        for a in idx:
            d = np.sqrt(((x[idx] - x[a]) ** 2).sum(1))
            out.append(np.sort(d[idx != a])[k - 1])
        return np.array(out)

    rr, rf = radii(real, ir), radii(fake, jf)
    dist = np.sqrt(((fake[jf][:, None, :] - real[ir][None, :, :]) ** 2).sum(-1))  # [fake entry, real entry]
    inr, inf = dist <= rr[None, :], dist <= rf[:, None]
    return {"precision": inr.any(1).mean(), "recall": inf.any(0).mean(), "density": inr.sum() / (k * len(jf)),
            "coverage": inr.any(0).mean()}


def test_full_set_values_equal_compute_prdc():
    rng = np.random.default_rng(0)
    for n, m, k in ((200, 150, 3), (90, 120, 5)):
        x, y = _draw(rng, n)[0], _draw(rng, m)[1]
        b, ref = bootstrap_prdc(x, y, 5, k=k), compute_prdc(x, y, k=k)
        for key in METRICS:
            assert b[key] == ref[key]
    # integer features with many exact ties (digits pixels): float64 products are exact there
    from sklearn.datasets import load_digits

    px = load_digits().data[:400]
    b, ref = bootstrap_prdc(px[:200], px[200:], 3), compute_prdc(px[:200], px[200:])
    assert all(b[key] == ref[key] for key in METRICS)


def test_multiset_rule_against_brute_force():
    rng = np.random.default_rng(1)
    x, y = _draw(rng, 40)
    k = 3
    rr, ff, d2 = _consistent_sqdist(x, y)
    nr, nf = _Neighbours(rr, k), _Neighbours(ff, k)
    for ir, jf in bootstrap_draws(40, 40, 5, 3):
        cr, cf = np.bincount(ir, minlength=40), np.bincount(jf, minlength=40)
        got, ref = prdc_counts(nr, nf, d2, cr, cf, k), _brute(x, y, cr, cf, k)
        for key in METRICS:  # same decisions; float sums of a few hundred terms: 1e-12
            assert got[key] == pytest.approx(ref[key], abs=1e-12), key


def test_truncated_neighbour_lists_fall_back_to_full_rows():
    """Counts concentrated away from a point's nearest neighbours force the full-row path."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((120, 4))
    y = rng.standard_normal((120, 4))
    rr, ff, d2 = _consistent_sqdist(x, y)
    nr, nf = _Neighbours(rr, 3), _Neighbours(ff, 3)
    cr = np.zeros(120, np.int64)
    cr[:3] = 40  # only three images present, 40 copies each
    cf = np.ones(120, np.int64)
    got = prdc_counts(nr, nf, d2, cr, cf, 3)
    ref = _brute(x, y, cr, cf, 3)
    for key in METRICS:
        assert got[key] == pytest.approx(ref[key], abs=1e-12)


def test_identical_sets_closed_form():
    """fake == real: every fake point is a real centre (distance 0), so precision = recall =
    coverage = 1; each real ball holds its own centre's copy and its k nearest neighbours' copies
    (the k-th exactly on the edge, counted by <=), k + 1 fakes for distinct distances, so
    density = N (k + 1) / (k M) = (k + 1) / k. compute_prdc agrees."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((150, D))
    b = bootstrap_prdc(x, x.copy(), 20)
    assert (b["precision"], b["recall"], b["coverage"]) == (1.0, 1.0, 1.0)
    assert b["density"] == pytest.approx(4 / 3, abs=1e-12) == compute_prdc(x, x.copy())["density"]
    for key in ("precision", "recall", "coverage"):
        assert b[f"{key}_ci_high"] == 1.0 and b[f"{key}_ci_low"] <= 1.0
    for key in METRICS:
        assert b[f"{key}_ci_low"] <= b[key] <= b[f"{key}_ci_high"]


def test_coverage_in_simulation():
    """40 independent draws of 300 + 300 points (16-dim Gaussians, shifted and scaled). The target
    is each metric's mean over 150 further draws. Measured (60 draws, 200 rounds): the 95% intervals
    covered it 58, 60, 60, 58 times in 60 (precision, recall, density, coverage), widths 1.09, 1.36,
    1.46, 0.94 times 3.92 sd of the estimator."""
    rng = np.random.default_rng(4)
    target = {key: [] for key in METRICS}
    for _ in range(150):
        x, y = _draw(rng, 300)
        r = compute_prdc(x, y)
        for key in METRICS:
            target[key].append(r[key])
    target = {key: np.mean(v) for key, v in target.items()}
    hits = dict.fromkeys(METRICS, 0)
    for t in range(40):
        x, y = _draw(rng, 300)
        b = bootstrap_prdc(x, y, 100, seed=t)
        for key in METRICS:
            assert b[f"{key}_ci_low"] <= b[key] <= b[f"{key}_ci_high"]
            hits[key] += b[f"{key}_ci_low"] <= target[key] <= b[f"{key}_ci_high"]
    assert min(hits.values()) >= 34, hits  # >= 85% of 40 for a nominal 95%


def test_memory_limit_names_sizes():
    with pytest.raises(ValueError, match="300 real and 200 fake images need 0.0 GiB"):
        bootstrap_prdc(np.zeros((300, 2)), np.zeros((200, 2)), 5, max_elements=1e4)


def test_fid_bootstrap_unchanged_by_shared_draws():
    """bootstrap_fid with the shared draws gives the same rounds as drawing from the seed itself
    (the stream it has always used: side a, then side b, per round)."""
    from iddpm_eval.fid import bootstrap_fid

    rng = np.random.default_rng(5)
    x, y = _draw(rng, 60)
    a = bootstrap_fid(x, y, 10, seed=7, method="sqrtm")
    b = bootstrap_fid(x, y, 10, seed=7, method="sqrtm", draws=bootstrap_draws(60, 60, 10, 7))
    legacy = np.random.default_rng(7)
    i1, i2 = legacy.integers(0, 60, 60), legacy.integers(0, 60, 60)
    assert np.array_equal(bootstrap_draws(60, 60, 1, 7)[0][0], i1) and np.array_equal(bootstrap_draws(60, 60, 1, 7)[0][1], i2)
    assert np.array_equal(a["values"], b["values"])


def test_cli_prints_an_interval_for_every_metric(tmp_path):
    from click.testing import CliRunner

    from iddpm_eval.cli import main
    from iddpm_eval.stats import FeatureStats, save_stats, stats_from_features

    rng = np.random.default_rng(6)
    x, y = _draw(rng, 120)
    for name, f in (("a", x), ("b", y)):
        mu, sig = stats_from_features(f)
        save_stats(tmp_path / f"{name}.npz", FeatureStats(mu, sig, count=len(f), mode="legacy-tf",
                                                          weights_sha256="e" * 64), features=f)
    args = ["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--pr", "--bootstrap", "30", "--no-progress"]
    run = CliRunner().invoke(main, args + ["--json", "--results", str(tmp_path / "r.csv")])
    assert run.exit_code == 0, run.output
    out = json.loads(run.stdout)
    ref = bootstrap_prdc(x.astype(np.float32), y.astype(np.float32), 30, draws=bootstrap_draws(120, 120, 30, 0))
    for key in METRICS:
        assert out[f"{key}_ci_low"] == ref[f"{key}_ci_low"] and out[f"{key}_ci_high"] == ref[f"{key}_ci_high"]
    import pandas as pd

    rows = pd.read_csv(tmp_path / "r.csv").set_index("metric")
    assert rows.loc["precision", "ci_low"] == pytest.approx(out["precision_ci_low"])
    text = CliRunner().invoke(main, args).output
    for key in METRICS:
        assert f"{key} {out[key]:.4f} (95% CI" in text


def test_sfid_interval_on_the_shared_resamples(tmp_path, monkeypatch):
    """sFID gets an interval from the same draws as FID's: equal to bootstrap_fid on the spatial
    features with those draws."""
    from iddpm_eval import sources
    from iddpm_eval.fid import bootstrap_fid
    from iddpm_eval.measure import compare
    from test_stats_fid import FakeExtractor

    def make(mode="legacy-tf", weights=None, batch_size=64, sfid=False, device=None):
        return FakeExtractor(spatial=sfid)

    monkeypatch.setattr(sources, "make_extractor", make)
    rng = np.random.default_rng(7)
    a = rng.integers(0, 255, (30, 8, 8, 3), dtype=np.uint8)
    b = rng.integers(30, 255, (26, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", a)
    np.savez(tmp_path / "b.npz", b)
    out = compare(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), sfid=True, bootstrap=20, progress=False)
    fx = FakeExtractor(spatial=True)
    sa, sb = fx(a)["spatial"], fx(b)["spatial"]
    ref = bootstrap_fid(sa, sb, 20, draws=bootstrap_draws(30, 26, 20, 0), estimate=out["sfid"])
    assert out["sfid_ci_low"] == pytest.approx(ref["low"], rel=1e-9)
    assert out["sfid_ci_high"] == pytest.approx(ref["high"], rel=1e-9)
    assert out["sfid_ci_low"] <= out["sfid"] <= out["sfid_ci_high"]
