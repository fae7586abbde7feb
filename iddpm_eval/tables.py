"""Results tables: one row per measurement, with the provenance needed to trust and compare it.

A table is a CSV file (the source of truth). Every write takes an advisory lock on the table's
folder (so concurrent appends keep every row), reads and checks the old table (a malformed one,
e.g. a truncated last row, is refused naming the line and never rewritten), adds all rows of one
command in one atomic rewrite (temporary file, then rename), and then, when ``pyarrow`` is
importable, derives the Parquet copy (same name, ``.parquet``) from the CSV's bytes, stamped with
their sha256 (schema metadata ``iddpm_csv_sha256``). Reading the ``.parquet`` path checks the
stamp against the CSV beside it and, when a kill left the copy stale, returns the CSV's content
and regenerates the copy; without pyarrow a leftover copy is deleted rather than left stale.

With ``replace=True`` (what the ``iddpm-eval`` commands use) a new row replaces the old rows of
the same *identity* (:func:`row_identity`): same experiment, metric, mode, seed, n, config_hash,
checkpoint_hash, weights_sha256, the same command line (``extra.command``) and the same input
fingerprints (every ``extra`` key ending in ``_fingerprint``). So rerunning a command on the same
inputs updates its rows instead of duplicating them; a different command or changed inputs add
rows. Rows without a recorded command are never replaced.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from iddpm_core.io import NotWritableError, atomic_path, check_writable
from iddpm_core.provenance import command_line, file_lock, provenance

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
STAMP_KEY = b"iddpm_csv_sha256"


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


def result_row(*, experiment: str, metric: str, value: float, ci_low: float | None = None,
               ci_high: float | None = None, n: int | None = None, mode: str | None = None, seed: int | None = None,
               weights_sha256: str | None = None, config_hash: str | None = None,
               checkpoint_hash: str | None = None, extra: dict | None = None, prov: dict | None = None) -> dict:
    """One checked row (:func:`normalize_row`) with provenance filled in; ``extra`` gets the command
    line under ``"command"`` unless it already has that key."""
    extra = dict(extra) if extra else {}
    extra.setdefault("command", command_line())
    row = dict(experiment=experiment, metric=metric, value=value, ci_low=ci_low, ci_high=ci_high, n=n,
               mode=mode, seed=seed, weights_sha256=weights_sha256, config_hash=config_hash,
               checkpoint_hash=checkpoint_hash, extra=extra)
    return normalize_row(row, prov)


def append_result(path: str | os.PathLike, *, replace: bool = False, **fields) -> dict:
    """Append one measurement (fields of :func:`result_row`) to the table at ``path`` and return
    the row as written; ``replace`` as in :func:`append_results`."""
    out = result_row(**fields)
    append_results(path, [out], replace=replace)
    return out


def check_experiment(experiment: str) -> str:
    """An experiment name must be one line of text (it is a CSV cell and a report heading)."""
    return _as_text("experiment", experiment, {"experiment": experiment, "metric": None}) or ""


def check_table(path: str | os.PathLike, experiment: str | None = None) -> Path:
    """Refuse, before any computation, what :func:`append_results` would refuse later: a
    ``.parquet`` path, a folder, a read-only table or folder, a malformed existing table, an
    experiment name that is not one line. Raises ``ValueError`` naming the file."""
    path = _check_path(path)
    if experiment is not None:
        check_experiment(experiment)
    check_writable(path, what="results table")
    if path.is_file() and path.stat().st_size > 0:
        read_results(path)
    return path


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


def _parquet_stamp(pq: Path) -> str | None:
    import pyarrow.parquet as pqm

    try:
        meta = pqm.read_schema(pq).metadata or {}
    except Exception:  # unreadable copy: treat as stale
        return None
    v = meta.get(STAMP_KEY)
    return v.decode() if v else None


def _write_parquet(path: Path) -> Path | None:
    """Derive the Parquet copy from the CSV at ``path`` as it is on disk, stamped with its sha256.
    Without pyarrow, delete a leftover copy so that it cannot disagree with the CSV."""
    pq = path.with_suffix(".parquet")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pqm
    except ImportError:
        if pq.is_file():
            pq.unlink()
        return None
    data = path.read_bytes()
    df = _checked_frame(path, _csv_frame(path, data))  # typed as read_results gives it
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[STAMP_KEY] = hashlib.sha256(data).hexdigest().encode()
    table = table.replace_schema_metadata(meta)
    mode = _file_mode(pq)
    with atomic_path(pq) as tmp:
        pqm.write_table(table, tmp)
        os.chmod(tmp, mode)
    return pq


def _key(v: Any) -> str | None:
    return None if _is_missing(v) else str(v)


def row_identity(row: Any) -> tuple | None:
    """What makes two rows the same measurement rerun (see the module doc); None without a command."""
    extra = parse_extra(row["extra"])
    command = extra.get("command")
    if not command:
        return None
    fingerprints = tuple(sorted((k, str(v)) for k, v in extra.items() if k.endswith("_fingerprint")))
    return tuple(_key(row[c]) for c in IDENTITY_COLUMNS) + (str(command), fingerprints)


def append_results(path: str | os.PathLike, rows: list[dict], *, replace: bool = False) -> int:
    """Append rows (dicts keyed by :data:`COLUMNS`) to the CSV at ``path`` in one atomic rewrite,
    keeping earlier rows; with ``replace`` earlier rows of the same :func:`row_identity` as a new
    row are dropped. Returns the number of rows replaced.

    The new rows are validated (:func:`normalize_row`) and the target checked (:func:`check_table`)
    before the lock; under the lock the existing table is read and checked, the whole table
    written to a temporary file and renamed over the old one, then the Parquet copy derived.
    Other processes appending to tables in the same folder wait for the lock, so no row is lost.
    Under torchrun only rank 0 appends (every rank holds the same numbers).
    """
    from iddpm_eval import distributed as dist

    path = _check_path(path)
    rows = list(rows)
    if not rows or not dist.is_main():
        return 0
    need_prov = any(any(_is_missing(r.get(c)) for c in PROVENANCE_COLUMNS) for r in rows if isinstance(r, dict))
    prov = provenance() if need_prov else None
    new = _frame(normalize_row(r, prov) for r in rows)
    check_writable(path, what="results table")
    path.parent.mkdir(parents=True, exist_ok=True)
    replaced = 0
    with file_lock(path.parent):
        check_writable(path, what="results table")  # may have changed while we waited
        if path.exists() and path.stat().st_size > 0:
            old = read_results(path)
            if replace:
                ids = {i for i in (row_identity(r) for _, r in new.iterrows()) if i is not None}
                drop = [row_identity(r) in ids for _, r in old.iterrows()] if ids else [False] * len(old)
                replaced = int(sum(drop))
                old = old[[not d for d in drop]].reset_index(drop=True)
            extra_cols = [c for c in old.columns if c not in COLUMNS]
            for c in extra_cols:  # columns someone added by hand survive, empty for the new rows
                new[c] = None
            table = pd.concat([old, new[list(old.columns)]], ignore_index=True) if len(old) else new
        else:
            table = new
        table = _typed(table)
        _write_csv(table, path)
        _write_parquet(path)
    return replaced


def _csv_frame(path: Path, data: bytes) -> pd.DataFrame:
    """Parse CSV bytes into text cells, refusing a record whose field count differs from the
    header's (a truncated last row, a hand-broken line) with the file and line number."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"results table {path}: cannot be parsed: {err}") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise ValueError(f"results table {path}: file is empty (no header row)")
        dup = sorted({c for c in header if header.count(c) > 1})
        if dup:
            raise ValueError(f"results table {path}: column(s) {dup} appear more than once in the header")
        records = []
        for rec in reader:
            if not rec:
                continue  # a blank line
            if len(rec) != len(header):
                raise ValueError(f"results table {path}: line {reader.line_num} has {len(rec)} fields where the "
                                 f"header has {len(header)} (a truncated or broken row); fix or delete that line")
            records.append(rec)
    except csv.Error as err:
        raise ValueError(f"results table {path}: line {reader.line_num} cannot be parsed ({err}: e.g. an unclosed "
                         f"quote, a row truncated by a kill); fix or delete that line") from None
    return pd.DataFrame(records, columns=header, dtype=object)


def _read_parquet_copy(path: Path) -> pd.DataFrame:
    """The Parquet copy, or, when the CSV beside it has changed since the copy was made (a kill
    between the two writes, a hand edit), the CSV's content, regenerating the copy if possible."""
    csv_path = path.with_suffix(".csv")
    if csv_path.is_file():
        import pyarrow  # noqa: F401  (ImportError: reported by the caller)

        if _parquet_stamp(path) != hashlib.sha256(csv_path.read_bytes()).hexdigest():
            df = read_results(csv_path)
            with contextlib.suppress(OSError, NotWritableError):
                check_writable(path, what="results table copy")
                with file_lock(path.parent):
                    _write_parquet(csv_path)
            return df
    df = pd.read_parquet(path)
    return df.astype({c: object for c in TEXT_COLUMNS if c in df.columns})


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """Read a results table (CSV, or Parquet by suffix) with typed columns.

    Floats for value/ci_low/ci_high, nullable integers for n/seed, ``None`` for empty text.
    A missing file, an unreadable file, a row with the wrong number of fields or missing columns
    raise an error naming the file (and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results table not found: {path}")
    try:
        if path.suffix.lower() == ".parquet":
            df = _read_parquet_copy(path)
        else:
            df = _csv_frame(path, path.read_bytes())
    except (OSError, ImportError) as err:
        raise ValueError(f"results table {path}: cannot be read: {err}") from None
    except Exception as err:  # pyarrow's and pandas' own parse errors
        if isinstance(err, ValueError) and str(err).startswith("results table "):
            raise
        raise ValueError(f"results table {path}: cannot be parsed: {type(err).__name__}: {err}") from None
    return _checked_frame(path, df)


def _checked_frame(path: Path, df: pd.DataFrame) -> pd.DataFrame:
    """Check the columns of a parsed table and type them (floats, nullable ints, None for empty text)."""
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
