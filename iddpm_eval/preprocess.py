"""Image preprocessing for the FID Inception network: uint8 NHWC in, scaled 299x299 float out.

Modes (DESIGN.md):

* ``legacy-tf`` (default; TTUR, ADM, StyleGAN, EDM, torch-fidelity): float images in [0, 255],
  TF1 ``resize_bilinear`` (``align_corners=False``, no half-pixel centres, no antialias) to
  299x299, then (x - 128) / 128. Source coordinate of output pixel i is i * (in / out) in
  float32; the two neighbours are floor(.) and min(floor(.) + 1, in - 1); the interpolation is
  done along x first, then along y, as ``a + (b - a) * t`` (the order TF and torch-fidelity use).
* ``clean`` (clean-fid): PIL bicubic resize of each channel as a 32-bit float image (``mode="F"``,
  which antialiases when shrinking), clipped to [0, 255], then (x - 128) / 128.

Grayscale images are replicated to three channels; any input size is accepted (one size per call).
The output is NCHW float32 in channels-last memory (the layout the network runs fastest in).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from iddpm_core.data import check_images

MODES = ("legacy-tf", "clean")
SIZE = 299


def _tf_axis(in_size: int, out_size: int):
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lo = src.long()
    hi = (lo + 1).clamp_max(in_size - 1)
    return lo, hi, src - lo.float()


def _one_hot(index: torch.Tensor, in_size: int) -> torch.Tensor:
    """(in_size, len(index)) matrix picking ``index``: a gather as a matmul, exact (one 1.0 per column)."""
    mat = torch.zeros(in_size, len(index), dtype=torch.float32)
    mat[index, torch.arange(len(index))] = 1.0
    return mat


def tf_bilinear_resize(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False)`` of a float NHWC tensor to ``size`` x ``size``.

    Returns (N, size, C, size) memory seen as NHWC ``(N, size, size, C)``. Each input row is
    interpolated along x once (gathers as exact one-hot matmuls), then the rows are gathered and
    blended along y: per element the same operations, in the same order, as TF's kernel.
    """
    n, h, w, c = x.shape
    if h == size and w == size:
        return x
    ylo, yhi, dy = _tf_axis(h, size)
    xlo, xhi, dx = _tf_axis(w, size)
    rows = x.permute(0, 1, 3, 2)  # (N, H, C, W) view
    left, right = rows @ _one_hot(xlo, w), rows @ _one_hot(xhi, w)  # (N, H, C, size)
    along_x = left + (right - left) * dx
    top, bottom = along_x.index_select(1, ylo), along_x.index_select(1, yhi)  # (N, size, C, size)
    out = top + (bottom - top) * dy.view(1, size, 1, 1)
    return out.permute(0, 1, 3, 2)


def pil_bicubic_resize(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """clean-fid's resize of one uint8 HWC image: PIL bicubic per channel in float mode, clipped."""
    out = np.empty((size, size, image.shape[2]), dtype=np.float32)
    for ch in range(image.shape[2]):
        pil = Image.fromarray(image[:, :, ch].astype(np.float32), mode="F")
        out[:, :, ch] = np.asarray(pil.resize((size, size), resample=Image.BICUBIC))
    return np.clip(out, 0, 255, out=out)


def preprocess(images: np.ndarray, mode: str = "legacy-tf", size: int = SIZE) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, 3, size, size), channels-last, scaled by (x - 128) / 128."""
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; choose one of {', '.join(MODES)}")
    images = check_images(images)
    if mode == "legacy-tf":
        x = tf_bilinear_resize(torch.from_numpy(images).to(torch.float32), size)
    else:
        x = torch.from_numpy(np.stack([pil_bicubic_resize(img, size) for img in images]))
    x = (x - 128) / 128
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    # NHWC memory seen as NCHW: a channels-last tensor without a copy (one copy if expanded)
    return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
