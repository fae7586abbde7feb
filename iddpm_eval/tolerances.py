"""The tolerance file of the regression gate (:mod:`iddpm_eval.regress`): per metric, the allowed
change and how to read it.

There is no implicit default tolerance. Without a tolerance file the built-in table
:data:`BUILTIN_TOLERANCES` is used (no ``default`` entry); a file may add ``[default]``.

Tolerance file (TOML, or JSON with the same structure)::

    [default]                 # optional: applies to metrics without their own entry
    rel = 0.05
    [metrics.fid]
    abs = 0.5                 # allowed absolute change
    rel = 0.02                # allowed change relative to |baseline|
    higher_is_better = false  # omit for two-sided
    ci = true                 # excuse changes within the noise the intervals give (z-test)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from iddpm_core.checks import refuse_unknown


class RegressError(ValueError):
    """The tables or the tolerance file cannot be compared (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class Tolerance:
    abs: float = 0.0
    rel: float = 0.0
    higher_is_better: bool | None = None
    ci: bool = True

    def allowed(self, baseline: float) -> float:
        return max(self.abs, self.rel * abs(baseline))


@dataclasses.dataclass
class Tolerances:
    metrics: dict[str, Tolerance]
    default: Tolerance | None = None
    source: str = "built-in"

    def get(self, metric: str) -> Tolerance | None:
        return self.metrics.get(metric, self.default)


# Built-in tolerances for the suite's own metric names, for comparing two runs of a measurement
# (tables of a few thousand images). CI uses its own file, results/ci/tolerances.toml.
BUILTIN_TOLERANCES: dict[str, Any] = {
    "metrics": {
        "fid": {"abs": 0.5, "rel": 0.02, "higher_is_better": False},
        "sfid": {"abs": 0.5, "rel": 0.02, "higher_is_better": False},
        "kid": {"abs": 0.002, "rel": 0.05, "higher_is_better": False},
        "precision": {"abs": 0.02, "higher_is_better": True},
        "recall": {"abs": 0.02, "higher_is_better": True},
        "density": {"abs": 0.03, "higher_is_better": True},
        "coverage": {"abs": 0.02, "higher_is_better": True},
        "bpd": {"abs": 0.01, "rel": 0.005, "higher_is_better": False},
        "nll": {"abs": 0.01, "rel": 0.005, "higher_is_better": False},
    }
}

_KEYS = {f.name for f in dataclasses.fields(Tolerance)}


def _tolerance(entry: Any, where: str) -> Tolerance:
    if not isinstance(entry, dict):
        raise RegressError(f"{where}: expected a table of abs/rel/higher_is_better/ci, got {entry!r}")
    refuse_unknown(entry, _KEYS, where, RegressError)
    kw: dict[str, Any] = {}
    for k in ("abs", "rel"):
        if k in entry:
            v = entry[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise RegressError(f"{where}: {k!r} must be a finite number >= 0, got {v!r}")
            kw[k] = float(v)
    for k in ("higher_is_better", "ci"):
        if k in entry:
            if not isinstance(entry[k], bool):
                raise RegressError(f"{where}: {k!r} must be true or false, got {entry[k]!r}")
            kw[k] = entry[k]
    return Tolerance(**kw)


def parse_tolerances(data: Any, source: str) -> Tolerances:
    """Build :class:`Tolerances` from the parsed file structure ({"default": ..., "metrics": {...}})."""
    if not isinstance(data, dict):
        raise RegressError(f"tolerances {source}: expected a table at top level")
    unknown = sorted(set(data) - {"default", "metrics"})
    if unknown:
        raise RegressError(f"tolerances {source}: unknown section(s) {unknown}; allowed: default, metrics")
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict):
        raise RegressError(f"tolerances {source}: 'metrics' must be a table of metric names")
    parsed = {str(m): _tolerance(e, f"tolerances {source}: metrics.{m}") for m, e in metrics.items()}
    default = _tolerance(data["default"], f"tolerances {source}: default") if "default" in data else None
    return Tolerances(parsed, default, source)


def load_tolerances(path: str | os.PathLike | None = None) -> Tolerances:
    """Read a TOML (``.toml``) or JSON tolerance file; ``None`` gives the built-in table."""
    if path is None:
        return parse_tolerances(BUILTIN_TOLERANCES, "built-in")
    path = Path(path)
    if not path.is_file():
        raise RegressError(f"tolerances file not found: {path}")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
        else:
            import tomllib

            data = tomllib.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise RegressError(f"tolerances {path}: cannot be parsed: {err}") from None
    return parse_tolerances(data, str(path))
