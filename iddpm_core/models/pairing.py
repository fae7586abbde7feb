"""Pairing two denoisers: find the width of one that matches the other's cost, and the training
steps that give both the same training compute.

Width search. Parameters and forward FLOPs (:mod:`iddpm_core.models.cost`, ODE evaluations
included) grow monotonically with ``base_channels`` for a fixed layout, so the width whose cost is
nearest to a target is found by bisection over integers: the smallest valid width whose cost
reaches the target and the largest valid width below it are both measured and the nearer one is
returned. Widths that do not build (attention heads that do not divide the channels) are skipped.
Every width measured is returned too, so a report can show the search.

Equal compute. Training FLOPs per step are about 3 x forward FLOPs x batch (forward plus a backward
costing twice the forward); ``steps = round(budget / (3 x forward x batch))``.
:func:`compute_gap` then checks the pairing with the *measured* forward + backward FLOPs per
image (:func:`iddpm_core.models.cost.training_flops_per_image`), an independent path.
"""

from __future__ import annotations

from dataclasses import replace

from . import ModelConfig, build_model
from .cost import count_parameters, forward_flops, training_flops_per_image

MEASURES = ("parameters", "forward_flops")


def measure(config: ModelConfig, what: str) -> int:
    """Parameters or forward FLOPs per image of the model ``config`` builds."""
    if what not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {what!r}")
    model = build_model(config)
    return count_parameters(model) if what == "parameters" else forward_flops(model)


def _valid(config: ModelConfig) -> bool:
    try:
        config.validate()
    except ValueError:
        return False
    return True


def match_width(config: ModelConfig, target: float, what: str, lo: int = 2, hi: int = 1024) -> dict:
    """The ``base_channels`` in [lo, hi] whose ``what`` (parameters / forward_flops) is nearest to
    ``target``, the other fields of ``config`` fixed. Returns ``{"width", "value", "ratio",
    "searched": {width: value}}`` (ratio = value / target)."""
    if target <= 0:
        raise ValueError(f"target must be positive, got {target}")
    cache: dict[int, int] = {}

    def cost(w: int) -> int:
        if w not in cache:
            cache[w] = measure(replace(config, base_channels=w), what)
        return cache[w]

    widths = [w for w in range(lo, hi + 1) if _valid(replace(config, base_channels=w))]
    if not widths:
        raise ValueError(f"no width in [{lo}, {hi}] builds a valid {config.kind} model")
    if cost(widths[-1]) < target:
        raise ValueError(f"the widest model ({widths[-1]}) has {what} {cost(widths[-1])} < target {target:.6g}; "
                         "raise hi")
    i, j = 0, len(widths) - 1  # find the first index whose cost reaches the target
    while i < j:
        mid = (i + j) // 2
        if cost(widths[mid]) >= target:
            j = mid
        else:
            i = mid + 1
    candidates = [widths[j]] + ([widths[j - 1]] if j > 0 else [])
    best = min(candidates, key=lambda w: (abs(cost(w) - target), w))
    return {"width": best, "value": cost(best), "ratio": cost(best) / target, "searched": dict(sorted(cache.items()))}


def steps_for_budget(budget_flops: float, forward_flops_per_image: float, batch: int) -> int:
    """Optimiser steps that spend ``budget_flops`` at about 3 x forward FLOPs per image (at least 1)."""
    if budget_flops <= 0 or forward_flops_per_image <= 0 or batch < 1:
        raise ValueError(f"budget, forward FLOPs and batch must be positive, got {budget_flops}, "
                         f"{forward_flops_per_image}, {batch}")
    return max(1, round(budget_flops / (3 * forward_flops_per_image * batch)))


def training_compute(config: ModelConfig, steps: int, batch: int) -> int:
    """Measured training FLOPs of ``steps`` steps at ``batch``: forward + backward per image x images."""
    return training_flops_per_image(build_model(config)) * batch * steps


def compute_gap(a: float, b: float) -> float:
    """|a - b| / max(a, b): the relative gap of two compute totals (equal compute: <= 0.05)."""
    if a <= 0 or b <= 0:
        raise ValueError(f"compute totals must be positive, got {a}, {b}")
    return abs(a - b) / max(a, b)
