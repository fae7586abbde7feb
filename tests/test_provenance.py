"""The shared record helpers of iddpm_core.provenance: command line, file lock, JSON cleaning."""

import json
import math
import subprocess
import sys

import pytest

from iddpm_core.provenance import command_line, file_lock, json_clean, source_root

# A second process tries the lock without waiting: exit 0 if it got it, 3 if it is held elsewhere.
TRY_LOCK = """
import fcntl, os, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(3)
sys.exit(0)
"""


def _try_lock(path) -> int:
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(path)]).returncode


def test_command_line_names_the_program_not_its_path():
    assert command_line(["/usr/local/bin/iddpm-train", "sweep", "--note", "a b"]) == "iddpm-train sweep --note 'a b'"
    root = source_root()
    assert command_line([str(root / "iddpm_core" / "cli_sweep.py"), "--widths", "8"]) == \
        "python -m iddpm_core.cli_sweep --widths 8"
    assert command_line([str(root / "iddpm_eval" / "cli" / "__main__.py"), "fid"]) == "python -m iddpm_eval.cli fid"
    assert command_line(["/tmp/elsewhere/script.py", "x"]) == "script.py x"  # not a module of the package
    assert command_line([]) == ""


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_file_lock_excludes_another_process(tmp_path, kind):
    path = tmp_path / "sub" / ".lock" if kind == "file" else tmp_path
    with file_lock(path):
        assert path.exists()
        assert _try_lock(path) == 3  # held by this process
    assert _try_lock(path) == 0  # released


def test_json_clean_replaces_non_finite_floats_everywhere():
    doc = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2, "x"), "e": None}
    clean = json_clean(doc)
    assert clean == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, "x"], "e": None}
    json.dumps(clean, allow_nan=False)  # valid JSON now
    with pytest.raises(ValueError):
        json.dumps(doc, allow_nan=False)
