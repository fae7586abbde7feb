"""Sweeps as jobs: TOML specs (and their refusals, before anything is submitted), the local
launcher (parallel jobs, kill -9, preemption requeue, rerun of unfinished runs only, --status).
The Slurm launcher on a real one-node cluster: tests/test_sweep_slurm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from iddpm_core import sweep as sw
from iddpm_core.sweep_spec import load_spec

REPO = Path(__file__).resolve().parent.parent

TINY_SPEC = """
name = "tiny"
[grid]
widths = [8, 16]
steps = [1, 3]
[model]
channel_mult = [1, 2]
num_heads = 1
[diffusion]
steps = 20
[train]
data = "digits"
batch_size = 8
ema_rates = [0.9]
sample_num = 4
sample_steps = "3"
sample_interval = 0
log_interval = 1
save_interval = 1
[eval]
hook = "sweep_job_hook:evaluate"
"""

# The evaluation hook the jobs import by name: a deterministic function of every EMA weight, which
# blocks once per run at the checkpoint named by a file block_<run>_<step> in $SWEEP_TEST_CTL
# (writing its pid to pid_<run> first) so that the test can kill or preempt the job there.
HOOK = '''
import os, time
from pathlib import Path


def evaluate(checkpoint, info):
    from iddpm_core.checkpoint import load_checkpoint

    ctl = Path(os.environ["SWEEP_TEST_CTL"])
    block, pid = ctl / f"block_{info['run']}_{info['step']}", ctl / f"pid_{info['run']}"
    if block.exists() and not pid.exists():
        pid.write_text(str(os.getpid()))
        t0 = time.time()
        while time.time() - t0 < 600:
            time.sleep(0.05)
        raise RuntimeError("nobody killed me")
    ema = next(iter(load_checkpoint(checkpoint)["ema"].values()))
    total = sum(float(v.double().abs().sum()) for v in ema.values())
    return {"fid": total, "nll": 1.0 + 1.0 / info["step"], "weights_l1": total}
'''

# columns that hold results (not when, where or by which job they were made)
RESULT_COLS = ["run", "run_index", "width", "depth", "objective", "schedule", "seed", "step", "params",
               "train_flops", "images_seen", "flops_per_image", "fid", "nll", "weights_l1", "checkpoint",
               "config_hash", "config", "eval_settings", "eval_hook"]


def write_spec(path: Path, text: str = TINY_SPEC, extra: str = "") -> Path:
    path.write_text(textwrap.dedent(text) + textwrap.dedent(extra))
    return path


@pytest.fixture
def hook_env(tmp_path, monkeypatch):
    """The hook module on PYTHONPATH (this process and its jobs), a control folder for it."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sweep_job_hook.py").write_text(HOOK)
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    monkeypatch.syspath_prepend(str(hooks))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hooks), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SWEEP_TEST_CTL", str(ctl))
    return ctl


# ----------------------------------------------------------------------------- specs

def test_spec_grid_and_overrides(tmp_path):
    path = write_spec(tmp_path / "s.toml", extra="""
        [launcher]
        name = "slurm"
        partition = "debug"
        time = 30
        sbatch = ["--qos=high"]
    """)
    spec = load_spec(path, {"train": {"lr": 3e-4}})
    assert [r.name for r in spec.runs] == ["w8_d1", "w16_d1"] and spec.name == "tiny"
    assert all(r.steps == (1, 3) and r.config.train.steps == 3 for r in spec.runs)
    cfg = spec.runs[1].config
    assert (cfg.model.base_channels, cfg.model.channel_mult, cfg.model.image_size) == (16, (1, 2), 8)
    assert cfg.train.lr == 3e-4 and cfg.train.save_interval == 1 and cfg.diffusion.steps == 20
    assert spec.eval_hook == "sweep_job_hook:evaluate" and spec.eval_settings == {}
    assert spec.launcher == {"name": "slurm", "partition": "debug", "time": 30, "sbatch": ["--qos=high"]}
    axes = load_spec(write_spec(tmp_path / "a.toml", TINY_SPEC.replace("steps = [1, 3]", """steps = [1, 3]
        objectives = ["hybrid", "simple"]
        seeds = [0, 1]""").replace("steps = 20", "steps = 40")))
    assert [r.name for r in axes.runs][:3] == ["w8_d1_hybrid_s0", "w8_d1_hybrid_s1", "w8_d1_simple_s0"]
    assert len(axes.runs) == 8 and axes.runs[3].config.diffusion.loss == "simple"


@pytest.mark.parametrize("change, message", [
    (("[grid]", "[grid]\nheight = [3]"), "grid: unknown key(s) ['height']"),
    (("name = \"tiny\"", "name = \"tiny\"\nowner = \"me\""), "unknown key(s) ['owner']"),
    (("batch_size = 8", "batch_size = \"8\""), "train.batch_size: expected int, got string '8'"),
    (("num_heads = 1", "num_heads = 1\nnum_haeds = 2"), "model: unknown key(s) ['num_haeds']"),
    (("widths = [8, 16]", "widths = []"), "grid.widths: empty array"),
    (("widths = [8, 16]", "widths = [8, \"16\"]"), "grid.widths: expected integers, got string '16'"),
    (("steps = [1, 3]", "steps = 3"), "grid.steps: expected an array, got integer 3"),
    (("widths = [8, 16]", "depths = [1]"), "missing the axis 'widths'"),
    (("[train]", "[train]\nsteps = 5"), "train.steps is set by the grid's 'steps' axis"),
    (("[eval]", "[launcher]\nmax_parallel = 0\n[eval]"), "launcher.max_parallel: must be >= 1"),
    (("[eval]", "[launcher]\npartiton = \"gpu\"\n[eval]"), "launcher: unknown key(s) ['partiton']"),
    (("[eval]", "[launcher]\nname = \"pbs\"\n[eval]"), "launcher.name: unknown launcher 'pbs'"),
    (("[eval]", "[launcher]\nsbatch = [\"qos=high\"]\n[eval]"), "launcher.sbatch: expected flags like"),
    (("[eval]", "[launcher]\ntime = \"1:00:00\"\n[eval]"), "launcher.time: expected int, got string"),
    (("num_heads = 1", "num_heads = 3"), "[model]: 16 channels at resolution 4 do not split into num_heads=3"),
])
def test_spec_refusals_name_the_key(tmp_path, change, message):
    path = write_spec(tmp_path / "bad.toml", TINY_SPEC.replace(*change))
    with pytest.raises(sw.SweepError) as err:
        load_spec(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_cli_refuses_bad_spec_and_eval_settings_before_submitting(tmp_path, hook_env):
    from iddpm_core.cli_sweep import sweep

    out = tmp_path / "out"
    cases = [(TINY_SPEC.replace("widths = [8, 16]", "widths = []"), "grid.widths: empty array"),
             (TINY_SPEC.replace('hook = "sweep_job_hook:evaluate"', 'fid_nmu = 3'), "unknown key(s) ['fid_nmu']"),
             (TINY_SPEC.replace('hook = "sweep_job_hook:evaluate"', 'fid_num = "many"'),
              "fid_num: expected an integer, got str 'many'"),
             (TINY_SPEC.replace('hook = "sweep_job_hook:evaluate"', 'hook = "no_such_module_x:f"'),
              "cannot import no_such_module_x")]
    for text, message in cases:
        r = CliRunner().invoke(sweep, ["--spec", str(write_spec(tmp_path / "s.toml", text)), "--out", str(out)])
        assert r.exit_code == 2 and message in r.output, (message, r.output)
        assert not (out / "submitit").exists() and not (out / "jobs").exists()  # nothing submitted


# ----------------------------------------------------------------------------- the local launcher

def _sweep(spec: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "iddpm_core.cli_sweep", "--spec", str(spec), "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def _wait_for(paths, proc, timeout=240):
    t0 = time.time()
    while not all(p.exists() and p.read_text() for p in paths):
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended early: {proc.stdout.read()}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"waited {timeout} s for {paths}")
        time.sleep(0.1)


def test_local_jobs_parallel_kill9_preemption_and_rerun(tmp_path, hook_env):
    """Two jobs run at once (both block in their hook at the same time); one is killed with
    SIGKILL, the other gets SIGUSR2 (a preemption) and is requeued by submitit's checkpointing
    protocol within the same sweep; the rerun submits only the killed run; the final table equals
    that of an uninterrupted sweep."""
    spec = write_spec(tmp_path / "s.toml")
    ref = _sweep(spec, tmp_path / "ref", "--max-parallel", "2", "--no-progress")
    ref_out = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, ref_out
    reference = pd.read_csv(tmp_path / "ref" / sw.TABLE)

    out = tmp_path / "out"
    for run in ("w8_d1", "w16_d1"):
        (hook_env / f"block_{run}_1").write_text("")
    proc = _sweep(spec, out, "--max-parallel", "2")
    pids = [hook_env / "pid_w8_d1", hook_env / "pid_w16_d1"]
    _wait_for(pids, proc)  # both jobs are inside their hook now: they run in parallel
    os.kill(int(pids[0].read_text()), signal.SIGKILL)
    os.kill(int(pids[1].read_text()), signal.SIGUSR2)
    first = proc.communicate(timeout=600)[0]
    assert proc.returncode == 1, first
    assert "w8_d1: job" in first and "INTERRUPTED" in first and "rerun the same command" in first
    events = [e["event"] for e in sw.read_log(out / "runs" / "w16_d1")]
    assert "requeued" in events and events[-1] == "job completed", events
    assert events.count("job started") == 2

    from iddpm_core.cli_sweep import sweep

    r = CliRunner().invoke(sweep, ["--status", str(out)])
    assert r.exit_code == 0, r.output
    lines = {ln.split()[0]: ln for ln in r.output.splitlines()[1:] if ln.startswith("w")}
    assert "INTERRUPTED" in lines["w8_d1"] and "0/2" in lines["w8_d1"]  # killed while evaluating step 1
    assert "COMPLETED" in lines["w16_d1"] and "2/2" in lines["w16_d1"]

    again = _sweep(spec, out, "--max-parallel", "2")
    second = again.communicate(timeout=600)[0]
    assert again.returncode == 0, second
    assert "submitted 1 job(s), 1 run(s) already complete" in second and "submitted w8_d1" in second
    table = pd.read_csv(out / sw.TABLE)
    pd.testing.assert_frame_equal(table[RESULT_COLS], reference[RESULT_COLS])
    assert table["job_id"].notna().all() and table["git_commit"].notna().all()
    # a third run has nothing to do
    third = _sweep(spec, out)
    assert "submitted 0 job(s), 2 run(s) already complete" in third.communicate(timeout=300)[0]
