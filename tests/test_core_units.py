"""Small tests of iddpm_core helpers that the end-to-end tests only reach indirectly: seeding,
resume rules, the generated run-config flags, the trainer's logs, single-process distributed
helpers, sweep bookkeeping and file helpers."""

from __future__ import annotations

import io
import os
import pickle
import random

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from iddpm_core import distributed as dist_utils
from iddpm_core.cli_config import (build_run_config, config_file_option, config_flags, config_options, field_comments,
                                   given_fields)
from iddpm_core.config import (RESUMABLE_FIELDS, ResumeError, RunConfig, TrainConfig, check_resume_changes,
                               load_run_config)
from iddpm_core.seeding import rng_state, seed_process, set_rng_state


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


# ----------------------------------------------------------------------------- seeding

def test_rng_state_round_trip_and_seed_process():
    seed_process(5, 0)
    st = rng_state()
    first = _draws()
    set_rng_state(st)
    assert _draws() == first  # restored: the same draws again
    seed_process(5, 0)
    assert _draws() == first  # same (seed, rank): same stream
    seed_process(5, 1)
    assert _draws() != first  # another rank: another stream


# ----------------------------------------------------------------------------- resume rules

def test_check_resume_changes_and_load_run_config():
    stored = RunConfig().to_dict()
    check_resume_changes(stored, {"train": {"steps": 5, "device": "cpu"}})  # resumable fields may change
    with pytest.raises(ResumeError, match=r"model\.base_channels \(checkpoint 32, given 64\)"):
        check_resume_changes(stored, {"model": {"base_channels": 64}})
    assert "steps" in RESUMABLE_FIELDS and "lr" not in RESUMABLE_FIELDS
    ckpt = {"model_config": stored["model"], "diffusion_config": stored["diffusion"], "train_config": stored["train"]}
    assert load_run_config(ckpt, "x.pt").to_dict() == stored
    with pytest.raises(ResumeError, match="x.pt: checkpoint has no train_config"):
        load_run_config({"model_config": {}, "diffusion_config": {}}, "x.pt")


# ----------------------------------------------------------------------------- generated flags

def test_flags_come_from_the_config_fields():
    import dataclasses

    from iddpm_core.cli_config import HIDDEN

    assert field_comments(TrainConfig)["batch_size"] == "Per process"
    assert "slower than fp32" in field_comments(TrainConfig)["precision"]  # continued comment lines
    flags = config_flags()
    by_field = {(f.section, f.field): name for name, f in flags.items()}
    for f in dataclasses.fields(TrainConfig):  # every train field has its flag, named after it
        assert by_field[("train", f.name)] == f.name
    assert by_field[("model", "kind")] == "model_kind" and by_field[("diffusion", "steps")] == "diffusion_steps"
    assert not any(key in by_field for key in HIDDEN)
    names = [o.name for o in config_options(skip={"steps"})]
    assert "steps" not in names and "diffusion_steps" in names and config_file_option().name == "config_file"
    with pytest.raises(click.BadParameter, match="not comma-separated numbers") as info:
        flags["ema_rates"].value("0.9,x")
    assert "--ema-rates" in info.value.format_message()


def test_build_run_config_merges_file_then_explicit_flags(tmp_path):
    seen = {}

    @click.command()
    @click.pass_context
    def cmd(ctx, config_file, **values):
        seen["given"] = given_fields(ctx, values)
        seen["config"] = build_run_config(ctx, values, config_file)

    cmd.params.extend([config_file_option()] + config_options())
    (tmp_path / "c.toml").write_text("[train]\nlr = 0.5\nbatch_size = 3\ndata = \"digits\"\n")
    r = CliRunner().invoke(cmd, ["--config", str(tmp_path / "c.toml"), "--batch-size", "7", "--ema-rates", "0.9,0.99"])
    assert r.exit_code == 0, r.output
    assert seen["given"]["train"] == {"batch_size": 7, "ema_rates": (0.9, 0.99)}  # only the explicit flags
    cfg = RunConfig.from_dict(seen["config"])
    assert cfg.train.lr == 0.5 and cfg.train.batch_size == 7 and cfg.train.ema_rates == (0.9, 0.99)
    assert cfg.model.attention_resolutions == (4,)  # completed: largest level below 16 but not the image


# ----------------------------------------------------------------------------- trainer logs

def test_train_logs_keep_rows_up_to_the_resumed_step(tmp_path):
    from iddpm_core.train_logs import CSV_COLUMNS, MetricsCSV, TrainLogger, trim_callback_csv

    csv_path = tmp_path / "metrics.csv"
    log = MetricsCSV(csv_path, None)
    for step in (1, 2, 3):
        log.append({"step": step, "loss": 0.5, "mse": float("nan")})
    MetricsCSV(csv_path, 2)
    lines = csv_path.read_text().splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS) and [ln.split(",")[0] for ln in lines[1:]] == ["1", "2"]
    assert lines[1].split(",")[CSV_COLUMNS.index("mse")] == ""  # NaN written empty
    cb = tmp_path / "callback_metrics.csv"
    cb.write_text("step,name,value\n1,a,1.0\n5,a,2.0\n")
    trim_callback_csv(cb, 3)
    assert cb.read_text() == "step,name,value\n1,a,1.0\n"
    logger = TrainLogger(tmp_path, None)  # a fresh run starts both files anew
    assert not cb.exists() and csv_path.read_text() == ",".join(CSV_COLUMNS) + "\n"
    logger.metrics({"step": 1, "loss": 1.0})
    logger.callback(1, {"fid": 3, "note": "text"})
    logger.close()
    assert cb.read_text() == "step,name,value\n1,fid,3.0\n"
    assert len(csv_path.read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- one process

def test_distributed_helpers_in_a_single_process():
    assert not dist_utils.is_initialized() and dist_utils.is_main()
    assert dist_utils.get_rank() == 0 and dist_utils.get_world_size() == 1 and dist_utils.local_rank() == 0
    assert dist_utils.pick_device("cpu") == torch.device("cpu")
    assert dist_utils.init_from_env(torch.device("cpu")) is False  # WORLD_SIZE unset: no group
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(dist_utils.all_reduce_sum(t), t)
    assert dist_utils.all_gather_object({"a": 1}) == [{"a": 1}] and dist_utils.broadcast_object(7) == 7
    m = torch.nn.Linear(2, 1)
    m(t).sum().backward()
    grad = m.weight.grad.clone()
    dist_utils.average_gradients(m.parameters())
    dist_utils.broadcast_module(m)
    dist_utils.barrier()
    assert torch.equal(m.weight.grad, grad)  # one process: nothing to average


# ----------------------------------------------------------------------------- checkpoints, files

def test_load_weights_names_the_mismatch():
    from iddpm_core.checkpoint import load_weights

    model = torch.nn.Linear(2, 3)
    with pytest.raises(ValueError, match=r"w.pt: .*1 with another shape.*weight \(3, 3\) vs \(3, 2\)"):
        load_weights(model, {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, "w.pt")
    with pytest.raises(ValueError, match="1 missing.*bias"):
        load_weights(model, {"weight": torch.zeros(3, 2)}, "w.pt")
    load_weights(model, {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}, "w.pt")
    assert float(model.weight.detach().sum()) == 6.0


def test_plain_pickles_npz_and_temp_files(tmp_path):
    from iddpm_core.io import RefusedPickle, load_plain_pickle, open_npz, pid_alive, stale_temp

    data = {b"data": np.arange(4, dtype=np.uint8), b"labels": [1, 2]}
    back = load_plain_pickle(io.BytesIO(pickle.dumps(data, protocol=2)), encoding="bytes")
    assert np.array_equal(back[b"data"], data[b"data"]) and back[b"labels"] == [1, 2]
    with pytest.raises(RefusedPickle, match="os"):
        load_plain_pickle(io.BytesIO(pickle.dumps(os.getcwd)))
    np.savez(tmp_path / "a.npz", mu=np.ones(2))
    with open_npz(tmp_path / "a.npz") as z:
        assert "mu" in z and z["mu"].tolist() == [1.0, 1.0]
    assert pid_alive(os.getpid())
    (tmp_path / "plain.txt").write_text("x")
    assert not stale_temp(tmp_path / "plain.txt")  # not a temporary file of atomic_path


def test_check_precision():
    from iddpm_core.precision import check_precision

    assert check_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        check_precision("fp16")


def test_grid_png_and_scale(tmp_path):
    from PIL import Image

    from iddpm_core.sample import grid_scale, make_grid, save_png

    imgs = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    grid = make_grid(imgs)
    save_png(tmp_path / "g.png", grid, scale=grid_scale(8))
    back = np.asarray(Image.open(tmp_path / "g.png"))
    s = grid_scale(8)
    assert s >= 1 and back.shape[:2] == (grid.shape[0] * s, grid.shape[1] * s)
    assert np.array_equal(back[::s, ::s], grid)


# ----------------------------------------------------------------------------- sweep bookkeeping

def test_sweep_rows_hooks_and_launcher_helpers(tmp_path):
    from iddpm_core.launch import LauncherOptions, is_live, sbatch_flags
    from iddpm_core.sweep import load_hook, read_rows, worker_id, write_rows
    from iddpm_core.sweep_grid import SweepError, make_grid, select
    from iddpm_core.sweep_spec import check_launcher, read_toml

    write_rows(tmp_path / "rows.csv", [{"run": "a", "step": 2, "fid": 1.5, "extra": [1, 2]}])
    row = read_rows(tmp_path / "rows.csv")[0]
    assert row["run"] == "a" and row["fid"] == "1.5" and row["extra"] == "[1, 2]"
    assert read_rows(tmp_path / "none.csv") == []
    assert load_hook("none") is None and load_hook("math:sqrt")(4.0) == 2.0
    assert worker_id().endswith(f":{os.getpid()}")
    runs = make_grid(RunConfig(), [8, 16], [1], [2])
    assert [r.name for r in select(runs, ["w16_d1"])] == ["w16_d1"]
    with pytest.raises(SweepError, match="w99_d1"):
        select(runs, ["w99_d1"])
    assert is_live("RUNNING") and not is_live("COMPLETED")
    assert sbatch_flags(LauncherOptions(name="slurm", time=30, partition="p", sbatch=("--qos=high",))) == \
        ["--time=30", "--partition=p", "--qos=high"]
    assert check_launcher("l", {"name": "local", "max_parallel": 2}) == {"name": "local", "max_parallel": 2}
    with pytest.raises(SweepError, match="l.max_parallel"):
        check_launcher("l", {"max_parallel": "two"})
    (tmp_path / "s.toml").write_text("[grid]\nwidths = [8]\n[other]\n")
    with pytest.raises(SweepError, match="unknown key"):
        read_toml(tmp_path / "s.toml", "spec", ["grid"])
    assert read_toml(tmp_path / "s.toml", "spec", ["grid", "other"])["grid"] == {"widths": [8]}


def test_record_helpers_cifar_batches_and_image_lists(tmp_path):
    import re

    from iddpm_core.datasets import read_cifar_batch
    from iddpm_core.image_files import list_image_files
    from iddpm_core.provenance import canonical_json, utc_now

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_now())
    assert canonical_json({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"\\u00e9"],"b":1}'
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": data, b"labels": [3, 7]}, protocol=2))
    images, labels = read_cifar_batch(tmp_path / "data_batch_1")
    assert np.array_equal(images, data) and labels.tolist() == [3, 7] and labels.dtype == np.int64
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("imgs/b.png", "imgs/sub/a.jpg", "imgs/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_image_files(tmp_path / "imgs")] == ["b.png", "a.jpg"]


def test_eval_settings_check_and_job_records(tmp_path):
    from iddpm_core.cli_sweep import check_eval_settings
    from iddpm_core.launch import LauncherOptions, check_slurm, job_state, make_executor
    from iddpm_core.sweep_grid import SweepError

    assert check_eval_settings(None, {"fid_num": 1}) == {}
    assert check_eval_settings("math:sqrt", {"fid_num": 1}) == {"fid_num": 1}  # no check_settings there
    assert job_state(tmp_path, "w8_d1") == {}  # never submitted
    ex = make_executor(tmp_path / "submitit", LauncherOptions(name="local"))
    assert ex.cluster == "local" and str(ex.folder).startswith(str(tmp_path / "submitit"))
    import shutil
    if shutil.which("sbatch") is None:
        with pytest.raises(SweepError, match="sbatch not found"):
            check_slurm(LauncherOptions(name="slurm"))
