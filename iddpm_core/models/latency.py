"""Inference cost measured on this machine: latency of a denoiser per image, and the solver study of
the continuous U-Net (solver -> function evaluations, FLOPs, latency).

Latency is the median over ``repeats`` timed no-grad forward passes of one batch (after ``warmup``
untimed ones), under ``threads`` torch threads (restored afterwards), divided by the batch size:
seconds per image per network evaluation. A sampler with S steps calls the network S times, so a
sample costs S x that (the sampler's own arithmetic is negligible next to the network). Times are
wall clock and depend on the machine's load: compare models measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn as nn

from .cost import forward_flops

SOLVER_STUDY = (("euler", 1), ("midpoint", 1), ("rk4", 1), ("dopri5", 1))
# Function evaluations per ODE block and solver step of the fixed-step solvers (torchdiffeq's tableaus).
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}


@contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` intra-op threads (None: leave as is), then restore the old number."""
    old = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _inputs(model: nn.Module, batch: int, seed: int):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).float().to(device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device) if cfg.num_classes else None
    return x, t, y


@torch.no_grad()
def latency(model: nn.Module, batch: int = 1, repeats: int = 7, warmup: int = 1, threads: int | None = 2,
            seed: int = 0) -> dict:
    """Median seconds per image of one forward pass at ``batch`` (see the module docstring), with the
    individual batch times, the ODE evaluations of the last pass (0 for the U-Net) and the settings."""
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"batch and repeats must be >= 1 and warmup >= 0, got {batch}, {repeats}, {warmup}")
    x, t, y = _inputs(model, batch, seed)
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch_threads(threads):
            for _ in range(warmup):
                model(x, t, y)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x, t, y)
                times.append(time.perf_counter() - start)
            used = torch.get_num_threads()
    finally:
        model.train(was_training)
    median = statistics.median(times)
    return {"batch": batch, "repeats": repeats, "threads": used, "median_batch_s": median,
            "per_image_s": median / batch, "times_s": times, "nfe": int(getattr(model, "nfe", 0))}


def solver_study(model: nn.Module, solvers=SOLVER_STUDY, tolerances=(1e-3,), batch: int = 1, repeats: int = 7,
                 threads: int | None = 2, seed: int = 0) -> list[dict]:
    """For each (solver, steps) of ``solvers`` (dopri5 once per tolerance, rtol = atol): function
    evaluations per forward and per ODE block, forward FLOPs and latency, all on the same weights.
    The model's own solver is restored afterwards."""
    if not hasattr(model, "set_solver"):
        raise ValueError("the solver study needs a continuous U-Net (kind 'cunet')")
    cfg = model.config
    blocks = len(model.ode_blocks())
    rows = []
    try:
        for solver, steps in solvers:
            for tol in (tolerances if solver == "dopri5" else (None,)):
                model.set_solver(solver, steps, rtol=tol, atol=tol)
                lat = latency(model, batch, repeats, threads=threads, seed=seed)
                rows.append({"solver": solver, "solver_steps": steps if solver != "dopri5" else None,
                             "tol": tol, "nfe": lat["nfe"], "nfe_per_block": lat["nfe"] / blocks, "blocks": blocks,
                             "forward_flops": forward_flops(model, batch=batch), "batch": batch,
                             "per_image_s": lat["per_image_s"], "median_batch_s": lat["median_batch_s"],
                             "threads": lat["threads"], "repeats": repeats})
    finally:
        model.set_solver(cfg.solver, cfg.solver_steps, cfg.rtol, cfg.atol)
    return rows
