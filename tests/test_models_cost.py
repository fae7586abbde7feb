"""Cost accounting: FLOP hand counts for a convolution, an attention layer, linear layers; training vs forward."""

import pytest
import torch
import torch.nn as nn

from iddpm_core.models import ModelConfig, build_model
from iddpm_core.models.cost import (count_parameters, cost_summary, forward_flops, function_evaluations,
                                    sampling_flops, training_flops_per_image)
from iddpm_core.models.layers import AttentionBlock


pytestmark = pytest.mark.usefixtures("one_thread")


class Wrap(nn.Module):
    """Gives a single layer the denoiser call signature model(x, t, y)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, t, y=None):
        return self.layer(x)


def test_convolution_flops_equal_hand_count():
    # 2 FLOPs per multiply-add: 2 * H_out * W_out * C_out * C_in * k * k (bias additions are not counted)
    conv = Wrap(nn.Conv2d(3, 8, 3, padding=1))
    assert forward_flops(conv, image_size=16, in_channels=3) == 2 * 16 * 16 * 8 * 3 * 9
    assert forward_flops(conv, image_size=16, in_channels=3, batch=4) == 2 * 16 * 16 * 8 * 3 * 9
    strided = Wrap(nn.Conv2d(4, 6, 3, stride=2, padding=1))
    assert forward_flops(strided, image_size=10, in_channels=4) == 2 * 5 * 5 * 6 * 4 * 9


def test_attention_flops_equal_hand_count():
    c, heads, side = 16, 4, 6
    T, d = side * side, c // heads
    hand = (2 * T * c * 3 * c          # qkv projection (1x1 conv)
            + 2 * heads * T * T * d    # q^T k
            + 2 * heads * T * T * d    # weights applied to v
            + 2 * T * c * c)           # output projection
    assert forward_flops(Wrap(AttentionBlock(c, heads)), image_size=side, in_channels=c) == hand


def test_training_flops_of_two_linear_layers_equal_hand_count():
    # forward 2ab + 2bc; backward: weight gradients 2ab + 2bc, input gradient of the second layer 2bc
    # (none for the first: the input needs no gradient)
    a, b, c = 5, 7, 3
    net = Wrap(nn.Sequential(nn.Flatten(), nn.Linear(a, b), nn.Linear(b, c)))
    fwd = forward_flops(net, image_size=1, in_channels=a)
    assert fwd == 2 * a * b + 2 * b * c
    assert training_flops_per_image(net, image_size=1, in_channels=a) == fwd + 2 * a * b + 4 * b * c


def test_training_flops_of_unet_are_close_to_three_forwards():
    model = build_model(ModelConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2),
                                    attention_resolutions=(4,), num_heads=2))
    fwd, train = forward_flops(model), training_flops_per_image(model)
    # backward = 2x forward except the input gradients of the two layers fed by tensors without gradient:
    # the input convolution (1 -> 8 channels, 3x3, 8x8) and the first time-MLP layer (8 -> 32)
    skipped = 2 * 8 * 8 * 8 * 1 * 9 + 2 * 8 * 32
    assert train == 3 * fwd - skipped
    assert all(p.grad is None for p in model.parameters())  # gradients were cleared


def test_sampling_flops_and_summary():
    cfg = ModelConfig(kind="cunet", image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2),
                      attention_resolutions=())
    model = build_model(cfg)
    fwd = forward_flops(model)
    assert sampling_flops(model, steps=10) == 10 * fwd
    assert sampling_flops(model, steps=10, evals_per_step=2) == 20 * fwd
    summary = cost_summary(model)
    assert summary["parameters"] == count_parameters(model)
    assert summary["forward_flops"] == fwd
    assert summary["function_evaluations"] == function_evaluations(model) == 4 * 5
    assert function_evaluations(build_model(ModelConfig(image_size=8, base_channels=8, attention_resolutions=()))) == 0
