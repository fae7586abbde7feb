"""Atomic writes: stale temporary files of killed writers are removed on the next run; output
paths are checked for writability before any work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iddpm_core import io as cio

ROOT = Path(__file__).resolve().parent.parent


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _touch(path: Path, age_s: float = 0.0, data: bytes = b"") -> Path:
    path.write_bytes(data)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def test_stale_temps_go_live_ones_and_user_files_stay(tmp_path):
    host, dead, me = cio.host_tag(), _dead_pid(), os.getpid()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    hour = cio.STALE_AGE_S
    gone = [
        _touch(tmp_path / f".latest.pt.{host}-{dead}.ab12cd34.pt"),            # writer dead: at once
        _touch(tmp_path / f".t.csv.{other_host}-{me}.ab12cd34.csv", hour + 60),  # other host, old
        _touch(tmp_path / ".t.csv.k2j3h4l5.csv", hour + 60, b"x" * 1000),       # old naming, old
        _touch(tmp_path / ".latest.pt.zz_9yy8x.pt", hour + 60),
    ]
    kept = [
        _touch(tmp_path / f".latest.pt.{host}-{me}.ab12cd34.pt"),              # a live writer (this process)
        _touch(tmp_path / f".t.csv.{other_host}-{dead}.ab12cd34.csv"),         # maybe live on its host
        _touch(tmp_path / ".t.csv.k2j3h4l5.csv.keep"),                         # not a temp name
        _touch(tmp_path / ".u.csv.k2j3h4l5.csv"),                              # old naming, recent
        _touch(tmp_path / ".bashrc", hour * 24),                               # a user's dotfile
        _touch(tmp_path / ".profile.backup12", hour * 24),                     # no suffix to match: not ours
        _touch(tmp_path / "t.csv.k2j3h4l5.csv", hour * 24),                    # not hidden
    ]
    cio.write_text(tmp_path / "t.csv", "a\n")  # the first atomic write into the folder cleans it
    assert sorted(p.name for p in gone if p.exists()) == []
    assert all(p.exists() for p in kept), [p.name for p in kept if not p.exists()]
    assert (tmp_path / "t.csv").read_text() == "a\n"


def test_temp_of_a_killed_writer_is_removed_by_the_next_run(tmp_path):
    # A real kill -9 while the temporary file is open: the next process's write removes it.
    code = ("import sys, time; from iddpm_core.io import atomic_path\n"
            "with atomic_path(sys.argv[1]) as t:\n"
            "    t.write_bytes(b'partial'); print(t, flush=True); time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    target = tmp_path / "latest.pt"
    p = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    tmp = Path(p.stdout.readline().strip())
    assert tmp.exists() and tmp.name.startswith(f".latest.pt.{cio.host_tag()}-{p.pid}.")
    # while the writer lives, a cleanup leaves its file alone
    assert cio.remove_stale_temps(tmp_path) == [] and tmp.exists()
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stdout.close()
    assert tmp.exists() and not target.exists()  # what the kill leaves behind
    subprocess.run([sys.executable, "-c", "import sys; from iddpm_core.io import write_bytes; "
                    "write_bytes(sys.argv[1], b'ok')", str(target)], check=True, env=env)
    assert not tmp.exists() and target.read_bytes() == b"ok"
    assert [q.name for q in tmp_path.iterdir()] == ["latest.pt"]


def test_check_writable(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("x")
    assert cio.check_writable(f) == f and cio.check_writable(tmp_path / "a" / "b", folder=True)
    os.chmod(f, 0o444)  # refused by its mode bits, even for root
    with pytest.raises(cio.NotWritableError, match=r"t\.csv: the file is read-only \(mode 0444\)"):
        cio.check_writable(f, what="results table")
    os.chmod(f, 0o644)
    with pytest.raises(cio.NotWritableError, match="exists and is not a folder"):
        cio.check_writable(f, folder=True)
    with pytest.raises(cio.NotWritableError, match=r"t\.csv is not a folder"):
        cio.check_writable(f / "sub" / "x.npz")
    with pytest.raises(cio.NotWritableError, match="is a folder, not a file"):
        cio.check_writable(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        with pytest.raises(cio.NotWritableError, match=r"output .*ro/new: folder .*ro is not writable \(mode 0555\)"):
            cio.check_writable(ro / "new", folder=True)
    finally:
        os.chmod(ro, 0o755)
