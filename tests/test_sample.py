"""Sampling: EMA loading, seeded shards, interrupted reruns, merged output, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from iddpm_core.checkpoint import load_checkpoint
from iddpm_core.config import RunConfig, TrainConfig
from iddpm_core.diffusion import DiffusionConfig, build_diffusion, p_sample_loop
from iddpm_core.models import ModelConfig
from iddpm_core.checkpoint import load_model
from iddpm_core.sample import make_grid, quantize, sample_images, sample_to_dir
from iddpm_core.seeding import seed_from
from iddpm_core.train import train

torch.set_num_threads(1)


def _run(tmp_path_factory, name, **model_kw):
    out = tmp_path_factory.mktemp(name)
    rc = RunConfig(model=ModelConfig(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2),
                                     attention_resolutions=(), **model_kw),
                   diffusion=DiffusionConfig(steps=20),
                   train=TrainConfig(batch_size=8, steps=3, lr=1e-2, ema_rates=(0.5, 0.9), sample_interval=0,
                                     save_interval=0, sample_num=4, sample_steps="5", log_interval=1))
    train(rc, out, progress=False)
    return out / "checkpoints" / "latest.pt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _run(tmp_path_factory, "uncond")


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    return _run(tmp_path_factory, "cond", num_classes=10)


def test_load_model_picks_ema_weights(ckpt):
    raw = load_checkpoint(ckpt)
    default = load_model(ckpt)
    assert default.ema_rate == 0.5  # the run's first rate
    for k, v in default.model.state_dict().items():
        assert torch.equal(v, raw["ema"]["0.5"][k])
    other = load_model(ckpt, ema=0.9)
    for k, v in other.model.state_dict().items():
        assert torch.equal(v, raw["ema"]["0.9"][k])
    plain = load_model(ckpt, ema="raw")
    assert plain.ema_rate is None
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, raw["model"][k])
    assert not all(torch.equal(raw["model"][k], raw["ema"]["0.5"][k]) for k in raw["model"])
    with pytest.raises(ValueError, match="0.999"):
        load_model(ckpt, ema=0.999)


def test_sample_images_is_the_diffusion_sampler_with_per_shard_seeds(ckpt):
    imgs = sample_images(ckpt, 6, steps=4, seed=3, batch_size=4, progress=False)
    assert imgs.shape == (6, 8, 8, 1) and imgs.dtype == np.uint8
    # shard 1 (images 4, 5) by hand: respaced ancestral chain, generator seeded from (seed, shard)
    sm = load_model(ckpt)
    diffusion = build_diffusion(sm.diffusion_config, "4")
    g = torch.Generator().manual_seed(seed_from(3, 1))
    x = p_sample_loop(diffusion, sm.model, (2, 1, 8, 8), generator=g)
    assert np.array_equal(imgs[4:], ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    assert np.array_equal(imgs, sample_images(ckpt, 6, steps=4, seed=3, batch_size=4, progress=False))
    assert not np.array_equal(imgs, sample_images(ckpt, 6, steps=4, seed=4, batch_size=4, progress=False))
    ddim = sample_images(ckpt, 2, steps=4, sampler="ddim", seed=3, batch_size=4, progress=False)
    assert ddim.shape == (2, 8, 8, 1)


def test_quantize_round_and_truncate():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.004, 0.5, 1.0, 1.2]).reshape(1, 1, 1, 7)
    r = quantize(x, "round").ravel().astype(int)
    t = quantize(x, "truncate").ravel().astype(int)
    assert list(r) == [0, 0, 128, 128, 191, 255, 255]   # (x + 1) * 127.5 = 0, .1275, 127.5, 128.01, 191.25, 255
    assert list(t) == [0, 0, 127, 128, 191, 255, 255]
    with pytest.raises(ValueError, match="quantize"):
        quantize(x, "floor")


def test_interrupted_run_resumes_to_the_same_samples(ckpt, tmp_path):
    whole = sample_to_dir(ckpt, tmp_path / "whole", 10, steps=3, seed=1, batch_size=4, progress=False)
    assert whole["shards"] == 3 and whole["shards_made"] == [0, 1, 2]

    class Stop(Exception):
        pass

    def stop_after_first(k, path):
        raise Stop

    with pytest.raises(Stop):
        sample_to_dir(ckpt, tmp_path / "cut", 10, steps=3, seed=1, batch_size=4, progress=False,
                      on_shard=stop_after_first)
    assert sorted(p.name for p in (tmp_path / "cut" / "shards").iterdir()) == ["shard_000000.npz"]
    again = sample_to_dir(ckpt, tmp_path / "cut", 10, steps=3, seed=1, batch_size=4, progress=False)
    assert again["shards_made"] == [1, 2] and again["shards_reused"] == 1
    with np.load(tmp_path / "whole" / "samples.npz") as a, np.load(tmp_path / "cut" / "samples.npz") as b:
        arr = b["arr_0"]
        assert arr.shape == (10, 8, 8, 1) and arr.dtype == np.uint8
        assert np.array_equal(a["arr_0"], arr)
        assert "arr_1" not in b.files
        assert json.loads(str(b["meta"]))["quantize"] == "round"
    assert len(np.unique(arr.reshape(10, -1), axis=0)) == 10  # no duplicated images
    # the same images as the in-memory sampler with that shard size
    assert np.array_equal(arr, sample_images(ckpt, 10, steps=3, seed=1, batch_size=4, progress=False))
    # a third run makes nothing
    assert sample_to_dir(ckpt, tmp_path / "cut", 10, steps=3, seed=1, batch_size=4, progress=False)["shards_made"] == []
    from PIL import Image
    with Image.open(tmp_path / "cut" / "grid.png") as im:
        png = np.asarray(im)
    # 8 px images are shown enlarged x4 by pixel repetition
    assert np.array_equal(png[::4, ::4], make_grid(arr)[..., 0]) and png.shape == (4 * 32, 4 * 42)
    # other settings into the same folder are refused
    with pytest.raises(ValueError, match="seed"):
        sample_to_dir(ckpt, tmp_path / "cut", 10, steps=3, seed=2, batch_size=4, progress=False)


def test_class_conditional_samples_carry_labels(cond_ckpt, tmp_path):
    s = sample_to_dir(cond_ckpt, tmp_path, 5, steps=2, seed=0, batch_size=3, quantize="truncate", progress=False)
    with np.load(s["samples"]) as z:
        assert z["arr_0"].shape == (5, 8, 8, 1)
        labels = z["arr_1"]
        assert labels.shape == (5,) and labels.min() >= 0 and labels.max() < 10
        assert json.loads(str(z["meta"]))["quantize"] == "truncate"
    g = torch.Generator().manual_seed(seed_from(0, 1))
    assert np.array_equal(labels[3:], torch.randint(0, 10, (2,), generator=g).numpy())


def test_make_grid_places_images():
    imgs = np.arange(5 * 2 * 2 * 1, dtype=np.uint8).reshape(5, 2, 2, 1)
    g = make_grid(imgs, ncol=3, pad=1)
    assert g.shape == (2 * 3 + 1, 3 * 3 + 1, 1)
    assert np.array_equal(g[1:3, 1:3], imgs[0]) and np.array_equal(g[4:6, 4:6], imgs[4])
    assert g[4:6, 7:9].sum() == 0  # the sixth cell is empty


def test_sample_cli(ckpt, tmp_path):
    from iddpm_core.cli import sample_main

    r = CliRunner().invoke(sample_main, ["--checkpoint", str(ckpt), "--num", "3", "--steps", "2",
                                         "--sampler", "ddim", "--eta", "0.5", "--out", str(tmp_path / "o"),
                                         "--batch-size", "2", "--ema", "0.9", "--no-progress"])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "o" / "samples.npz") as z:
        got = z["arr_0"]
    want = sample_images(ckpt, 3, steps=2, sampler="ddim", eta=0.5, batch_size=2, ema_rate=0.9, progress=False)
    assert np.array_equal(got, want)
    bad = CliRunner().invoke(sample_main, ["--checkpoint", str(tmp_path / "missing.pt"), "--num", "3",
                                           "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "missing.pt" in bad.output
    bad = CliRunner().invoke(sample_main, ["--checkpoint", str(ckpt), "--num", "3", "--steps", "500",
                                           "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "steps" in bad.output


def test_sample_shard_is_one_shard_of_sample_images(ckpt):
    from iddpm_core.sample import sample_shard

    sm = load_model(ckpt)
    diffusion = build_diffusion(sm.diffusion_config, "4")
    imgs, labels = sample_shard(sm, diffusion, 2, seed=3, shard=1)
    assert labels is None and imgs.shape == (2, 8, 8, 1) and imgs.dtype == np.uint8
    assert np.array_equal(imgs, sample_images(ckpt, 6, steps=4, seed=3, batch_size=4, progress=False)[4:])
