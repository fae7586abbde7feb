"""The interface every image source shares: :class:`ImageSource` (uint8 NHWC images with optional
integer labels, read on demand), :class:`ArraySource` for images in memory, :func:`check_images`
(the one check of an image batch) and :class:`DataError`. The sources themselves are in
:mod:`iddpm_core.image_files` and :mod:`iddpm_core.datasets`; :mod:`iddpm_core.data` opens them."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

NO_LABEL = -1


class DataError(ValueError):
    """A data file or folder cannot be used; the message names it."""


class ImageSource:
    """Base class: subclasses set ``shape`` (H, W, C), ``has_labels``, ``name`` and implement
    ``__len__`` and ``_read(i) -> (image, label)``."""

    shape: tuple[int, int, int]
    has_labels: bool = False
    name: str = ""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, i: int) -> tuple[np.ndarray, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} ({n} images)")
        return self._read(i % n)

    def batch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Images [len(indices), H, W, C] uint8 and labels [len(indices)] int64 (-1 = none)."""
        items = [self[int(i)] for i in indices]
        h, w, c = self.shape
        if not items:
            return np.zeros((0, h, w, c), np.uint8), np.zeros((0,), np.int64)
        return np.stack([x for x, _ in items]), np.array([y for _, y in items], np.int64)

    def iter_batches(self, batch_size: int = 64, indices: Sequence[int] | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (images, labels) batches over ``indices`` (default: all, in order)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        for start in range(0, len(idx), batch_size):
            yield self.batch(idx[start:start + batch_size])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n={len(self)}, shape={self.shape})"


class ArraySource(ImageSource):
    """Images already in memory (uint8 NHWC)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "array"):
        self.name = name
        self.images = check_images(images, name, need_images=True)
        self.shape = tuple(self.images.shape[1:])
        self.has_labels = labels is not None
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (len(self.images),) or not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{name}: labels must be integers of shape ({len(self.images)},), "
                                f"got {labels.dtype} {labels.shape}")
            self.labels = labels.astype(np.int64)
        else:
            self.labels = np.full(len(self.images), NO_LABEL, np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def _read(self, i):
        return self.images[i], int(self.labels[i])

    def batch(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        return self.images[idx], self.labels[idx]


def check_images(images, name: str = "images", need_images: bool = False) -> np.ndarray:
    """``images`` (a numpy array or a torch tensor) checked to be uint8 [N, H, W, C] with C 1 or 3
    ([N, H, W] is grayscale) and returned as a numpy array [N, H, W, C]; ``need_images`` also
    refuses N = 0. Raises DataError (a ValueError) naming ``name``, the shape and the dtype."""
    if type(images).__module__.startswith("torch"):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"{name}: images must be uint8 (values 0..255), got dtype {images.dtype} with shape "
                        f"{images.shape}; convert with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)")
    if images.ndim == 3:  # N, H, W grayscale
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{name}: images must have shape (N, H, W, C) with C 1 or 3 (NHWC), got {images.shape}")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise DataError(f"{name}: empty images of shape {images.shape}")
    if need_images and images.shape[0] == 0:
        raise DataError(f"{name}: holds no images (shape {images.shape})")
    return images
