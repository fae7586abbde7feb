"""Named datasets: Fashion-MNIST from its IDX files, scikit-learn's digits and CIFAR-10 python
batches (read by an unpickler that builds only plain data, so a crafted batch cannot run code)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from iddpm_core.image_source import ArraySource, DataError, ImageSource
from iddpm_core.io import RefusedPickle, load_plain_pickle

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
# Where `fashion-mnist:SPLIT` looks when no root is passed: this variable, else Debian's folder.
FASHION_MNIST_ENV = "IDDPM_FASHION_MNIST"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# ----------------------------------------------------------------------------- IDX (Fashion-MNIST)

def _open_maybe_gz(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) holding unsigned bytes: magic 0x0000 08 ndim, big-endian
    dimensions, then the data."""
    path = Path(path)
    try:
        with _open_maybe_gz(path) as fh:
            head = fh.read(4)
            if len(head) != 4 or head[:2] != b"\x00\x00":
                raise DataError(f"{path}: not an IDX file (magic {head!r})")
            if head[2] != 0x08:
                raise DataError(f"{path}: IDX data type 0x{head[2]:02x} is not unsigned byte (0x08)")
            ndim = head[3]
            dims = struct.unpack(f">{ndim}I", fh.read(4 * ndim))
            data = fh.read()
    except (OSError, EOFError, struct.error, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise DataError(f"{path}: IDX header says {dims} ({expected} bytes) but holds {len(data)} bytes")
    return np.frombuffer(data, np.uint8).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for cand in (root / (stem + ".gz"), root / stem):
        if cand.is_file():
            return cand
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {root} "
                    "(install Debian's dataset-fashion-mnist or pass the folder holding the IDX files)")


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> ArraySource:
    """Fashion-MNIST from IDX files (``train``: 60,000, ``test``: 10,000 images 28x28x1 with labels),
    in ``root``, else ``$IDDPM_FASHION_MNIST``, else Debian's /usr/share/datasets/fashion-mnist."""
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    if root is None:
        root = os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_ROOT
    root = Path(root)
    img_stem, lab_stem = FASHION_MNIST_FILES[split]
    images = read_idx(_find_idx(root, img_stem))
    labels = read_idx(_find_idx(root, lab_stem))
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DataError(f"{root}: Fashion-MNIST {split} images {images.shape} and labels {labels.shape} do not match")
    return ArraySource(images[..., None], labels, name=f"fashion-mnist:{split}")


# ----------------------------------------------------------------------------- digits

def digits() -> ArraySource:
    """scikit-learn's digits: 1,797 images 8x8x1 with labels 0-9. Its levels 0..16 are mapped to
    uint8 by ``round(v * 255 / 16)`` (0 -> 0, 16 -> 255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    return ArraySource(images, d.target.astype(np.int64), name="digits")


# ----------------------------------------------------------------------------- CIFAR-10

def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``data`` [N, 3072] uint8 and ``labels`` [N] int64 of one CIFAR-10 python batch, read without
    running code (:func:`iddpm_core.io.load_plain_pickle`); anything else is refused, naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            d = load_plain_pickle(fh, encoding="bytes")
    except RefusedPickle as exc:
        raise DataError(f"{path}: not a CIFAR-10 batch, refused without running it: {exc}") from None
    except Exception as exc:  # truncated or foreign files raise many types
        raise DataError(f"cannot read CIFAR-10 batch {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch (a {type(d).__name__}, expected a dict)")
    d = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array [N, 3072], got {got}")
    labels = np.asarray(labels) if isinstance(labels, (list, tuple, np.ndarray)) else None
    if labels is None or labels.shape != (len(data),) or (len(labels) and not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{path}: 'labels' must be {len(data)} integers")
    return data, labels.astype(np.int64)


class Cifar10Source(ImageSource):
    """CIFAR-10 "python version" batches in a local folder (``data_batch_1..5`` for ``train``,
    ``test_batch`` for ``test``); each batch is a pickle with ``data`` [10000, 3072] uint8
    (R, G, B planes of 32x32) and ``labels``. One batch file is held in memory at a time."""

    def __init__(self, root: str | os.PathLike, split: str = "train"):
        self.root = Path(root)
        names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        if split not in names:
            raise DataError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
        if (self.root / "cifar-10-batches-py").is_dir():
            self.root = self.root / "cifar-10-batches-py"
        self.files = [self.root / n for n in names[split]]
        missing = [str(p) for p in self.files if not p.is_file()]
        if missing:
            raise DataError(f"CIFAR-10 {split} batch files missing: {', '.join(missing)}")
        self.name = f"cifar10:{split}:{self.root}"
        self.shape = (32, 32, 3)
        self.has_labels = True
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None
        # Batch lengths: read each file's labels once (cheap next to the images).
        self.counts = [len(self._load(k)[1]) for k in range(len(self.files))]
        self.starts = np.cumsum([0] + self.counts)

    def _load(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is not None and self._cache[0] == k:
            return self._cache[1], self._cache[2]
        data, labels = read_cifar_batch(self.files[k])
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self._cache = (k, images, labels)
        return images, labels

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _read(self, i):
        k = int(np.searchsorted(self.starts, i, side="right") - 1)
        images, labels = self._load(k)
        j = i - int(self.starts[k])
        return np.ascontiguousarray(images[j]), int(labels[j])
