"""Sweeps in one process: grid, rerun/interruption behaviour, table columns, the evaluation hook
against the standalone FID and bits/dim commands, and the CLI (``--launcher inline``). Jobs, specs
and launchers: tests/test_sweep_jobs.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from iddpm_core import sweep as sw
from iddpm_core import sweep_grid as sg
from iddpm_core.config import RunConfig
from iddpm_core.config import complete_model_config

REPO = Path(__file__).resolve().parent.parent
TINY = {"model": {"channel_mult": [1, 2], "num_heads": 1},
        "diffusion": {"steps": 20},
        "train": {"data": "digits", "batch_size": 8, "ema_rates": [0.9], "sample_num": 4, "sample_steps": "3",
                  "sample_interval": 0, "log_interval": 1}}
TINY_FLAGS = ["--channel-mult", "1,2", "--num-heads", "1", "--diffusion-steps", "20", "--batch-size", "8",
              "--ema-rates", "0.9", "--sample-num", "4", "--sample-steps", "3", "--sample-interval", "0",
              "--log-interval", "1", "--no-progress"]


def tiny_base(**train) -> RunConfig:
    d = json.loads(json.dumps(TINY))
    d["train"].update(train)
    complete_model_config(d)
    return RunConfig.from_dict(d)


class FakeTrainer:
    """Stands in for iddpm_core.train.train in tests of the sweep's bookkeeping: writes a checkpoint
    of the untrained model with the trainer's fields (step, images seen, FLOPs = 3 x params x images)."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, out_dir, resume=None, progress=True, callback=None):
        from iddpm_core.checkpoint import save_checkpoint
        from iddpm_core.ema import rate_key
        from iddpm_core.models import build_model
        from iddpm_core.models.cost import count_parameters

        self.calls.append((Path(out_dir).name, cfg.train.steps, resume))
        torch.manual_seed(cfg.model.base_channels)
        model = build_model(cfg.model)
        step, n = cfg.train.steps, count_parameters(model)
        images = step * cfg.train.batch_size
        extra = dict(diffusion_config=cfg.diffusion.to_dict(), train_config=cfg.train.to_dict(),
                     ema={rate_key(r): model.state_dict() for r in cfg.train.ema_rates}, step=step,
                     images_seen=images, train_flops=3 * n * images, flops_per_image=3 * n, num_parameters=n)
        ck = Path(out_dir) / "checkpoints"
        save_checkpoint(ck / f"ckpt_{step:06d}.pt", model, cfg.model, **extra)
        save_checkpoint(ck / "latest.pt", model, cfg.model, **extra)
        return {"step": step}


def weight_checksum(checkpoint: str, info: dict) -> dict:
    """A deterministic 'evaluation': numbers that change with every weight of the EMA model."""
    from iddpm_core.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    ema = next(iter(ck["ema"].values()))
    total = sum(float(v.double().abs().sum()) for v in ema.values())
    return {"fid": total, "fid_ci_low": total - 1, "fid_ci_high": total + 1, "nll": 1.0 + 1.0 / info["step"],
            "nll_stderr": 0.01, "weights_l1": total}


# ----------------------------------------------------------------------------- grid and split

def test_grid_names_configs_and_axes():
    base = tiny_base()
    runs = sg.make_grid(base, [8, 16, 24], [1, 2], [4, 2])
    assert [r.name for r in runs] == ["w8_d1", "w8_d2", "w16_d1", "w16_d2", "w24_d1", "w24_d2"]
    assert all(r.steps == (2, 4) and r.config.train.steps == 4 for r in runs)
    assert [(r.config.model.base_channels, r.config.model.num_res_blocks) for r in runs] == \
        [(8, 1), (8, 2), (16, 1), (16, 2), (24, 1), (24, 2)]
    assert base.model.base_channels != 24 or base.model.num_res_blocks == 1  # base left alone
    # identity: same config -> same hash whatever the length or logging; other width -> other hash
    again = sg.make_grid(tiny_base(log_interval=7), [8], [1], [9])[0]
    assert again.config_hash == runs[0].config_hash
    assert sg.make_grid(tiny_base(lr=3e-4), [8], [1], [2])[0].config_hash != runs[0].config_hash
    assert len({r.config_hash for r in runs}) == len(runs)
    for bad in ([0], [8, 8], []):
        with pytest.raises(sw.SweepError, match="widths"):
            sg.make_grid(base, bad, [1], [2])
    # the other axes: objectives set loss, variance and the network's sigma output; names carry them
    longer = RunConfig.from_dict({**base.to_dict(), "diffusion": {**base.diffusion.to_dict(), "steps": 40}})
    grid = sg.make_grid(longer, [8], [1], [2], objectives=["hybrid", "simple"], schedules=["linear"], seeds=[0, 3])
    assert [r.name for r in grid] == ["w8_d1_hybrid_linear_s0", "w8_d1_hybrid_linear_s3",
                                      "w8_d1_simple_linear_s0", "w8_d1_simple_linear_s3"]
    simple = grid[2].config
    assert (simple.diffusion.loss, simple.diffusion.var_type, simple.model.learn_sigma) == ("simple", "fixed_large",
                                                                                              False)
    assert grid[0].config.model.learn_sigma and grid[1].config.train.seed == 3
    assert all(r.config.diffusion.schedule == "linear" for r in grid)
    assert len({r.config_hash for r in grid}) == 4
    with pytest.raises(sw.SweepError, match="objectives.*'l2'"):
        sg.make_grid(base, [8], [1], [2], objectives=["l2"])
    with pytest.raises(sw.SweepError, match="seeds"):
        sg.make_grid(base, [8], [1], [2], seeds=[])
    with pytest.raises(sw.SweepError, match="w8_d1_linear: linear schedule needs T > 20"):  # T = 20 here
        sg.make_grid(base, [8], [1], [2], schedules=["linear"])
    heads5 = tiny_base()
    heads5.model.num_heads = 5
    with pytest.raises(sw.SweepError, match="w6_d1"):  # 12 channels at the attention level, 5 heads
        sg.make_grid(heads5, [6], [1], [2])


# ----------------------------------------------------------------------------- reruns (fake trainer)

def test_rerun_skips_finished_fills_missing_evaluations_and_extends(tmp_path):
    fake = FakeTrainer()
    runs = sg.make_grid(tiny_base(), [8, 16], [1], [2, 4])
    r1 = sw.run_sweep(tmp_path, runs, None, train_fn=fake, progress=False, command="cmd one")
    assert len(fake.calls) == 4 and r1.rows == 4 and r1.evaluated == []
    table = pd.read_csv(tmp_path / sw.TABLE)
    assert table["fid"].isna().all() and list(table["step"]) == [2, 4, 2, 4]
    # training columns come from inside the checkpoints
    assert (table["train_flops"] == 3 * table["params"] * table["images_seen"]).all()
    assert (table["images_seen"] == table["step"] * 8).all()

    # with an evaluator: nothing is trained again, every checkpoint gets its evaluation
    r2 = sw.run_sweep(tmp_path, runs, weight_checksum, train_fn=fake, progress=False, command="cmd two")
    assert len(fake.calls) == 4 and r2.trained == [] and len(r2.evaluated) == 4
    table = pd.read_csv(tmp_path / sw.TABLE)
    assert table["fid"].notna().all() and table["eval_hook"].str.endswith("test_sweep:weight_checksum").all()
    assert (table["command"] == "cmd two").all()

    # third run: all complete -> skipped, table byte-identical
    before = (tmp_path / sw.TABLE).read_bytes()
    r3 = sw.run_sweep(tmp_path, runs, weight_checksum, train_fn=fake, progress=False)
    assert r3.skipped == ["w8_d1", "w16_d1"] and r3.trained == r3.evaluated == []
    assert (tmp_path / sw.TABLE).read_bytes() == before

    # more checkpoint steps: only the new segment is trained, resuming
    longer = sg.make_grid(tiny_base(), [8, 16], [1], [2, 4, 6])
    r4 = sw.run_sweep(tmp_path, longer, weight_checksum, train_fn=fake, progress=False)
    assert r4.trained == ["w8_d1@6", "w16_d1@6"] and fake.calls[-1] == ("w16_d1", 6, "auto")
    assert len(pd.read_csv(tmp_path / sw.TABLE)) == 6

    # a step the run passed without a checkpoint cannot be made
    with pytest.raises(sw.SweepError, match="already trained to step 6"):
        sw.run_sweep(tmp_path, sg.make_grid(tiny_base(), [8], [1], [5]), None, train_fn=fake, progress=False)
    # another config in the same folder is refused, naming the field
    with pytest.raises(sw.SweepError, match="train.lr"):
        sw.run_sweep(tmp_path, sg.make_grid(tiny_base(lr=1e-3), [8, 16], [1], [2]), None, train_fn=fake,
                     progress=False)
    with pytest.raises(sw.SweepError, match="sweep.json"):
        sw.run_sweep(tmp_path, runs, weight_checksum, eval_settings={"fid_num": 9}, train_fn=fake, progress=False)


def test_only_and_torchrun_refusal(tmp_path, monkeypatch):
    fake = FakeTrainer()
    grid = sg.make_grid(tiny_base(), [8, 16, 24, 32], [1], [2])
    r = sw.run_sweep(tmp_path, grid, None, only=["w24_d1"], train_fn=fake, progress=False)
    assert r.trained == ["w24_d1@2"] and r.rows == 1
    with pytest.raises(sw.SweepError, match="w99_d1"):
        sw.run_sweep(tmp_path, grid, None, only=["w99_d1"], train_fn=fake, progress=False)
    with monkeypatch.context() as m:
        m.setenv("WORLD_SIZE", "2")
        with pytest.raises(sw.SweepError, match="torchrun"):
            sw.run_sweep(tmp_path, grid, None, train_fn=fake, progress=False)


def test_table_columns_feed_scaling_fit(tmp_path):
    from iddpm_eval import scaling

    fake = FakeTrainer()

    def law(checkpoint, info):  # FID that follows 5 + 300 C^-0.25 exactly
        c = float(info["train_flops"])
        return {"fid": 5 + 300 * c ** -0.25, "nll": 1.5}

    runs = sg.make_grid(tiny_base(), [8, 16, 32], [1], [1, 3, 9])
    sw.run_sweep(tmp_path, runs, law, train_fn=fake, progress=False, command="x")
    table = scaling.read_table(tmp_path / sw.TABLE)
    for col in ("run", "params", "train_flops", "images_seen", "step", "fid", "fid_ci_low", "fid_ci_high", "nll",
                "nll_stderr", "width", "depth", "config_hash", "command", "git_commit", "config"):
        assert col in table.columns
    assert len(table) == 9 and table["git_commit"].astype(str).str.len().min() >= 7
    cfg = json.loads(table["config"][0])
    assert cfg["model"]["base_channels"] == 8 and cfg["train"]["steps"] == 9
    res = scaling.scaling_fit(table, "compute", "fid", points="all", n_boot=0, progress=False)
    assert res.fit.params["alpha"] == pytest.approx(0.25, rel=1e-3)
    assert res.fit.params["E"] == pytest.approx(5.0, rel=1e-2)


# ----------------------------------------------------------------------------- the real trainer

def test_interrupted_sweep_rerun_with_real_trainer(tmp_path):
    from iddpm_core.train import train

    class Stop(KeyboardInterrupt):
        pass

    def stopping_train(cfg, out_dir, **kw):
        def cb(step, model, ema, info):
            if Path(out_dir).name == "w16_d1" and step == 2:
                raise Stop()
        return train(cfg, out_dir, callback=cb, **kw)

    runs = sg.make_grid(tiny_base(), [8, 16], [1], [1, 3])
    with pytest.raises(Stop):
        sw.run_sweep(tmp_path, runs, weight_checksum, train_fn=stopping_train, progress=False)
    done = pd.read_csv(tmp_path / sw.TABLE)
    assert list(zip(done["run"], done["step"])) == [("w8_d1", 1), ("w8_d1", 3), ("w16_d1", 1)]
    ck8 = tmp_path / "runs" / "w8_d1" / "checkpoints" / "ckpt_000003.pt"
    stamp, rows8 = ck8.stat().st_mtime_ns, (tmp_path / "runs" / "w8_d1" / "rows.csv").read_bytes()

    res = sw.run_sweep(tmp_path, runs, weight_checksum, progress=False)
    assert res.skipped == ["w8_d1"] and res.trained == ["w16_d1@3"] and res.evaluated == ["w16_d1@3"]
    assert ck8.stat().st_mtime_ns == stamp and (tmp_path / "runs" / "w8_d1" / "rows.csv").read_bytes() == rows8
    log = sw.read_log(tmp_path / "runs" / "w16_d1")
    assert [(e["event"], e["step"]) for e in log] == [("trained", 1), ("evaluated", 1), ("trained", 3),
                                                     ("evaluated", 3)]
    table = pd.read_csv(tmp_path / sw.TABLE)
    assert len(table) == 4 and not table.duplicated(["run", "step"]).any()

    # the interrupted-and-resumed run ends with the same weights as one trained straight to step 3
    sw.run_sweep(tmp_path / "straight", sg.make_grid(tiny_base(), [16], [1], [3]), weight_checksum, progress=False)
    straight = pd.read_csv(tmp_path / "straight" / sw.TABLE)
    got = table[(table["run"] == "w16_d1") & (table["step"] == 3)].iloc[0]
    assert got["weights_l1"] == pytest.approx(straight["weights_l1"][0], rel=1e-6)
    assert got["train_flops"] == straight["train_flops"][0] and got["images_seen"] == 24


# ----------------------------------------------------------------------------- evaluation hook

def test_eval_hook_matches_standalone_fid_and_nll(tmp_path):
    from iddpm_eval import nll, sources, sweep_eval
    from iddpm_eval.fid import fid_lowrank

    fake = FakeTrainer()
    runs = sg.make_grid(tiny_base(), [8], [1], [2])
    settings = {"fid_num": 10, "fid_ref_num": 12, "fid_steps": 3, "fid_sampler": "ddim", "fid_bootstrap": 30,
                "nll_num": 4, "nll_estimate": 3, "seed": 5}
    sw.run_sweep(tmp_path, runs, sweep_eval.evaluate_checkpoint, eval_settings=settings, train_fn=fake,
                 progress=False)
    row = pd.read_csv(tmp_path / sw.TABLE).iloc[0]
    ckpt = tmp_path / row["checkpoint"]
    samples = tmp_path / "runs" / "w8_d1" / "eval" / "step_000002" / "samples.npz"
    # the samples are those of the checkpoint (EMA weights, DDIM 3 steps, seed 5)
    from iddpm_core.sample import sample_images

    with np.load(samples) as z:
        np.testing.assert_array_equal(z["arr_0"], sample_images(str(ckpt), 10, 3, "ddim", seed=5, batch_size=256,
                                                                progress=False))
    # FID from the features `iddpm-eval fid samples.npz digits --num 12 --seed 5` would extract
    fx = sources.make_extractor()
    feats = [sources.measure(sources.resolve(spec), lambda: fx, mode="legacy-tf", need_features=True, num=num,
                             seed=5, progress=False).pool for spec, num in ((str(samples), None), ("digits", 12))]
    assert row["fid"] == pytest.approx(fid_lowrank(*feats), rel=1e-6)
    assert row["fid_n"] == 10 and row["fid_ref_n"] == 12 and row["fid_method"] == "lowrank"
    assert row["weights_sha256"] == fx.weights_sha256
    assert np.isfinite([row["fid_ci_low"], row["fid_ci_high"]]).all() and row["fid_ci_low"] < row["fid_ci_high"]
    assert row["fid_ci_method"] == "bootstrap-percentile-bias-shifted"
    # the same bits/dim as `iddpm-eval nll --estimate 3 --num 4 --seed 5`
    alone = nll.evaluate(str(ckpt), "digits", out_dir=tmp_path / "nll_alone", num=4, estimate=3, seed=5,
                         progress=False)
    assert row["nll"] == pytest.approx(alone["bpd"], rel=1e-12)
    assert row["nll_stderr"] == pytest.approx(alone["bpd_stderr"], rel=1e-12)
    assert row["nll_method"] == "estimate3" and row["nll_n"] == 4
    assert len(list((tmp_path / "eval_cache").glob("ref_*.npz"))) == 1
    with pytest.raises(ValueError, match="fid_nmu"):
        sweep_eval.settings({"eval": {"fid_nmu": 3}})


# ----------------------------------------------------------------------------- CLI

def test_cli_sweep_records_command_and_refuses_bad_flags(tmp_path, monkeypatch):
    from iddpm_core import cli_sweep

    fake = FakeTrainer()
    monkeypatch.setattr("iddpm_core.train.train", fake)
    monkeypatch.setattr(sys, "argv", ["iddpm-train", "sweep", "--widths", "8,16", "--steps", "2"])
    out = tmp_path / "s"
    args = ["--widths", "8,16", "--depths", "1", "--steps", "2", "--out", str(out), "--eval-hook", "none",
            "--launcher", "inline",
            "--table", str(tmp_path / "copy.csv"), *TINY_FLAGS]
    r = CliRunner().invoke(cli_sweep.sweep, args)
    assert r.exit_code == 0, r.output
    assert "trained 2 segment(s)" in r.output
    table = pd.read_csv(out / sw.TABLE)
    assert (table["command"] == "iddpm-train sweep --widths 8,16 --steps 2").all()
    assert (tmp_path / "copy.csv").read_bytes() == (out / sw.TABLE).read_bytes()
    cfg = json.loads(table["config"][1])
    assert cfg["model"]["base_channels"] == 16 and cfg["diffusion"]["steps"] == 20
    assert cfg["train"]["batch_size"] == 8 and cfg["model"]["image_size"] == 8
    r = CliRunner().invoke(cli_sweep.sweep, args)
    assert r.exit_code == 0 and "trained 0 segment(s)" in r.output and "2 run(s) already complete" in r.output
    for bad, msg in ((["--eval-hook", "nomodule_xyz_123:f"], "cannot import"),
                     (["--eval-hook", "iddpm_core.sweep:nothing_here"], "no callable"),
                     (["--eval-hook", "justamodule"], "MODULE:FUNC"),
                     (["--launcher", "slurm", "--sbatch", "qos=high"], "--qos=high"),
                     (["--spec", "x.toml"], "--widths/--depths/--steps"),
                     (["--widths", "8,x"], "integers")):
        r = CliRunner().invoke(cli_sweep.sweep, args + bad)
        assert r.exit_code == 2 and msg in r.output, (bad, r.output)
    # the default hook missing (iddpm_eval not installed) -> a warning, training columns only
    assert cli_sweep.resolve_hook("nomodule_xyz_123:evaluate", explicit=False) is None


def test_one_job_prepare_run_one_run_done_and_merge_table(tmp_path):
    """What one job does, step by step: prepare the folder, train and record one run, then the table."""
    from iddpm_core.sweep import merge_table, prepare, read_rows, run_done, run_one

    fake = FakeTrainer()
    runs = sg.make_grid(tiny_base(), [8, 16], [1], [2, 4])
    prepare(tmp_path, runs, None)
    assert not run_done(tmp_path, runs[1], evaluated=False)
    res = run_one(tmp_path, runs[1], progress=False, train_fn=fake)
    assert run_done(tmp_path, runs[1], evaluated=False) and not run_done(tmp_path, runs[1], evaluated=True)
    assert not run_done(tmp_path, runs[0], evaluated=False)
    assert [c[1] for c in fake.calls] == [2, 4] and len(res.trained) == 2
    rows = read_rows(merge_table(tmp_path, tmp_path / "copy.csv"))
    assert [(r["run"], r["step"]) for r in rows] == [("w16_d1", "2"), ("w16_d1", "4")]
    assert (tmp_path / "copy.csv").read_bytes() == (tmp_path / sw.TABLE).read_bytes()
