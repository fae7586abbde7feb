"""Continuous U-Net: shapes, t-dependence, second-order dynamics, evaluation counts, adjoint, FLOPs per evaluation."""

import itertools

import pytest
import torch

from iddpm_core.models import ModelConfig, build_model
from iddpm_core.models.cost import forward_flops, function_evaluations
from iddpm_core.models.cunet import ODEBlock
from helpers import randomize_


pytestmark = pytest.mark.usefixtures("one_thread")



def small(**kw):
    base = dict(kind="cunet", image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2),
                attention_resolutions=(4,), num_heads=2)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("channels,learn_sigma,classes", list(itertools.product([1, 3], [True, False], [None, 4])))
def test_output_shapes(channels, learn_sigma, classes):
    model = build_model(small(in_channels=channels, learn_sigma=learn_sigma, num_classes=classes))
    y = torch.tensor([0, 3]) if classes else None
    out = model(torch.randn(2, channels, 8, 8), torch.tensor([3.0, 999.0]), y)
    assert out.shape == (2, channels * (2 if learn_sigma else 1), 8, 8)


def test_output_depends_on_t():
    # the released code ignores t; here the embedding conditions every ODE block
    model = randomize_(build_model(small())).eval()
    x = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1)
    out = model(x, torch.tensor([10.0, 900.0]))
    assert (out[0] - out[1]).abs().max() > 1e-3
    # and each ODE block on its own depends on the embedding
    block = model.down[0][0]
    state = torch.randn(1, 16, 8, 8)
    e1, e2 = torch.randn(2, 1, 32)
    assert (block(state, e1) - block(state, e2)).abs().max() > 1e-3


@pytest.mark.parametrize("solver,steps,per_step", [("rk4", 1, 4), ("rk4", 2, 4), ("euler", 3, 1), ("midpoint", 2, 2)])
def test_counted_evaluations_equal_the_solver_count(solver, steps, per_step):
    model = build_model(small(solver=solver, solver_steps=steps, channel_mult=(1, 2, 2), attention_resolutions=()))
    blocks = 2 * 3 + 1  # down and up at each of 3 levels, plus the bottleneck
    with torch.no_grad():
        model(torch.randn(1, 1, 8, 8), torch.tensor([1]))
    assert model.nfe == blocks * steps * per_step
    assert function_evaluations(model) == blocks * steps * per_step


def test_blocks_per_level_follow_num_res_blocks():
    model = build_model(small(num_res_blocks=2, attention_resolutions=()))
    assert len(model.ode_blocks()) == 2 * 2 * 2 + 1  # 2 blocks at each of 2 levels on both paths, bottleneck
    with torch.no_grad():
        model(torch.randn(1, 1, 8, 8), torch.tensor([1]))
    assert model.nfe == 4 * 9


def test_additive_embedding_variant_depends_on_t():
    model = randomize_(build_model(small(use_scale_shift_norm=False))).eval()
    x = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1)
    out = model(x, torch.tensor([10.0, 900.0]))
    assert out.shape == (2, 2, 8, 8) and (out[0] - out[1]).abs().max() > 1e-3


def test_adaptive_solver_count_matches_a_hook_count():
    model = randomize_(build_model(small(solver="dopri5")), seed=1)
    calls = []
    for block in model.ode_blocks():
        block.func.conv1.register_forward_hook(lambda *a: calls.append(1))
    model(torch.randn(1, 1, 8, 8), torch.tensor([5]))
    # dopri5: at least one accepted step of 6 stages per block, plus the initial evaluations
    assert model.nfe == len(calls) >= 7 * len(model.ode_blocks())


def test_euler_steps_follow_second_order_dynamics():
    # two explicit Euler steps of dx/ds = v, dv/ds = f(x, v), written out by hand
    cfg = small(solver="euler", solver_steps=2)
    block = randomize_(ODEBlock(4, 32, cfg))
    state, emb = torch.randn(2, 8, 5, 5), torch.randn(2, 32)
    ss = block.emb_proj(emb)
    x, v = state.chunk(2, dim=1)
    for _ in range(2):
        _, dv, _ = block.func(None, (x, v, ss))
        x, v = x + 0.5 * v, v + 0.5 * dv
    assert torch.allclose(block(state, emb), torch.cat([x, v], dim=1), atol=1e-5)


def test_rk4_matches_fine_euler():
    # the solvers agree on the same dynamics: rk4 (4 steps) vs euler (300 steps, error O(1/300))
    block = randomize_(ODEBlock(2, 8, small(solver="rk4", solver_steps=4)), seed=3)
    state, emb = 0.5 * torch.randn(1, 4, 3, 3), torch.randn(1, 8)
    with torch.no_grad():
        a = block(state, emb)
        block.solver, block.steps = "euler", 300
        b = block(state, emb)
    assert (a - b).norm() < 1e-2 * b.norm()


def test_gradients_reach_every_parameter():
    model = randomize_(build_model(small(in_channels=3, num_classes=2)))
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 500.0]), torch.tensor([0, 1]))
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_adjoint_gradients_match_direct_backprop():
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 400.0])
    grads = []
    for adjoint in (False, True):
        model = randomize_(build_model(small(solver="rk4", solver_steps=2, adjoint=adjoint)), seed=2)
        model(x, t).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    # the adjoint solves the backward ODE with the same rk4 grid, so it agrees up to discretisation error
    total = torch.cat([g.flatten() for g in grads[0].values()])
    for name, g in grads[0].items():
        assert grads[1][name] is not None, name
        assert (grads[1][name] - g).norm() <= 0.06 * g.norm() + 1e-4 * total.norm(), name


def test_each_solver_evaluation_is_counted_in_flops():
    # rk4 (4 evaluations per block) minus euler (1) = 3 evaluations of every block's dynamics,
    # each costing two 3x3 convolutions: 2c -> c and c -> c at H x W (2 FLOPs per multiply-add).
    cfg = dict(channel_mult=(1, 2), attention_resolutions=())
    rk4 = forward_flops(build_model(small(solver="rk4", **cfg)))
    euler = forward_flops(build_model(small(solver="euler", **cfg)))
    per_eval = sum(2 * hw * (2 * c * c * 9 + c * c * 9) for c, hw in [(8, 64), (16, 16), (16, 16), (16, 16), (8, 64)])
    assert rk4 - euler == 3 * per_eval


def test_config_errors():
    with pytest.raises(ValueError, match="solver"):
        build_model(small(solver="rk45"))
    with pytest.raises(ValueError, match="solver_steps"):
        build_model(small(solver_steps=0))
    with pytest.raises(ValueError, match="no dropout"):
        build_model(small(dropout=0.1))


def test_small_config_parameter_count_equals_hand_count():
    def conv(cin, cout, k):
        return cin * cout * k * k + cout

    def lin(i, o):
        return i * o + o

    def attn(c):
        return 2 * c + (c * 3 * c + 3 * c) + (c * c + c)

    def block(c, emb=32):  # dynamics GN(2c), conv 2c->c, GN(c), conv c->c; embedding projection to 2c
        return 4 * c + conv(2 * c, c, 3) + 2 * c + conv(c, c, 3) + lin(emb, 2 * c)

    hand = (lin(8, 32) + lin(32, 32)                       # time embedding
            + conv(1, 8, 3) + 2 * 8 + conv(8, 8, 3)        # stem, initial velocity
            + block(8) + block(16) + attn(32)              # down path (attention on the 32-channel state at 4 px)
            + conv(16, 32, 1)                              # transition 8 px -> 4 px
            + block(16)                                    # bottleneck
            + conv(32 + 32, 32, 1) + block(16) + attn(32)  # up, 4 px: merge with skip
            + conv(32 + 16, 16, 1) + block(8)              # up, 8 px
            + 2 * 16 + conv(16, 1, 3))                     # output
    model = build_model(small(learn_sigma=False))
    assert sum(p.numel() for p in model.parameters()) == hand
