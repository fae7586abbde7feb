"""The Improved-DDPM U-Net (Nichol & Dhariwal 2021): residual blocks, attention, timestep conditioning."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import (AttentionBlock, TimeEmbedding, check_input, fast_ops, group_norm_act, normalization,
                     zero_module)


CHANNELS_LAST_MIN_WIDTH = 32  # base channels from which the fast path runs channels-last


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, timestep injection (scale-shift or add), GroupNorm-SiLU-dropout-zero conv, skip."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, dropout: float, scale_shift: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(),
                                        nn.Linear(emb_dim, 2 * out_channels if scale_shift else out_channels))
        self.out_norm = normalization(out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if not fast_ops():
            return self._forward_reference(x, emb)
        norm, _, conv = self.in_layers
        h = conv(group_norm_act(norm, x))
        e = self.emb_layers(emb).type(h.dtype)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = group_norm_act(self.out_norm, h, scale, shift)
        else:
            h = group_norm_act(self.out_norm, h + e[:, :, None, None])
        _, dropout, conv = self.out_layers
        return self.skip(x) + conv(dropout(h))

    def _forward_reference(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.ModuleList):
    """A sequence of layers; ResBlocks receive the embedding, the rest only x."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModel(nn.Module):
    """Improved-DDPM U-Net. ``forward(x, t, y=None)`` returns ``in_channels * (2 if learn_sigma else 1)`` channels.

    Layer for layer as improved-diffusion's ``UNetModel`` (same parameter count and FLOPs). As there, with
    ``use_scale_shift_norm=False`` the embedding is added before a GroupNorm, which cancels it wherever a
    group holds one channel (32 or fewer channels): keep scale-shift on (the default) for narrow models.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.num_classes = config.num_classes
        mult = config.resolved_channel_mult()
        sizes = config.resolutions()
        self.levels = len(mult)
        base = config.base_channels
        self.time_embed = TimeEmbedding(base, config.num_classes)
        emb_dim = self.time_embed.dim

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, config.dropout, config.use_scale_shift_norm)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, config.num_heads)

        self.input_blocks = nn.ModuleList([Stage([nn.Conv2d(config.in_channels, base, 3, padding=1)])])
        skip_chans = [base]
        ch = base
        for level, m in enumerate(mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [res(ch, base * m)]
                ch = base * m
                if sizes[level] in config.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(Stage(layers))
                skip_chans.append(ch)
            if level < len(mult) - 1:
                self.input_blocks.append(Stage([Downsample(ch)]))
                skip_chans.append(ch)

        self.middle_block = Stage([res(ch, ch), attn(ch), res(ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), base * mult[level])]
                ch = base * mult[level]
                if sizes[level] in config.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Stage(layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, config.out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.config.in_channels, self.levels)
        emb = self.time_embed(t, y, x.shape[0])
        hs = []
        # channels-last activations: oneDNN's convolutions and the attention's token layout need no reorders.
        # Only for 32+ base channels: narrower convolutions ran slower channels-last on this CPU (16 channels,
        # 28 px: 7% slower), and the contiguous layout keeps torch's fast GroupNorm.
        wide = self.config.base_channels >= CHANNELS_LAST_MIN_WIDTH
        h = x.contiguous(memory_format=torch.channels_last) if fast_ops() and wide else x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        if not fast_ops():
            return self.out(h)
        norm, _, conv = self.out
        return conv(group_norm_act(norm, h)).contiguous()
