"""Commands that record results or write outputs: every user error in an output path is refused
before any computation, a measurement is printed before it is written, one command's rows land
in one write, a rerun replaces its rows, and nothing ends in a Python traceback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from iddpm_eval import tables
from iddpm_eval.cli import main
from iddpm_eval.tables import read_results
from test_fid_cli import _images, fake  # noqa: F401  (fixture: a cheap fake Inception)
from test_nll import write_checkpoint

PAIR_FLAGS = ("--kid", "--kid-subsets", "2", "--kid-subset-size", "4", "--pr", "--k", "2")


def invoke(*args, cmd=main):
    """Run a command as its console script would: sys.argv is the command line (recorded in rows)."""
    argv = [str(a) for a in args]
    name = "iddpm-eval" if cmd is main else "iddpm-sample"
    saved = sys.argv
    sys.argv = [name, *argv]
    try:
        return CliRunner().invoke(cmd, argv)
    finally:
        sys.argv = saved


def no_traceback(r):
    """A user error: a message and an exit code, never an uncaught exception."""
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)


@pytest.fixture
def pair(tmp_path):
    np.savez(tmp_path / "a.npz", _images(10, 7))
    np.savez(tmp_path / "b.npz", _images(10, 8))
    return tmp_path / "a.npz", tmp_path / "b.npz"


def _truncated_table(path: Path) -> bytes:
    tables.append_results(path, [dict(experiment="e", metric="fid", value=1.5, extra={"command": "x"}),
                                 dict(experiment="e", metric="kid", value=0.5, extra={"command": "x"})])
    data = path.read_bytes()
    data = data[:data.rindex(b"\ne,kid,") + 9]  # the last row cut after its value's first digit
    path.write_bytes(data)
    return data


def test_fid_refuses_bad_results_targets_before_computing(tmp_path, pair, fake):
    malformed = tmp_path / "malformed.csv"
    malformed.write_text("a,b\n1,2\n")
    truncated = tmp_path / "truncated.csv"
    _truncated_table(truncated)
    readonly = tmp_path / "readonly.csv"
    tables.append_results(readonly, [dict(experiment="e", metric="fid", value=1.0)])
    os.chmod(readonly, 0o444)
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    os.chmod(ro_dir, 0o555)
    cases = [(["--results", malformed], "malformed.csv: missing column"),
             (["--results", truncated], "truncated.csv: line 3 has"),
             (["--results", tmp_path / "r.parquet"], "give the .csv path"),
             (["--results", readonly], "readonly.csv: the file is read-only (mode 0444)"),
             (["--results", ro_dir / "r.csv"], "is not writable (mode 0555)"),
             (["--results", tmp_path / "r.csv", "--experiment", "two\nlines"], "'experiment' must be one line"),
             (["--results", tmp_path / "r.csv", "--experiment", " "], "--experiment must not be empty"),
             (["--save-features", ro_dir / "feats"], "--save-features"),
             ]
    try:
        before = {p: p.read_bytes() for p in (malformed, truncated, readonly)}
        for cmd in ("fid", "recall"):
            for flags, msg in cases:
                r = invoke(cmd, *pair, "--json", *flags)
                assert r.exit_code == 2 and msg in r.output, (cmd, flags, r.output)
                no_traceback(r)
        assert fake == []  # refused before any feature was computed
        assert {p: p.read_bytes() for p in before} == before and list(ro_dir.iterdir()) == []
        assert not (tmp_path / "r.csv").exists() and not (tmp_path / "r.parquet").exists()
    finally:
        os.chmod(readonly, 0o644)
        os.chmod(ro_dir, 0o755)


def test_result_printed_before_a_failed_write(tmp_path, pair, fake, monkeypatch):
    def disk_full(df, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tables, "_write_csv", disk_full)
    r = invoke("fid", *pair, "--json", "--results", tmp_path / "r.csv")
    assert r.exit_code == 1, r.output
    no_traceback(r)
    assert json.loads(r.stdout)["fid"] > 0  # the measurement reached the user
    assert "r.csv not written, the result above is not recorded" in r.output and "No space left" in r.output
    r = invoke("fid", *pair, "--results", tmp_path / "r.csv", "--no-progress")
    assert r.exit_code == 1 and r.stdout.startswith("FID ") and "not recorded" in r.output


def test_one_write_per_command_and_a_rerun_replaces_its_rows(tmp_path, pair, fake, monkeypatch):
    table = tmp_path / "r.csv"
    writes = []
    real = tables._write_csv
    monkeypatch.setattr(tables, "_write_csv", lambda df, p: (writes.append(len(df)), real(df, p))[1])
    args = ("fid", *pair, "--json", *PAIR_FLAGS, "--results", table, "--experiment", "e")
    first = json.loads(invoke(*args).stdout)
    metrics = ["fid", "kid", "precision", "recall", "density", "coverage"]
    assert writes == [6]  # all six rows of the command in one atomic rewrite, not one per metric
    assert read_results(table)["metric"].tolist() == metrics
    r = invoke(*args)  # the same command on the same inputs: replaces
    assert r.exit_code == 0 and "replaced 6 row(s)" in r.output
    df = read_results(table)
    assert df["metric"].tolist() == metrics and df["value"][0] == first["fid"]
    assert writes == [6, 6]
    invoke(*args[:-2], "--experiment", "e", "--seed", "1")  # another seed: a new measurement
    assert len(read_results(table)) == 12
    invoke("recall", *pair, "--k", "2", "--results", table, "--experiment", "e")  # another command
    assert len(read_results(table)) == 17


def test_stats_output_checked_first_and_statistics_never_discarded(tmp_path, pair, fake, monkeypatch):
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    os.chmod(ro_dir, 0o555)
    try:
        r = invoke("stats", pair[0], "-o", ro_dir / "ref.npz", "--no-progress")
        assert r.exit_code == 2 and f"-o/--output {ro_dir / 'ref.npz'}: folder {ro_dir} is not writable" in r.output
        no_traceback(r)
        assert fake == []
    finally:
        os.chmod(ro_dir, 0o755)
    good = tmp_path / "good.npz"
    assert invoke("stats", pair[0], "-o", good, "--no-progress").exit_code == 0
    # a write that fails after the computation (the check passed; the disk did not): the
    # statistics are kept in a fallback file and the message says where
    from iddpm_eval.cli import outputs

    monkeypatch.setattr(outputs, "check_output", lambda *a, **k: None)
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    r = invoke("stats", pair[0], "-o", blocker / "ref.npz", "--no-progress")
    assert r.exit_code == 1, r.output
    no_traceback(r)
    assert "saved to " in r.output
    fallback = Path(r.output.split("saved to ")[1].split(" instead")[0])
    try:
        with np.load(fallback) as z, np.load(good) as g:
            assert np.array_equal(z["mu"], g["mu"]) and np.array_equal(z["sigma"], g["sigma"])
    finally:
        fallback.unlink()


def test_nll_out_and_results_checked_first(tmp_path):
    ck = write_checkpoint(tmp_path / "m.pt")
    base = ["nll", "--checkpoint", ck, "--data", "digits", "--num", "2", "--no-progress", "--json"]
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    os.chmod(ro_dir, 0o555)
    try:
        r = invoke(*base, "--out", ro_dir / "nll")
        assert r.exit_code == 2 and f"--out {ro_dir / 'nll'}: folder {ro_dir} is not writable" in r.output, r.output
        no_traceback(r)
        assert list(ro_dir.iterdir()) == []
    finally:
        os.chmod(ro_dir, 0o755)
    bad = tmp_path / "bad.csv"
    data = _truncated_table(bad)
    r = invoke(*base, "--out", tmp_path / "o", "--results", bad)
    assert r.exit_code == 2 and "bad.csv: line 3 has" in r.output
    no_traceback(r)
    assert not (tmp_path / "o").exists() and bad.read_bytes() == data
    r = invoke(*base, "--out", tmp_path / "o", "--results", tmp_path / "r.csv", "--experiment", "a\nb")
    assert r.exit_code == 2 and "one line" in r.output and not (tmp_path / "o").exists()
    # printed, then recorded in one row; a rerun replaces it
    for _ in range(2):
        r = invoke(*base, "--out", tmp_path / "o", "--results", tmp_path / "r.csv")
        assert r.exit_code == 0, r.output
    df = read_results(tmp_path / "r.csv")
    assert df["metric"].tolist() == ["bpd"] and df["value"][0] == json.loads(r.stdout)["bpd"]


def test_sample_out_checked_first(tmp_path):
    from iddpm_core.cli import sample_main

    ck = write_checkpoint(tmp_path / "m.pt")
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    os.chmod(ro_dir, 0o555)
    try:
        r = invoke("--checkpoint", ck, "--num", "2", "--steps", "2", "--out", ro_dir / "s", "--no-progress",
                   cmd=sample_main)
        assert r.exit_code == 2 and f"output folder {ro_dir / 's'}: folder {ro_dir} is not writable" in r.output
        no_traceback(r)
        assert list(ro_dir.iterdir()) == []
    finally:
        os.chmod(ro_dir, 0o755)


@pytest.mark.parametrize("what", ["missing", "random bytes", "empty"])
def test_bad_weights_file_is_named(tmp_path, pair, what):
    w = tmp_path / "w.pt"
    if what == "random bytes":
        w.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif what == "empty":
        w.write_bytes(b"")
    for args in (("stats", pair[0], "-o", tmp_path / "s.npz"), ("fid", *pair)):
        r = invoke(*args, "--weights", w, "--no-progress")
        assert r.exit_code in (1, 2) and str(w) in r.output, r.output
        no_traceback(r)
        assert "weights_only=False" not in r.output  # never advise running a file's code
    assert not (tmp_path / "s.npz").exists()


def test_regress_names_the_truncated_line(tmp_path):
    bad = tmp_path / "cur.csv"
    _truncated_table(bad)
    r = invoke("regress", "--baseline", bad, "--current", bad)
    assert r.exit_code == 2 and "cur.csv: line 3 has 3 fields where the header has 16" in r.output
    no_traceback(r)


def test_shared_source_flags_and_checks_before_computing(tmp_path):
    import click

    from iddpm_eval.cli.experiment import resolve_spec
    from iddpm_eval.cli.fid import run_compare, source_options
    from iddpm_eval.cli.outputs import check_results

    cmd = source_options(click.command()(lambda **kw: None))
    names = {p.name for p in cmd.params}
    assert {"mode", "features", "num", "seed", "results", "experiment", "save_features", "sampler"} <= names
    with pytest.raises(click.UsageError, match="--experiment must not be empty"):
        check_results(tmp_path / "r.csv", " ")
    check_results(None, "")  # no table: nothing to check
    with pytest.raises(click.ClickException, match="no-such-source"):
        run_compare(str(tmp_path / "no-such-source"), str(tmp_path / "b"), as_json=False, results=None,
                    experiment=None, no_progress=True)
    spec = tmp_path / "exp.toml"
    spec.write_text("")
    assert resolve_spec(str(spec), None) == (spec, tmp_path.name)
    with pytest.raises(click.UsageError, match="give a path or --suite"):
        resolve_spec("nothing-here", None)
