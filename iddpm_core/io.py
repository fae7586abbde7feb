"""Atomic file writes: write to a temporary file beside the target, then rename over it.

A crash or Ctrl-C mid-write leaves the old file (or no file) in place, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
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
