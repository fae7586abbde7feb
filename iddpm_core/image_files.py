"""Image sources read from files: a folder of images (:class:`FolderSource`) and an ``.npz`` batch
(:class:`NpzSource`, read row by row from the archive). The folder rules are in
:mod:`iddpm_core.data`'s docstring."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from iddpm_core.image_source import NO_LABEL, DataError, ImageSource
from iddpm_core.io import open_npz

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


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
