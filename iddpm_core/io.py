"""Atomic file writes: write to a temporary file beside the target, then rename over it.

A crash or Ctrl-C mid-write leaves the old file (or no file) in place, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it to ``path``.

    ``suffix`` defaults to the target's own suffix, so libraries that look at the extension
    (``np.savez`` adds ``.npz`` when it is missing) write exactly the yielded path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix,
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp makes the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_npz(path: str | os.PathLike, **arrays) -> None:
    """``np.savez`` made atomic; ``path`` should end in ``.npz``."""
    import numpy as np

    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` made atomic."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Full hex sha256 of a file's bytes, read in chunks; a missing file is named in the error."""
    import hashlib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file_sha256: no such file: {path}")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


class _NpzReader:
    """``np.load(path, allow_pickle=False)`` whose item access names the file and the array when
    it fails; an array of Python objects (dtype object) is refused, never unpickled."""

    def __init__(self, path: Path, error: type[Exception]):
        import numpy as np

        self.path, self.error = path, error
        self._z = np.load(path, allow_pickle=False)
        self.files = self._z.files

    def __contains__(self, key: str) -> bool:
        return key in self._z.files

    def __getitem__(self, key: str):
        try:
            return self._z[key]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            dtype = self._member_dtype(key)
            if dtype is not None and dtype.hasobject:
                raise self.error(f"{self.path}: array '{key}' holds Python objects (dtype {dtype}); "
                                 "refusing to unpickle it (a data file must not run code): save it as a "
                                 "numeric or string array") from None
            raise self.error(f"{self.path}: cannot read array '{key}': {exc}") from exc

    def _member_dtype(self, key: str):
        import numpy as np

        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(key + ".npy") as fh:
                version = np.lib.format.read_magic(fh)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                return read(fh)[2]
        except Exception:  # the header itself is unreadable: the caller reports the original error
            return None

    def close(self) -> None:
        self._z.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_npz(path: str | os.PathLike, error: type[Exception] = ValueError) -> _NpzReader:
    """Open an ``.npz`` for reading arrays by name (``with open_npz(p) as z: z["mu"]``), never
    unpickling: an object array, a truncated or corrupt member raises ``error`` naming the file
    and the array."""
    path = Path(path)
    try:
        return _NpzReader(path, error)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise error(f"cannot read {path} as .npz: {exc}") from exc
