"""Respacing: kept steps for every syntax, alpha-bar preserved, original indices passed to the model."""

import numpy as np
import pytest
import torch

from iddpm_core.diffusion import DiffusionConfig, GaussianDiffusion, SpacedDiffusion, build_diffusion, get_betas, space_timesteps


def test_single_count_is_evenly_strided_with_both_ends():
    kept = space_timesteps(1000, "50")
    assert len(kept) == 50 and kept[0] == 0 and kept[-1] == 999
    assert np.all(np.abs(np.array(kept) - np.arange(50) * 999 / 49) <= 0.5)
    assert space_timesteps(10, "10") == list(range(10))
    assert space_timesteps(10, "1") == [0]
    assert space_timesteps(12, "") == space_timesteps(12, None) == list(range(12))
    assert space_timesteps(100, 4) == space_timesteps(100, "4")


def test_section_counts():
    # 100 steps in 3 sections of 34, 33, 33 (the first takes the remainder)
    kept = space_timesteps(100, "3,2,1")
    assert kept == [0, 16, 33, 34, 66, 67]  # 0..33 thirds; 34 and 66; 67
    kept = space_timesteps(300, "10,10,10")
    assert len(kept) == 30
    for i, start in enumerate((0, 100, 200)):
        sec = kept[10 * i: 10 * i + 10]
        assert sec[0] == start and sec[-1] == start + 99


def test_ddim_stride():
    kept = space_timesteps(1000, "ddim50")
    assert kept == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim3") == [0, 334, 668]
    assert space_timesteps(10, "ddim4") == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="no integer stride"):
        space_timesteps(10, "ddim6")  # strides 1, 2, 3, 4 give 10, 5, 4, 3 steps


def test_bad_specs():
    with pytest.raises(ValueError, match="cannot keep 11"):
        space_timesteps(10, "11")
    with pytest.raises(ValueError, match="bad respacing"):
        space_timesteps(10, "fast")
    with pytest.raises(ValueError, match="bad respacing"):
        space_timesteps(10, "ddimX")
    with pytest.raises(ValueError, match="cannot keep 0"):
        space_timesteps(10, "0")
    with pytest.raises(ValueError, match="non-empty subset"):
        SpacedDiffusion([], get_betas("cosine", 10))


@pytest.mark.parametrize("schedule,T", [("cosine", 1000), ("linear", 200)])
@pytest.mark.parametrize("spec", ["50", "7", "2", "1", "10,10,10", "5,1,3", "ddim50", "ddim8", ""])
def test_respacing_keeps_alpha_bar(schedule, T, spec):
    betas = get_betas(schedule, T)
    kept = space_timesteps(T, spec)
    d = SpacedDiffusion(kept, betas, var_type="learned_range")
    base = np.cumprod(1 - betas)
    np.testing.assert_array_equal(d.alphas_cumprod, base[kept])
    # and the recomputed betas reproduce it (up to the precision of 1 - beta for beta near 1)
    np.testing.assert_allclose(np.cumprod(1 - d.betas), base[kept], rtol=1e-6, atol=0)
    assert d.num_timesteps == len(kept) and d.original_num_steps == T
    assert np.all((d.betas > 0) & (d.betas <= 1))


def test_spaced_model_sees_original_indices():
    T = 100
    d = SpacedDiffusion(space_timesteps(T, "5"), get_betas("cosine", T))
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    x = torch.zeros(5, 1, 2, 2)
    d.p_mean_variance(model, x, torch.arange(5))
    kept = torch.tensor(space_timesteps(T, "5"), dtype=torch.float32)
    torch.testing.assert_close(seen[0], kept * 1000 / T)
    d2 = SpacedDiffusion(space_timesteps(T, "5"), get_betas("cosine", T), rescale_timesteps=False)
    d2.p_mean_variance(model, x, torch.arange(5))
    torch.testing.assert_close(seen[1], kept)


def test_config_roundtrip_and_build():
    cfg = DiffusionConfig(steps=200, schedule="linear", timestep_respacing="20")
    assert DiffusionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown diffusion config keys \\['stepz'\\]"):
        DiffusionConfig.from_dict({"stepz": 3})
    d = build_diffusion(cfg)
    assert isinstance(d, SpacedDiffusion) and d.num_timesteps == 20
    assert d.var_type == "learned_range" and d.loss_type == "rescaled_mse"
    full = build_diffusion(cfg, respacing="")
    assert type(full) is GaussianDiffusion and full.num_timesteps == 200
    np.testing.assert_array_equal(full.betas, get_betas("linear", 200))
    ddim = build_diffusion(DiffusionConfig(steps=100), respacing="ddim10")
    np.testing.assert_allclose(ddim.alphas_cumprod, np.cumprod(1 - get_betas("cosine", 100))[::10], rtol=1e-12)
