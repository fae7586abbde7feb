"""Scaling fits: closed forms, scipy peers, bootstrap coverage, frontier, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy.optimize import approx_fprime, curve_fit, minimize_scalar
from threadpoolctl import threadpool_limits

from iddpm_eval import scaling as S
from iddpm_eval.scaling.bootstrap import bootstrap
from iddpm_eval.scaling.fit import fit_logs, one_thread
from iddpm_eval.scaling.law import box_bounds, model_for
from iddpm_eval.scaling.lbfgs import lbfgs, lbfgs_batch
from iddpm_eval.scaling.points import select_points
from iddpm_eval.cli import main


def rel(a, b):
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------- loss and gradient


def test_huber_closed_form():
    r = np.array([-0.5, -1e-3, -2e-4, 0.0, 3e-4, 1e-3, 0.2])
    d = 1e-3
    expect = [d * (0.5 - d / 2), 0.5e-6, 0.5 * 4e-8, 0.0, 0.5 * 9e-8, 0.5e-6, d * (0.2 - d / 2)]
    np.testing.assert_allclose(S.huber(r, d), expect, rtol=1e-12, atol=0)


@pytest.mark.parametrize("form", ["saturating", "power", "fixed-E", "joint"])
def test_gradient_matches_finite_differences(form):
    rng = np.random.default_rng(3)
    model = model_for(form, 0.7 if form == "fixed-E" else None)
    n = 25
    z = rng.normal(size=(n, model.n_terms))
    theta = rng.normal(scale=0.5, size=model.n_params)
    ly = model.log_pred(theta[None, :], z)[0] + rng.normal(scale=0.05, size=n)  # mostly linear Huber branch
    w = rng.integers(0, 3, size=n).astype(float)
    delta = 0.04  # some residuals in each branch
    f, g = model.loss_and_grad(theta[None, :], z, ly, w, delta)
    assert f[0] == pytest.approx(model.loss(theta[None, :], z, ly, w, delta)[0], rel=1e-14)
    num = approx_fprime(theta, lambda t: model.loss(t[None, :], z, ly, w, delta)[0], 1e-7)
    np.testing.assert_allclose(g[0], num, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- recovery and peers


@pytest.mark.parametrize("scale", [1.0, 1e15])
@pytest.mark.parametrize("form", ["saturating", "power", "fixed-E"])
def test_noise_free_data_gives_back_the_law(form, scale):
    x = scale * np.logspace(0, 4, 15)
    E, A, alpha = 1.3, 7.0 * scale ** 0.45, 0.45
    E_true = 0.0 if form == "power" else E
    y = E_true + A * x ** -alpha
    fit = S.fit_power_law(x, y, form, fixed_E=E if form == "fixed-E" else None)
    assert fit.converged
    assert rel(fit.params["alpha"], alpha) < 1e-6
    assert rel(fit.params["A"], A) < 1e-6
    if form != "power":
        assert rel(fit.params["E"], E) < 1e-6
    else:
        assert "E" not in fit.params
    np.testing.assert_allclose(fit.predict(x), y, rtol=1e-7)


def test_joint_noise_free_recovery():
    n = np.repeat(np.logspace(5, 8, 4), 6)
    d = np.tile(np.logspace(4, 7, 6), 4)
    truth = {"E": 1.5, "A": 400.0, "alpha": 0.34, "B": 900.0, "beta": 0.28}
    y = truth["E"] + truth["A"] * n ** -truth["alpha"] + truth["B"] * d ** -truth["beta"]
    fit = S.fit_joint(n, d, y)
    for k, v in truth.items():
        assert rel(fit.params[k], v) < 1e-6, k


def test_least_squares_limit_agrees_with_curve_fit():
    # With a huge Huber delta the loss is 0.5 * sum r^2 in log space: scipy's curve_fit on the
    # same log-space model minimises the same thing (by Levenberg-Marquardt).
    rng = np.random.default_rng(11)
    x = np.logspace(0, 4, 30)
    y = (0.8 + 12.0 * x ** -0.6) * np.exp(0.03 * rng.standard_normal(x.size))
    fit = S.fit_power_law(x, y, delta=1e3)

    def model(lx, le, la, alpha):
        return np.logaddexp(le, la - alpha * lx)

    p, _ = curve_fit(model, np.log(x), np.log(y), p0=[0.0, 2.0, 0.5], xtol=1e-14, ftol=1e-14, gtol=1e-14)
    assert rel(fit.params["E"], np.exp(p[0])) < 1e-5
    assert rel(fit.params["A"], np.exp(p[1])) < 1e-5
    assert rel(fit.params["alpha"], p[2]) < 1e-5


def test_noise_free_agrees_with_curve_fit_in_linear_space():
    x = np.logspace(1, 3, 12)
    y = 2.0 + 30.0 * x ** -0.7
    p, _ = curve_fit(lambda x, E, A, a: E + A * x ** -a, x, y, p0=[1.0, 10.0, 0.5], xtol=1e-15, ftol=1e-15)
    fit = S.fit_power_law(x, y)
    for k, v in zip(["E", "A", "alpha"], p):
        assert rel(fit.params[k], v) < 1e-6


def test_power_form_least_squares_is_ordinary_regression():
    rng = np.random.default_rng(5)
    x = np.logspace(2, 6, 20)
    y = 50 * x ** -0.3 * np.exp(0.1 * rng.standard_normal(x.size))
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    fit = S.fit_power_law(x, y, "power", delta=1e3)
    assert rel(fit.params["alpha"], -slope) < 1e-7
    assert rel(fit.params["A"], np.exp(intercept)) < 1e-7


def test_batched_lbfgs_matches_scipy_per_resample():
    rng = np.random.default_rng(2)
    x = np.logspace(0, 4, 20)
    y = (1 + 10 * x ** -0.5) * np.exp(0.05 * rng.standard_normal(x.size))
    fit = S.fit_power_law(x, y)
    model = model_for("saturating", None)
    z = (np.log(x) - fit.center)[:, None]
    ly = np.log(y)
    W = np.stack([S.run_weights(np.arange(x.size), rng) for _ in range(20)])
    bounds = box_bounds(model, ly)
    with threadpool_limits(1):
        th, f = lbfgs_batch(model, np.repeat(fit.theta[None], len(W), 0), z, ly, W, S.DELTA, bounds)
        for b in range(len(W)):
            ref = lbfgs(model, fit.theta, z, ly, W[b], S.DELTA, bounds)
            np.testing.assert_allclose(th[b], ref.x, rtol=0, atol=1e-6)
            assert f[b] <= ref.fun * S.DELTA ** 2 * (1 + 1e-9)


def test_row_weights_count_as_repeated_rows():
    # fit_logs takes log inputs and row multiplicities: weight 2 is the same fit as the row twice
    rng = np.random.default_rng(4)
    x = np.logspace(0, 4, 12)
    y = (1 + 10 * x ** -0.5) * np.exp(0.05 * rng.standard_normal(x.size))
    w = rng.integers(0, 3, size=x.size).astype(float)
    fit = fit_logs("saturating", np.log(x), np.log(y), w)
    rep = np.repeat(np.arange(x.size), w.astype(int))
    ref = S.fit_power_law(x[rep], y[rep])
    assert fit.n_points == np.count_nonzero(w)
    for k in ("E", "A", "alpha"):
        assert rel(fit.params[k], ref.params[k]) < 1e-6, k


def test_fits_run_with_one_blas_thread():
    from threadpoolctl import threadpool_info

    threads = one_thread(lambda: [p["num_threads"] for p in threadpool_info()])()
    assert threads and set(threads) == {1}


# --------------------------------------------------------------------------- bootstrap


@pytest.mark.slow
def test_bootstrap_coverage_of_the_exponent():
    # 50 seeded data sets from y = E + A x^-alpha with 5% log-normal noise: the 95% percentile
    # interval must hold the true alpha in at least 90% of them.
    E, A, alpha = 1.0, 10.0, 0.5
    x = np.logspace(0, 4, 20)
    hits = 0
    for trial in range(50):
        rng = np.random.default_rng(1000 + trial)
        y = (E + A * x ** -alpha) * np.exp(0.05 * rng.standard_normal(x.size))
        res = S.scaling_fit(pd.DataFrame({"train_flops": x, "fid": y}), "compute", "fid", points="all",
                            n_boot=200, seed=trial, progress=False)
        row = res.table.set_index("parameter").loc["alpha"]
        assert row["ci_low"] < row["value"] < row["ci_high"]
        hits += row["ci_low"] <= alpha <= row["ci_high"]
    assert hits >= 45, hits


def test_run_weights_draw_whole_runs():
    groups = np.array(["a", "a", "b", "c", "c", "c", "d"])
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = S.run_weights(groups, rng)
        per_run = {g: set(w[groups == g]) for g in set(groups)}
        assert all(len(v) == 1 for v in per_run.values())  # one weight per run
        assert sum(v.pop() for v in per_run.values()) == 4  # four runs drawn


def test_bootstrap_over_runs_ignores_checkpoint_multiplicity():
    # Each run repeated as 3 identical checkpoints must give the same bootstrap as one row per
    # run (same seed): resampling is by run. A row-level bootstrap would draw 3x more indices.
    rng = np.random.default_rng(4)
    x = np.logspace(0, 4, 12)
    y = (1 + 10 * x ** -0.5) * np.exp(0.05 * rng.standard_normal(x.size))
    one = pd.DataFrame({"run": np.arange(12), "train_flops": x, "fid": y, "step": 1})
    three = pd.concat([one.assign(step=s) for s in (1, 2, 3)], ignore_index=True)
    kw = dict(points="all", n_boot=60, seed=9, progress=False)
    a = S.scaling_fit(one, "compute", "fid", **kw)
    b = S.scaling_fit(three, "compute", "fid", **kw)
    np.testing.assert_allclose(b.boot, a.boot, rtol=1e-6)
    np.testing.assert_allclose(b.table[["value", "ci_low", "ci_high"]], a.table[["value", "ci_low", "ci_high"]],
                               rtol=1e-6)


def test_bootstrap_of_noise_free_data_gives_back_the_law_on_every_resample():
    # any resample of exact data has the same optimum; a resample with too few points is NaN
    x = np.logspace(0, 4, 8)
    y = 1.3 + 7.0 * x ** -0.45
    fit = S.fit_power_law(x, y)
    boot = bootstrap(fit, np.log(x), np.log(y), np.arange(x.size), lambda present: present, 30, 0,
                     progress=False)
    assert boot.shape == (30, 3) and not np.isnan(boot).all()
    ok = ~np.isnan(boot).any(axis=1)
    np.testing.assert_allclose(boot[ok], np.tile([1.3, 7.0, 0.45], (ok.sum(), 1)), rtol=1e-5)
    too_few = bootstrap(fit, np.log(x), np.log(y), np.arange(x.size), lambda present: present & (x < 3), 10, 0,
                         progress=False)
    assert np.isnan(too_few).all()


def test_percentile_interval_ignores_failed_resamples():
    draws = np.column_stack([np.arange(101.0), 2 * np.arange(101.0)])
    lo, hi = S.percentile_ci(np.vstack([draws, np.full((7, 2), np.nan)]), 0.9)
    np.testing.assert_allclose(lo, [5.0, 10.0])
    np.testing.assert_allclose(hi, [95.0, 190.0])


def test_estimate_k_is_the_median_flops_per_parameter_image():
    t = pd.DataFrame({"params": [1e5, 2e5, 4e5], "images_seen": [10.0, 20.0, 40.0],
                      "train_flops": [6 * 1e6, 7 * 4e6, 100 * 16e6]})
    assert S.estimate_k(t) == pytest.approx(7.0)


def test_parameter_table_csv_reads_back(tmp_path):
    t = pd.DataFrame({"parameter": ["E", "alpha"], "value": [1.25, 1 / 3], "ci_low": [1.0, np.nan],
                      "ci_high": [1.5, np.nan]})
    path = S.write_csv(t, tmp_path / "sub" / "fit.csv")
    back = S.read_table(path)
    assert back["parameter"].tolist() == ["E", "alpha"] and np.isnan(back["ci_low"][1])
    np.testing.assert_allclose(back["value"], t["value"], rtol=1e-9)


# --------------------------------------------------------------------------- frontier


def test_frontier_of_a_hand_made_table():
    t = pd.DataFrame({
        "run":         ["s", "s", "s", "m", "m", "m", "l", "l"],
        "train_flops": [1.0, 2.0, 4.0, 2.0, 4.0, 8.0, 4.0, 16.0],
        "fid":         [50., 40., 38., 45., 30., 20., 33., 12.],
    })
    # s@1 (first), s@2 (40 < 50; m@2 = 45 is worse), m@4 (30 beats s@4 38 and l@4 33), m@8, l@16
    expect = [0, 1, 4, 5, 7]
    assert np.flatnonzero(S.frontier_mask(t["train_flops"], t["fid"])).tolist() == expect
    res = S.scaling_fit(t, "compute", "fid", form="power", n_boot=0, progress=False)
    assert res.frontier.index.tolist() == expect
    assert np.flatnonzero(res.data["used"]).tolist() == expect
    # a bootstrap resample without run "m" recomputes the frontier: l@4 (33) now beats s@4 (38)
    present = (t["run"] != "m").to_numpy()
    m = select_points("frontier", t["train_flops"].to_numpy(), t["fid"].to_numpy(), t["run"].to_numpy(),
                              np.zeros(len(t)), present)
    assert np.flatnonzero(m).tolist() == [0, 1, 6, 7]


def test_frontier_matches_brute_force_with_ties():
    rng = np.random.default_rng(8)
    x = rng.integers(1, 12, size=80).astype(float)
    y = rng.integers(1, 15, size=80).astype(float)
    brute = [not np.any((x <= x[i]) & (y < y[i])) for i in range(len(x))]
    assert S.frontier_mask(x, y).tolist() == brute


def test_last_checkpoint_selection():
    m = S.last_mask(np.array(["a", "b", "a", "b", "a"]), np.array([1, 5, 3, 2, 2]))
    assert m.tolist() == [False, True, True, False, False]


# --------------------------------------------------------------------------- joint form and compute optimum


def test_compute_optimal_closed_form_matches_numeric_minimum():
    fit = S.Fit("joint", {"E": 1.2, "A": 300.0, "alpha": 0.35, "B": 700.0, "beta": 0.3}, 0.0, 0, True,
                np.empty(0), np.empty(0))
    k = 6.0
    for c in (1e14, 1e18):
        n_opt, d_opt = S.compute_optimal(fit, c, k)
        loss = lambda ln: fit.predict(np.exp(ln), c / (k * np.exp(ln)))  # noqa: E731
        res = minimize_scalar(loss, bounds=(0, 60), method="bounded", options={"xatol": 1e-10})
        assert rel(float(n_opt), np.exp(res.x)) < 1e-6
        assert rel(float(d_opt * n_opt * k), c) < 1e-12


def test_joint_fit_table_with_budget():
    rows = []
    for i, n in enumerate([1e5, 1e6, 1e7]):
        for s in range(1, 6):
            d = 1e4 * 3 ** s
            rows.append(dict(run=i, params=n, images_seen=d, train_flops=6.0 * n * d, step=s,
                             fid=1.5 + 400 * n ** -0.34 + 900 * d ** -0.28))
    res = S.joint_fit(pd.DataFrame(rows), "fid", budgets=[1e15], n_boot=20, progress=False)
    tab = res.table.set_index("parameter")
    assert tab.loc["k", "value"] == pytest.approx(6.0, rel=1e-12)
    assert rel(tab.loc["alpha", "value"], 0.34) < 1e-6
    n_opt, _ = S.compute_optimal(res.fit, 1e15, 6.0)
    assert rel(tab.loc["N_opt@1e+15", "value"], float(n_opt)) < 1e-12


# --------------------------------------------------------------------------- errors


def test_clear_errors():
    t = pd.DataFrame({"train_flops": [1.0, 2, 3, 4, 5], "fid": [5.0, 4, 3, 2.5, 2.2]})
    with pytest.raises(ValueError, match="'nll'"):
        S.scaling_fit(t, "compute", "nll", n_boot=0)
    with pytest.raises(ValueError, match="images_seen"):
        S.scaling_fit(t, "images", "fid", n_boot=0)
    with pytest.raises(ValueError, match="'fid' must be positive"):
        S.scaling_fit(t.assign(fid=[5.0, 4, 0, 2.5, 2.2]), "compute", "fid", n_boot=0)
    with pytest.raises(ValueError, match="too few points"):
        S.scaling_fit(t.head(3), "compute", "fid", points="all", n_boot=0)
    with pytest.raises(ValueError, match="fixed_E"):
        S.fit_power_law(t["train_flops"], t["fid"], "fixed-E")
    with pytest.raises(ValueError, match="several"):
        S.fit_joint([1.0, 1, 1, 1, 1, 1], [1.0, 2, 3, 4, 5, 6], [3.0, 2, 1.5, 1.2, 1.1, 1.05])


# --------------------------------------------------------------------------- CLI and plot


def _sweep(path):
    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate([1e5, 3e5, 1e6, 3e6]):
        for s in range(1, 7):
            d = 5e3 * 2 ** s
            fid = (2 + 300 * n ** -0.3 + 900 * d ** -0.35) * np.exp(0.02 * rng.standard_normal())
            rows.append(dict(run=f"r{i}", params=n, train_flops=6 * n * d, images_seen=d, step=100 * s, fid=fid,
                             fid_ci_low=fid, fid_ci_high=fid, nll=3 + n ** -0.1, nll_stderr=0.01, extra="x"))
    pd.DataFrame(rows).to_csv(path, index=False)


def test_cli_writes_csv_png_and_json(tmp_path):
    table = tmp_path / "sweep.csv"
    _sweep(table)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["scaling", str(table), "--x", "compute", "--y", "fid", "--bootstrap", "40",
                                  "--out", str(out), "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    for k in ("alpha", "alpha_ci", "E", "A"):
        assert k in doc
    assert doc["alpha_ci"][0] <= doc["alpha"] <= doc["alpha_ci"][1]
    csv = pd.read_csv(out / "fit_fid_vs_compute.csv")
    assert csv.columns.tolist() == ["parameter", "value", "ci_low", "ci_high"]
    assert csv["parameter"].tolist() == ["E", "A", "alpha"]
    assert csv.set_index("parameter").loc["alpha", "value"] == pytest.approx(doc["alpha"], rel=1e-9)
    assert (out / "fit_fid_vs_compute.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = CliRunner().invoke(main, ["scaling", str(table), "--y", "nll", "--x", "params", "--fixed-E", "2.9",
                                  "--points", "last", "--bootstrap", "0", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["form"] == "fixed-E" and doc["E"] == pytest.approx(2.9) and doc["alpha_ci"] == [None, None]

    r = CliRunner().invoke(main, ["scaling", str(table), "--joint", "--budget", "1e14", "--bootstrap", "10",
                                  "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "N_opt@1e+14" in pd.read_csv(out / "fit_fid_joint.csv")["parameter"].tolist()
    assert (out / "fit_fid_joint.png").stat().st_size > 0


def test_cli_errors(tmp_path):
    table = tmp_path / "sweep.csv"
    _sweep(table)
    run = lambda *a: CliRunner().invoke(main, ["scaling", str(table), "--out", str(tmp_path), *a])  # noqa: E731
    r = run("--y", "kid")
    assert r.exit_code == 2 and "'kid'" in r.output
    r = run("--fit", "fixed-E")
    assert r.exit_code == 2 and "--fixed-E" in r.output
    r = run("--fit", "power", "--fixed-E", "1")
    assert r.exit_code == 2
    bad = tmp_path / "bad.csv"
    pd.read_csv(table).assign(fid=0.0).to_csv(bad, index=False)
    r = CliRunner().invoke(main, ["scaling", str(bad), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "bad.csv" in r.output and "positive" in r.output


def test_x_column_named_like_an_alias_wins_over_the_alias(tmp_path):
    # A sweep table from another tool: columns params, compute, fid (no train_flops). Noise-free
    # fid = 2 + 50 compute^-0.3, so the fit must give alpha = 0.3 from the 'compute' column itself.
    compute = np.geomspace(1e9, 1e13, 8)
    table = pd.DataFrame({"params": np.geomspace(1e4, 1e6, 8), "compute": compute,
                          "fid": 2.0 + 50.0 * compute ** -0.3})
    path = tmp_path / "other_tool.csv"
    table.to_csv(path, index=False)
    r = CliRunner().invoke(main, ["scaling", str(path), "--x", "compute", "--y", "fid", "--bootstrap", "0",
                                  "--out", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    doc = json.loads(r.stdout)
    assert doc["x"] == "compute" and doc["alpha"] == pytest.approx(0.3, rel=1e-3)
    # with both columns present the given name still wins; the alias is used only without it
    both = table.assign(train_flops=compute ** 2)   # x^2 would halve the exponent to 0.15
    assert S.resolve_column(both, "compute", "x") == "compute"
    assert S.resolve_column(both.drop(columns="compute"), "compute", "x") == "train_flops"
    res = S.scaling_fit(both, "compute", "fid", n_boot=0, progress=False)
    assert res.x == "compute" and res.fit.params["alpha"] == pytest.approx(0.3, rel=1e-3)
