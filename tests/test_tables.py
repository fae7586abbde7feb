"""Results tables and provenance: schema, exact round trip, atomic appends, clear errors, hashes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from iddpm_core import provenance as prov_mod
from iddpm_eval import tables
from iddpm_core.io import file_sha256
from iddpm_core.provenance import config_hash, git_commit, provenance
from iddpm_eval.tables import COLUMNS, append_result, append_results, read_results

PROV = {"package_version": "9.9.9", "git_commit": "abc", "time": "2026-01-01T00:00:00Z", "machine": "test"}


def row(experiment="e", metric="fid", value=1.0, **kw):
    return {"experiment": experiment, "metric": metric, "value": value, **PROV, **kw}


def test_columns_match_issue():
    required = ["experiment", "metric", "value", "ci_low", "ci_high", "n", "config_hash", "checkpoint_hash",
                "weights_sha256", "mode", "seed", "package_version", "git_commit", "time", "machine", "extra"]
    assert COLUMNS == required


def test_append_result_round_trip_exact(tmp_path):
    path = tmp_path / "sub" / "r.csv"
    values = [0.1 + 0.2, 1 / 3, 1e-300, 123456789.123456789, -2.5e17]
    for i, v in enumerate(values):
        append_result(path, experiment=f"exp{i % 2}", metric="fid", value=v, ci_low=v - 1, ci_high=v + 1, n=50_000,
                      mode="legacy-tf", seed=i, weights_sha256="7ff4", config_hash="00123", checkpoint_hash="0e5",
                      extra={"figure": "a.png", "k": [1, 2]})
    df = read_results(path)
    assert list(df.columns) == COLUMNS
    assert df["value"].tolist() == values  # bit-exact floats through CSV
    assert df["ci_low"].tolist() == [v - 1 for v in values]
    assert df["seed"].tolist() == list(range(5)) and str(df["seed"].dtype) == "Int64"
    assert df["n"].tolist() == [50_000] * 5
    # hash-like text stays text (no int parsing that would drop leading zeros or read "0e5" as 0.0)
    assert df["config_hash"].tolist() == ["00123"] * 5 and df["checkpoint_hash"].tolist() == ["0e5"] * 5
    extra = tables.parse_extra(df["extra"][0])
    assert extra["figure"] == "a.png" and extra["k"] == [1, 2] and "command" in extra
    real = provenance()
    assert df["package_version"][0] == real["package_version"]
    assert df["git_commit"][0] == real["git_commit"] and df["machine"][0] == real["machine"]
    assert pd.Timestamp(df["time"][0]).tz is not None  # ISO with Z


def test_missing_optional_values_read_back_as_missing(tmp_path):
    path = tmp_path / "r.csv"
    append_results(path, [row()])
    df = read_results(path)
    assert math.isnan(df["ci_low"][0]) and df["n"].isna()[0] and df["seed"].isna()[0]
    assert df["mode"][0] is None and df["extra"][0] is None
    assert df["package_version"][0] == "9.9.9"  # given provenance is kept, not overwritten


def test_append_keeps_earlier_rows_and_bytes(tmp_path):
    path = tmp_path / "r.csv"
    append_results(path, [row("a", value=1.5), row("b", value=2.5)])
    before = path.read_text()
    append_results(path, [row("c", value=3.5)])
    after = path.read_text()
    assert after.startswith(before)  # earlier rows unchanged, byte for byte
    df = read_results(path)
    assert df["experiment"].tolist() == ["a", "b", "c"] and df["value"].tolist() == [1.5, 2.5, 3.5]


def test_append_is_atomic_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "r.csv"
    append_results(path, [row("a")])
    before = path.read_bytes()
    files = sorted(p.name for p in tmp_path.iterdir())  # r.csv (and r.parquet with pyarrow)

    def broken_to_csv(self, target, *a, **k):
        Path(target).write_text("experiment,metric\npartial")  # a half-written temp file ...
        raise OSError("disk full")  # ... then the crash

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken_to_csv)
    with pytest.raises(OSError, match="disk full"):
        append_results(path, [row("b")])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # no temp file left behind


def _worker(args):
    path, who, count = args
    for i in range(count):
        append_results(path, [row(f"{who}", value=float(i))])


def _in_two_processes(worker, path: str, count: int) -> pd.DataFrame:
    """Run ``worker((path, who, count))`` for who = p0, p1 in two processes at once; read the table."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        pool.map(worker, [(path, "p0", count), (path, "p1", count)])
    return read_results(path)


def test_concurrent_appends_lose_nothing(tmp_path):
    path = str(tmp_path / "r.csv")
    df = _in_two_processes(_worker, path, 12)
    assert len(df) == 24
    for who in ("p0", "p1"):
        assert df.loc[df["experiment"] == who, "value"].tolist() == [float(i) for i in range(12)]


def test_hand_added_column_survives(tmp_path):
    path = tmp_path / "r.csv"
    append_results(path, [row("a")])
    df = pd.read_csv(path, dtype=object, keep_default_na=False)
    df["note"] = "checked by hand"
    df.to_csv(path, index=False)
    append_results(path, [row("b")])
    raw = pd.read_csv(path, dtype=object, keep_default_na=False)
    assert raw["note"].tolist() == ["checked by hand", ""]


def test_new_file_is_readable_per_umask(tmp_path):
    path = tmp_path / "r.csv"
    old = os.umask(0o022)
    try:
        append_results(path, [row()])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("bad, match", [
    (dict(row(), colour="red"), "unknown column"),
    ({k: v for k, v in row().items() if k != "value"}, "'value' is required"),
    (row(metric=""), "'metric' is required"),
    (row(value="high"), "must be a number"),
    (row(n=2.5), "must be an integer"),
    (row(ci_low=2.0, ci_high=1.0), "ci_low 2.0 > ci_high 1.0"),
    (row(ci_low=1.0), "both ci_low and ci_high"),
    (row(mode="a\nb"), "one line"),
    (row(extra=[1, 2]), "must be a dict"),
])
def test_bad_rows_are_rejected_and_nothing_written(tmp_path, bad, match):
    path = tmp_path / "r.csv"
    append_results(path, [row("keep")])
    before = path.read_bytes()
    with pytest.raises(ValueError, match=match):
        append_results(path, [row("ok"), bad])
    assert path.read_bytes() == before


def test_parquet_path_rejected(tmp_path):
    with pytest.raises(ValueError, match="give the .csv path"):
        append_results(tmp_path / "r.parquet", [row()])


def test_read_results_errors_name_file_and_columns(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_results(tmp_path / "nope.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.csv.*empty"):
        read_results(empty)
    partial = tmp_path / "partial.csv"
    partial.write_text("experiment,metric,value\ne,fid,1.0\n")
    with pytest.raises(ValueError, match=r"partial.csv: missing column\(s\) \['ci_low', 'ci_high', 'n'"):
        read_results(partial)
    path = tmp_path / "r.csv"
    append_results(path, [row(), row("x")])
    text = path.read_text().splitlines()
    text[2] = text[2].replace("x,fid,1.0", "x,fid,lots")
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match="r.csv: column 'value' row 3 holds 'lots'"):
        read_results(path)


def test_append_to_malformed_table_refuses(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing column"):
        append_results(path, [row()])
    assert path.read_text() == "a,b\n1,2\n"


def test_parquet_copy_matches_csv(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "r.csv"
    append_results(path, [row(value=1 / 3, n=5, extra={"a": 1}), row("b", value=2.0)])
    a = read_results(path)
    b = read_results(path.with_suffix(".parquet"))
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_no_parquet_without_pyarrow(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError("no pyarrow")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    path = tmp_path / "r.csv"
    append_results(path, [row()])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]


# ---------------------------------------------------------------- provenance and hashes

@dataclasses.dataclass
class Cfg:
    lr: float = 1e-4
    channels: tuple = (1, 2, 2)
    name: str = "cosine"


def test_config_hash_canonical():
    d = {"lr": 1e-4, "channels": [1, 2, 2], "name": "cosine"}
    # Independent closed form: sha256 of the sorted, compact JSON text written out by hand.
    text = '{"channels":[1,2,2],"lr":0.0001,"name":"cosine"}'
    assert config_hash(d, full=True) == hashlib.sha256(text.encode()).hexdigest()
    assert config_hash(d) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert config_hash(Cfg()) == config_hash(d) == config_hash(dict(reversed(list(d.items()))))
    assert config_hash({**d, "lr": 2e-4}) != config_hash(d)
    assert config_hash({**d, "channels": [2, 1, 2]}) != config_hash(d)
    np = pytest.importorskip("numpy")
    assert config_hash({**d, "lr": np.float64(1e-4), "channels": np.array([1, 2, 2])}) == config_hash(d)
    with pytest.raises(TypeError, match="cannot hash"):
        config_hash({"f": object()})


def test_file_sha256_matches_hashlib(tmp_path):
    data = os.urandom(10_000) + b"tail"
    p = tmp_path / "w.bin"
    p.write_bytes(data)
    assert file_sha256(p, chunk_size=997) == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        file_sha256(tmp_path / "missing.bin")


def _git(root, *args):
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t",
                           "-c", "commit.gpgsign=false", *args], check=True, capture_output=True, text=True).stdout


def test_git_commit_of_checkout(tmp_path):
    assert git_commit(tmp_path) == "unknown"  # not a checkout
    (tmp_path / "iddpm_core").mkdir()
    src = tmp_path / "iddpm_core" / "m.py"
    src.write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    (tmp_path / "other.txt").write_text("a")
    _git(tmp_path, "add", "other.txt")
    _git(tmp_path, "commit", "-q", "-m", "first")
    assert git_commit(tmp_path) == "unknown"  # a checkout, but it does not track the sources
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "c")
    head = _git(tmp_path, "rev-parse", "HEAD").strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "results.csv").write_text("untracked, not a source change")
    assert git_commit(tmp_path) == head
    src.write_text("x = 2\n")
    assert git_commit(tmp_path) == head + "+dirty"


def test_provenance_fields():
    p = provenance()
    assert set(p) == {"package_version", "git_commit", "time", "machine"}
    assert p["time"].endswith("Z") and pd.Timestamp(p["time"]).year >= 2024
    torch = pytest.importorskip("torch")
    assert f"torch={torch.__version__}" in p["machine"] and f"threads={torch.get_num_threads()}" in p["machine"]
    assert p["package_version"] == prov_mod.package_version()


def test_nan_value_is_recorded_but_none_is_not(tmp_path):
    path = tmp_path / "r.csv"
    append_results(path, [row(value=float("nan"))])
    assert math.isnan(read_results(path)["value"][0])
    with pytest.raises(ValueError, match="'value' is required"):
        append_results(path, [row(value=None)])


def test_hand_written_nan_text_reads_as_nan(tmp_path):
    path = tmp_path / "r.csv"
    append_results(path, [row(value=2.0)])
    path.write_text(path.read_text().replace("e,fid,2.0,", "e,fid,NaN,"))
    assert math.isnan(read_results(path)["value"][0])


# ------------------------------------------------------------- refusing broken or protected tables

def _cut_last_row(path: Path, keep: int) -> bytes:
    """Cut the file inside its last row, `keep` characters into that row, as a kill mid-write would."""
    lines = path.read_bytes().split(b"\n")
    last = [i for i, l in enumerate(lines) if l][-1]
    data = b"\n".join(lines[:last] + [lines[last][:keep]])
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("keep", [18, 200])  # inside the value column; inside the quoted extra JSON
def test_truncated_last_row_is_refused_naming_file_and_line(tmp_path, keep):
    path = tmp_path / "r.csv"
    append_results(path, [row("a", value=1.25, extra={"command": "x", "k": "v" * 300}),
                          row("b", value=2.5, extra={"command": "y", "k": "w" * 300})])
    data = _cut_last_row(path, keep)
    with pytest.raises(ValueError, match=r"r\.csv: line 3 "):
        read_results(path)
    with pytest.raises(ValueError, match=r"r\.csv: line 3 "):
        append_results(path, [row("c")])
    with pytest.raises(ValueError, match=r"r\.csv: line 3 "):
        tables.check_table(path)
    assert path.read_bytes() == data  # never rewritten


def test_read_only_table_and_folder_are_refused(tmp_path):
    path = tmp_path / "r.csv"
    append_results(path, [row("a")])
    before = path.read_bytes()
    os.chmod(path, 0o444)  # tests may run as root, who could write anyway: the mode bits decide
    try:
        for call in (lambda: append_results(path, [row("b")]), lambda: tables.check_table(path)):
            with pytest.raises(ValueError, match=r"r\.csv: the file is read-only \(mode 0444\)"):
                call()
        assert path.read_bytes() == before and path.stat().st_mode & 0o777 == 0o444
    finally:
        os.chmod(path, 0o644)
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:
        with pytest.raises(ValueError, match=r"folder .*ro is not writable \(mode 0555\)"):
            tables.check_table(folder / "sub" / "t.csv")
        with pytest.raises(ValueError, match="not writable"):
            append_results(folder / "t.csv", [row()])
        assert list(folder.iterdir()) == []
    finally:
        os.chmod(folder, 0o755)


def test_check_table_refuses_before_any_work(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv: missing column"):
        tables.check_table(bad)
    with pytest.raises(ValueError, match="give the .csv path"):
        tables.check_table(tmp_path / "r.parquet")
    with pytest.raises(ValueError, match="'experiment' must be one line"):
        tables.check_table(tmp_path / "r.csv", "two\nlines")
    with pytest.raises(ValueError, match="is not a file"):
        tables.check_table(tmp_path)
    assert tables.check_table(tmp_path / "new" / "r.csv", "ok") == tmp_path / "new" / "r.csv"
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------- reruns, one write, the Parquet copy

def _cmd_row(experiment, metric, value, command="iddpm-eval fid a b", **kw):
    return row(experiment, metric, value, extra={"command": command, "a_fingerprint": "fa", **kw.pop("extra", {})},
               **kw)


def test_rerun_replaces_rows_of_the_same_identity(tmp_path):
    path = tmp_path / "r.csv"
    first = [_cmd_row("e", "fid", 10.0, seed=0), _cmd_row("e", "kid", 0.1, seed=0)]
    assert append_results(path, first, replace=True) == 0
    append_results(path, [row("hand", "fid", 1.0)], replace=True)  # no command: never replaced
    # the same command on the same inputs: both rows replaced, in place of duplicates
    assert append_results(path, [_cmd_row("e", "fid", 10.5, seed=0), _cmd_row("e", "kid", 0.2, seed=0)],
                          replace=True) == 2
    df = read_results(path)
    assert df[["experiment", "metric", "value"]].values.tolist() == [["hand", "fid", 1.0], ["e", "fid", 10.5],
                                                                     ["e", "kid", 0.2]]
    # another seed, another command line, or changed inputs: new rows, the old ones kept
    append_results(path, [_cmd_row("e", "fid", 11.0, seed=1)], replace=True)
    append_results(path, [_cmd_row("e", "fid", 12.0, seed=0, command="iddpm-eval fid a b --num 5")], replace=True)
    append_results(path, [_cmd_row("e", "fid", 13.0, seed=0, extra={"a_fingerprint": "changed"})], replace=True)
    append_results(path, [row("hand", "fid", 1.0)], replace=True)
    assert read_results(path)["value"].tolist() == [1.0, 10.5, 0.2, 11.0, 12.0, 13.0, 1.0]
    # without replace (the library default) a rerun appends
    append_results(path, [_cmd_row("e", "kid", 0.2, seed=0)])
    assert read_results(path)["metric"].tolist().count("kid") == 2


def _replacing_worker(args):
    path, who, count = args
    for i in range(count):
        append_results(path, [_cmd_row(who, "fid", float(i), command=f"run {who} {i}"),
                              _cmd_row(who, "kid", float(i), command=f"run {who} {i}")], replace=True)


def test_concurrent_replacing_appends_keep_every_row_and_a_matching_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = str(tmp_path / "r.csv")
    df = _in_two_processes(_replacing_worker, path, 8)
    assert len(df) == 32
    for who in ("p0", "p1"):
        mine = df[df["experiment"] == who]
        assert mine["value"].tolist() == [float(i) for i in range(8) for _ in range(2)]  # pairs stay together
    pd.testing.assert_frame_equal(df, read_results(Path(path).with_suffix(".parquet")), check_dtype=False)
    assert tables._parquet_stamp(Path(path).with_suffix(".parquet")) == file_sha256(path)


def test_stale_parquet_copy_is_never_read(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    path = tmp_path / "r.csv"
    pq = path.with_suffix(".parquet")
    append_results(path, [row("a")])
    real = tables._write_parquet

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies between the CSV rename and the Parquet write

    monkeypatch.setattr(tables, "_write_parquet", killed)
    with pytest.raises(KeyboardInterrupt):
        append_results(path, [row("b")])
    monkeypatch.setattr(tables, "_write_parquet", real)
    assert read_results(path)["experiment"].tolist() == ["a", "b"]
    assert read_results(pq)["experiment"].tolist() == ["a", "b"]  # the CSV's content, not the stale copy
    assert tables._parquet_stamp(pq) == file_sha256(path)  # and the copy was regenerated
    raw = pd.read_parquet(pq)  # what any Parquet reader sees: typed columns, not CSV text
    assert raw["experiment"].tolist() == ["a", "b"] and str(raw["value"].dtype) == "float64"
    assert str(raw["seed"].dtype) == "Int64" and raw["ci_low"].isna().all()
    # a hand edit of the CSV also makes the copy stale
    path.write_text(path.read_text().replace("\na,", "\nz,", 1))
    assert read_results(pq)["experiment"].tolist() == ["z", "b"]



# ----------------------------------------------------------------------------- rows

def test_row_checks_and_result_row():
    from iddpm_eval.row_checks import check_experiment, is_missing, normalize_row
    from iddpm_eval.tables import result_row

    assert [is_missing(v) for v in (None, pd.NA, float("nan"), "", 0, "x")] == [True] * 4 + [False] * 2
    out = normalize_row({"experiment": "e", "metric": "fid", "value": "1.5", "n": 3.0},
                        prov={"package_version": "1", "git_commit": "c", "time": "t", "machine": "m"})
    assert list(out) == COLUMNS and out["value"] == 1.5 and out["n"] == 3 and out["git_commit"] == "c"
    assert check_experiment("one line") == "one line"
    with pytest.raises(ValueError, match="one line"):
        check_experiment("two\nlines")
    r = result_row(experiment="e", metric="fid", value=2.0, extra={"a": 1})
    assert json.loads(r["extra"])["command"] and json.loads(r["extra"])["a"] == 1 and r["package_version"]


def test_row_identity_is_what_a_rerun_shares():
    from iddpm_eval.tables import row_identity

    a = dict(experiment="e", metric="fid", mode=None, seed=0, n=5, config_hash=None, checkpoint_hash=None,
             weights_sha256="w", extra=json.dumps({"command": "c", "a_fingerprint": "x", "other": 1}))
    assert row_identity(a) == row_identity({**a, "extra": json.dumps({"command": "c", "a_fingerprint": "x"})})
    assert row_identity(a) != row_identity({**a, "seed": 1})
    assert row_identity(a) != row_identity({**a, "extra": json.dumps({"command": "c", "a_fingerprint": "y"})})
    assert row_identity({**a, "extra": "{}"}) is None  # no command: never the same measurement


def test_comparison_rows_one_per_metric_with_intervals():
    from iddpm_eval.tables import comparison_rows

    out = dict(a="A", b="B", n_a=10, n_b=7, fid=3.0, fid_ci_low=2.0, fid_ci_high=4.0, kid_mean=0.1, precision=0.5,
               recall=0.4, density=0.9, coverage=0.6, mode="legacy-tf", seed=1, weights_sha256="w")
    rows = comparison_rows(out, None, fd="fd_dinov2")
    assert [r["metric"] for r in rows] == ["fd_dinov2", "kid", "precision", "recall", "density", "coverage"]
    assert rows[0]["experiment"] == "A vs B" and rows[0]["n"] == 7 and rows[0]["ci_low"] == 2.0
    assert rows[1]["value"] == 0.1 and rows[1]["ci_low"] is None and json.loads(rows[1]["extra"])["n_a"] == 10
    assert [r["metric"] for r in comparison_rows(out, "x", metrics=("prdc", "fid"))][-1] == "fid"
