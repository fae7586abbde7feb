"""The grid of a sweep: :class:`RunSpec` (one run: name, axes, config, checkpoint steps),
:func:`make_grid` (widths x depths x objectives x schedules x seeds), checkpoints added at FLOP
budgets (:func:`with_budget_steps`) and :func:`select`. :mod:`iddpm_core.sweep` runs them."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

from iddpm_core.config import RunConfig
from iddpm_core.provenance import config_hash

# Train fields that do not change what a run computes (the trainer lets them change on resume).
_NOT_IDENTITY = ("steps", "log_interval", "sample_interval", "save_interval", "sample_num", "sample_steps", "device")


class SweepError(ValueError):
    """A sweep cannot run as asked; the message names the run, file or flag."""


# Objectives of the grid's ``objectives`` axis: the diffusion loss, the variance it goes with, and
# whether the network outputs the variance (Improved DDPM's L_simple uses the fixed variance beta_t).
OBJECTIVES = {
    "hybrid": {"loss": "hybrid", "var_type": "learned_range", "learn_sigma": True},
    "vlb": {"loss": "vlb", "var_type": "learned_range", "learn_sigma": True},
    "simple": {"loss": "simple", "var_type": "fixed_large", "learn_sigma": False},
}
SCHEDULES = ("linear", "cosine")


@dataclass
class RunSpec:
    """One run of the grid: its name, grid index, axes and config (``train.steps`` = last checkpoint)."""

    index: int
    name: str
    width: int
    depth: int
    steps: tuple[int, ...]
    config: RunConfig
    objective: str | None = None
    schedule: str | None = None
    seed: int | None = None

    def identity(self) -> dict:
        """The config fields that decide what the run computes (not its length or logging)."""
        d = self.config.to_dict()
        d["train"] = {k: v for k, v in d["train"].items() if k not in _NOT_IDENTITY}
        return d

    @property
    def config_hash(self) -> str:
        return config_hash(self.identity())


def _positive_ints(values: Sequence[int], what: str, minimum: int = 1) -> tuple[int, ...]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or int(v) < minimum:
            kind = "positive integers" if minimum == 1 else f"integers >= {minimum}"
            raise SweepError(f"{what} must be {kind}, got {list(values)}")
        out.append(int(v))
    if not out:
        raise SweepError(f"{what}: give at least one value (the grid would be empty)")
    if len(set(out)) != len(out):
        raise SweepError(f"{what} repeat a value: {list(values)}")
    return tuple(out)


def _choices(values: Sequence[str] | None, what: str, allowed) -> tuple:
    if values is None:
        return (None,)
    values = list(values)
    if not values:
        raise SweepError(f"{what}: give at least one value (the grid would be empty)")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise SweepError(f"{what}: unknown value(s) {bad}; choose from {sorted(allowed)}")
    if len(set(values)) != len(values):
        raise SweepError(f"{what} repeat a value: {values}")
    return tuple(values)


def make_grid(base: RunConfig, widths: Sequence[int], depths: Sequence[int], steps: Sequence[int], *,
              objectives: Sequence[str] | None = None, schedules: Sequence[str] | None = None,
              seeds: Sequence[int] | None = None) -> list[RunSpec]:
    """The runs of a widths x depths x objectives x schedules x seeds grid (in that order, widths
    outermost), each trained to the checkpoint ``steps`` (sorted). ``base`` gives every other
    setting; an axis left None keeps the base's value and stays out of the run names. Each run's
    model is validated here."""
    widths = _positive_ints(widths, "widths")
    depths = _positive_ints(depths, "depths")
    steps = tuple(sorted(_positive_ints(steps, "steps")))
    objectives = _choices(objectives, "objectives", OBJECTIVES)
    schedules = _choices(schedules, "schedules", SCHEDULES)
    seeds = (None,) if seeds is None else _positive_ints(seeds, "seeds", minimum=0)
    runs = []
    for w, d, obj, sched, seed in itertools.product(widths, depths, objectives, schedules, seeds):
        name = f"w{w}_d{d}" + (f"_{obj}" if obj else "") + (f"_{sched}" if sched else "") + \
            (f"_s{seed}" if seed is not None else "")
        cfg = copy.deepcopy(base)
        cfg.model.base_channels = w
        cfg.model.num_res_blocks = d
        cfg.train.steps = steps[-1]
        if obj is not None:
            o = OBJECTIVES[obj]
            cfg.diffusion.loss, cfg.diffusion.var_type, cfg.model.learn_sigma = o["loss"], o["var_type"], o["learn_sigma"]
        if sched is not None:
            cfg.diffusion.schedule = sched
        if seed is not None:
            cfg.train.seed = seed
        try:
            cfg.model.validate()
            from iddpm_core.diffusion.config import build_diffusion
            build_diffusion(cfg.diffusion)  # refuses e.g. a linear schedule with T <= 20
        except ValueError as exc:
            raise SweepError(f"run {name}: {exc}") from exc
        runs.append(RunSpec(len(runs), name, w, d, steps, cfg, obj, sched, seed))
    return runs


def steps_for_budgets(budgets: Sequence[float], flops_per_step: float, what: str = "run") -> tuple[int, ...]:
    """The first step whose cumulative training compute reaches each FLOP budget: ceil(C / flops_per_step).
    A budget below one step is refused (the checkpoint would not be at that budget)."""
    if not flops_per_step > 0:
        raise SweepError(f"{what}: training FLOPs per step must be positive, got {flops_per_step}")
    out = []
    for c in budgets:
        if not float(c) > 0:
            raise SweepError(f"FLOP budgets must be positive, got {list(budgets)}")
        if float(c) < flops_per_step:
            raise SweepError(f"{what}: FLOP budget {float(c):g} is below one training step ({flops_per_step:g} FLOPs)")
        out.append(int(math.ceil(float(c) / flops_per_step - 1e-9)))
    return tuple(out)


def training_flops_per_step(cfg: RunConfig) -> int:
    """Measured training FLOPs of one step of one process (forward + backward per image x batch)."""
    from iddpm_core.models import build_model
    from iddpm_core.models.cost import training_flops_per_image

    return int(training_flops_per_image(build_model(cfg.model))) * int(cfg.train.batch_size)


def with_budget_steps(runs: Sequence[RunSpec], budgets: Sequence[float],
                      flops_per_step: Callable[[RunConfig], float] = training_flops_per_step) -> list[RunSpec]:
    """The runs with a checkpoint added at each FLOP budget (IsoFLOP profiles): each run's own
    step for each budget, from its measured FLOPs per step; training goes to the last one."""
    out = []
    for run in runs:
        extra = steps_for_budgets(budgets, flops_per_step(run.config), run.name)
        steps = tuple(sorted(set(run.steps) | set(extra)))
        cfg = copy.deepcopy(run.config)
        cfg.train.steps = steps[-1]
        out.append(dataclasses.replace(run, steps=steps, config=cfg))  # other fields (axes, seed) kept
    return out


def select(runs: Sequence[RunSpec], only: Sequence[str] | None) -> list[RunSpec]:
    """The runs named in ``only`` (all when None); unknown names are refused."""
    if not only:
        return list(runs)
    names = [r.name for r in runs]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise SweepError(f"--only names runs not in the grid: {unknown}; the grid has {names}")
    return [r for r in runs if r.name in only]
