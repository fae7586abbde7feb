"""Regression gate: planted regressions, identical tables, added/missing rows, malformed input, rules."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from iddpm_eval import regress as rg
from iddpm_eval.cli import main
from iddpm_eval.tables import append_results, read_results

PROV = {"package_version": "0", "git_commit": "c", "time": "2026-01-01T00:00:00Z", "machine": "m"}
ROOT = Path(__file__).resolve().parent.parent


def table(path: Path, rows: list[tuple]) -> Path:
    """rows: (experiment, metric, value[, {more columns}])."""
    full = []
    for r in rows:
        d = {"experiment": r[0], "metric": r[1], "value": r[2], **PROV}
        if len(r) > 3:
            d.update(r[3])
        full.append(d)
    if path.exists():
        path.unlink()
    append_results(path, full)
    return path


BASE = [("cifar", "fid", 10.0, {"mode": "legacy-tf", "weights_sha256": "w1"}), ("cifar", "precision", 0.6),
        ("mnist", "bpd", 1.5)]


def tol_file(tmp_path: Path, text: str, name="tol.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def run(*args):
    res = CliRunner().invoke(main, ["regress", *map(str, args)])
    return res.exit_code, res.output


def status_of(output: str, experiment: str, metric: str) -> str:
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == experiment and parts[2] == metric:
            return parts[0]
    raise AssertionError(f"row ({experiment}, {metric}) not printed:\n{output}")


def test_identical_tables_pass(tmp_path):
    a = table(tmp_path / "a.csv", BASE)
    b = table(tmp_path / "b.csv", BASE)
    code, out = run("--baseline", a, "--current", b)
    assert code == 0, out
    for e, m, *_ in BASE:
        assert status_of(out, e, m) == "ok"
    assert "PASS: 3 ok" in out


def test_planted_regression_flagged(tmp_path):
    a = table(tmp_path / "a.csv", BASE)
    cur = list(BASE)
    cur[0] = ("cifar", "fid", 11.0, {"mode": "legacy-tf", "weights_sha256": "w1"})  # +10 % FID
    b = table(tmp_path / "b.csv", cur)
    code, out = run("--baseline", a, "--current", b)
    assert code == 1, out
    assert status_of(out, "cifar", "fid") == "REGRESSION"
    assert status_of(out, "cifar", "precision") == "ok" and status_of(out, "mnist", "bpd") == "ok"
    assert "FAIL (regression)" in out


def test_added_and_missing_rows_listed(tmp_path):
    a = table(tmp_path / "a.csv", BASE)
    b = table(tmp_path / "b.csv", BASE[:2] + [("mnist", "recall", 0.4)])
    code, out = run("--baseline", a, "--current", b)
    assert code == 1 and "FAIL (missing rows)" in out, out  # a baseline row vanished
    assert status_of(out, "mnist", "bpd") == "missing" and status_of(out, "mnist", "recall") == "added"
    code, out = run("--baseline", a, "--current", b, "--allow-missing")
    assert code == 0 and status_of(out, "mnist", "bpd") == "missing"
    b2 = table(tmp_path / "b2.csv", BASE + [("new", "kid", 0.01)])
    code, out = run("--baseline", a, "--current", b2)
    assert code == 0 and status_of(out, "new", "kid") == "added"


def test_malformed_table_exits_2_with_message(tmp_path):
    a = table(tmp_path / "a.csv", BASE)
    bad = tmp_path / "bad.csv"
    bad.write_text("experiment,metric,value\ncifar,fid,10.0\n")
    code, out = run("--baseline", a, "--current", bad)
    assert code == 2
    assert "current table cannot be read" in out and "bad.csv" in out and "missing column(s) ['ci_low'" in out
    code, out = run("--baseline", tmp_path / "nope.csv", "--current", a)
    assert code == 2 and "nope.csv" in out


def test_unknown_metric_exits_2_unless_default(tmp_path):
    a = table(tmp_path / "a.csv", BASE + [("x", "mystery", 1.0)])
    b = table(tmp_path / "b.csv", BASE + [("x", "mystery", 1.0)])
    code, out = run("--baseline", a, "--current", b)
    assert code == 2 and "unknown metric(s) ['mystery']" in out and status_of(out, "x", "mystery") == "UNKNOWN"
    tol = tol_file(tmp_path, "[default]\nrel = 0.1\n[metrics.fid]\nabs = 0.5\n")
    code, out = run("--baseline", a, "--current", b, "--tolerances", tol)
    assert code == 0, out


def test_mode_or_weights_mismatch_is_incomparable(tmp_path):
    a = table(tmp_path / "a.csv", BASE)
    b = table(tmp_path / "b.csv", [("cifar", "fid", 10.0, {"mode": "clean", "weights_sha256": "w1"})] + BASE[1:])
    code, out = run("--baseline", a, "--current", b)
    assert code == 2 and "mode 'legacy-tf' vs 'clean'" in out
    c = table(tmp_path / "c.csv", [("cifar", "fid", 10.0, {"mode": "legacy-tf", "weights_sha256": "w2"})] + BASE[1:])
    code, out = run("--baseline", a, "--current", c)
    assert code == 2 and "weights_sha256 'w1' vs 'w2'" in out
    d = table(tmp_path / "d.csv", [("cifar", "fid", 10.0)] + BASE[1:])  # unrecorded mode: compared
    assert run("--baseline", a, "--current", d)[0] == 0


# ---------------------------------------------------------------- the rule, through the library

def compare(bv, cv, tol: dict, bci=None, cci=None):
    def frame(v, ci):
        d = {"experiment": "e", "metric": "m", "value": v, **PROV}
        if ci:
            d.update(ci_low=ci[0], ci_high=ci[1])
        return d

    import tempfile

    with tempfile.TemporaryDirectory() as td:
        pa, pb = Path(td) / "a.csv", Path(td) / "b.csv"
        append_results(pa, [frame(bv, bci)])
        append_results(pb, [frame(cv, cci)])
        comp = rg.compare_tables(read_results(pa), read_results(pb), rg.parse_tolerances({"metrics": {"m": tol}}, "t"))
    return comp.table["status"].iloc[0], comp


@pytest.mark.parametrize("cv, tol, expect", [
    (100.0, {}, "ok"),                             # identical with zero tolerance
    (100.0 + 1e-12, {}, "REGRESSION"),             # zero tolerance: any real change
    (101.9, {"rel": 0.02}, "ok"),                  # allowed = 0.02 * 100 = 2
    (102.1, {"rel": 0.02}, "REGRESSION"),
    (97.9, {"rel": 0.02}, "REGRESSION"),           # two-sided by default
    (102.1, {"rel": 0.02, "abs": 3.0}, "ok"),      # allowed = max(abs, rel*|b|) = 3
    (103.0, {"abs": 3.0}, "ok"),                   # boundary is inclusive
    (103.001, {"abs": 3.0}, "REGRESSION"),
    (97.0, {"abs": 1.0, "higher_is_better": True}, "REGRESSION"),
    (103.0, {"abs": 1.0, "higher_is_better": True}, "improved"),
    (97.0, {"abs": 1.0, "higher_is_better": False}, "improved"),
    (103.0, {"abs": 1.0, "higher_is_better": False}, "REGRESSION"),
    (math.nan, {"abs": 1.0}, "REGRESSION"),
])
def test_tolerance_rule(cv, tol, expect):
    assert compare(100.0, cv, tol)[0] == expect


def test_zero_baseline_relative():
    assert compare(0.0, 0.0, {"rel": 0.1})[0] == "ok"
    status, comp = compare(0.0, 1e-9, {"rel": 0.1})
    assert status == "REGRESSION" and comp.table["rel_delta"].iloc[0] == math.inf


def test_confidence_intervals_z_test_of_the_difference():
    # The rule: |d| <= Z * sqrt(se_b^2 + se_c^2), se = (facing half of a 95% interval) / Z, so for
    # half-widths h_b, h_c the boundary is sqrt(h_b^2 + h_c^2): 3-4-5 gives exactly 5.
    b = (10.0, (7.0, 13.0))                                  # h_b = 3
    def at(cv):
        return compare(b[0], cv, {}, bci=b[1], cci=(cv - 4.0, cv + 4.0))[0]   # h_c = 4
    assert at(15.0 * (1 - 1e-9)) == "ok" and at(15.0) == "ok"
    assert at(15.0 * (1 + 1e-9)) == "REGRESSION"
    assert at(10.0 - 5.0) == "ok" and at(5.0 * (1 - 1e-9)) == "REGRESSION"   # two-sided
    # overlap would have excused up to h_b + h_c = 7: a change of 6 is beyond the noise
    assert at(16.0) == "REGRESSION"
    status, comp = compare(10.0, 14.0, {}, bci=(7.0, 13.0), cci=(10.0, 18.0))
    assert status == "ok" and "within noise" in comp.table["note"].iloc[0]
    assert compare(10.0, 14.0, {"ci": False}, bci=(7.0, 13.0), cci=(10.0, 18.0))[0] == "REGRESSION"
    # only the baseline has an interval: se_c = 0, the boundary is h_b
    assert compare(10.0, 10.9, {}, bci=(9.0, 11.0))[0] == "ok"
    assert compare(10.0, 11.1, {}, bci=(9.0, 11.0))[0] == "REGRESSION"
    # direction still applies to unexplained changes
    assert compare(10.0, 11.0, {"higher_is_better": True}, bci=(9.5, 10.4), cci=(10.5, 11.5))[0] == "improved"


def test_skewed_interval_uses_the_half_facing_the_change():
    # A bootstrap interval with a long upper tail (baseline 10 in [9.9, 16]) explains an increase
    # up to 6 but a decrease only up to 0.1: the half facing the change sets the standard error.
    assert compare(10.0, 15.9, {}, bci=(9.9, 16.0))[0] == "ok"
    assert compare(10.0, 9.85, {}, bci=(9.9, 16.0))[0] == "REGRESSION"
    assert compare(10.0, 9.95, {}, bci=(9.9, 16.0))[0] == "ok"
    # the current row's facing half: c = 12 in [11.9, 20] moved up, so its lower half (0.1) counts
    assert compare(10.0, 12.0, {}, bci=(9.9, 10.1), cci=(11.9, 20.0))[0] == "REGRESSION"


def test_interval_not_containing_its_value_is_refused(tmp_path):
    _, comp = compare(10.0, 30.0, {"abs": 100.0}, bci=(9.0, 11.0), cci=(9.0, 11.0))
    assert comp.exit_code == 2 and comp.table["status"].iloc[0] == "INCOMPARABLE"
    assert "current row" in comp.errors[0] and "(e, m)" in comp.errors[0]


def _ci_fid_row(path: Path, value: float, ci: tuple[float, float]) -> Path:
    base = read_results(ROOT / "results" / "ci" / "baseline.csv")
    fid = base[base["metric"] == "fid"].iloc[0]
    d = {c: fid[c] for c in ("experiment", "metric", "n", "mode", "weights_sha256", "seed", *PROV)}
    d.update(value=value, ci_low=ci[0], ci_high=ci[1])
    append_results(path, [{k: (None if pd.isna(v) else v) for k, v in d.items()}])
    return path


def test_threefold_fid_regression_with_copied_interval_fails_the_gate(tmp_path):
    # The case: FID 51.2 -> 163.6 with the baseline's interval copied into the current row.
    base = ROOT / "results" / "ci" / "baseline.csv"
    b = read_results(base)
    fid = b[b["metric"] == "fid"].iloc[0]
    cur = _ci_fid_row(tmp_path / "t.csv", 163.6, (float(fid["ci_low"]), float(fid["ci_high"])))
    code, out = run("--baseline", base, "--current", cur, "--allow-missing")
    assert code == 2, out
    assert "(ci-digits, fid)" in out and "does not contain its value 163.6" in out and "Traceback" not in out
    # with an honest interval of its own (same relative width) it is a regression, not noise
    h = (float(fid["ci_high"]) - float(fid["ci_low"])) / 2 * 163.6 / float(fid["value"])
    cur = _ci_fid_row(tmp_path / "u.csv", 163.6, (163.6 - h, 163.6 + h))
    code, out = run("--baseline", base, "--current", cur, "--allow-missing")
    assert code == 1 and status_of(out, "ci-digits", "fid") == "REGRESSION", out


def test_within_noise_change_passes_the_builtin_gate(tmp_path):
    # 51.20 -> 53.0 is beyond the built-in tolerance (max(0.5, 0.02 * 51.2) = 1.02) but well
    # inside sqrt(h_b^2 + h_c^2) ~ 5.4 for two intervals of the baseline's width.
    base = ROOT / "results" / "ci" / "baseline.csv"
    b = read_results(base)
    fid = b[b["metric"] == "fid"].iloc[0]
    lo, hi, v = float(fid["ci_low"]), float(fid["ci_high"]), float(fid["value"])
    cur = _ci_fid_row(tmp_path / "t.csv", 53.0, (53.0 - (v - lo), 53.0 + (hi - v)))
    code, out = run("--baseline", base, "--current", cur, "--allow-missing")
    assert code == 0 and status_of(out, "ci-digits", "fid") == "ok" and "within noise" in out, out


def test_committed_baseline_intervals_contain_their_values():
    df = read_results(ROOT / "results" / "ci" / "baseline.csv")
    assert [rg.interval_problem(r) for _, r in df.iterrows()] == [None] * len(df)


def test_duplicates_use_last_row_and_say_so(tmp_path):
    a = table(tmp_path / "a.csv", BASE)
    b = table(tmp_path / "b.csv", BASE + [("mnist", "bpd", 9.0), ("mnist", "bpd", 1.5)])
    code, out = run("--baseline", a, "--current", b)
    assert code == 0, out
    assert "note: current: 3 rows for (mnist, bpd); using the last" in out


# ---------------------------------------------------------------- tolerance files

def test_tolerance_files_toml_and_json_agree(tmp_path):
    data = {"default": {"rel": 0.1}, "metrics": {"fid": {"abs": 0.5, "rel": 0.02, "higher_is_better": False,
                                                         "ci": False}}}
    t = rg.load_tolerances(tol_file(tmp_path, "[default]\nrel = 0.1\n[metrics.fid]\nabs = 0.5\nrel = 0.02\n"
                                              "higher_is_better = false\nci = false\n"))
    j = rg.load_tolerances(tol_file(tmp_path, json.dumps(data), "tol.json"))
    assert t.metrics == j.metrics and t.default == j.default
    assert t.get("fid") == rg.Tolerance(0.5, 0.02, False, False) and t.get("other") == rg.Tolerance(rel=0.1)


@pytest.mark.parametrize("text, match", [
    ("[metrics.fid]\nabs = -1\n", "'abs' must be a finite number >= 0"),
    ("[metrics.fid]\nabsolute = 1\n", r"unknown key\(s\) \['absolute'\]"),
    ("[metrics.fid]\nhigher_is_better = 'yes'\n", "must be true or false"),
    ("[metric.fid]\nabs = 1\n", r"unknown section\(s\) \['metric'\]"),
    ("[metrics.fid\n", "cannot be parsed"),
])
def test_bad_tolerance_file_exits_2(tmp_path, text, match):
    a = table(tmp_path / "a.csv", BASE)
    code, out = run("--baseline", a, "--current", a, "--tolerances", tol_file(tmp_path, text))
    assert code == 2
    assert pd.Series([out]).str.contains(match).iloc[0], out


def test_shipped_ci_tolerances_parse_and_cover_builtin_metrics():
    ci = rg.load_tolerances(ROOT / "results" / "ci" / "tolerances.toml")
    builtin = rg.load_tolerances(None)
    assert set(builtin.metrics) <= set(ci.metrics) and ci.default is None and builtin.default is None
    assert all(t.higher_is_better is None and not t.ci for t in ci.metrics.values())  # documented: two-sided, no CI
    raw = tomllib.loads((ROOT / "results" / "ci" / "tolerances.toml").read_text())
    assert set(raw["metrics"]) == set(ci.metrics)


# ---------------------------------------------------------------- baseline update and output file

def test_update_baseline_and_output_csv(tmp_path):
    a = table(tmp_path / "a.csv", BASE)
    cur = [("cifar", "fid", 12.0, {"mode": "legacy-tf", "weights_sha256": "w1"})] + BASE[1:]
    b = table(tmp_path / "b.csv", cur)
    out_csv = tmp_path / "cmp.csv"
    code, out = run("--baseline", a, "--current", b, "-o", out_csv)
    assert code == 1
    cmp = pd.read_csv(out_csv)
    assert len(cmp) == 3 and cmp.loc[cmp["metric"] == "fid", "status"].item() == "REGRESSION"
    assert cmp.loc[cmp["metric"] == "fid", "delta"].item() == 2.0
    code, out = run("--baseline", a, "--current", b, "--update-baseline")
    assert code == 0 and "baseline updated" in out
    assert a.read_bytes() == b.read_bytes()
    assert run("--baseline", a, "--current", b)[0] == 0
    fresh = tmp_path / "ci" / "baseline.csv"  # first baseline: nothing to compare against yet
    code, out = run("--baseline", fresh, "--current", b, "--update-baseline")
    assert code == 0 and fresh.read_bytes() == b.read_bytes()


def test_update_baseline_refuses_malformed_current(tmp_path):
    a = table(tmp_path / "a.csv", BASE)
    before = a.read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_text("experiment,metric\nx,y\n")
    code, out = run("--baseline", a, "--current", bad, "--update-baseline")
    assert code == 2 and "bad.csv" in out and a.read_bytes() == before


def test_update_baseline_warns_about_uncovered_metrics(tmp_path):
    b = table(tmp_path / "b.csv", BASE + [("x", "mystery", 1.0)])
    res = CliRunner().invoke(main, ["regress", "--baseline", str(tmp_path / "base.csv"), "--current", str(b),
                                    "--update-baseline"])
    assert res.exit_code == 0 and "no tolerance for metric(s) ['mystery']" in res.output


def test_different_n_is_noted(tmp_path):
    a = table(tmp_path / "a.csv", [("e", "fid", 10.0, {"n": 1000})])
    b = table(tmp_path / "b.csv", [("e", "fid", 10.0, {"n": 5000})])
    code, out = run("--baseline", a, "--current", b)
    assert code == 0 and "n differs: 1000 vs 5000" in out


def test_file_level_api_compares_reports_writes_and_updates(tmp_path):
    a = table(tmp_path / "a.csv", BASE)
    b = table(tmp_path / "b.csv", BASE[:2] + [("mnist", "bpd", 1.8), ("mnist", "odd", 1.0)])
    tol = tol_file(tmp_path, "[metrics.fid]\nabs = 0.5\n[metrics.precision]\nabs = 0.02\n"
                             "[metrics.bpd]\nabs = 0.01\n")
    assert rg.metrics_without_tolerance(b, tol) == ["odd"]
    comp = rg.compare_files(a, b, tol)
    assert comp.exit_code == rg.EXIT_REGRESSION
    text = rg.format_comparison(comp)
    assert text.splitlines()[-1] == "FAIL (regression): 1 REGRESSION, 1 added, 2 ok"
    rg.write_comparison(comp, tmp_path / "cmp.csv")
    written = pd.read_csv(tmp_path / "cmp.csv")
    assert list(written.columns) == rg.COMPARISON_COLUMNS and len(written) == 4
    rg.update_baseline(b, a)
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(rg.RegressError, match="current table cannot be read"):
        rg.update_baseline(tmp_path / "nothing.csv", a)


def test_noise_threshold_is_the_root_sum_of_squares_of_the_facing_halves():
    def row(v, lo, hi, extra=None):
        return pd.Series({"value": v, "ci_low": lo, "ci_high": hi, "mode": "legacy-tf", "extra": extra})

    b, c = row(10.0, 9.0, 10.0 + 3 * rg.Z95), row(12.0, 12.0 - 4 * rg.Z95, 20.0)
    assert rg.noise_threshold(b, c) == pytest.approx(rg.Z95 * 5.0)  # se_b = 3, se_c = 4 (the facing halves)
    assert rg.noise_threshold(row(1.0, math.nan, math.nan), row(2.0, math.nan, math.nan)) == 0.0
    dino = json.dumps({"detector": "dinov2-vitb14"})
    assert rg.detector_mismatch(b, row(12.0, 11.0, 13.0, dino)) == "detector 'inception-2015-12-05' vs 'dinov2-vitb14'"
    assert rg.detector_mismatch(b, c) is None
