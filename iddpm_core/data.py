"""Image data sources behind one interface: uint8 NHWC images with optional integer labels.

Every source is an :class:`ImageSource`: ``len(src)``, ``src[i] -> (image HxWxC uint8, label or -1)``,
``src.batch(indices)`` and ``src.iter_batches(batch_size)``. Images are read on demand, so 50,000
images never need to sit in memory at once (Fashion-MNIST and digits are small and are read whole).

Sources: a folder of images (recursive ``.png``/``.jpg``/``.jpeg``), an ``.npz`` batch (``arr_0``
NHWC uint8, labels in ``arr_1``/``labels``/``y`` when present, read row by row from the archive),
Fashion-MNIST IDX files, scikit-learn's digits and CIFAR-10 python batches. :func:`load_source`
turns a short spec (``fashion-mnist:train``, ``digits``, a folder, an ``.npz``) into a source.

Rules for folders: every image must have the same height and width; a folder with mixed sizes is
refused (like torch-fidelity, which cannot batch them; resize them yourself so the resize is a
choice you record). Images are RGB (C = 3) unless every file is grayscale (C = 1); alpha is dropped.
16-bit PNGs become 8 bits by their high byte (v >> 8: what Pillow does for 16-bit colour PNGs and
libpng's ``strip_16``), so a 16-bit copy of 8-bit images (v * 257) reads back as the same bytes.
Every image is decoded once when the folder is opened (``verify=True``), so a corrupt or truncated
file, or a subfolder that cannot be listed, is refused, naming it, before any work starts.

CIFAR-10 batches are pickles; they are read by an unpickler that builds only what the format holds
(dicts, lists, strings, numbers, numpy arrays) and refuses anything else, so a crafted batch cannot
run code.

Models see ``to_model_range(images)``: float32 NCHW in [-1, 1] (x / 127.5 - 1);
:class:`TorchImageDataset` wraps a source for a torch DataLoader, with optional random flips.

Layout: :mod:`iddpm_core.image_source` (the interface, in-memory arrays, the image check),
:mod:`iddpm_core.image_files` (folders, ``.npz``), :mod:`iddpm_core.datasets` (Fashion-MNIST,
digits, CIFAR-10); this module opens any of them from a spec and holds the model-side conversions.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from iddpm_core.datasets import (FASHION_MNIST_ENV, FASHION_MNIST_ROOT, Cifar10Source, digits, fashion_mnist,
                                 read_cifar_batch, read_idx)
from iddpm_core.image_files import IMAGE_EXTENSIONS, FolderSource, NpzSource, list_image_files
from iddpm_core.image_source import NO_LABEL, ArraySource, DataError, ImageSource, check_images

# The names callers import from here (each defined in one of the modules above or below).
__all__ = ["FASHION_MNIST_ENV", "FASHION_MNIST_ROOT", "IMAGE_EXTENSIONS", "NO_LABEL", "ArraySource", "Cifar10Source",
           "DataError", "FolderSource", "ImageSource", "NpzSource", "TorchImageDataset", "check_images", "digits",
           "fashion_mnist", "from_model_range", "list_image_files", "load_source", "read_cifar_batch", "read_idx",
           "to_model_range"]


# ----------------------------------------------------------------------------- specs

def load_source(spec: str | os.PathLike, *, root: str | os.PathLike | None = None,
                class_from_prefix: bool = False) -> ImageSource:
    """Open a source from a spec: ``fashion-mnist:train`` / ``fashion-mnist:test`` (IDX files in
    ``root`` or the Debian folder), ``digits``, ``cifar10:train:FOLDER`` / ``cifar10:test:FOLDER``,
    a folder of images, or an ``.npz`` batch."""
    s = str(spec)
    if s.startswith("fashion-mnist:"):
        return fashion_mnist(s.split(":", 1)[1], root)
    if s == "fashion-mnist":
        return fashion_mnist("train", root)
    if s == "digits":
        return digits()
    if s.startswith("cifar10:"):
        parts = s.split(":", 2)
        if len(parts) != 3:
            raise DataError(f"CIFAR-10 spec must be cifar10:train:FOLDER or cifar10:test:FOLDER, got {s!r}")
        return Cifar10Source(parts[2], parts[1])
    path = Path(s)
    if path.is_dir():
        return FolderSource(path, class_from_prefix=class_from_prefix)
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        return NpzSource(path)
    if not path.exists():
        raise DataError(f"{s}: no such file or folder, and not a known dataset "
                        "(fashion-mnist:train, fashion-mnist:test, digits, cifar10:SPLIT:FOLDER)")
    raise DataError(f"{s}: not a folder of images or an .npz batch")


# ----------------------------------------------------------------------------- model side

def to_model_range(images: np.ndarray):
    """uint8 NHWC -> float32 torch tensor NCHW in [-1, 1] (x / 127.5 - 1)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def from_model_range(x, rounding: str = "round") -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC. ``rounding="round"``: ((x + 1) * 127.5).round();
    ``"truncate"``: Improved-DDPM's ``.to(uint8)`` after clamping (floors)."""
    import torch

    y = ((x.detach().float() + 1) * 127.5)
    if rounding == "round":
        y = y.round()
    elif rounding != "truncate":
        raise ValueError(f"rounding must be 'round' or 'truncate', got {rounding!r}")
    return y.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class TorchImageDataset:
    """Map-style dataset for ``torch.utils.data.DataLoader``: item -> (float32 CHW in [-1, 1],
    int64 label, -1 without labels); ``flip=True`` mirrors each image left-right with p = 0.5."""

    def __init__(self, source: ImageSource, flip: bool = False):
        self.source, self.flip = source, flip

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        import torch

        img, label = self.source[i]
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 127.5 - 1.0
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, torch.tensor(label, dtype=torch.int64)
