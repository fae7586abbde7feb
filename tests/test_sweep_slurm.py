"""The Slurm launcher on a real one-node Slurm cluster started on this machine by
scripts/slurm_local.sh (Debian's slurm-wlm and munge, installed by the script when missing; needs
root). When the cluster cannot be started the test FAILS with the reason; it is never skipped
silently. A developer without root may skip it explicitly with IDDPM_SKIP_SLURM=1 (or -m "not slurm").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from iddpm_core import sweep as sw
from test_sweep_jobs import RESULT_COLS, _wait_for, hook_env, write_spec  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "slurm_local.sh"

pytestmark = pytest.mark.slurm


@pytest.fixture
def slurm_cluster(tmp_path, monkeypatch):
    """A running one-node cluster; SLURM_CONF set for this process and its children. The daemons
    are stopped by their PIDs at the end."""
    if os.environ.get("IDDPM_SKIP_SLURM") == "1":
        pytest.skip("IDDPM_SKIP_SLURM=1: the Slurm integration test was skipped on request")
    if os.geteuid() != 0:
        pytest.fail("the Slurm integration test needs root (it installs slurm-wlm/munge and starts slurmctld, "
                    "slurmd and munged); run it as root, or skip it explicitly with IDDPM_SKIP_SLURM=1")
    d = tmp_path / "slurm"
    done = subprocess.run(["bash", str(SCRIPT), "start", str(d)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    if done.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, timeout=60)
        pytest.fail(f"could not start Slurm with {SCRIPT}: {done.stderr.strip()[-2000:]}")
    monkeypatch.setenv("SLURM_CONF", str(d / "slurm.conf"))
    try:
        yield d
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, timeout=60)
        for pid_file in ("slurmctld.pid", "slurmd.pid", "munged.pid"):
            assert not (d / pid_file).exists()


def _sweep(*args: str, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "iddpm_core.cli_sweep", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)


def test_slurm_sweep_scancel_and_rerun(tmp_path, hook_env, slurm_cluster):
    spec = write_spec(tmp_path / "s.toml")
    out = tmp_path / "out"
    slurm = ["--launcher", "slurm", "--time", "10", "--cpus-per-task", "1", "--max-parallel", "2", "--wait"]

    # an option Slurm refuses is an error naming it, before anything is submitted
    bad = _sweep("--spec", str(spec), "--out", str(out), *slurm, "--partition", "nosuchpartition")
    text = bad.communicate(timeout=120)[0]
    assert bad.returncode == 2 and "--partition=nosuchpartition" in text and "invalid partition" in text, text
    assert not (out / "jobs").exists()

    # the reference: the same grid, uninterrupted, one thread, in one process
    ref = _sweep("--spec", str(spec), "--out", str(tmp_path / "ref"), "--launcher", "inline", "--no-progress",
                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    ref_text = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, ref_text

    (hook_env / "block_w8_d1_1").write_text("")
    first = _sweep("--spec", str(spec), "--out", str(out), *slurm)
    _wait_for([hook_env / "pid_w8_d1"], first)  # w8_d1's job is evaluating step 1
    job = json.loads((out / "jobs" / "w8_d1.json").read_text())
    assert job["launcher"] == "slurm"
    subprocess.run(["scancel", job["job_id"]], check=True, timeout=60)
    text = first.communicate(timeout=600)[0]
    assert first.returncode == 1 and f"w8_d1: job {job['job_id']} CANCELLED" in text, text

    status = _sweep("--status", str(out))
    st = status.communicate(timeout=120)[0]
    lines = {ln.split()[0]: ln for ln in st.splitlines() if ln.startswith("w")}
    assert "CANCELLED" in lines["w8_d1"] and "COMPLETED" in lines["w16_d1"], st

    again = _sweep("--spec", str(spec), "--out", str(out), *slurm)
    text = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and "submitted 1 job(s), 1 run(s) already complete" in text, text
    table = pd.read_csv(out / sw.TABLE)
    reference = pd.read_csv(tmp_path / "ref" / sw.TABLE)
    pd.testing.assert_frame_equal(table[RESULT_COLS], reference[RESULT_COLS])
    rerun = json.loads((out / "jobs" / "w8_d1.json").read_text())
    assert rerun["job_id"] != job["job_id"] and Path(rerun["stdout"]).exists()
    assert set(table.loc[table["run"] == "w8_d1", "job_id"].astype(str)) == {rerun["job_id"]}
