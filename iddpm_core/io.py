"""Atomic file writes: write to a temporary file beside the target, then rename over it.

A crash or Ctrl-C mid-write leaves the old file (or no file) in place, never a truncated one.
A kill -9 can leave the temporary file itself behind. Its name says who wrote it:
``.<target name>.<host tag>-<pid>.<8 random chars><suffix>`` (host tag: 8 hex digits of the
host name's sha1). The first atomic write into a folder in a process (and
:func:`remove_stale_temps`, which the results tables, checkpoint loading and sampling call at
start) removes the leftovers of earlier writers there. A temporary file is *stale* when its
writer is dead (its host tag is this host's and no process has its pid) or when it is older than
:data:`STALE_AGE_S` (any writer, including names from before the pid was recorded:
``.<target>.<8 random chars><suffix>`` with the target ending in that suffix); a live writer's
file is never touched, and no atomic write leaves its temporary file unmodified for an hour.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import socket
import stat
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Iterator

STALE_AGE_S = 3600.0
_NEW = re.compile(r"^\.(?P<target>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.[a-z0-9_]{8}(?P<suffix>.*)$")
_OLD = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}(?P<suffix>\.[A-Za-z0-9]+)$")
_cleaned: set[str] = set()
_cleaned_lock = threading.Lock()


def host_tag() -> str:
    """8 hex digits naming this host in temporary file names."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists (another user's process) or cannot tell: keep the file
    return True


def stale_temp(entry: Path, now: float | None = None) -> bool:
    """Whether ``entry`` is a leftover temporary file of :func:`atomic_path` (rule in the module doc)."""
    name = entry.name
    m = _NEW.match(name)
    old = None if m else _OLD.match(name)
    if m is None and (old is None or not old["target"].endswith(old["suffix"])):
        return False
    try:
        st = entry.lstat()
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if m is not None and m["host"] == host_tag() and not pid_alive(int(m["pid"])):
        return True
    return (now if now is not None else time.time()) - st.st_mtime > STALE_AGE_S


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete stale temporary files of :func:`atomic_path` in ``folder``; return what was removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        if e.name.startswith(".") and stale_temp(Path(e.path), now):
            try:
                os.unlink(e.path)
                removed.append(Path(e.path))
            except OSError:
                pass  # gone already, or not ours to remove
    return removed


def _clean_once(folder: Path) -> None:
    key = str(folder.resolve())
    with _cleaned_lock:
        if key in _cleaned:
            return
        _cleaned.add(key)
    remove_stale_temps(folder)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it to ``path``.

    ``suffix`` defaults to the target's own suffix, so libraries that look at the extension
    (``np.savez`` adds ``.npz`` when it is missing) write exactly the yielded path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_once(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{host_tag()}-{os.getpid()}.",
                               suffix=suffix if suffix is not None else path.suffix, dir=path.parent)
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


class NotWritableError(ValueError):
    """An output path that cannot be written; the message names it and says why."""


def _writable(p: Path, st: os.stat_result) -> bool:
    """Mode bits first (a file or folder with no write bit, or none for its owner when that is us,
    is read-only even for root, who would otherwise write through it), then access(2)."""
    mode = st.st_mode
    if not mode & 0o222 or (st.st_uid == os.geteuid() and not mode & 0o200):
        return False
    return os.access(p, os.W_OK | (os.X_OK if stat.S_ISDIR(mode) else 0))


def check_writable(path: str | os.PathLike, *, folder: bool = False, what: str = "output") -> Path:
    """Check before any work that ``path`` (a file, or a folder with ``folder=True``) can be written:
    an existing file must be writable and not a folder, and the nearest existing folder on the
    way to it writable. Raises :class:`NotWritableError` naming the path; returns ``Path(path)``."""
    path = Path(path)
    where = f"{what} {path}"
    if folder:
        if path.exists() and not path.is_dir():
            raise NotWritableError(f"{where}: exists and is not a folder")
        d = path
    else:
        if path.is_dir():
            raise NotWritableError(f"{where}: is a folder, not a file")
        if path.exists():
            st = path.stat()
            if not _writable(path, st):
                raise NotWritableError(f"{where}: the file is read-only (mode {stat.S_IMODE(st.st_mode):04o}); "
                                       f"refusing to replace it")
        d = path.parent
    d = Path(os.path.abspath(d))
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise NotWritableError(f"{where}: {d} is not a folder")
    st = d.stat()
    if not _writable(d, st):
        raise NotWritableError(f"{where}: folder {d} is not writable (mode {stat.S_IMODE(st.st_mode):04o})")
    return path


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


# ----------------------------------------------------------------------------- plain pickles

def _latin1_bytes(text, encoding):
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedPickle(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not bytes data")
    return text.encode("latin-1")


def _plain_dtype(*args):
    import numpy as np

    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise RefusedPickle(f"dtype {dtype} holds Python objects")
    return dtype


def _plain_globals() -> dict:
    """The only globals a pickle of plain data refers to: numpy's array and scalar reconstruction
    (as Python 2's cPickle and numpy 1.x/2.x write them under protocols 2-5) and protocol 2's
    spelling of bytes."""
    import numpy as np

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _plain_dtype,
           ("_codecs", "encode"): _latin1_bytes}
    for mod in ("numpy.core", "numpy._core"):
        out[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        out[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        out[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return out


class RefusedPickle(pickle.UnpicklingError):
    """A pickle asked for something other than plain data; nothing of it was run."""


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings, bytes, numbers and numpy arrays of plain dtypes; any
    other global (a function to call, a class to build) is refused before it is called."""

    allowed: dict | None = None

    def find_class(self, module, name):
        if _PlainUnpickler.allowed is None:
            _PlainUnpickler.allowed = _plain_globals()
        fn = _PlainUnpickler.allowed.get((module, name))
        if fn is None:
            raise RefusedPickle(f"refusing to load {module}.{name}: only plain data (containers, "
                                         "numbers, strings, numpy arrays) is read from this pickle")
        return fn

    def persistent_load(self, pid):
        raise RefusedPickle("it holds persistent references, which plain data never has")


def load_plain_pickle(fh, encoding: str = "ASCII"):
    """Unpickle the open binary file ``fh`` without running code: only plain data is built (see
    :class:`_PlainUnpickler`); anything else raises :class:`RefusedPickle` naming the global.
    ``encoding="bytes"`` keeps Python 2 strings as bytes (CIFAR-10's batches)."""
    return _PlainUnpickler(fh, encoding=encoding).load()
