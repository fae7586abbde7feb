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

Models see ``to_model_range(images)``: float32 NCHW in [-1, 1] (x / 127.5 - 1).
"""

from __future__ import annotations

import gzip
import os
import struct
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from iddpm_core.io import RefusedPickle, load_plain_pickle, open_npz

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
# Where `fashion-mnist:SPLIT` looks when no root is passed: this variable, else Debian's folder.
FASHION_MNIST_ENV = "IDDPM_FASHION_MNIST"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
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


# ----------------------------------------------------------------------------- folder

# Pillow modes of 16-bit grayscale PNGs (older Pillow versions give "I"); Pillow's convert("L")
# clips them at 255, which turns them into black and white.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
GRAY_MODES = ("1", "L", "F") + SIXTEEN_BIT_MODES


def _decode(im, path: Path, channels: int) -> np.ndarray:
    """A PIL image -> uint8 HxW (``channels`` 1) or HxWx3, 16-bit grayscale scaled by v >> 8."""
    if im.mode in SIXTEEN_BIT_MODES:
        raw = np.asarray(im)
        if raw.size and (raw.min() < 0 or raw.max() > 65535):
            raise DataError(f"{path}: {im.mode} image has values outside 0..65535; only 8- and 16-bit images "
                            "are read")
        gray = (raw.astype(np.int64) >> 8).astype(np.uint8)
        return gray if channels == 1 else np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)


def _read_image_file(path: Path, channels: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = _decode(im, path, channels)
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"cannot read image {path}: {exc}") from exc
    return arr[..., None] if channels == 1 else arr


def list_image_files(root: Path) -> list[Path]:
    """Image files (by extension) under ``root``, recursively, following folder links once, sorted.
    A folder that cannot be listed (permissions, I/O error) is refused, naming it and the reason."""
    def fail(exc: OSError):
        where = exc.filename or root
        raise DataError(f"cannot list folder {where}: {exc.strerror or exc}") from exc

    found, seen = [], set()
    for folder, dirs, names in os.walk(root, onerror=fail, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # a link back to a folder already walked
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in names:
            p = Path(folder) / name
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                found.append(p)
    return sorted(found)


class FolderSource(ImageSource):
    """Images found recursively under a folder, in sorted path order.

    Every file is decoded once at construction (``verify=True``; with False only the headers are
    read), so unreadable, corrupt or truncated files, folders that cannot be listed, an empty folder
    and mixed sizes fail before any work starts. With ``class_from_prefix`` the label is the
    file-name prefix before the first ``_`` (integer prefixes keep their value; other prefixes
    are numbered in sorted order, see ``class_names``).
    """

    def __init__(self, root: str | os.PathLike, class_from_prefix: bool = False, verify: bool = True):
        from PIL import Image

        self.root = Path(root)
        self.name = str(self.root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder")
        self.files = list_image_files(self.root)
        if not self.files:
            raise DataError(f"{self.root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} recursively)")
        sizes, gray = {}, True
        for p in self.files:
            try:
                with Image.open(p) as im:
                    size, mode = im.size, im.mode
                    if verify:
                        im.load()  # decodes every pixel: a truncated file fails here
            except Exception as exc:
                raise DataError(f"cannot read image {p}: {exc}") from exc
            sizes.setdefault(size, p)
            gray = gray and mode in GRAY_MODES
        if len(sizes) > 1:
            examples = "; ".join(f"{p} is {w}x{h}" for (w, h), p in list(sizes.items())[:3])
            raise DataError(f"{self.root}: images have {len(sizes)} different sizes ({examples}); "
                            "resize them to one size first")
        (w, h), = sizes
        self.shape = (h, w, 1 if gray else 3)
        self.has_labels = class_from_prefix
        self.class_names: list[str] = []
        self.labels = np.full(len(self.files), NO_LABEL, np.int64)
        if class_from_prefix:
            prefixes = []
            for p in self.files:
                if "_" not in p.stem:
                    raise DataError(f"{p}: file name has no class prefix before '_'")
                prefixes.append(p.stem.split("_", 1)[0])
            if all(s.isdigit() for s in prefixes):
                self.labels = np.array([int(s) for s in prefixes], np.int64)
                self.class_names = [str(v) for v in sorted(set(self.labels.tolist()))]
            else:
                self.class_names = sorted(set(prefixes))
                lookup = {s: i for i, s in enumerate(self.class_names)}
                self.labels = np.array([lookup[s] for s in prefixes], np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, i):
        arr = _read_image_file(self.files[i], self.shape[2])
        if arr.shape != self.shape:
            raise DataError(f"{self.files[i]}: decoded shape {arr.shape} differs from {self.shape}")
        return arr, int(self.labels[i])


# ----------------------------------------------------------------------------- npz

class _NpyMember:
    """Random row access to one uncompressed-or-compressed ``.npy`` member of a zip archive."""

    def __init__(self, path: Path, member: str):
        self.path, self.member = path, member
        self._zip = zipfile.ZipFile(path)
        self._fh = self._zip.open(member)
        version = np.lib.format.read_magic(self._fh)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in reader:
            raise DataError(f"{path}: {member} has unsupported .npy version {version}")
        self.shape, self.fortran, self.dtype = reader[version](self._fh)
        self.offset = self._fh.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> np.ndarray:
        self._fh.seek(self.offset + start * self.row_bytes)
        n = stop - start
        buf = self._fh.read(n * self.row_bytes)
        if len(buf) != n * self.row_bytes:
            raise DataError(f"{self.path}: {self.member} is truncated")
        return np.frombuffer(buf, dtype=self.dtype).reshape((n,) + tuple(self.shape[1:]))

    def close(self):
        self._fh.close()
        self._zip.close()


class NpzSource(ImageSource):
    """An ``.npz`` batch: ``arr_0`` [N, H, W, C] uint8 (C 1 or 3, or [N, H, W] grayscale);
    labels from ``arr_1``, ``labels`` or ``y`` when present. Rows are read from the archive
    on demand (contiguous runs in one read), so the file need not fit in memory."""

    LABEL_KEYS = ("arr_1", "labels", "y")

    def __init__(self, path: str | os.PathLike, key: str = "arr_0"):
        self.path = Path(path)
        self.name = str(self.path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                members = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read {self.path} as .npz: {exc}") from exc
        if key not in members:
            raise DataError(f"{self.path}: no '{key}' array (has {sorted(members)})")
        try:
            self._arr = _NpyMember(self.path, key + ".npy")
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read {self.path}[{key}]: {exc}") from exc
        shape, dtype = tuple(self._arr.shape), self._arr.dtype
        if dtype != np.uint8:
            raise DataError(f"{self.path}: {key} must be uint8 images, got dtype {dtype} shape {shape}")
        if self._arr.fortran:
            raise DataError(f"{self.path}: {key} is stored in Fortran order; save it C-contiguous")
        if len(shape) == 3:
            shape = shape + (1,)
        if len(shape) != 4 or shape[-1] not in (1, 3):
            raise DataError(f"{self.path}: {key} must have shape [N, H, W, C] with C 1 or 3, got {tuple(self._arr.shape)}")
        if shape[0] == 0:
            raise DataError(f"{self.path}: {key} holds no images")
        self.n = shape[0]
        self.shape = shape[1:]
        self.has_labels = False
        self.labels = np.full(self.n, NO_LABEL, np.int64)
        for lk in self.LABEL_KEYS:
            if lk in members:
                with open_npz(self.path, DataError) as z:
                    lab = z[lk]
                if lab.shape == (self.n,) and np.issubdtype(lab.dtype, np.integer):
                    self.labels, self.has_labels = lab.astype(np.int64), True
                    break

    def __len__(self) -> int:
        return self.n

    def _read(self, i):
        return self._arr.rows(i, i + 1)[0].reshape(self.shape).copy(), int(self.labels[i])

    def batch(self, indices):
        idx = np.asarray(indices, dtype=np.int64) % max(self.n, 1)
        if len(idx) and np.all(np.diff(idx) == 1):
            imgs = self._arr.rows(int(idx[0]), int(idx[-1]) + 1).reshape((len(idx),) + self.shape)
            return imgs.copy(), self.labels[idx]
        return super().batch(idx)

    def __getstate__(self):  # DataLoader workers re-open the archive
        state = self.__dict__.copy()
        state.pop("_arr")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._arr = _NpyMember(self.path, "arr_0.npy")


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
