"""Experiment specifications: a set of training runs on the sweep engine, how to evaluate each
checkpoint, and how to report, in one TOML file with presets (``benchmarks/paper/*.toml``).

Format (every table but ``name``, ``kind`` and one of ``[[rows]]`` / ``[grid]`` is optional)::

    name = "ablation"
    kind = "ablation"             # the report: ablation, sampling-steps, importance-sampling, scaling,
                                  #   missing-u (iddpm_eval.experiment.report_missing_u), sweep
    description = "..."
    notes = ["choices where the paper is silent, one line each (copied into the README)"]

    [budget]                      # named training lengths rows refer to (presets change them)
    short = 2000
    long = 6000

    [base.model]                  # the base run config, as in a sweep spec
    channel_mult = [1, 2, 2]
    [base.diffusion]
    steps = 4000
    [base.train]
    data = "fashion-mnist:train"

    [[rows]]                      # one training run each ...
    name = "lin1k_simple"
    objective = "simple"          # hybrid / simple / vlb (iddpm_core.sweep_grid.OBJECTIVES)
    steps = "short"               # checkpoint steps: an integer, a budget name, or an array of them
    diffusion = {steps = 1000, schedule = "linear"}   # model / diffusion / train tables override the base
    paper = {nll = 3.99, fid = 32.5}                  # free-form, for the report

    [grid]                        # ... or a sweep grid (iddpm_core.sweep_spec's axes), steps may name budgets

    [[orderings]]                 # claims the report judges with the intervals
    claim = "cosine beats linear (L_simple)"
    metric = "nll"                # lower is better
    better = "cos4k_simple"       # a row name or an array of them: every better row against
    worse = ["lin4k_simple"]      #   every worse row

    [eval]                        # the evaluation hook and its settings, as in a sweep spec
    hook = "iddpm_eval.sweep_eval:evaluate_checkpoint"
    [launcher]                    # as in a sweep spec
    [report]                      # settings of the kind's report (e.g. the scaling fits' bootstrap)

    [presets.smoke]               # merged over the document (tables key by key, arrays replaced)
    budget = {short = 3, long = 6}
    [presets.smoke.base.train]
    data = "digits"

A preset named ``full`` is the default. Rows of ``[[rows]]`` may also be changed per preset with
``[presets.NAME.rows.ROWNAME]`` tables, merged into the row of that name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from iddpm_core.checks import refuse_unknown
from iddpm_core.sweep_grid import OBJECTIVES, RunSpec, SweepError, make_grid
from iddpm_core.sweep_spec import read_toml

TOP = ("name", "kind", "description", "notes", "budget", "base", "rows", "grid", "orderings", "eval", "launcher",
       "report", "presets")
KINDS = ("ablation", "sampling-steps", "importance-sampling", "scaling", "sweep", "missing-u")
ROW_KEYS = ("name", "objective", "steps", "model", "diffusion", "train", "paper")


@dataclass
class Experiment:
    """A parsed, checked experiment at one preset."""

    path: str
    name: str
    kind: str
    preset: str
    description: str
    notes: list
    runs: list[RunSpec]
    eval_hook: str | None
    eval_settings: dict
    launcher: dict
    report: dict
    rows: list = field(default_factory=list)       # the [[rows]] tables (with their paper numbers)
    orderings: list = field(default_factory=list)
    doc: dict = field(default_factory=dict)        # the merged document


def merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: tables key by key, everything else replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _steps(where: str, value, budget: dict) -> list[int]:
    vals = value if isinstance(value, list) else [value]
    out = []
    for v in vals:
        if isinstance(v, str):
            if v not in budget:
                raise SweepError(f"{where}: budget {v!r} is not in [budget] ({sorted(budget)})")
            v = budget[v]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SweepError(f"{where}: checkpoint steps must be positive integers or budget names, got {v!r}")
        out.append(v)
    return out


def _run_of_row(where: str, index: int, row: dict, base: dict, budget: dict) -> RunSpec:
    from iddpm_core.config import RunConfig
    from iddpm_core.diffusion.config import build_diffusion
    from iddpm_core.config import complete_model_config

    refuse_unknown(row, list(ROW_KEYS), where, SweepError)
    if not isinstance(row.get("name"), str) or not row["name"].replace("_", "").replace("-", "").isalnum():
        raise SweepError(f"{where}: name must be a string of letters, digits, '_' and '-', got {row.get('name')!r}")
    d = {s: merge(base.get(s, {}), row.get(s, {})) for s in ("model", "diffusion", "train")}
    obj = row.get("objective")
    if obj is not None:
        if obj not in OBJECTIVES:
            raise SweepError(f"{where}: objective {obj!r} unknown; choose from {sorted(OBJECTIVES)}")
        o = OBJECTIVES[obj]
        d["diffusion"].update(loss=o["loss"], var_type=o["var_type"])
        d["model"]["learn_sigma"] = o["learn_sigma"]
    steps = tuple(sorted(set(_steps(f"{where}.steps", row.get("steps", "short"), budget))))
    d["train"]["steps"] = steps[-1]
    try:
        complete_model_config(d)
        cfg = RunConfig.from_dict(d, where=where)
        cfg.model.validate()
        build_diffusion(cfg.diffusion)
    except (ValueError, FileNotFoundError) as exc:
        raise SweepError(f"{where}: {exc}") from exc
    return RunSpec(index, row["name"], cfg.model.base_channels, cfg.model.num_res_blocks, steps, cfg,
                   obj, cfg.diffusion.schedule, cfg.train.seed)


def _grid_runs(where: str, grid: dict, base: dict, budget: dict) -> list[RunSpec]:
    from iddpm_core.config import RunConfig
    from iddpm_core.sweep_spec import GRID_AXES
    from iddpm_core.config import complete_model_config

    unknown = sorted(set(grid) - set(GRID_AXES))
    if unknown:
        raise SweepError(f"{where}: unknown axis {unknown}; known axes are {sorted(GRID_AXES)}")
    d = {s: dict(base.get(s, {})) for s in ("model", "diffusion", "train")}
    d["model"].setdefault("base_channels", grid.get("widths", [32])[0])
    try:
        complete_model_config(d)
        cfg = RunConfig.from_dict(d, where=where)
        return make_grid(cfg, grid.get("widths", [cfg.model.base_channels]),
                         grid.get("depths", [cfg.model.num_res_blocks]),
                         _steps(f"{where}.steps", grid.get("steps", "short"), budget),
                         objectives=grid.get("objectives"), schedules=grid.get("schedules"), seeds=grid.get("seeds"))
    except (ValueError, FileNotFoundError) as exc:
        raise SweepError(exc if str(exc).startswith(where) else f"{where}: {exc}") from exc


def load_experiment(path, preset: str = "full") -> Experiment:
    """Read ``path``, apply ``preset`` and build its runs (every model and diffusion checked)."""
    path = Path(path)
    where = f"experiment {path}"
    doc = read_toml(path, where, TOP)
    presets = doc.pop("presets", {})
    if preset != "full" and preset not in presets:
        raise SweepError(f"{where}: no preset {preset!r}; it has {['full', *sorted(p for p in presets if p != 'full')]}")
    over = copy.deepcopy(presets.get(preset, {}))
    row_over = over.pop("rows", {})
    doc = merge(doc, over)
    if doc.get("kind") not in KINDS:
        raise SweepError(f"{where}: kind must be one of {list(KINDS)}, got {doc.get('kind')!r}")
    budget = doc.get("budget", {})
    base = doc.get("base", {})
    rows = doc.get("rows", [])
    if bool(rows) == ("grid" in doc):
        raise SweepError(f"{where}: give either [[rows]] or [grid], not {'both' if rows else 'neither'}")
    names = [r.get("name") for r in rows]
    if len(set(names)) != len(names):
        raise SweepError(f"{where}: rows repeat a name: {names}")
    bad = sorted(set(row_over) - set(names))
    if bad:
        raise SweepError(f"{where}: preset {preset!r} changes rows that do not exist: {bad}")
    rows = [merge(r, row_over.get(r["name"], {})) for r in rows]
    if rows:
        runs = [_run_of_row(f"{where}: rows[{i}] ({r.get('name')})", i, r, base, budget) for i, r in enumerate(rows)]
    else:
        runs = _grid_runs(f"{where}: grid", doc["grid"], base, budget)
    for o in doc.get("orderings", []):
        named = [x for k in ("better", "worse") for x in (o.get(k) if isinstance(o.get(k), list) else [o.get(k)])]
        missing = sorted(set(map(str, named)) - set(names))
        if missing or o.get("metric") not in ("nll", "fid"):
            raise SweepError(f"{where}: ordering {o.get('claim')!r}: metric must be nll or fid and better/worse "
                             f"must name rows (unknown: {missing})")
    ev = dict(doc.get("eval", {}))
    hook = ev.pop("hook", "iddpm_eval.sweep_eval:evaluate_checkpoint")
    hook = None if str(hook).lower() in ("none", "") else hook
    if hook is not None:
        import importlib

        from iddpm_core.sweep import load_hook

        load_hook(hook)
        check = getattr(importlib.import_module(hook.split(":", 1)[0]), "check_settings", None)
        if check is not None:
            try:
                check(ev)
            except ValueError as exc:
                raise SweepError(f"{where}: eval: {exc}") from exc
    from iddpm_core.sweep_spec import check_launcher

    launcher = check_launcher(f"{where}: launcher", doc.get("launcher", {}))
    return Experiment(str(path), doc.get("name", path.stem), doc["kind"], preset, doc.get("description", ""),
                      list(doc.get("notes", [])), runs, hook, ev, launcher, dict(doc.get("report", {})), rows,
                      list(doc.get("orderings", [])), doc)
