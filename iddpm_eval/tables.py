"""Results tables: one row per measurement, with the provenance needed to trust and compare it.

A table is a CSV file (the source of truth). When ``pyarrow`` is importable a Parquet copy is
written beside it (same name, ``.parquet``) after every append. Appends are atomic (write to a
temporary file, then rename) and serialised between processes with an advisory lock on the
table's folder, so concurrent appends keep every row.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

from iddpm_core.io import atomic_path
from iddpm_eval.provenance import provenance

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


def _is_missing(v: Any) -> bool:
    if v is None or v is pd.NA:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and v == ""


def _as_float(name: str, v: Any, row: dict) -> float | None:
    if name == "value" and isinstance(v, float) and math.isnan(v):
        return v  # a measurement that came out NaN is worth recording (regress flags it)
    if _is_missing(v):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"results row {_label(row)}: column {name!r} must be a number, got {v!r}") from None


def _as_int(name: str, v: Any, row: dict) -> int | None:
    if _is_missing(v):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = math.nan
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"results row {_label(row)}: column {name!r} must be an integer, got {v!r}")
    return int(f)


def _as_text(name: str, v: Any, row: dict) -> str | None:
    if _is_missing(v):
        return None
    s = str(v)
    if "\n" in s or "\r" in s:
        raise ValueError(f"results row {_label(row)}: column {name!r} must be one line, got {v!r}")
    return s


def _label(row: dict) -> str:
    return f"(experiment={row.get('experiment')!r}, metric={row.get('metric')!r})"


def _extra_text(extra: Any, row: dict) -> str | None:
    if _is_missing(extra):
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


def command_line() -> str:
    """The running command, shell-quoted (``sys.argv``)."""
    return shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]) if sys.argv and sys.argv[0] else ""


def append_result(path: str | os.PathLike, *, experiment: str, metric: str, value: float,
                  ci_low: float | None = None, ci_high: float | None = None, n: int | None = None,
                  mode: str | None = None, seed: int | None = None, weights_sha256: str | None = None,
                  config_hash: str | None = None, checkpoint_hash: str | None = None,
                  extra: dict | None = None) -> dict:
    """Append one measurement to the table at ``path`` and return the row as written.

    Provenance (package version, git commit, UTC time, machine) is filled in here; ``extra``
    gets the command line under ``"command"`` unless it already has that key.
    """
    extra = dict(extra) if extra else {}
    extra.setdefault("command", command_line())
    row = dict(experiment=experiment, metric=metric, value=value, ci_low=ci_low, ci_high=ci_high, n=n,
               mode=mode, seed=seed, weights_sha256=weights_sha256, config_hash=config_hash,
               checkpoint_hash=checkpoint_hash, extra=extra)
    out = normalize_row(row)
    append_results(path, [out])
    return out


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``folder`` (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        raise ValueError(f"results table {path}: give the .csv path; the Parquet copy is written beside it")
    if path.exists() and not path.is_file():
        raise ValueError(f"results table {path}: exists and is not a file")
    return path


def _frame(rows: Iterable[dict]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows), columns=COLUMNS)
    return _typed(df)


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    for c in FLOAT_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="raise").astype("float64")
    for c in INT_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="raise").astype("Int64")
    for c in TEXT_COLUMNS:
        df[c] = df[c].astype(object).where(df[c].notna() & (df[c].astype(object) != ""), None)
    return df


def _file_mode(path: Path) -> int:
    """Mode for a rewritten table: the old file's, else 0o666 minus the umask (mkstemp gives 0o600)."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    mode = _file_mode(path)
    with atomic_path(path) as tmp:
        # Python's repr of a float round-trips exactly; pandas writes floats with repr by default.
        df.to_csv(tmp, index=False, lineterminator="\n")
        os.chmod(tmp, mode)


def _write_parquet(df: pd.DataFrame, path: Path) -> Path | None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return None
    pq = path.with_suffix(".parquet")
    mode = _file_mode(pq)
    with atomic_path(pq) as tmp:
        df.to_parquet(tmp, index=False)
        os.chmod(tmp, mode)
    return pq


def append_results(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append rows (dicts keyed by :data:`COLUMNS`) to the CSV at ``path``, keeping earlier rows.

    The existing table is read and checked, the new rows validated (:func:`normalize_row`), the
    whole table written to a temporary file and renamed over the old one. Other processes
    appending to tables in the same folder wait for the lock, so no row is lost. Under torchrun
    only rank 0 appends (every rank holds the same numbers).
    """
    from iddpm_eval import distributed as dist

    path = _check_path(path)
    rows = list(rows)
    if not rows or not dist.is_main():
        return
    need_prov = any(any(_is_missing(r.get(c)) for c in PROVENANCE_COLUMNS) for r in rows if isinstance(r, dict))
    prov = provenance() if need_prov else None
    new = _frame(normalize_row(r, prov) for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(path.parent):
        if path.exists() and path.stat().st_size > 0:
            old = read_results(path)
            extra_cols = [c for c in old.columns if c not in COLUMNS]
            for c in extra_cols:  # columns someone added by hand survive, empty for the new rows
                new[c] = None
            table = pd.concat([old, new[list(old.columns)]], ignore_index=True) if len(old) else new
        else:
            table = new
        table = _typed(table)
        _write_csv(table, path)
        _write_parquet(table, path)


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """Read a results table (CSV, or Parquet by suffix) with typed columns.

    Floats for value/ci_low/ci_high, nullable integers for n/seed, ``None`` for empty text.
    A missing file, an unreadable file or missing columns raise an error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results table not found: {path}")
    try:
        if path.suffix.lower() == ".parquet":
            df = pd.read_parquet(path)
            df = df.astype({c: object for c in TEXT_COLUMNS if c in df.columns})
        else:
            df = pd.read_csv(path, dtype=object, keep_default_na=False, na_values=[])
    except pd.errors.EmptyDataError:
        raise ValueError(f"results table {path}: file is empty (no header row)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ImportError) as err:
        raise ValueError(f"results table {path}: cannot be parsed: {err}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"results table {path}: missing column(s) {missing}; "
                         f"found {list(df.columns)}; expected {COLUMNS}")
    for c in FLOAT_COLUMNS + INT_COLUMNS:
        col = df[c].astype(object)
        col = col.where(col.notna() & (col != ""), None)
        num = pd.to_numeric(col, errors="coerce")
        bad = num.isna() & col.notna() & (col.astype(str).str.strip().str.lower() != "nan")
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise ValueError(f"results table {path}: column {c!r} row {i + 2} holds {col.iloc[i]!r}, not a number")
        df[c] = num
    try:
        df = _typed(df)
    except (TypeError, ValueError) as err:
        raise ValueError(f"results table {path}: {err}") from None
    empty = df["experiment"].isna() | df["metric"].isna()
    if empty.any():
        i = int(empty.to_numpy().nonzero()[0][0])
        raise ValueError(f"results table {path}: row {i + 2} has an empty experiment or metric")
    return df


def parse_extra(text: Any) -> dict:
    """The ``extra`` column of one row as a dict (empty when absent or not a JSON object)."""
    if _is_missing(text):
        return {}
    if isinstance(text, dict):
        return text
    try:
        v = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return {}
    return v if isinstance(v, dict) else {}
