"""The fast paths (channels-last activations, fused attention, in-place SiLU, fused AdamW, list-wise EMA)
give the numbers of the plain operations up to float32 rounding; bf16 autocast stays close to fp32.

Tolerances. A float64 run of the plain operations is the truth (its own rounding, ~1e-16 relative,
is negligible). The plain float32 run's distance to it, ``err_ref``, is the float32 rounding error
this network accumulates on these inputs; the fast float32 run does the same arithmetic in another
order (other summation trees, fused kernels), so its distance ``err_fast`` must be of the same size.
We allow ``err_fast <= 8 * err_ref + 16 * eps32 * scale`` per tensor, ``scale`` being the tensor's
largest magnitude (the second term covers tensors whose reference error happens to be near zero).
A genuine mistake (a head or channel order, a missing scale, a wrong optimiser update) gives errors
of the size of the values themselves, orders of magnitude above this bound.
"""

from __future__ import annotations

import copy

import pytest
import torch

from iddpm_core.config import TrainConfig
from iddpm_core.diffusion import DiffusionConfig, build_diffusion
from iddpm_core.diffusion.samplers import ddim_sample_loop, p_sample_loop
from iddpm_core.ema import EMA
from iddpm_core.models import ModelConfig, build_model
from iddpm_core.models.cost import forward_flops, training_flops_per_image
from iddpm_core.models.layers import reference_ops
from iddpm_core.precision import with_precision
from iddpm_core.train_step import build_optimizer, forward_backward, optimizer_step

torch.set_num_threads(1)
EPS32 = torch.finfo(torch.float32).eps


def small_config(**kw) -> ModelConfig:
    """16x16 RGB, two levels, attention (2 heads) at 8 px and in the middle, learned sigmas; 32 base
    channels, so the fast path runs channels-last with the fused GroupNorm node."""
    d = dict(image_size=16, in_channels=3, base_channels=32, channel_mult=(1, 2), attention_resolutions=(8,),
             num_heads=2)
    d.update(kw)
    return ModelConfig(**d)


def perturbed_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A model whose every weight is random (the zero-initialised output layers would hide errors)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def assert_float32_close(fast: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    err_fast = (fast.double() - ref64).abs().max().item()
    err_ref = (ref32.double() - ref64).abs().max().item()
    bound = 8 * err_ref + 16 * EPS32 * ref64.abs().max().item()
    assert err_fast <= bound, f"{what}: fast path off by {err_fast:.3g}, plain float32 by {err_ref:.3g}"


@pytest.mark.parametrize("scale_shift,width", [(True, 32), (False, 32), (True, 16)])
def test_unet_forward_and_gradients_match_plain_operations(scale_shift, width):
    """Width 32: channels-last with the fused GroupNorm node; width 16: contiguous, fused attention only."""
    cfg = small_config(use_scale_shift_norm=scale_shift, base_channels=width)
    model = perturbed_model(cfg)
    model64 = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g)
    t = torch.tensor([0.0, 250.0, 600.0, 999.0])

    def run(m, xx, tt, plain):
        m.zero_grad(set_to_none=True)
        if plain:
            with reference_ops():
                out = m(xx, tt)
        else:
            out = m(xx, tt)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        return out.detach(), [p.grad.detach().clone() for p in m.parameters()]

    out_fast, g_fast = run(model, x, t, plain=False)
    out_ref, g_ref = run(model, x, t, plain=True)
    out64, g64 = run(model64, x.double(), t.double(), plain=True)
    assert out_fast.shape == out64.shape and out_fast.is_contiguous()
    assert_float32_close(out_fast, out_ref, out64, "output")
    for (name, _), a, b, c in zip(model.named_parameters(), g_fast, g_ref, g64):
        assert_float32_close(a, b, c, f"gradient of {name}")
    # and no-grad forward (in-place SiLU) equals the forward that records gradients
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), out_fast, rtol=0, atol=16 * EPS32 * out64.abs().max().item())


def test_fast_path_counts_the_same_flops():
    model = perturbed_model(small_config())
    fast = (forward_flops(model), training_flops_per_image(model))
    with reference_ops():
        plain = (forward_flops(model), training_flops_per_image(model))
    assert fast == plain


def _train_steps(model, diffusion, steps, fused: bool, plain: bool, dtype=torch.float32):
    tcfg = TrainConfig(lr=1e-3, ema_rates=(0.9,), weight_decay=0.01)
    if fused:
        opt = build_optimizer(model, tcfg)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, foreach=False)
    ema = EMA(model, tcfg.ema_rates)
    losses = []
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = (torch.rand(6, 3, 16, 16, generator=g) * 2 - 1).to(dtype)
        t = torch.randint(0, diffusion.num_timesteps, (6,), generator=g)
        noise = torch.randn(6, 3, 16, 16, generator=g).to(dtype)
        w = torch.rand(6, generator=g).to(dtype) + 0.5
        acc = torch.zeros(14, dtype=torch.float64)
        ctx = reference_ops() if plain else torch.enable_grad()
        with ctx:
            out = forward_backward(model, diffusion, x, t, w, noise, None, 3, acc, set())
        losses.append(torch.cat(out))
        optimizer_step(model, opt, ema, 0.0)
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()], ema


def test_training_steps_match_plain_operations_and_loop_adamw():
    """Three trainer steps (hybrid loss, micro-batches, AdamW with weight decay, EMA): the fast path with the
    fused AdamW against the plain operations with the per-tensor AdamW loop, both against float64. The
    per-example losses of steps 2 and 3 see the parameters the earlier updates made. (Parameters are not
    compared element by element: Adam divides by the gradient's running RMS, which turns the float32
    rounding of a near-zero gradient into an O(lr) difference of that element, on either float32 path.)"""
    cfg = small_config()
    diffusion = build_diffusion(DiffusionConfig(steps=100))
    model = perturbed_model(cfg)
    model_ref, model64 = copy.deepcopy(model), copy.deepcopy(model).double()
    loss_fast, p_fast, _ = _train_steps(model, diffusion, 3, fused=True, plain=False)
    loss_ref, p_ref, _ = _train_steps(model_ref, diffusion, 3, fused=False, plain=True)
    loss64, p64, _ = _train_steps(model64, diffusion, 3, fused=False, plain=True, dtype=torch.float64)
    assert_float32_close(loss_fast, loss_ref, loss64, "per-example losses")
    # all parameters moved alike: the whole update vector agrees to float32 rounding in the large
    d_fast, d_ref, d64 = (torch.cat([(a - b.to(a.dtype)).flatten() for a, b in zip(ps, model64.parameters())])
                          for ps in (p_fast, p_ref, p64))
    assert ((d_fast.double() - d64).norm() <= 8 * (d_ref.double() - d64).norm() + 16 * EPS32 * d64.norm())


def test_fused_adamw_equals_the_per_tensor_loop():
    """The fused AdamW kernel against torch's per-tensor loop on identical gradients: each element's
    update is a handful of float32 operations, so they agree to a few ulps of the parameter plus the
    step (lr)."""
    torch.manual_seed(5)
    params = [torch.randn(37, 5), torch.randn(64), torch.randn(3, 3, 4, 4)]
    model = torch.nn.Module()
    model.ps = torch.nn.ParameterList([p.clone() for p in params])
    fused = list(model.ps)
    loop = [p.clone().requires_grad_() for p in params]
    opt_f = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.01))
    assert opt_f.defaults.get("fused")
    opt_l = torch.optim.AdamW(loop, lr=1e-3, weight_decay=0.01, foreach=False)
    for _ in range(4):
        for a, b in zip(fused, loop):
            g = torch.randn_like(a) * torch.logspace(-6, 0, a.numel()).reshape(a.shape)
            a.grad, b.grad = g.clone(), g.clone()
        opt_f.step()
        opt_l.step()
    for a, b, p0 in zip(fused, loop, params):
        assert not torch.equal(b, p0)
        assert (a - b).abs().max() <= 4 * 4 * EPS32 * (b.abs().max() + 1e-3)


def test_ema_update_equals_the_per_tensor_loop_bit_for_bit():
    model = perturbed_model(small_config())
    ema = EMA(model, (0.9, 0.99), warmup=True)
    shadows = {k: {n: t.clone() for n, t in v.items()} for k, v in ema.shadows.items()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for rate in (0.9, 0.99):  # the previous implementation: s.mul_(rate).add_(v, alpha=1 - rate)
            eff = min(rate, (1.0 + step) / (10.0 + step))
            for n, v in model.state_dict().items():
                shadows[repr(rate)][n].mul_(eff).add_(v, alpha=1.0 - eff)
    for k in shadows:
        for n in shadows[k]:
            assert torch.equal(ema.shadows[k][n], shadows[k][n]), (k, n)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_steps_match_plain_operations(sampler):
    cfg = small_config()
    model = perturbed_model(cfg).eval()
    model64 = copy.deepcopy(model).double()
    diffusion = build_diffusion(DiffusionConfig(steps=100), "ddim4" if sampler == "ddim" else "4")
    loop = ddim_sample_loop if sampler == "ddim" else p_sample_loop

    def run(m, dtype, plain):
        g = torch.Generator().manual_seed(3)
        noise = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype)
        # the step noise is drawn in float32 from the same generator and cast, as the sampler does
        if plain:
            with reference_ops():
                return loop(diffusion, m, (3, 3, 16, 16), generator=g, noise=noise, dtype=dtype)
        return loop(diffusion, m, (3, 3, 16, 16), generator=g, noise=noise, dtype=dtype)

    fast, ref, ref64 = run(model, torch.float32, False), run(model, torch.float32, True), run(model64, torch.float64, True)
    assert_float32_close(fast, ref, ref64, f"{sampler} samples after 4 steps")


def test_bf16_forward_is_float32_and_close_to_fp32():
    """bfloat16 keeps 8 significant bits (relative rounding 2^-9); through the network's ~15 layers the
    errors add up to a few per cent of the output's scale, while a broken autocast path (wrong layout,
    dropped term) would be off by the output's own size."""
    model = perturbed_model(small_config()).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([1.0, 100.0, 500.0, 900.0])
    with torch.no_grad():
        ref = model(x, t)
        low = with_precision(model, "bf16")(x, t)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    rel = ((low - ref).norm() / ref.norm()).item()
    assert 0 < rel < 15 * 2.0 ** -9, rel
    assert with_precision(model, "fp32") is model
    with pytest.raises(ValueError, match="precision"):
        with_precision(model, "fp16")


def test_trainer_and_sampler_take_bf16(tmp_path):
    """--precision bf16 end to end: two training steps and a 3-step sample give finite losses and valid
    images, the setting is stored in the run config, and an unknown precision is refused by name."""
    from iddpm_core.config import RunConfig
    from iddpm_core.sample import sample_images
    from iddpm_core.train import train

    rc = RunConfig(model=ModelConfig(image_size=8, in_channels=1, base_channels=32, channel_mult=(1, 2),
                                     attention_resolutions=(4,), num_heads=2),
                   diffusion=DiffusionConfig(steps=20),
                   train=TrainConfig(batch_size=4, steps=2, log_interval=1, sample_interval=0, save_interval=0,
                                     sample_num=2, sample_steps="3", ema_rates=(0.9,), precision="bf16"))
    summary = train(rc, tmp_path / "run", progress=False)
    assert summary["run_config"]["train"]["precision"] == "bf16"
    assert all(torch.isfinite(torch.tensor(summary["last_metrics"][k])) for k in ("loss", "mse", "vb"))
    imgs = sample_images(summary["checkpoint"], 2, 3, progress=False, precision="bf16")
    assert imgs.shape == (2, 8, 8, 1) and imgs.dtype.name == "uint8"
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
