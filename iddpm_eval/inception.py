"""The FID Inception network (Inception-2015-12-05) as a plain PyTorch module.

Module names follow NVIDIA's TorchScript (``conv``, ``conv_1`` ... ``mixed`` ... ``mixed_10``),
which follow the TF graph's scopes, so ``load_state_dict`` takes the tensors of
:func:`iddpm_eval.weights.load_nvidia_state` as they are. Input: float NCHW 299x299 already
scaled by (x - 128) / 128. Every convolution is conv (no bias) -> batch norm without scale
(eps 0.001) -> ReLU; :meth:`FIDInception.fold` merges the norm into the convolution.

Speed on the CPU (see ``benchmarks/fid_features.py``): folded norms, channels-last memory, and
each convolution + bias + ReLU run as one oneDNN primitive (``mkldnn._convolution_pointwise``, the
op ``torch.compile`` emits on CPU) on a weight reordered once into oneDNN's blocked layout. All of
it is eager code: no TorchScript and no compilation step at run time. Without oneDNN (or on a
GPU) the same folded weights run through ``conv2d`` + in-place ReLU. The fused path carries no
gradients (features are computed under ``torch.inference_mode``).

TF quirks kept: average pools do not count padding; the last block (``mixed_10``) pools its
fourth branch with a max pool instead of an average pool.

sFID features (ADM evaluator, TF tensor ``mixed_6/conv:0``): in the TF graph the scope
``mixed_6/conv`` holds ``Conv2D``, ``batchnorm`` and the op named after the scope itself, the
layer's ReLU output, so ``mixed_6/conv:0`` is taken AFTER the batch norm and ReLU. ``mixed_6`` is
the third 17x17 block (torch-fidelity's ``Mixed_6d``) and ``conv`` its 1x1 branch
(``Mixed_6d.branch1x1``): 192 channels at 17x17, of which the evaluator keeps the first 7,
flattened in TF's (H, W, C) order to 17 * 17 * 7 = 2023 numbers.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3


def _fused_conv_relu():
    """oneDNN's fused convolution + ReLU (the op torch.compile uses on CPU), if this build has it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._convolution_pointwise
        x, w = torch.ones(1, 2, 3, 3), torch.ones(2, 2, 1, 1)
        ok = torch.equal(op(x, w, torch.zeros(2), [0, 0], [1, 1], [1, 1], 1, "relu", [None], ""), F.conv2d(x, w))
    except (AttributeError, RuntimeError):
        return None
    return op if ok else None


_FUSED = _fused_conv_relu()


class ConvBN(nn.Module):
    """Conv (no bias) + batch norm without scale (eps 0.001) + ReLU, as in the TF graph."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.register_buffer("weight", torch.zeros(cout, cin, kh, kw))
        self.register_buffer("beta", torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))
        self.folded = False
        self._packed = None  # oneDNN copy of the folded weight, made at the first CPU call
        self._packed_for = 0

    def _apply(self, fn, recurse=True):
        self._packed = None  # moved or cast: repack from the (new) weight on the next call
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def fold(self) -> None:
        """Merge the norm into the convolution (computed in float64): w' = w / s, b = beta - mean / s."""
        if self.folded:
            return
        inv = 1.0 / torch.sqrt(self.var.double() + BN_EPS)
        weight = self.weight.double() * inv[:, None, None, None]
        bias = self.beta.double() - self.mean.double() * inv
        self.weight = weight.to(self.weight.dtype)
        self.beta = bias.to(self.beta.dtype)
        self.mean = torch.zeros_like(self.mean)
        self.var = torch.full_like(self.var, 1.0 - BN_EPS)
        self.folded = True
        self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            if _FUSED is not None and x.device.type == "cpu" and x.dtype == torch.float32:
                # one oneDNN primitive: convolution + bias + ReLU (no second pass over memory), with the
                # weight reordered once into oneDNN's blocked layout instead of at every call
                # (oneDNN picks the blocked layout for an input shape: pack for the largest batch seen)
                if self._packed is None or x.shape[0] > self._packed_for:
                    self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                        self.weight.to_mkldnn(), list(self.padding), [self.stride, self.stride], [1, 1], 1,
                        list(x.shape))
                    self._packed_for = x.shape[0]
                return _FUSED(x, self._packed, self.beta, list(self.padding), [self.stride, self.stride],
                              [1, 1], 1, "relu", [None], "")
            return F.conv2d(x, self.weight, self.beta, self.stride, self.padding).relu_()
        y = F.conv2d(x, self.weight, None, self.stride, self.padding)
        y = F.batch_norm(y, self.mean, self.var, None, self.beta, False, 0.0, BN_EPS)
        return F.relu(y)


def _avg3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class _Pool(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "avg":
            return _avg3(x)
        return F.max_pool2d(x, 3, 1, 1)


def _seq(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


class BlockA(nn.Module):
    """35x35 block (TF ``mixed`` .. ``mixed_2``): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_out: int):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = _seq(conv=ConvBN(cin, 48, 1), conv_1=ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _seq(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                            conv_2=ConvBN(96, 96, 3, padding=1))
        self.tower_2 = _seq(pool=_Pool("avg"), conv=ConvBN(cin, pool_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockB(nn.Module):
    """35 -> 17 reduction (TF ``mixed_3``): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = _seq(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                          conv_2=ConvBN(96, 96, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), F.max_pool2d(x, 3, 2)], 1)


class BlockC(nn.Module):
    """17x17 block (TF ``mixed_4`` .. ``mixed_7``) with factorised 7x7 convolutions."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.conv = ConvBN(cin, 192, 1)
        self.tower = _seq(conv=ConvBN(cin, c7, 1), conv_1=ConvBN(c7, c7, (1, 7), padding=(0, 3)),
                          conv_2=ConvBN(c7, 192, (7, 1), padding=(3, 0)))
        self.tower_1 = _seq(conv=ConvBN(cin, c7, 1), conv_1=ConvBN(c7, c7, (7, 1), padding=(3, 0)),
                            conv_2=ConvBN(c7, c7, (1, 7), padding=(0, 3)),
                            conv_3=ConvBN(c7, c7, (7, 1), padding=(3, 0)),
                            conv_4=ConvBN(c7, 192, (1, 7), padding=(0, 3)))
        self.tower_2 = _seq(pool=_Pool("avg"), conv=ConvBN(cin, 192, 1))

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)


class BlockD(nn.Module):
    """17 -> 8 reduction (TF ``mixed_8``)."""

    def __init__(self, cin: int):
        super().__init__()
        self.tower = _seq(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _seq(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 192, (1, 7), padding=(0, 3)),
                            conv_2=ConvBN(192, 192, (7, 1), padding=(3, 0)),
                            conv_3=ConvBN(192, 192, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), F.max_pool2d(x, 3, 2)], 1)


class BlockE(nn.Module):
    """8x8 block (TF ``mixed_9``, ``mixed_10``); ``pool`` is "avg" for mixed_9, "max" for mixed_10."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = _Pool(pool)
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class FIDInception(nn.Module):
    """Inception-2015-12-05 up to pool_3 (2048), optionally the sFID map and the classifier.

    ``forward(x)`` returns ``(pool [N, 2048], spatial [N, 2023] or empty, logits [N, 1008] or empty)``;
    ``spatial`` is computed only when ``self.sfid`` is true, ``logits`` only when ``fc`` is present.
    """

    def __init__(self, num_classes: int = 0, sfid: bool = False):
        super().__init__()
        self.sfid = sfid
        self.conv = ConvBN(3, 32, 3, stride=2)
        self.conv_1 = ConvBN(32, 32, 3)
        self.conv_2 = ConvBN(32, 64, 3, padding=1)
        self.conv_3 = ConvBN(64, 80, 1)
        self.conv_4 = ConvBN(80, 192, 3)
        self.mixed = BlockA(192, 32)
        self.mixed_1 = BlockA(256, 64)
        self.mixed_2 = BlockA(288, 64)
        self.mixed_3 = BlockB(288)
        self.mixed_4 = BlockC(768, 128)
        self.mixed_5 = BlockC(768, 160)
        self.mixed_6 = BlockC(768, 160)
        self.mixed_7 = BlockC(768, 192)
        self.mixed_8 = BlockD(768)
        self.mixed_9 = BlockE(1280, "avg")
        self.mixed_10 = BlockE(2048, "max")
        self.fc = nn.Linear(2048, num_classes) if num_classes else None
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], sfid: bool = False, fold: bool = True) -> "FIDInception":
        """Build from NVIDIA-named tensors (see :mod:`iddpm_eval.weights`)."""
        num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 0
        net = cls(num_classes=num_classes, sfid=sfid)
        net.load_state_dict(state, strict=True)
        if fold:
            net.fold()
        return net

    def fold(self) -> "FIDInception":
        for module in self.modules():
            if isinstance(module, ConvBN):
                module.fold()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = F.max_pool2d(x, 3, 2)
        x = self.conv_4(self.conv_3(x))
        x = F.max_pool2d(x, 3, 2)
        x = self.mixed_3(self.mixed_2(self.mixed_1(self.mixed(x))))
        x = self.mixed_5(self.mixed_4(x))
        parts = self.mixed_6.branches(x)
        spatial = x.new_zeros(0)
        if self.sfid:
            # TF order (H, W, C): [N, 17, 17, 7] flattened
            spatial = parts[0][:, :7].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        x = self.mixed_7(torch.cat(parts, 1))
        x = self.mixed_10(self.mixed_9(self.mixed_8(x)))
        pool = F.avg_pool2d(x, 8).flatten(1)
        logits = x.new_zeros(0)
        if self.fc is not None:
            logits = self.fc(pool)
        return pool, spatial, logits
