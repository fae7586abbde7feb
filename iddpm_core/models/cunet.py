"""Continuous U-Net (Calvo-Ordonez et al. 2024, "The Missing U"): second-order ODE blocks solved by torchdiffeq.

Each level carries a position x and a velocity v of ``c`` channels each (state ``[x, v]``, 2c channels).
An ODE block integrates, over solver time s in [0, 1],

    dx/ds = v,    dv/ds = f(x, v; e) = Conv3x3(SiLU(GN(h) * (1 + a) + b)),  h = Conv3x3(SiLU(GN([x, v])))

where (a, b) = Linear(SiLU(e)) comes from the diffusion-time embedding e (plus class embedding), so the
diffusion time conditions every block (the released code computes the embedding but never uses it);
with ``use_scale_shift_norm=False`` the embedding is added after the second norm instead.
f does not depend on the solver time s. The initial velocity is a learned GN-SiLU-Conv3x3 of the stem
output; afterwards (x, v) travel together: bilinear resizing and 1x1 convolutions (with SiLU) map the
2c-channel state between levels, skips are concatenated, attention runs on the state at
``attention_resolutions``. ``num_res_blocks`` is the number of ODE blocks per level on each path
(1 = the released design: 2 * levels + 1 blocks). There is no dropout: an ODE right-hand side must be
deterministic for the solver, so ``dropout > 0`` is refused.
``nfe`` counts evaluations of every f during the last forward pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchdiffeq import odeint, odeint_adjoint

from .config import FIXED_STEP_SOLVERS, ModelConfig
from .layers import AttentionBlock, TimeEmbedding, check_input, normalization, resize, zero_module


class SecondOrderDynamics(nn.Module):
    """Right-hand side of dx/ds = v, dv/ds = f(x, v; e); counts its evaluations in ``nfe``."""

    def __init__(self, channels: int, scale_shift: bool = True):
        super().__init__()
        self.channels = channels
        self.scale_shift = scale_shift
        self.norm1 = normalization(2 * channels)
        self.conv1 = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.norm2 = normalization(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()
        self.nfe = 0

    def forward(self, s: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        # state = (x, v, scale_shift); scale_shift is constant in s (its derivative is zero) and rides in the
        # state so that the adjoint method also returns its gradient.
        self.nfe += 1
        x, v, ss = state
        h = self.conv1(self.act(self.norm1(torch.cat([x, v], dim=1))))
        e = ss[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h) + e  # after the norm: with one channel per group a norm would erase it
        dv = self.conv2(self.act(h))
        return v, dv, torch.zeros_like(ss)


class ODEBlock(nn.Module):
    """Integrates :class:`SecondOrderDynamics` over s in [0, 1] and returns the state at s = 1."""

    def __init__(self, channels: int, emb_dim: int, config: ModelConfig):
        super().__init__()
        self.channels = channels
        self.func = SecondOrderDynamics(channels, config.use_scale_shift_norm)
        self.emb_proj = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, 2 * channels if config.use_scale_shift_norm else channels))
        self.solver = config.solver
        self.steps = config.solver_steps
        self.rtol, self.atol = config.rtol, config.atol
        self.adjoint = config.adjoint
        self.max_num_steps = config.max_num_steps

    def forward(self, state: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x, v = state.chunk(2, dim=1)
        ss = self.emb_proj(emb)
        if self.solver in FIXED_STEP_SOLVERS:
            # an explicit grid gives exactly ``steps`` steps (a float step_size can round to one more)
            s = torch.linspace(0.0, 1.0, self.steps + 1, dtype=x.dtype, device=x.device)
            options = None
        else:
            s = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
            options = {"max_num_steps": self.max_num_steps}
        solve = odeint_adjoint if self.adjoint else odeint
        kwargs = {"adjoint_params": tuple(self.func.parameters())} if self.adjoint else {}
        xs, vs, _ = solve(self.func, (x, v, ss), s, rtol=self.rtol, atol=self.atol, method=self.solver,
                          options=options, **kwargs)
        return torch.cat([xs[-1], vs[-1]], dim=1)


class Transition(nn.Module):
    """1x1 convolution with SiLU between levels (channel change of the [x, v] state)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(h))


class ContinuousUNet(nn.Module):
    """Continuous U-Net: ODE blocks on the down path, at the bottleneck and on the up path."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.num_classes = config.num_classes
        mult = config.resolved_channel_mult()
        self.sizes = config.resolutions()
        self.levels = len(mult)
        base = config.base_channels
        widths = [base * m for m in mult]  # position channels per level; the state has twice as many
        self.time_embed = TimeEmbedding(base, config.num_classes)
        emb_dim = self.time_embed.dim
        attn_at = set(config.attention_resolutions)

        self.stem = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.initial_velocity = nn.Sequential(normalization(widths[0]), nn.SiLU(),
                                              nn.Conv2d(widths[0], widths[0], 3, padding=1))
        n = config.num_res_blocks
        self.down = nn.ModuleList(nn.ModuleList(ODEBlock(c, emb_dim, config) for _ in range(n)) for c in widths)
        self.down_attn = nn.ModuleList(
            AttentionBlock(2 * c, config.num_heads) if r in attn_at else nn.Identity()
            for c, r in zip(widths, self.sizes))
        self.down_trans = nn.ModuleList(Transition(2 * widths[i], 2 * widths[i + 1])
                                        for i in range(self.levels - 1))
        self.middle = ODEBlock(widths[-1], emb_dim, config)
        self.up_merge = nn.ModuleList(
            Transition(2 * widths[min(i + 1, self.levels - 1)] + 2 * widths[i], 2 * widths[i])
            for i in range(self.levels))
        self.up = nn.ModuleList(nn.ModuleList(ODEBlock(c, emb_dim, config) for _ in range(n)) for c in widths)
        self.up_attn = nn.ModuleList(
            AttentionBlock(2 * c, config.num_heads) if r in attn_at else nn.Identity()
            for c, r in zip(widths, self.sizes))
        self.out = nn.Sequential(normalization(2 * widths[0]), nn.SiLU(),
                                 zero_module(nn.Conv2d(2 * widths[0], config.out_channels, 3, padding=1)))

    def ode_blocks(self) -> list[ODEBlock]:
        return [*(b for level in self.down for b in level), self.middle, *(b for level in self.up for b in level)]

    @property
    def nfe(self) -> int:
        """Function evaluations of all ODE blocks since the last :meth:`reset_nfe` (each forward resets)."""
        return sum(b.func.nfe for b in self.ode_blocks())

    def set_solver(self, solver: str, steps: int = 1, rtol: float | None = None, atol: float | None = None) -> None:
        """Integrate every ODE block with another solver (same weights): e.g. a model trained with rk4
        sampled with euler. ``self.config`` is updated to match; a bad choice raises ValueError."""
        from dataclasses import replace

        cfg = replace(self.config, solver=solver, solver_steps=int(steps), rtol=self.config.rtol if rtol is None
                      else float(rtol), atol=self.config.atol if atol is None else float(atol))
        cfg.validate()
        self.config = cfg
        for b in self.ode_blocks():
            b.solver, b.steps, b.rtol, b.atol = cfg.solver, cfg.solver_steps, cfg.rtol, cfg.atol

    def reset_nfe(self) -> None:
        for b in self.ode_blocks():
            b.func.nfe = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.config.in_channels, self.levels)
        self.reset_nfe()
        emb = self.time_embed(t, y, x.shape[0])
        pos = self.stem(x)
        h = torch.cat([pos, self.initial_velocity(pos)], dim=1)
        skips = []
        for i in range(self.levels):
            for block in self.down[i]:
                h = block(h, emb)
            h = self.down_attn[i](h)
            skips.append(h)
            if i < self.levels - 1:
                h = self.down_trans[i](resize(h, (h.shape[2] // 2, h.shape[3] // 2)))
        h = self.middle(h, emb)
        for i in reversed(range(self.levels)):
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = resize(h, skip.shape[-2:])
            h = self.up_merge[i](torch.cat([h, skip], dim=1))
            for block in self.up[i]:
                h = block(h, emb)
            h = self.up_attn[i](h)
        return self.out(h)
