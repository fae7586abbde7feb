"""Trainer: configs, EMA, micro-batches, resume equality, logs, checkpoints, clear errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from iddpm_core.checkpoint import load_checkpoint
from iddpm_core.config import ResumeError, RunConfig, TrainConfig, complete_model_config, merge_resume_config
from iddpm_core.diffusion import DiffusionConfig
from iddpm_core.ema import EMA
from iddpm_core.models import ModelConfig, build_model
from iddpm_core.train import batch_indices, train
from iddpm_core.train_step import lr_at

torch.set_num_threads(1)  # the tiny models are faster single-threaded, and the machine is shared


def tiny(**train_kw) -> RunConfig:
    """8x8 digits, a two-level U-Net with attention at 4 px, T = 20."""
    model = ModelConfig(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2),
                        attention_resolutions=(4,), num_heads=2, dropout=train_kw.pop("dropout", 0.0))
    kw = dict(batch_size=8, steps=4, lr=1e-3, log_interval=1, sample_interval=0, save_interval=0,
              sample_num=4, sample_steps="5", ema_rates=(0.9, 0.99))
    kw.update(train_kw)
    return RunConfig(model=model, diffusion=DiffusionConfig(steps=20), train=TrainConfig(**kw))


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class GradRecorder:
    """Callback keeping a copy of every parameter's gradient after each step."""

    def __init__(self):
        self.grads = {}

    def __call__(self, step, model, ema, info):
        self.grads[step] = [p.grad.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- pieces with closed forms

def test_ema_matches_closed_form():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    p0 = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, (0.9, 0.5))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(5):
        ema.update(model)
    for rate in (0.9, 0.5):
        # constant target p0 + 1: ema_k = rate^k p0 + (1 - rate^k)(p0 + 1) = p0 + 1 - rate^k
        for (name, v), q0 in zip(ema.state_dict_for(rate).items(), p0):
            torch.testing.assert_close(v, q0 + 1 - rate ** 5)
    warm = EMA(model, (0.99,), warmup=True)
    assert [warm.effective_rate(0.99)] == [1 / 10]
    warm.update(model)
    assert warm.effective_rate(0.99) == pytest.approx(2 / 11)


def test_lr_warmup_and_batch_indices():
    cfg = TrainConfig(lr=1e-3, lr_warmup_steps=4)
    assert [lr_at(s, cfg) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    # consecutive steps walk through epochs, each a permutation of the dataset
    stream = np.concatenate([batch_indices(10, 3, s, 4) for s in range(5)])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20])  # a new order each epoch
    assert np.array_equal(batch_indices(10, 3, 2, 4), stream[8:12])


def test_run_config_files_roundtrip(tmp_path):
    rc = tiny(ema_rates=(0.999, 0.99))
    rc.save(tmp_path / "run.json")
    assert RunConfig.from_file(tmp_path / "run.json") == rc
    (tmp_path / "run.toml").write_text('[model]\nimage_size = 8\nin_channels = 1\nchannel_mult = [1, 2]\n'
                                       'attention_resolutions = []\n[train]\nema_rates = [0.9]\nlr = 0.002\n')
    rt = RunConfig.from_file(tmp_path / "run.toml")
    assert rt.model.channel_mult == (1, 2) and rt.train.ema_rates == (0.9,) and rt.train.lr == 0.002
    (tmp_path / "bad.json").write_text(json.dumps({"train": {"learning_rate": 1}}))
    with pytest.raises(ValueError, match=r"bad\.json.*learning_rate"):
        RunConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="microbatch"):
        TrainConfig(microbatch=-1)
    (tmp_path / "bad2.json").write_text(json.dumps({"train": {"batch_size": 0}}))
    with pytest.raises(ValueError, match=r"bad2\.json.*batch_size"):
        RunConfig.from_file(tmp_path / "bad2.json")
    (tmp_path / "bad3.json").write_text(json.dumps({"model": {"image_size": 8, "attention_resolutions": [16]}}))
    with pytest.raises(ValueError, match=r"bad3\.json.*attention resolution 16"):
        RunConfig.from_file(tmp_path / "bad3.json")
    d = complete_model_config({"model": {"base_channels": 16}, "train": {"data": "digits"}})
    assert (d["model"]["image_size"], d["model"]["in_channels"], d["model"]["attention_resolutions"]) == (8, 1, [4])


def test_merge_resume_config_names_fields():
    stored = tiny(steps=4)
    given = tiny(steps=9, sample_interval=3)
    merged = merge_resume_config(stored, given)
    assert merged.train.steps == 9 and merged.train.sample_interval == 3
    with pytest.raises(ResumeError, match=r"train\.lr"):
        merge_resume_config(stored, tiny(steps=9, lr=0.5))
    other = tiny()
    other.model.base_channels = 32
    with pytest.raises(ResumeError, match=r"model\.base_channels"):
        merge_resume_config(stored, other)


# ----------------------------------------------------------------------------- the training loop

def test_microbatches_average_gradients_like_the_full_batch(tmp_path):
    full, split = GradRecorder(), GradRecorder()
    train(tiny(steps=1), tmp_path / "full", callback=full, progress=False)
    train(tiny(steps=1, microbatch=3), tmp_path / "split", callback=split, progress=False)  # 3 + 3 + 2
    for a, b in zip(full.grads[1], split.grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert sum(float(g.abs().sum()) for g in full.grads[1]) > 0


def test_grad_clip_limits_the_update_norm(tmp_path):
    rec = GradRecorder()
    summary = train(tiny(steps=1, grad_clip=1e-3), tmp_path, callback=rec, progress=False)
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in rec.grads[1]))
    assert norm == pytest.approx(1e-3, rel=1e-4)
    assert summary["last_metrics"]["grad_norm"] > 1e-2  # the logged norm is the one before clipping


def test_resume_equals_straight_run(tmp_path):
    # dropout exercises the saved RNG states; the importance sampler warms up after 200 losses
    # (T = 20, 10 each), after about 20 steps of 16 examples
    kw = dict(steps=24, batch_size=16, microbatch=8, timestep_sampler="loss-second-moment", dropout=0.1,
              ema_rates=(0.9,), save_interval=0)
    straight = train(tiny(**kw), tmp_path / "a", progress=False)
    train(tiny(**{**kw, "steps": 13}), tmp_path / "b", progress=False)
    resumed = train(tiny(**kw), tmp_path / "b", resume="auto", progress=False)
    assert resumed["step"] == straight["step"] == 24
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "latest.pt")
    assert int(a["sampler_state"]["loss_counts"].min()) == 10  # warmed up: non-uniform sampling ran
    for key in ("model", "ema", "optimizer", "sampler_state"):
        flat_a, flat_b = _flatten(a[key]), _flatten(b[key])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            if isinstance(flat_a[k], torch.Tensor):
                assert torch.equal(flat_a[k], flat_b[k]), (key, k)
            else:
                assert flat_a[k] == flat_b[k], (key, k)
    for k in ("step", "images_seen", "train_flops"):
        assert a[k] == b[k]
    rows_a, rows_b = read_csv(tmp_path / "a" / "metrics.csv"), read_csv(tmp_path / "b" / "metrics.csv")
    assert [r["step"] for r in rows_b] == [str(s) for s in range(1, 25)]
    for ra, rb in zip(rows_a, rows_b):
        for col in ("loss", "mse", "vb", "loss_q0", "loss_q3", "grad_norm", "train_flops"):
            assert ra[col] == rb[col], (ra["step"], col)


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}


def test_logs_tensorboard_csv_and_checkpoint_contents(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from iddpm_core.models.cost import training_flops_per_image

    seen = []
    rc = tiny(steps=4, log_interval=2, sample_interval=2, save_interval=2)
    summary = train(rc, tmp_path, progress=False, callback=lambda step, m, e, info: seen.append(step) or {"probe": step * 0.5})
    assert seen == [1, 2, 3, 4]
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    names = ["loss", "mse", "vb", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm", "lr",
             "images_per_sec", "train_flops", "images_seen"]
    rows = read_csv(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["2", "4"]
    for name in names:
        events = ea.Scalars(f"train/{name}")
        assert [e.step for e in events] == [2, 4], name
        for e, r in zip(events, rows):
            assert e.value == pytest.approx(float(r[name]), rel=1e-6), name  # TB and CSV hold the same numbers
    assert [e.value for e in ea.Scalars("callback/probe")] == [0.5, 1.0, 1.5, 2.0]
    # loss = mse + vb for the hybrid loss (weights are 1 with the uniform sampler)
    for r in rows:
        assert float(r["loss"]) == pytest.approx(float(r["mse"]) + float(r["vb"]), rel=1e-6)
    # training FLOPs: measured per image on an independently built model, times images seen
    torch.manual_seed(0)
    per_image = training_flops_per_image(build_model(rc.model))
    assert summary["flops_per_image"] == per_image
    assert [int(r["train_flops"]) for r in rows] == [per_image * 16, per_image * 32]
    assert (tmp_path / "samples" / "step_000002.png").exists() and (tmp_path / "samples" / "step_000004.png").exists()
    ck = load_checkpoint(tmp_path / "checkpoints" / "ckpt_000002.pt")
    for key in ("model", "ema", "optimizer", "sampler_state", "rng", "step", "images_seen", "train_flops",
                "diffusion_config", "train_config", "model_config", "data"):
        assert key in ck, key
    assert ck["step"] == 2 and set(ck["ema"]) == {"0.9", "0.99"} and ck["data"]["spec"] == "digits"
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"] == 4


def test_corrupt_or_missing_checkpoints_give_clear_errors(tmp_path, monkeypatch):
    train(tiny(steps=2, save_interval=2), tmp_path, progress=False)
    ckpts = tmp_path / "checkpoints"
    earlier = (ckpts / "ckpt_000002.pt").read_bytes()
    with pytest.raises(ResumeError, match="latest.pt exists"):
        train(tiny(steps=3), tmp_path, progress=False)
    with pytest.raises(ResumeError, match="nope.pt"):
        train(tiny(steps=3), tmp_path, resume=tmp_path / "nope.pt", progress=False)

    # a write that fails half-way leaves the earlier checkpoints as they were and no temporary files
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(tiny(steps=3), tmp_path, resume="auto", progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(ckpts / "latest.pt")["step"] == 2
    assert (ckpts / "ckpt_000002.pt").read_bytes() == earlier
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt_000002.pt", "latest.pt"]

    # a corrupt latest.pt is named in the error; the periodic checkpoint still resumes
    (ckpts / "latest.pt").write_bytes(earlier[: len(earlier) // 2])
    with pytest.raises(ResumeError, match=r"latest\.pt"):
        train(tiny(steps=3), tmp_path, resume="auto", progress=False)
    assert (ckpts / "ckpt_000002.pt").read_bytes() == earlier
    out = train(tiny(steps=3), tmp_path, resume=ckpts / "ckpt_000002.pt", progress=False)
    assert out["step"] == 3


def test_loss_goes_down_on_digits(tmp_path):
    rc = tiny(steps=100, batch_size=32, lr=2e-3, log_interval=10, ema_rates=(0.99,))
    rc.diffusion = DiffusionConfig(steps=50)
    train(rc, tmp_path, progress=False)
    mse = [float(r["mse"]) for r in read_csv(tmp_path / "metrics.csv")]
    assert len(mse) == 10
    assert np.mean(mse[-3:]) < 0.6 * mse[0], mse


def test_flip_mirrors_about_half_the_examples(tmp_path, monkeypatch):
    from iddpm_core.diffusion import GaussianDiffusion
    from iddpm_core.io import save_npz

    image = np.zeros((1, 8, 8, 1), np.uint8)
    image[0, :, :3] = 255  # bright left columns: a mirrored copy is bright on the right
    save_npz(tmp_path / "one.npz", arr_0=image)
    seen = []
    real = GaussianDiffusion.training_losses

    def recording(self, model, x_start, t, *args, **kwargs):
        seen.append(x_start.detach().clone())
        return real(self, model, x_start, t, *args, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", recording)
    for flip in (False, True):
        seen.clear()
        train(tiny(steps=2, batch_size=16, data=str(tmp_path / "one.npz"), flip=flip), tmp_path / f"f{flip}",
              progress=False)
        x = torch.cat(seen)
        original = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 127.5 - 1
        same = (x == original).flatten(1).all(1)
        mirrored = (x == original.flip(-1)).flatten(1).all(1)
        assert bool((same | mirrored).all())
        if flip:
            assert 8 <= int(mirrored.sum()) <= 24  # 32 fair coin flips
        else:
            assert int(mirrored.sum()) == 0
