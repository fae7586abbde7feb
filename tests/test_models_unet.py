"""Improved-DDPM U-Net: reference parameter count and FLOPs, hand counts, shapes, init, conditioning, errors."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from iddpm_core.models import ModelConfig, build_model
from iddpm_core.models.cost import count_parameters, forward_flops
from iddpm_core.models.layers import AttentionBlock, num_groups, timestep_embedding
from helpers import randomize_


pytestmark = pytest.mark.usefixtures("one_thread")



def small(**kw):
    base = dict(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
                num_heads=2)
    base.update(kw)
    return ModelConfig(**base)


def test_reference_config_parameter_count_matches_improved_diffusion():
    # REFERENCE.md: improved-diffusion's UNetModel at 32 px, 32 channels, 1 res block, attention at 16,
    # 4 heads, scale-shift norm, learned sigmas has 1,629,478 parameters and 567 MFLOP per forward image.
    model = build_model(ModelConfig())
    assert count_parameters(model) == 1_629_478
    assert abs(forward_flops(model) - 567e6) < 0.5e6


def conv(cin, cout, k):
    return cin * cout * k * k + cout


def lin(i, o):
    return i * o + o


def gn(c):
    return 2 * c


def resblock(cin, cout, emb):
    skip = conv(cin, cout, 1) if cin != cout else 0
    return gn(cin) + conv(cin, cout, 3) + lin(emb, 2 * cout) + gn(cout) + conv(cout, cout, 3) + skip


def attn(c):
    return gn(c) + (c * 3 * c + 3 * c) + (c * c + c)


def test_small_config_parameter_count_equals_hand_count():
    # 8 px, 1 channel, 8 base channels, mult (1, 2), 1 res block, attention at 4 px, fixed variance.
    cfg = small(learn_sigma=False)
    emb = 32
    hand = (lin(8, emb) + lin(emb, emb)                      # time embedding MLP
            + conv(1, 8, 3)                                  # input conv
            + resblock(8, 8, emb)                            # level 0 (8 px)
            + conv(8, 8, 3)                                  # downsample
            + resblock(8, 16, emb) + attn(16)                # level 1 (4 px, attention)
            + resblock(16, 16, emb) + attn(16) + resblock(16, 16, emb)   # middle
            + resblock(16 + 16, 16, emb) + attn(16)          # up, level 1, skip from level-1 res block
            + resblock(16 + 8, 16, emb) + attn(16) + conv(16, 16, 3)     # skip from downsample; upsample
            + resblock(16 + 8, 8, emb)                       # level 0, skip from level-0 res block
            + resblock(8 + 8, 8, emb)                        # skip from input conv
            + gn(8) + conv(8, 1, 3))                         # output
    assert count_parameters(build_model(cfg)) == hand
    with_classes = count_parameters(build_model(small(learn_sigma=True, num_classes=5)))
    assert with_classes == hand + 5 * emb + (8 * 1 * 9 + 1)  # label embedding + one more output channel


@pytest.mark.parametrize("channels,learn_sigma,classes", list(itertools.product([1, 3], [True, False], [None, 4])))
def test_output_shapes(channels, learn_sigma, classes):
    model = build_model(small(in_channels=channels, learn_sigma=learn_sigma, num_classes=classes))
    x = torch.randn(3, channels, 8, 8)
    y = torch.tensor([0, 1, 3]) if classes else None
    out = model(x, torch.tensor([0.0, 10.5, 999.0]), y)
    assert out.shape == (3, channels * (2 if learn_sigma else 1), 8, 8)


@pytest.mark.parametrize("size,mult", [(28, (1, 2, 2)), (32, (1, 2, 2, 2)), (8, (1, 2, 2)), (64, (1, 2, 3, 4))])
def test_default_channel_mult_per_resolution(size, mult):
    cfg = ModelConfig(image_size=size, attention_resolutions=())
    assert cfg.resolved_channel_mult() == mult
    assert build_model(ModelConfig(image_size=size, in_channels=1, base_channels=8, attention_resolutions=()))(
        torch.randn(1, 1, size, size), torch.tensor([3])).shape == (1, 2, size, size)


def test_zero_initialised_output_gives_zero_at_init():
    model = build_model(small(in_channels=3))
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([5, 700]))
    assert torch.count_nonzero(out) == 0


def test_output_depends_on_t_and_on_class():
    model = randomize_(build_model(small(num_classes=3))).eval()
    x = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1)
    out = model(x, torch.tensor([10.0, 900.0]), torch.tensor([1, 1]))
    assert (out[0] - out[1]).abs().max() > 1e-3
    out = model(x, torch.tensor([10.0, 10.0]), torch.tensor([0, 2]))
    assert (out[0] - out[1]).abs().max() > 1e-3
    # float and long timesteps with equal values give the same output
    a = model(x[:1], torch.tensor([10]), torch.tensor([1]))
    b = model(x[:1], torch.tensor([10.0]), torch.tensor([1]))
    assert torch.equal(a, b)


def test_gradients_reach_every_parameter():
    model = randomize_(build_model(small(in_channels=3, num_classes=2, dropout=0.1)))
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 500.0]), torch.tensor([0, 1]))
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 3.5, 999.0])
    emb = timestep_embedding(t, 6)
    for i, ti in enumerate(t.tolist()):
        freqs = [math.exp(-math.log(10000) * j / 3) for j in range(3)]
        want = [math.cos(ti * f) for f in freqs] + [math.sin(ti * f) for f in freqs]
        assert torch.allclose(emb[i], torch.tensor(want), atol=1e-4)


def test_attention_block_matches_scaled_dot_product_attention():
    block = randomize_(AttentionBlock(8, num_heads=2))
    x = torch.randn(2, 8, 3, 3)
    h = block.norm(x.reshape(2, 8, 9))
    qkv = block.qkv(h).reshape(2, 2, 12, 9)  # [b, heads, 3 * d, T]
    q, k, v = (u.transpose(-1, -2) for u in qkv.chunk(3, dim=2))  # [b, heads, T, d]
    a = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(2, 8, 9)
    want = x + block.proj_out(a).reshape(2, 8, 3, 3)
    assert torch.allclose(block(x), want, atol=1e-5)


def test_group_count():
    assert num_groups(32) == 32 and num_groups(128) == 32 and num_groups(16) == 16
    assert num_groups(48) == 24 and num_groups(7) == 7


def test_errors_say_why():
    with pytest.raises(ValueError, match="cannot be halved"):
        build_model(ModelConfig(image_size=28, channel_mult=(1, 2, 2, 2)))
    with pytest.raises(ValueError, match="no default channel_mult"):
        build_model(ModelConfig(image_size=24))
    with pytest.raises(ValueError, match="attention resolution 16"):
        build_model(ModelConfig(image_size=28))
    with pytest.raises(ValueError, match="num_heads"):
        build_model(small(num_heads=3))
    with pytest.raises(ValueError, match="kind"):
        build_model(small(kind="transformer"))
    model = build_model(small())
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        model(torch.randn(1, 3, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 1, 7, 7), torch.tensor([1]))
    with pytest.raises(ValueError, match="num_classes=None"):
        model(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        build_model(small(num_classes=3))(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.tensor([3]))
    with pytest.raises(ValueError, match="pass y"):
        build_model(small(num_classes=3))(torch.randn(1, 1, 8, 8), torch.tensor([1]))
