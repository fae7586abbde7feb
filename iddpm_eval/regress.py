"""Regression gate: compare a current results table with a baseline, row by row.

Rows are matched by (experiment, metric); when a table holds several rows for one pair, the
last one (the latest append) is used and the output says so.

The rule, per matched pair, with baseline value b, current value c and d = c - b:

* allowed = max(abs, rel * |b|) from the metric's tolerance entry (missing keys count as 0);
* d is *beyond tolerance* when |d| > allowed (plus a few ulps of float noise);
* with ``ci = true`` (the default) a change beyond tolerance is excused when it is within the
  noise of the two measurements: a two-sided z-test of the difference at 95%,
  ``|d| <= Z * sqrt(se_b^2 + se_c^2)`` with ``Z = 1.959963984540054`` (plus float noise). Each
  standard error is taken from the row's interval, read as a 95% interval: ``se = h / Z`` where
  ``h`` is the half of the interval that faces the other value (baseline: ``ci_high - b`` when
  c > b, ``b - ci_low`` when c < b; current: ``c - ci_low`` when c > b, ``ci_high - c`` when
  c < b). For a symmetric interval (``value +- 1.96 se``, as ``nll`` writes) this is exactly the
  standard error; for a skewed bootstrap interval it is the spread on the side the change moved
  to, so a long tail away from the change excuses nothing. A row without an interval has se = 0.
  (The old rule, "the two intervals overlap", excused differences up to h_b + h_c, the sum
  instead of the root sum of squares: with equal errors a 0.6% test instead of 5%);
* a row whose interval does not contain its own value (a copied or stale interval) cannot be
  tested: it is refused with exit code 2, naming the row, whatever the tolerance entry says;
* direction: without ``higher_is_better`` a change beyond tolerance either way is a regression
  (two-sided, the default); with ``higher_is_better = true|false`` only the worse direction is,
  a change the other way is reported as ``improved``;
* a value that becomes NaN (or stops being NaN) is a regression; NaN in both is ``ok``.

Rows only in the current table are listed as ``added`` (not a failure); rows only in the
baseline are ``missing`` and fail the gate unless ``allow_missing``. Tables that cannot be
compared (unreadable, missing columns), a matched metric with no tolerance entry and no
``[default]`` entry (an *unknown metric*), and pairs measured in a different ``mode``, with
different weights (``weights_sha256``) or with a different feature network (``detector`` in the
row's extra, Inception implied for rows in an Inception mode) give exit code 2.

The tolerances come from a file read by :mod:`iddpm_eval.tolerances` (without one, its built-in
table :data:`~iddpm_eval.tolerances.BUILTIN_TOLERANCES`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from iddpm_core.io import atomic_path
from iddpm_eval.tables import _file_mode, read_results
from iddpm_eval.tolerances import RegressError, Tolerance, Tolerances, load_tolerances, parse_tolerances

# the gate's callers (CLI, tests) take the tolerance names from here too
__all__ = ["COMPARISON_COLUMNS", "EXIT_INCOMPARABLE", "EXIT_OK", "EXIT_REGRESSION", "Z95",
           "Comparison", "RegressError", "Tolerance", "Tolerances", "compare_files", "compare_tables",
           "detector_mismatch", "format_comparison", "interval_problem", "load_tolerances", "metrics_without_tolerance",
           "noise_threshold", "parse_tolerances", "update_baseline", "write_comparison"]

EXIT_OK, EXIT_REGRESSION, EXIT_INCOMPARABLE = 0, 1, 2
_ULPS = 8 * 2.220446049250313e-16  # float noise allowed on top of a tolerance
Z95 = 1.959963984540054  # two-sided 95% normal quantile: intervals are read, and d is tested, at 95%


def _interval(row: pd.Series) -> tuple[float, float] | None:
    lo, hi = row["ci_low"], row["ci_high"]
    if pd.isna(lo) or pd.isna(hi):
        return None
    return float(lo), float(hi)


def interval_problem(row: pd.Series) -> str | None:
    """Why a row's interval cannot be used (it does not contain the row's value), else None."""
    iv, v = _interval(row), float(row["value"])
    if iv is None or math.isnan(v):
        return None
    if not (iv[0] <= v <= iv[1]):
        return f"interval [{iv[0]:.6g}, {iv[1]:.6g}] does not contain its value {v:.6g}"
    return None


def _facing_se(row: pd.Series, toward_higher: bool) -> float:
    """Standard error from the half of the row's 95% interval that faces the other value (0 without one)."""
    iv = _interval(row)
    if iv is None:
        return 0.0
    v = float(row["value"])
    return ((iv[1] - v) if toward_higher else (v - iv[0])) / Z95


def noise_threshold(b: pd.Series, c: pd.Series) -> float:
    """Z95 * sqrt(se_b^2 + se_c^2), the standard errors taken from the intervals' facing halves."""
    up = float(c["value"]) > float(b["value"])
    return Z95 * math.hypot(_facing_se(b, up), _facing_se(c, not up))


def _text(v: Any) -> str | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or v == "" else str(v)


def _detector(row: pd.Series) -> str | None:
    """The feature network a row was measured with: ``detector`` in its extra JSON, else Inception
    for rows in an Inception mode (rows written before the field existed)."""
    from iddpm_eval.stats import implied_detector
    from iddpm_eval.tables import parse_extra

    try:
        extra = parse_extra(row.get("extra"))
    except ValueError:
        extra = {}
    return implied_detector(_text(extra.get("detector")), _text(row.get("mode")))


def detector_mismatch(b: pd.Series, c: pd.Series) -> str | None:
    """'detector X vs Y' when baseline and current rows name different feature networks."""
    db, dc = _detector(b), _detector(c)
    return f"detector {db!r} vs {dc!r}" if db and dc and db != dc else None


def _last_per_key(df: pd.DataFrame, name: str, notes: list[str]) -> pd.DataFrame:
    dup = df.duplicated(["experiment", "metric"], keep=False)
    if dup.any():
        counts = df[dup].groupby(["experiment", "metric"]).size()
        for (e, m), k in counts.items():
            notes.append(f"{name}: {k} rows for ({e}, {m}); using the last")
    return df.drop_duplicates(["experiment", "metric"], keep="last")


COMPARISON_COLUMNS = ["status", "experiment", "metric", "baseline", "current", "delta", "rel_delta", "allowed",
                      "note"]


@dataclasses.dataclass
class Comparison:
    """Outcome of :func:`compare_tables`: one row per (experiment, metric) in either table."""

    table: pd.DataFrame  # COMPARISON_COLUMNS
    errors: list[str]  # reasons the tables cannot be compared (exit 2)
    notes: list[str]  # duplicates and similar remarks
    allow_missing: bool = False

    @property
    def counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.table["status"].value_counts().items()}

    @property
    def exit_code(self) -> int:
        if self.errors:
            return EXIT_INCOMPARABLE
        status = set(self.table["status"])
        if "REGRESSION" in status or ("missing" in status and not self.allow_missing):
            return EXIT_REGRESSION
        return EXIT_OK


def _compare_pair(b: pd.Series, c: pd.Series, tol: Tolerance) -> tuple[str, float, float, float, str]:
    bv, cv = float(b["value"]), float(c["value"])
    allowed = tol.allowed(bv) if math.isfinite(bv) else math.nan
    if math.isnan(bv) or math.isnan(cv):
        if math.isnan(bv) and math.isnan(cv):
            return "ok", math.nan, math.nan, allowed, "both NaN"
        return "REGRESSION", math.nan, math.nan, allowed, "value is NaN in " + ("current" if math.isnan(cv) else "baseline")
    d = cv - bv
    if bv != 0:
        rel = d / abs(bv)
    else:
        rel = 0.0 if d == 0 else math.copysign(math.inf, d)
    noise = _ULPS * max(abs(bv), abs(cv)) if math.isfinite(d) else 0.0
    if d == 0 or abs(d) <= allowed + noise:
        return "ok", d, rel, allowed, ""
    if tol.ci:
        thr = noise_threshold(b, c)
        if thr > 0 and abs(d) <= thr * (1 + _ULPS):
            note = f"beyond tolerance but within noise (|d| <= {thr:.4g} = z*sqrt(se_b^2+se_c^2))"
            return "ok", d, rel, allowed, note
    if tol.higher_is_better is not None and (d > 0) == tol.higher_is_better:
        return "improved", d, rel, allowed, ""
    return "REGRESSION", d, rel, allowed, ""


def compare_tables(baseline: pd.DataFrame, current: pd.DataFrame, tolerances: Tolerances | None = None,
                   allow_missing: bool = False) -> Comparison:
    """Compare two tables read by :func:`iddpm_eval.tables.read_results` (rule in the module doc)."""
    tolerances = tolerances if tolerances is not None else load_tolerances(None)
    notes: list[str] = []
    errors: list[str] = []
    base = _last_per_key(baseline, "baseline", notes).set_index(["experiment", "metric"], drop=False)
    cur = _last_per_key(current, "current", notes).set_index(["experiment", "metric"], drop=False)
    keys = sorted(set(base.index) | set(cur.index))
    out = []
    unknown: set[str] = set()
    for key in keys:
        e, m = key
        in_b, in_c = key in base.index, key in cur.index
        bad = [(name, why) for name, t, present in (("baseline", base, in_b), ("current", cur, in_c))
               if present and (why := interval_problem(t.loc[key]))]
        if bad:  # an interval that excludes its own value was copied or is stale: nothing to test against
            what = "; ".join(f"{name} row: {why}" for name, why in bad)
            errors.append(f"({e}, {m}) cannot be compared: {what}")
            bv = float(base.loc[key, "value"]) if in_b else math.nan
            cv = float(cur.loc[key, "value"]) if in_c else math.nan
            out.append(("INCOMPARABLE", e, m, bv, cv, math.nan, math.nan, math.nan, what))
            continue
        if not in_c:
            bv = float(base.loc[key, "value"])
            out.append(("missing", e, m, bv, math.nan, math.nan, math.nan, math.nan, "only in baseline"))
            continue
        if not in_b:
            cv = float(cur.loc[key, "value"])
            out.append(("added", e, m, math.nan, cv, math.nan, math.nan, math.nan, "only in current"))
            continue
        b, c = base.loc[key], cur.loc[key]
        mismatch = [col for col in ("mode", "weights_sha256")
                    if _text(b[col]) is not None and _text(c[col]) is not None and _text(b[col]) != _text(c[col])]
        det = detector_mismatch(b, c)
        if mismatch or det:
            what = ", ".join([f"{col} {_text(b[col])!r} vs {_text(c[col])!r}" for col in mismatch] + ([det] if det else []))
            errors.append(f"({e}, {m}) cannot be compared: {what}")
            out.append(("INCOMPARABLE", e, m, float(b["value"]), float(c["value"]), math.nan, math.nan, math.nan, what))
            continue
        tol = tolerances.get(m)
        if tol is None:
            unknown.add(m)
            out.append(("UNKNOWN", e, m, float(b["value"]), float(c["value"]), math.nan, math.nan, math.nan,
                        "no tolerance for this metric"))
            continue
        status, d, rel, allowed, note = _compare_pair(b, c, tol)
        nb, nc = b["n"], c["n"]
        if not pd.isna(nb) and not pd.isna(nc) and int(nb) != int(nc):
            note = "; ".join(x for x in (note, f"n differs: {int(nb)} vs {int(nc)}") if x)
        out.append((status, e, m, float(b["value"]), float(c["value"]), d, rel, allowed, note))
    if unknown:
        errors.append(f"unknown metric(s) {sorted(unknown)}: no entry in tolerances ({tolerances.source}) and no "
                      f"[default]; add [metrics.NAME] entries or a [default] section")
    table = pd.DataFrame(out, columns=COMPARISON_COLUMNS)
    return Comparison(table, errors, notes, allow_missing)


def compare_files(baseline: str | os.PathLike, current: str | os.PathLike,
                  tolerances: str | os.PathLike | None = None, allow_missing: bool = False) -> Comparison:
    """Read both tables and the tolerance file, then :func:`compare_tables`.

    An unreadable or malformed table or tolerance file raises :class:`RegressError`.
    """
    tol = load_tolerances(tolerances)
    frames = []
    for name, path in (("baseline", baseline), ("current", current)):
        try:
            frames.append(read_results(path))
        except (OSError, ValueError) as err:
            raise RegressError(f"{name} table cannot be read: {err}") from None
    return compare_tables(frames[0], frames[1], tol, allow_missing)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return "" if v is None else str(v)


def format_comparison(comp: Comparison) -> str:
    """A plain-text table of every compared row, then notes, errors and a one-line summary."""
    t = comp.table.copy()
    for col in ("delta", "rel_delta"):
        t[col] = [("" if math.isnan(v) else f"{v:+.4g}") for v in t[col]]
    cells = [COMPARISON_COLUMNS] + [[_fmt(v) for v in row] for row in t.itertuples(index=False)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COMPARISON_COLUMNS))]
    lines = ["  ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for n in comp.notes:
        lines.append(f"note: {n}")
    for e in comp.errors:
        lines.append(f"error: {e}")
    counts = comp.counts
    summary = ", ".join(f"{counts[k]} {k}" for k in sorted(counts)) or "no rows"
    code = comp.exit_code
    if code == EXIT_REGRESSION:
        why = [w for w, k in (("regression", "REGRESSION"), ("missing rows", "missing")) if counts.get(k)
               and not (k == "missing" and comp.allow_missing)]
        verdict = f"FAIL ({', '.join(why)})"
    else:
        verdict = "PASS" if code == EXIT_OK else "ERROR (tables cannot be compared)"
    lines.append(f"{verdict}: {summary}")
    return "\n".join(lines)


def write_comparison(comp: Comparison, path: str | os.PathLike) -> None:
    """The comparison table as CSV (atomic write)."""
    with atomic_path(path) as tmp:
        comp.table.to_csv(tmp, index=False, lineterminator="\n")


def update_baseline(current: str | os.PathLike, baseline: str | os.PathLike) -> None:
    """Copy the current table over the baseline (atomically), after checking that it reads cleanly."""
    try:
        read_results(current)
    except (OSError, ValueError) as err:
        raise RegressError(f"current table cannot be read: {err}") from None
    mode = _file_mode(Path(baseline))
    with atomic_path(baseline) as tmp:
        shutil.copyfile(current, tmp)
        os.chmod(tmp, mode)


def metrics_without_tolerance(table: str | os.PathLike, tolerances: str | os.PathLike | None = None) -> list[str]:
    """Metric names in a results table that the tolerance file (or the built-in table) does not cover."""
    tol = load_tolerances(tolerances)
    return sorted({m for m in read_results(table)["metric"] if tol.get(m) is None})
