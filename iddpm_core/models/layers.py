"""Building blocks shared by the U-Net and the continuous U-Net."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# Fast paths (default): attention by F.scaled_dot_product_attention; in models of 32+ base channels
# channels-last activations with GroupNorm + scale-shift + SiLU as one autograd node (group_norm_act).
# They change float rounding only; ``reference_ops()`` switches them off (tests compare the two).
_FAST = True


def fast_ops() -> bool:
    """True unless inside :func:`reference_ops`."""
    return _FAST


@contextlib.contextmanager
def reference_ops():
    """Run the denoisers with the plain operations (NCHW, explicit attention matmuls) inside this block."""
    global _FAST
    old, _FAST = _FAST, False
    try:
        yield
    finally:
        _FAST = old


def _spatial_sum(t: torch.Tensor) -> torch.Tensor:
    """Per-(example, channel) sum over the positions, [N, C] in float64 (accumulated in float32, or in
    float32 for half types)."""
    return t.sum(tuple(range(2, t.dim())), dtype=torch.float32 if t.dtype != torch.float64 else None).double()


def _group_norm_act(x, weight, bias, scale, shift, groups: int, eps: float, act: bool, inplace: bool):
    """Forward of :class:`_GroupNormAct`: (output, centred input xc = x - mean, per-channel rstd [N, C]
    and 1 + scale, float64). The variance and the output come from xc, so nothing cancels where a group's
    mean is large against its spread. ``inplace`` applies the SiLU on its own input (no backward)."""
    n, c = x.shape[:2]
    cg = c // groups
    view = (n, c) + (1,) * (x.dim() - 2)
    m = cg * x[0, 0].numel()
    mean = (_spatial_sum(x).view(n, groups, cg).sum(-1) / m).repeat_interleave(cg, 1)  # [n, c]
    xc = x - mean.to(x.dtype).view(view)
    var = _spatial_sum(xc.square()).view(n, groups, cg).sum(-1) / m
    rstd = (var + eps).rsqrt().repeat_interleave(cg, 1)
    gamma, beta = weight.double(), bias.double()
    one_plus = 1 + scale.double() if scale is not None else None
    k = gamma * one_plus if one_plus is not None else gamma.expand(n, c)
    b = beta * one_plus if one_plus is not None else beta.expand(n, c)
    if shift is not None:
        b = b + shift.double()
    a = (rstd * k).to(x.dtype).view(view)
    if inplace:  # no backward: normalise in place of the centred copy, one buffer for the whole node
        z = xc.mul_(a).add_(b.to(x.dtype).view(view))
        return (F.silu(z, inplace=True) if act else z), None, None, rstd, one_plus
    z = torch.addcmul(b.to(x.dtype).view(view), xc, a)
    out = F.silu(z, inplace=inplace) if act else z
    return out, z, xc, rstd, one_plus


class _GroupNormAct(torch.autograd.Function):
    """GroupNorm, optional scale-shift ``z = GN(x) * (1 + scale) + shift`` and optional SiLU, as one
    autograd node. Statistics come from per-channel sums over the spatial positions (reductions that run
    along memory on channels-last tensors), combined per group in float64; normalisation, affine and
    scale-shift fold into one multiply-add per element of the centred input, which is kept for the
    backward: two reductions and two multiply-add passes."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups: int, eps: float, act: bool):
        out, z, xc, rstd, one_plus = _group_norm_act(x, weight, bias, scale, shift, groups, eps, act, False)
        ctx.save_for_backward(xc, z if act else None, rstd, weight.double(), bias.double(), one_plus)
        ctx.groups, ctx.act, ctx.has_scale, ctx.has_shift = groups, act, scale is not None, shift is not None
        ctx.dtypes = (weight.dtype, (scale if scale is not None else shift if shift is not None else x).dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, z, rstd, gamma, beta, one_plus = ctx.saved_tensors
        n, c = xc.shape[:2]
        view = (n, c) + (1,) * (xc.dim() - 2)
        g = ctx.groups
        m = (c // g) * xc[0, 0].numel()
        dz = torch.ops.aten.silu_backward(grad_out, z) if ctx.act else grad_out
        s_dz = _spatial_sum(dz)                          # sum dz
        s_dz_xhat = rstd * _spatial_sum(dz * xc)         # sum dz * xhat
        ones = one_plus if one_plus is not None else torch.ones_like(s_dz)
        k = gamma * ones
        grad_x = grad_w = grad_b = grad_scale = grad_shift = None
        if ctx.needs_input_grad[0]:
            a = (k * s_dz).view(n, g, -1).sum(-1).repeat_interleave(c // g, 1) / m
            bb = (k * s_dz_xhat).view(n, g, -1).sum(-1).repeat_interleave(c // g, 1) / m
            # dx = rstd * (k dz - a - xhat * bb), xhat = rstd * xc
            grad_x = torch.addcmul((-rstd * a).to(xc.dtype).view(view), xc,
                                   (-rstd * rstd * bb).to(xc.dtype).view(view))
            grad_x.addcmul_(dz, (rstd * k).to(xc.dtype).view(view))
        w_dtype, e_dtype = ctx.dtypes
        if ctx.needs_input_grad[1]:
            grad_w = (ones * s_dz_xhat).sum(0).to(w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = (ones * s_dz).sum(0).to(w_dtype)
        if ctx.has_scale and ctx.needs_input_grad[3]:
            grad_scale = (gamma * s_dz_xhat + beta * s_dz).to(e_dtype)
        if ctx.has_shift and ctx.needs_input_grad[4]:
            grad_shift = s_dz.to(e_dtype)
        return grad_x, grad_w, grad_b, grad_scale, grad_shift, None, None, None


def group_norm_act(norm: nn.GroupNorm, x: torch.Tensor, scale: torch.Tensor | None = None,
                   shift: torch.Tensor | None = None, act: bool = True) -> torch.Tensor:
    """``SiLU(norm(x) * (1 + scale) + shift)`` (scale, shift: [N, C] or None; ``act=False`` skips the
    SiLU). On channels-last input (the fast path of wide models), one fused node (for bfloat16/float16
    input under autocast the statistics are summed in float32, as GroupNorm32 does): torch's own GroupNorm
    is 2-3x slower on channels-last than on contiguous tensors. Otherwise the plain modules."""
    if _FAST and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        if torch.is_grad_enabled():
            return _GroupNormAct.apply(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, act)
        return _group_norm_act(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, act, True)[0]
    h = norm(x)
    if scale is not None:
        view = scale.shape + (1,) * (x.dim() - 2)
        h = h * (1 + scale.view(view))
    if shift is not None:
        h = h + shift.view(shift.shape + (1,) * (x.dim() - 2))
    return F.silu(h) if act else h


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps t [N]: cos half, then sin half."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def num_groups(channels: int, max_groups: int = 32) -> int:
    """32 groups, or the largest divisor of ``channels`` below 32 when 32 does not divide it."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (or float64 for float64 input) whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64:
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(num_groups(channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over spatial positions; matmuls written out so FLOP counters see them."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.channels = channels
        self.num_heads = num_heads
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _FAST or x.dim() != 4:
            return self._forward_reference(x)
        # Token-major layout [b, T, c]: a view of channels-last x, so the 1x1 convolutions are matmuls
        # without copies; the q, k, v of each head as in the reference (per-head slices of 3 * d channels).
        b, c, *spatial = x.shape
        d = c // self.num_heads
        tokens = x.reshape(b, c, -1).transpose(1, 2)
        normed = group_norm_act(self.norm, x, act=False).reshape(b, c, -1).transpose(1, 2)
        qkv = F.linear(normed, self.qkv.weight.squeeze(-1), self.qkv.bias)
        q, k, v = qkv.unflatten(-1, (self.num_heads, 3, d)).permute(3, 0, 2, 1, 4)  # each [b, heads, T, d]
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        h = F.linear(h.transpose(1, 2).reshape(b, -1, c), self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return (tokens + h).transpose(1, 2).reshape(b, c, *spatial)

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))  # [b, 3c, T]
        # each head owns a contiguous slice of 3 * c / heads channels holding its q, k, v
        qkv = qkv.reshape(b * self.num_heads, 3 * c // self.num_heads, -1)
        q, k, v = qkv.chunk(3, dim=1)  # [b*h, d, T]
        scale = 1.0 / math.sqrt(math.sqrt(q.shape[1]))
        w = torch.bmm((q * scale).transpose(1, 2), k * scale)  # [b*h, T, T]
        w = torch.softmax(w.float(), dim=-1).type(w.dtype)
        h = torch.bmm(v, w.transpose(1, 2))  # [b*h, d, T]
        h = self.proj_out(h.reshape(b, c, -1))
        return (flat + h).reshape(b, c, *spatial)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of width ``base`` followed by a two-layer MLP to ``4 * base``; optional class labels."""

    def __init__(self, base: int, num_classes: int | None = None):
        super().__init__()
        self.base = base
        self.dim = 4 * base
        self.mlp = nn.Sequential(nn.Linear(base, self.dim), nn.SiLU(), nn.Linear(self.dim, self.dim))
        self.num_classes = num_classes
        self.label_emb = nn.Embedding(num_classes, self.dim) if num_classes is not None else None

    def forward(self, t: torch.Tensor, y: torch.Tensor | None, n: int) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"t must have shape [{n}] (one timestep per image), got {tuple(t.shape)}")
        emb = self.mlp(timestep_embedding(t, self.base).to(self.mlp[0].weight.dtype))
        if self.label_emb is None:
            if y is not None:
                raise ValueError("class labels y were given but the model has num_classes=None")
        else:
            if y is None:
                raise ValueError(f"the model is class-conditional (num_classes={self.num_classes}): pass y")
            if y.shape != (n,):
                raise ValueError(f"y must have shape [{n}], got {tuple(y.shape)}")
            y = y.long()
            if n and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"class labels must lie in [0, {self.num_classes}), got {y.tolist()}")
            emb = emb + self.label_emb(y)
        return emb


def check_input(x: torch.Tensor, in_channels: int, levels: int) -> None:
    """Raise ValueError when ``x`` is not [N, in_channels, H, W] with H, W halving ``levels - 1`` times."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x must have shape [N, {in_channels}, H, W], got {tuple(x.shape)}")
    k = 2 ** (levels - 1)
    if x.shape[2] % k or x.shape[3] % k:
        raise ValueError(f"x spatial size {tuple(x.shape[2:])} must be divisible by {k} for {levels} levels")


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
