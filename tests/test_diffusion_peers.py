"""Our samplers against diffusers' DDPMScheduler / DDIMScheduler on the same model, noise and steps.

diffusers' "leading" spacing with K inference steps of T keeps range(0, T, T // K): our "ddimK".
Its schedulers hold alpha-bar in float32; the float64 runs give them our float64 alpha-bar (which
test_diffusion_schedules shows equals theirs to float32 precision) so that the step maths is
compared tightly.
"""

import numpy as np
import pytest
import torch

from iddpm_core.diffusion import (GaussianDiffusion, SpacedDiffusion, ddim_sample_loop, get_betas, p_sample_loop,
                                  space_timesteps)

T, K = 1000, 10
SHAPE = (2, 2, 4, 4)


def model_eps(x, t):
    t = t.to(x.dtype).reshape(-1, 1, 1, 1)
    return torch.sin(1.3 * x + t / 300) * 0.9


def model_eps_var(x, t):
    return torch.cat([model_eps(x, t), torch.tanh(x - t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000)], 1)


def diffusers_loop(scheduler, model, x, generator, **step_kw):
    for t in scheduler.timesteps:
        tt = torch.full((x.shape[0],), int(t))
        x = scheduler.step(model(x, tt), t, x, generator=generator, **step_kw).prev_sample
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_ancestral_matches_diffusers_ddpm(var_type, dtype):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", variance_type=var_type,
                          clip_sample=True)
    sched.set_timesteps(K)
    betas = get_betas("cosine", T)
    if dtype == torch.float64:
        sched.alphas_cumprod = torch.from_numpy(np.cumprod(1 - betas))
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    d = SpacedDiffusion(space_timesteps(T, f"ddim{K}"), betas, var_type=var_type)
    assert d.use_timesteps == sorted(int(t) for t in sched.timesteps)
    model = model_eps_var if var_type == "learned_range" else model_eps
    g = torch.Generator().manual_seed(0)
    ours = p_sample_loop(d, model, SHAPE, generator=g, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g, dtype=dtype)
    theirs = diffusers_loop(sched, model, x, g)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_matches_diffusers_ddim(eta, dtype):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                          set_alpha_to_one=True, steps_offset=0)
    sched.set_timesteps(K)
    betas = get_betas("cosine", T)
    if dtype == torch.float64:
        sched.alphas_cumprod = torch.from_numpy(np.cumprod(1 - betas))
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    d = SpacedDiffusion(space_timesteps(T, f"ddim{K}"), betas)
    g = torch.Generator().manual_seed(1)
    ours = ddim_sample_loop(d, model_eps, SHAPE, generator=g, eta=eta, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=g, dtype=dtype)
    # improved-diffusion re-derives epsilon from the clipped x0: diffusers' use_clipped_model_output
    theirs = diffusers_loop(sched, model_eps, x, g, eta=eta, use_clipped_model_output=True)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, theirs, **tol)


def test_q_sample_matches_diffusers_add_noise():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    d = GaussianDiffusion(get_betas("cosine", T))
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(8, 1, 3, 3, generator=g) * 2 - 1
    noise = torch.randn(8, 1, 3, 3, generator=g)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    torch.testing.assert_close(d.q_sample(x0, t, noise), sched.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
