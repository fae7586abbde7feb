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


def test_confidence_intervals():
    # beyond tolerance (0) but the intervals overlap: explained by noise
    status, comp = compare(10.0, 11.0, {}, bci=(9.0, 10.6), cci=(10.5, 11.5))
    assert status == "ok" and "overlap" in comp.table["note"].iloc[0]
    assert compare(10.0, 11.0, {}, bci=(9.0, 10.4), cci=(10.5, 11.5))[0] == "REGRESSION"  # disjoint
    assert compare(10.0, 11.0, {"ci": False}, bci=(9.0, 10.6), cci=(10.5, 11.5))[0] == "REGRESSION"
    # only the baseline has an interval: the current point inside it is explained
    assert compare(10.0, 10.9, {}, bci=(9.0, 11.0))[0] == "ok"
    assert compare(10.0, 11.1, {}, bci=(9.0, 11.0))[0] == "REGRESSION"
    # direction still applies to unexplained changes
    assert compare(10.0, 11.0, {"higher_is_better": True}, bci=(9.5, 10.4), cci=(10.5, 11.5))[0] == "improved"


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
