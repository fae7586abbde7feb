"""Sweep specifications: a grid of runs, the base config, what to measure and how to launch, in one
TOML file read by ``iddpm-train sweep --spec FILE``. Everything is checked here, before any job is
submitted: an unknown key, a value of the wrong type, an empty axis or an unusable model is an
error naming the file and the key.

Example (every table but ``[grid]`` is optional)::

    name = "ablation-smoke"

    [grid]                                # every combination is one run
    widths = [16, 32]                     # model.base_channels
    depths = [1]                          # model.num_res_blocks
    steps = [500, 1000]                   # checkpoint steps evaluated along each run
    objectives = ["hybrid", "simple"]     # optional axis: L_hybrid (learned variance) / L_simple / L_vlb
    schedules = ["cosine", "linear"]      # optional axis: noise schedule
    seeds = [0, 1]                        # optional axis: train.seed

    [model]                               # the base run config, as in a run config file
    channel_mult = [1, 2]
    [diffusion]
    steps = 1000
    [train]
    data = "digits"
    batch_size = 32
    save_interval = 100                   # latest.pt every 100 steps: what a killed job resumes from

    [eval]                                # settings of the evaluation hook (its own keys)
    hook = "iddpm_eval.sweep_eval:evaluate_checkpoint"   # or "none"
    fid_num = 256
    nll_num = 64

    [launcher]                            # flags of the same names override these
    name = "local"                        # or "slurm"
    max_parallel = 2
    time = 60                             # minutes per job (Slurm's --time; local jobs get it too)
    partition = "gpu"                     # Slurm only: partition, account, cpus_per_task,
    cpus_per_task = 4                     #   gpus_per_task, sbatch (extra flags, e.g. ["--qos=high"])
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from iddpm_core.checks import refuse_unknown
from iddpm_core.sweep_grid import RunSpec, SweepError, make_grid

TOP_KEYS = ("name", "description", "grid", "model", "diffusion", "train", "eval", "launcher")
# grid axis -> element type (int axes take integers, str axes strings)
GRID_AXES = {"widths": int, "depths": int, "steps": int, "seeds": int, "objectives": str, "schedules": str}
REQUIRED_AXES = ("widths", "steps")
# launcher key -> accepted types
LAUNCHER_KEYS = {"name": (str,), "max_parallel": (int,), "time": (int,), "partition": (str,), "account": (str,),
                 "cpus_per_task": (int,), "gpus_per_task": (int,), "sbatch": (list,), "wait": (bool,)}
LAUNCHERS = ("local", "slurm", "inline")
# base-config fields the grid sets: refused in the base tables when the axis is present
_AXIS_FIELDS = {"widths": ("model", "base_channels"), "depths": ("model", "num_res_blocks"),
                "steps": ("train", "steps"), "seeds": ("train", "seed"), "schedules": ("diffusion", "schedule"),
                "objectives": ("diffusion", "loss")}


@dataclass
class SweepSpec:
    """A parsed, checked spec: the runs, the evaluation hook and its settings, launcher options."""

    path: str
    name: str
    runs: list[RunSpec]
    eval_hook: str | None
    eval_settings: dict
    launcher: dict = field(default_factory=dict)


def read_toml(path: Path, where: str, top_keys) -> dict:
    """The TOML document at ``path``; a missing file, invalid TOML or a top-level key not in
    ``top_keys`` is a :class:`SweepError` starting with ``where``."""
    if not path.is_file():
        raise SweepError(f"{where}: no such file")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SweepError(f"{where}: not valid TOML ({exc})") from exc
    refuse_unknown(doc, list(top_keys), where, SweepError)
    return doc


def _type_name(value) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def _accepts(annotation: str, value) -> bool:
    """Whether ``value`` (parsed from TOML) fits a dataclass field annotated ``annotation``."""
    ok = []
    for part in (p.strip() for p in str(annotation).split("|")):
        if part == "bool":
            ok.append(isinstance(value, bool))
        elif part == "int":
            ok.append(isinstance(value, int) and not isinstance(value, bool))
        elif part == "float":
            ok.append(isinstance(value, (int, float)) and not isinstance(value, bool))
        elif part == "str":
            ok.append(isinstance(value, str))
        elif part in ("tuple", "list"):
            ok.append(isinstance(value, list))
        elif part == "None":
            ok.append(value is None)
        else:  # Any or something unforeseen: the config's own checks decide
            ok.append(True)
    return any(ok)


def _check_table(where: str, table, cls) -> dict:
    if not isinstance(table, dict):
        raise SweepError(f"{where}: expected a table, got {_type_name(table)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    refuse_unknown(table, set(fields), where, SweepError)
    for k, v in table.items():
        if not _accepts(fields[k].type, v):
            raise SweepError(f"{where}.{k}: expected {fields[k].type}, got {_type_name(v)} {v!r}")
    return dict(table)


def _check_grid(where: str, grid) -> dict:
    if not isinstance(grid, dict):
        raise SweepError(f"{where}: expected a table, got {_type_name(grid)}")
    refuse_unknown(grid, set(GRID_AXES), where, SweepError, what="axes")
    for axis in REQUIRED_AXES:
        if axis not in grid:
            raise SweepError(f"{where}: missing the axis {axis!r}")
    for axis, values in grid.items():
        kind = GRID_AXES[axis]
        if not isinstance(values, list):
            raise SweepError(f"{where}.{axis}: expected an array, got {_type_name(values)} {values!r}")
        if not values:
            raise SweepError(f"{where}.{axis}: empty array (the grid would have no runs)")
        for v in values:
            good = isinstance(v, str) if kind is str else isinstance(v, int) and not isinstance(v, bool)
            if not good:
                raise SweepError(f"{where}.{axis}: expected {'strings' if kind is str else 'integers'}, "
                                 f"got {_type_name(v)} {v!r}")
    return grid


def check_launcher(where: str, table) -> dict:
    """The launcher table's keys and types (Slurm's own check of the values comes later, from
    ``sbatch --test-only``, still before anything is submitted)."""
    if not isinstance(table, dict):
        raise SweepError(f"{where}: expected a table, got {_type_name(table)}")
    refuse_unknown(table, set(LAUNCHER_KEYS), where, SweepError)
    for k, v in table.items():
        types = LAUNCHER_KEYS[k]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise SweepError(f"{where}.{k}: expected {'/'.join(t.__name__ for t in types)}, got {_type_name(v)} {v!r}")
    if "name" in table and table["name"] not in LAUNCHERS:
        raise SweepError(f"{where}.name: unknown launcher {table['name']!r}; choose from {list(LAUNCHERS)}")
    for k in ("max_parallel", "time", "cpus_per_task"):
        if k in table and table[k] < 1:
            raise SweepError(f"{where}.{k}: must be >= 1, got {table[k]}")
    if "gpus_per_task" in table and table["gpus_per_task"] < 0:
        raise SweepError(f"{where}.gpus_per_task: must be >= 0, got {table['gpus_per_task']}")
    if "sbatch" in table:
        bad = [f for f in table["sbatch"] if not isinstance(f, str) or not f.startswith("--")]
        if bad:
            raise SweepError(f"{where}.sbatch: expected flags like '--qos=high', got {bad}")
    return dict(table)


def load_spec(path: str | os.PathLike, base_overrides: dict | None = None) -> SweepSpec:
    """Read and check the spec at ``path``; ``base_overrides`` ({section: {field: value}}) are
    applied over its base tables (flags given on the command line)."""
    from iddpm_core.config import RunConfig, TrainConfig
    from iddpm_core.diffusion.config import DiffusionConfig
    from iddpm_core.models import ModelConfig
    from iddpm_core.config import complete_model_config

    path = Path(path)
    where = str(path)
    d = read_toml(path, f"spec {where}", TOP_KEYS)
    for k in ("name", "description"):
        if k in d and not isinstance(d[k], str):
            raise SweepError(f"spec {where}: {k}: expected string, got {_type_name(d[k])}")
    if "grid" not in d:
        raise SweepError(f"spec {where}: missing the [grid] table")
    grid = _check_grid(f"spec {where}: grid", d["grid"])
    base = {"model": _check_table(f"spec {where}: model", d.get("model", {}), ModelConfig),
            "diffusion": _check_table(f"spec {where}: diffusion", d.get("diffusion", {}), DiffusionConfig),
            "train": _check_table(f"spec {where}: train", d.get("train", {}), TrainConfig)}
    for axis in grid:
        section, name = _AXIS_FIELDS[axis]
        if name in base[section]:
            raise SweepError(f"spec {where}: {section}.{name} is set by the grid's {axis!r} axis; remove it from "
                             f"[{section}]")
    for section, values in (base_overrides or {}).items():
        base[section].update(values)
    # placeholders for the first run (each run sets its own): the base is validated with them
    base["model"].setdefault("base_channels", grid["widths"][0])
    base["model"].setdefault("num_res_blocks", grid.get("depths", [1])[0])
    try:
        complete_model_config(base)
        cfg = RunConfig.from_dict(base, where=f"spec {where}")
    except (ValueError, FileNotFoundError) as exc:
        msg = str(exc)
        raise SweepError(msg if msg.startswith(f"spec {where}") else f"spec {where}: {msg}") from exc
    try:
        runs = make_grid(cfg, grid["widths"], grid.get("depths", [cfg.model.num_res_blocks]), grid["steps"],
                         objectives=grid.get("objectives"), schedules=grid.get("schedules"), seeds=grid.get("seeds"))
    except SweepError as exc:
        raise SweepError(f"spec {where}: {exc}") from exc
    ev = d.get("eval", {})
    if not isinstance(ev, dict):
        raise SweepError(f"spec {where}: eval: expected a table, got {_type_name(ev)}")
    ev = dict(ev)
    hook = ev.pop("hook", "default")
    if not isinstance(hook, str):
        raise SweepError(f"spec {where}: eval.hook: expected string MODULE:FUNC or 'none', got {_type_name(hook)}")
    launcher = check_launcher(f"spec {where}: launcher", d.get("launcher", {}))
    return SweepSpec(str(path), d.get("name", path.stem), runs, hook, ev, launcher)
