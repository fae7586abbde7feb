"""After kills and resumes, TensorBoard, metrics.csv and callback_metrics.csv hold every logged step
exactly once, with the same numbers (read back with TensorBoard's own EventAccumulator)."""

from __future__ import annotations

import csv
import time

import pytest
import torch

from iddpm_core.config import RunConfig, TrainConfig
from iddpm_core.diffusion import DiffusionConfig
from iddpm_core.models import ModelConfig
from iddpm_core.train import train

torch.set_num_threads(1)


def _config(**kw) -> RunConfig:
    model = ModelConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), attention_resolutions=(),
                        num_heads=1)
    train_kw = dict(batch_size=4, steps=8, lr=1e-3, log_interval=1, sample_interval=0, save_interval=3,
                    sample_num=2, sample_steps="2", ema_rates=(0.9,))
    train_kw.update(kw)
    return RunConfig(model=model, diffusion=DiffusionConfig(steps=10), train=TrainConfig(**train_kw))


class Killed(RuntimeError):
    pass


def _callback(kill_at=None):
    def cb(step, model, ema, info):
        if step == kill_at:
            raise Killed(f"killed at step {step}")
        return {"probe": step * 0.5}
    return cb


def _next_second():
    """TensorBoard reads event files in name order, and the name holds the creation time in whole
    seconds and then a per-process counter (".9" sorts after ".10"): runs a second apart keep their order,
    as real resumes do."""
    time.sleep(1.05)


def _read(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(out / "callback_metrics.csv", newline="") as fh:
        cb_rows = list(csv.DictReader(fh))
    return ea, rows, cb_rows


def _assert_agree(out, steps):
    ea, rows, cb_rows = _read(out)
    assert [int(r["step"]) for r in rows] == steps
    for name in ("loss", "grad_norm", "images_seen"):
        events = ea.Scalars(f"train/{name}")
        assert [e.step for e in events] == steps, name
        for e, r in zip(events, rows):
            assert e.value == pytest.approx(float(r[name]), rel=1e-6), name  # float32 in TB, float64 in CSV
    assert [e.step for e in ea.Scalars("callback/probe")] == steps
    assert [int(r["step"]) for r in cb_rows] == steps
    assert [float(r["value"]) for r in cb_rows] == [s * 0.5 for s in steps]


def test_tensorboard_and_csvs_agree_after_two_kills_and_resumes(tmp_path):
    # run 1: checkpoint at step 3, killed at step 5 (steps 4-5 logged, then lost with the process)
    with pytest.raises(Killed):
        train(_config(), tmp_path, callback=_callback(kill_at=5), progress=False)
    _next_second()
    # run 2: resumes from 3, checkpoint at 6, killed at step 8 before the final checkpoint
    with pytest.raises(Killed):
        train(_config(), tmp_path, resume="auto", callback=_callback(kill_at=8), progress=False)
    _next_second()
    # run 3: resumes from 6 and finishes
    summary = train(_config(), tmp_path, resume="auto", callback=_callback(), progress=False)
    assert summary["step"] == 8
    _assert_agree(tmp_path, list(range(1, 9)))


def test_fresh_run_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    with pytest.raises(Killed):
        train(_config(steps=4, save_interval=0), tmp_path, callback=_callback(kill_at=3), progress=False)
    assert not (tmp_path / "checkpoints" / "latest.pt").exists()
    _next_second()
    train(_config(steps=4, save_interval=0), tmp_path, resume="auto", callback=_callback(), progress=False)
    _assert_agree(tmp_path, [1, 2, 3, 4])
