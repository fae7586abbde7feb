"""Smoke run of the missing-U measurements on tiny models: pairing counts at equal compute, latency,
the solver study, FID against sampling steps (real Inception, a handful of images) and denoising."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iddpm_core.checkpoint import save_checkpoint
from iddpm_core.diffusion import DiffusionConfig
from iddpm_core.models import ModelConfig, build_model

BASE = dict(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
            num_heads=2, learn_sigma=True)


def _checkpoint(path, cfg):
    torch.manual_seed(0)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(path, m, cfg, diffusion_config=DiffusionConfig(steps=10).to_dict(), step=3)
    return str(path)


def test_missing_u_smoke(tmp_path):
    from benchmarks.missing_u.measure import measure_checkpoint
    from benchmarks.missing_u.pairings import pairing_row

    unet, cunet = ModelConfig(kind="unet", **BASE), ModelConfig(kind="cunet", **BASE)
    row = pairing_row("tiny", {"unet": unet, "cunet": cunet}, budget=2e9, batch=8)
    assert row["compute_gap"] <= 0.05 and row["cunet_nfe"] == 5 * 4  # 5 ODE blocks x rk4
    assert row["params_ratio"] == pytest.approx(row["cunet_params"] / row["unet_params"], abs=1e-4)

    blocks = 5
    for kind, cfg in (("unet", unet), ("cunet", cunet)):
        ckpt = _checkpoint(tmp_path / f"{kind}.pt", cfg)
        out = measure_checkpoint(ckpt, "digits", tmp_path / "m", preset="smoke")  # one reference cache
        lat = out["latency"]
        assert [r["batch"] for r in lat] == [1, 4] and all(r["per_image_s"] > 0 for r in lat)
        assert all(r["sample_s_all_steps"] == pytest.approx(10 * r["per_image_s"]) for r in lat)
        if kind == "cunet":
            solvers = out["solvers"]
            assert [r["solver"] for r in solvers] == ["euler", "rk4", "dopri5"] * 2
            assert [r["nfe"] for r in solvers if r["solver"] != "dopri5"] == [blocks, 4 * blocks] * 2
        else:
            assert out["solvers"] == []
        fid = out["fid_steps"]
        assert len(fid) == (3 if kind == "cunet" else 1) * 2 * 2
        assert {(r["sampler"], r["steps"]) for r in fid} == {("ddpm", 2), ("ddpm", 10), ("ddim", 2), ("ddim", 10)}
        assert all(math.isfinite(r["fid"]) and r["fid"] >= 0 and r["fid_n"] == 8 for r in fid)
        den = out["denoising"]
        assert [r["sigma"] for r in den] == [0.1, 0.3] and den[0]["t"] < den[1]["t"]
        for r in den:
            assert r["n"] == 6
            for m in ("denoised_psnr", "noisy_psnr", "denoised_ssim"):
                assert r[f"{m}_low"] <= r[m] <= r[f"{m}_high"] and np.isfinite(r[m])
