"""`iddpm-train run`: flags, config files, data-derived sizes, resume through the CLI."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from iddpm_core.checkpoint import load_checkpoint
from iddpm_core.config import RunConfig

torch.set_num_threads(1)


def test_train_cli_run_and_resume(tmp_path):
    from iddpm_core.cli import train_main

    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--data", "digits", "--base-channels", "16", "--channel-mult", "1,2",
            "--diffusion-steps", "20", "--batch-size", "4", "--steps", "2", "--sample-interval", "0",
            "--sample-num", "4", "--sample-steps", "ddim3", "--ema-rates", "0.9,0.99", "--no-progress"]
    r = CliRunner().invoke(train_main, args)
    assert r.exit_code == 0, r.output
    stored = json.loads((out / "run_config.json").read_text())
    assert stored["model"]["image_size"] == 8 and stored["model"]["in_channels"] == 1  # taken from the data
    assert stored["train"]["ema_rates"] == [0.9, 0.99] and stored["diffusion"]["steps"] == 20
    assert stored["train"]["data_root"] is None  # flags left at a None default stay None
    r = CliRunner().invoke(train_main, ["run", "--out", str(out), "--resume", "auto", "--steps", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out / "checkpoints" / "latest.pt")["step"] == 3
    r = CliRunner().invoke(train_main, ["run", "--out", str(out), "--resume", "auto", "--steps", "4", "--lr", "1",
                                        "--no-progress"])
    assert r.exit_code == 2 and "train.lr" in r.output
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nsteps = 1\nbatch_size = 2\nsample_interval = 0\nsample_num = 2\nsample_steps = '2'\n"
                   "[diffusion]\nsteps = 20\n[model]\nbase_channels = 16\nchannel_mult = [1, 2]\n")
    r = CliRunner().invoke(train_main, ["run", "--config", str(cfg), "--out", str(tmp_path / "c"), "--no-progress",
                                        "--seed", "5"])
    assert r.exit_code == 0, r.output
    stored = RunConfig.from_file(tmp_path / "c" / "run_config.json")
    assert stored.train.seed == 5 and stored.train.batch_size == 2 and stored.model.image_size == 8


def test_train_cli_without_channel_mult_uses_the_default_for_the_image_size(tmp_path):
    from iddpm_core.cli import train_main
    from iddpm_core.models.config import ModelConfig

    out = tmp_path / "run"
    r = CliRunner().invoke(train_main, ["run", "--out", str(out), "--data", "digits", "--base-channels", "8",
                                        "--diffusion-steps", "20", "--batch-size", "2", "--steps", "1",
                                        "--sample-interval", "0", "--sample-num", "2", "--sample-steps", "2",
                                        "--no-progress"])
    assert r.exit_code == 0, r.output
    stored = ModelConfig.from_dict(json.loads((out / "run_config.json").read_text())["model"])
    assert stored.channel_mult is None
    assert stored.resolved_channel_mult() == ModelConfig(image_size=8, in_channels=1).resolved_channel_mult()
