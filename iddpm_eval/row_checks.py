"""One row of a results table: its columns, and the checks every row passes before it is written
(types, one-line text, a JSON object for ``extra``, an interval that holds together). Tables
themselves (appending, reading, the Parquet copy) are :mod:`iddpm_eval.tables`."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from iddpm_core.provenance import provenance

COLUMNS = [
    "experiment", "metric", "value", "ci_low", "ci_high", "n",
    "config_hash", "checkpoint_hash", "weights_sha256", "mode", "seed",
    "package_version", "git_commit", "time", "machine", "extra",
]
REQUIRED = ("experiment", "metric", "value")
FLOAT_COLUMNS = ("value", "ci_low", "ci_high")
INT_COLUMNS = ("n", "seed")
TEXT_COLUMNS = tuple(c for c in COLUMNS if c not in FLOAT_COLUMNS + INT_COLUMNS)
PROVENANCE_COLUMNS = ("package_version", "git_commit", "time", "machine")
IDENTITY_COLUMNS = ("experiment", "metric", "mode", "seed", "n", "config_hash", "checkpoint_hash", "weights_sha256")


def is_missing(v: Any) -> bool:
    """An empty cell: None, pandas' NA, a float NaN or the empty string."""
    if v is None or v is pd.NA:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and v == ""


def _as_float(name: str, v: Any, row: dict) -> float | None:
    if name == "value" and isinstance(v, float) and math.isnan(v):
        return v  # a measurement that came out NaN is worth recording (regress flags it)
    if is_missing(v):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"results row {_label(row)}: column {name!r} must be a number, got {v!r}") from None


def _as_int(name: str, v: Any, row: dict) -> int | None:
    if is_missing(v):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = math.nan
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"results row {_label(row)}: column {name!r} must be an integer, got {v!r}")
    return int(f)


def _as_text(name: str, v: Any, row: dict) -> str | None:
    if is_missing(v):
        return None
    s = str(v)
    if "\n" in s or "\r" in s:
        raise ValueError(f"results row {_label(row)}: column {name!r} must be one line, got {v!r}")
    return s


def _label(row: dict) -> str:
    return f"(experiment={row.get('experiment')!r}, metric={row.get('metric')!r})"


def _extra_text(extra: Any, row: dict) -> str | None:
    if is_missing(extra):
        return None
    if isinstance(extra, str):
        try:
            parsed = json.loads(extra)
        except json.JSONDecodeError:
            raise ValueError(f"results row {_label(row)}: column 'extra' must be a dict or JSON object text") from None
        extra = parsed
    if not isinstance(extra, dict):
        raise ValueError(f"results row {_label(row)}: column 'extra' must be a dict, got {type(extra).__name__}")
    try:
        return json.dumps(extra, sort_keys=True, ensure_ascii=False, default=str)
    except ValueError as err:
        raise ValueError(f"results row {_label(row)}: 'extra' is not JSON-serialisable: {err}") from None


def normalize_row(row: dict, prov: dict | None = None) -> dict:
    """Check one row and return it with every column of :data:`COLUMNS` (``None`` when absent).

    Missing provenance columns are filled from ``prov`` (default: :func:`provenance`). Unknown
    keys, a missing experiment/metric/value, non-numeric values and ``ci_low > ci_high`` raise
    ``ValueError``.
    """
    if not isinstance(row, dict):
        raise ValueError(f"results row must be a dict, got {type(row).__name__}")
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise ValueError(f"results row {_label(row)}: unknown column(s) {unknown}; allowed: {COLUMNS}")
    out: dict[str, Any] = {}
    for c in COLUMNS:
        v = row.get(c)
        if c in FLOAT_COLUMNS:
            out[c] = _as_float(c, v, row)
        elif c in INT_COLUMNS:
            out[c] = _as_int(c, v, row)
        elif c == "extra":
            out[c] = _extra_text(v, row)
        else:
            out[c] = _as_text(c, v, row)
    for c in REQUIRED:
        if out[c] is None:
            raise ValueError(f"results row {_label(row)}: column {c!r} is required")
    lo, hi = out["ci_low"], out["ci_high"]
    if (lo is None) != (hi is None):
        raise ValueError(f"results row {_label(row)}: give both ci_low and ci_high or neither")
    if lo is not None and lo > hi:
        raise ValueError(f"results row {_label(row)}: ci_low {lo} > ci_high {hi}")
    if any(out[c] is None for c in PROVENANCE_COLUMNS):
        prov = prov if prov is not None else provenance()
        for c in PROVENANCE_COLUMNS:
            if out[c] is None:
                out[c] = prov.get(c)
    return out


def check_experiment(experiment: str) -> str:
    """An experiment name must be one line of text (it is a CSV cell and a report heading)."""
    return _as_text("experiment", experiment, {"experiment": experiment, "metric": None}) or ""


def parse_extra(text: Any) -> dict:
    """The ``extra`` column of one row as a dict (empty when absent or not a JSON object)."""
    if is_missing(text):
        return {}
    if isinstance(text, dict):
        return text
    try:
        v = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return {}
    return v if isinstance(v, dict) else {}
