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

The columns and the checks of one row are :mod:`iddpm_eval.row_checks`; :func:`result_row` and
:func:`comparison_rows` build checked rows with their provenance.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from iddpm_core.io import NotWritableError, atomic_path, check_writable
from iddpm_core.provenance import command_line, file_lock, provenance
from iddpm_eval.row_checks import (COLUMNS, FLOAT_COLUMNS, IDENTITY_COLUMNS, INT_COLUMNS, PROVENANCE_COLUMNS,
                                   TEXT_COLUMNS, is_missing, check_experiment, normalize_row, parse_extra)

STAMP_KEY = b"iddpm_csv_sha256"
PRDC = ("precision", "recall", "density", "coverage")


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


def comparison_rows(out: dict, experiment: str | None = None, *, fd: str = "fid",
                    metrics: tuple = ("fid", "fd_inf", "kid", "sfid", "prdc")) -> list[dict]:
    """The rows of one comparison (:func:`iddpm_eval.measure.compare`'s result ``out``): one per
    metric it holds, of the groups ``metrics`` in that order ("fid", "fd_inf", "kid", "sfid",
    "prdc"), with its interval where there is one. ``fd`` names the distance ("fid", or
    "fd_dinov2" for DINOv2 features; FD-infinity is ``fd + "_inf"``). The experiment defaults to
    "A vs B"; ``n`` is the smaller set (both counts are in ``extra``)."""
    columns = {"fid": [(fd, "fid", "fid_ci_low", "fid_ci_high")],
               "fd_inf": [(f"{fd}_inf", "fd_inf", "fd_inf_ci_low", "fd_inf_ci_high")],
               "kid": [("kid", "kid_mean", None, None)], "sfid": [("sfid", "sfid", "sfid_ci_low", "sfid_ci_high")],
               "prdc": [(m, m, f"{m}_ci_low", f"{m}_ci_high") for m in PRDC]}
    exp = experiment or f"{out['a']} vs {out['b']}"
    extra = {k: out[k] for k in ("a", "b", "n_a", "n_b", "a_fingerprint", "b_fingerprint", "iddpm_version", "num",
                                 "detector") if out.get(k) is not None}
    counts = [v for v in (out.get("n_a"), out.get("n_b")) if v is not None]
    n = min(counts) if counts else None
    prov = provenance()
    return [result_row(experiment=exp, metric=metric, value=out[key],
                       ci_low=out.get(lo) if lo else None, ci_high=out.get(hi) if hi else None, n=n,
                       mode=out.get("mode"), seed=out.get("seed"), weights_sha256=out.get("weights_sha256"),
                       extra=extra, prov=prov)
            for group in metrics for metric, key, lo, hi in columns[group] if key in out]


def append_result(path: str | os.PathLike, *, replace: bool = False, **fields) -> dict:
    """Append one measurement (fields of :func:`result_row`) to the table at ``path`` and return
    the row as written; ``replace`` as in :func:`append_results`."""
    out = result_row(**fields)
    append_results(path, [out], replace=replace)
    return out


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
    return None if is_missing(v) else str(v)


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
    need_prov = any(any(is_missing(r.get(c)) for c in PROVENANCE_COLUMNS) for r in rows if isinstance(r, dict))
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
