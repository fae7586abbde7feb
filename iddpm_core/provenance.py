"""Where a number came from: package version, git commit, time, machine, command line and content
hashes; and the small shared helpers that records need (a file lock for read-merge-write cycles,
JSON without NaN). The one home of each: the trainer, the sweep and the evaluator all import them.

Nothing here touches the network. ``git`` is run locally, only on the checkout that holds the
installed ``iddpm`` sources; an installed wheel (no checkout) reports ``"unknown"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator


UNKNOWN = "unknown"
SHORT_HASH_CHARS = 16  # config_hash default length: 64 bits of sha256 (hex)


def package_version() -> str:
    """Version of the installed ``iddpm`` distribution (falls back to ``iddpm_core.__version__``)."""
    try:
        from importlib.metadata import version

        return version("iddpm")
    except Exception:  # not installed as a distribution (e.g. a bare source tree on sys.path)
        try:
            from iddpm_core import __version__

            return str(__version__)
        except Exception:
            return UNKNOWN


def source_root() -> Path:
    """Folder that contains the ``iddpm_core`` and ``iddpm_eval`` packages."""
    return Path(__file__).resolve().parent.parent


def git_commit(root: str | os.PathLike | None = None) -> str:
    """Commit of the iddpm source tree, with ``+dirty`` when tracked package files differ from it.

    Returns ``"unknown"`` when ``root`` (default: :func:`source_root`) is not inside a git
    checkout, when git is missing, or when the checkout is not the one holding the sources.
    """
    root = Path(root) if root is not None else source_root()
    if not root.is_dir():
        return UNKNOWN

    def _git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=10, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = _git("rev-parse", "--verify", "HEAD")
    if not commit:
        return UNKNOWN
    # The checkout must track the package sources under root (a site-packages folder inside some
    # unrelated or ignored part of a repository does not count).
    packages = [p for p in ("iddpm_core", "iddpm_eval") if (root / p).is_dir()]
    if not packages or not _git("ls-files", "--", *packages):
        return UNKNOWN
    # Only the package sources decide "dirty": results files and notes do not change a number.
    paths = packages + (["pyproject.toml"] if (root / "pyproject.toml").exists() else [])
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    return commit + ("+dirty" if status else "")


def utc_now() -> str:
    """Current UTC time as ISO 8601 with seconds, e.g. ``2026-11-23T18:16:26Z``."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or UNKNOWN


def machine() -> str:
    """One-line description: OS/arch, CPU model and count, torch version, torch threads, GPU."""
    parts = [f"{platform.system()}-{platform.machine()}", f"cpu={_cpu_name()} x{os.cpu_count()}",
             f"python={platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch={torch.__version__}")
        parts.append(f"threads={torch.get_num_threads()}")
        if torch.cuda.is_available():
            parts.append(f"gpu={torch.cuda.get_device_name(0)}")
    except Exception:  # torch missing or broken: the row is still worth writing
        parts.append("torch=none")
    return "; ".join(parts)


def provenance() -> dict[str, str]:
    """``package_version``, ``git_commit``, ``time`` (UTC ISO) and ``machine`` of this process."""
    return {"package_version": package_version(), "git_commit": git_commit(), "time": utc_now(),
            "machine": machine()}


def _canonical(obj: Any) -> Any:
    """Plain JSON types for hashing: dataclasses as dicts, tuples/sets as lists, paths as strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"config_hash: dict key {k!r} of type {type(k).__name__} is not hashable as JSON")
            out[str(k)] = _canonical(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_canonical(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return repr(obj)  # "nan", "inf": JSON has no spelling for them
        return obj
    # numpy scalars / 0-d arrays / torch scalars
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return _canonical(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        return _canonical(obj.item())
    raise TypeError(f"config_hash: cannot hash a value of type {type(obj).__name__}: {obj!r}")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys, no spaces, ASCII only: equal configs give equal text."""
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def config_hash(obj: Any, full: bool = False) -> str:
    """sha256 of :func:`canonical_json` of ``obj``: the first 16 hex digits, or all 64 with ``full``.

    Dataclasses, dicts, lists/tuples, paths, numbers and numpy/torch scalars are accepted; dict
    key order does not matter, list order does, a tuple hashes like the equal list.
    """
    digest = hashlib.sha256(canonical_json(obj).encode("ascii")).hexdigest()
    return digest if full else digest[:SHORT_HASH_CHARS]


def command_line(argv: list[str] | None = None) -> str:
    """The running command (``sys.argv``), shell-quoted, with the program shortened to its name:
    ``iddpm-train sweep ...``; a module of the package run as a script or with ``python -m`` is
    written ``python -m iddpm_core.cli_sweep ...``."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0]:
        return ""
    prog = Path(argv[0])
    head = [prog.name]
    if prog.suffix == ".py":
        try:
            rel = prog.resolve().relative_to(source_root())
        except ValueError:
            rel = None
        if rel is not None and rel.parts and rel.parts[0] in ("iddpm_core", "iddpm_eval"):
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__main__":
                parts = parts[:-1]
            head = ["python", "-m", ".".join(parts)]
    return shlex.join(head + argv[1:])


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``) held for the ``with`` block. ``path`` is a
    folder (locked itself) or a lock file (created, with its parent folders, if missing). A no-op
    where ``fcntl`` is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def json_clean(obj: Any) -> Any:
    """``obj`` with every NaN and infinity (in nested dicts, lists and tuples) replaced by None,
    so that it is valid JSON (``json.dumps(..., allow_nan=False)`` accepts it)."""
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


if __name__ == "__main__":  # pragma: no cover - manual check
    json.dump(provenance(), sys.stdout, indent=2)
    print()
