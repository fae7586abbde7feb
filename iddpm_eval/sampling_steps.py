"""FID of one checkpoint against the number of sampling steps, ancestral (DDPM) and DDIM, and for a
continuous U-Net against its ODE solver: the rows behind "composes with existing speed-ups" and
"solver against NFE, latency and FID".

Each row is one (solver, sampler, steps) setting evaluated by the sweep's evaluator
(:func:`iddpm_eval.sweep_eval.fid_of_checkpoint`: the same sampler, the same feature extractor,
the cached reference features, FID with a bootstrap interval), so these numbers compare with the
sweep table's. ``steps`` None means all steps of the trained chain (T). The weights are loaded
once (EMA by default); the solver is switched on the same weights
(:meth:`iddpm_core.models.cunet.ContinuousUNet.set_solver`). Per row also the sampling cost per
image: network evaluations (steps) x forward FLOPs, and the ODE evaluations per forward.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_STEPS = (25, 50, 100, None)
DEFAULT_SAMPLERS = ("ddpm", "ddim")


def fid_by_sampling_steps(checkpoint: str, out_dir: str | Path, steps=DEFAULT_STEPS, samplers=DEFAULT_SAMPLERS,
                          solvers=None, eval_settings: dict | None = None, data: str | None = None,
                          progress: bool = False) -> list[dict]:
    """Rows of FID for every solver x sampler x steps. ``solvers``: (solver, solver_steps, tol) triples
    for a continuous U-Net (None: its trained solver only); ``eval_settings``: keys of
    :data:`iddpm_eval.sweep_eval.DEFAULTS` (fid_num, fid_bootstrap, fid_ref, ...); ``data``: the
    reference set when ``fid_ref`` is not given."""
    from iddpm_core.models.cost import forward_flops
    from iddpm_core.checkpoint import load_model
    from iddpm_eval import sweep_eval

    for k in ("fid_steps", "fid_sampler"):
        if eval_settings and k in eval_settings:
            raise ValueError(f"eval_settings.{k}: set by this function's steps / samplers arguments")
    for sampler in samplers:
        if sampler not in DEFAULT_SAMPLERS:
            raise ValueError(f"sampler must be one of {DEFAULT_SAMPLERS}, got {sampler!r}")
    sm = load_model(checkpoint, ema=(eval_settings or {}).get("ema_rate"))
    T = int(sm.diffusion_config.steps)
    model = sm.model
    is_cunet = hasattr(model, "set_solver")
    if solvers and not is_cunet:
        raise ValueError(f"{checkpoint}: solvers apply to a continuous U-Net; this checkpoint holds a "
                         f"{sm.model_config.kind!r}")
    trained = model.config if is_cunet else None
    settings_in = {k: v for k, v in (eval_settings or {}).items() if k != "ema_rate"}
    out_dir, cache_dir = Path(out_dir), Path(out_dir) / "eval_cache"
    rows = []
    try:
        for solver in (solvers or ([(trained.solver, trained.solver_steps, trained.rtol)] if is_cunet else [None])):
            if is_cunet:
                model.set_solver(solver[0], solver[1], rtol=solver[2], atol=solver[2])
            fwd = forward_flops(model)
            nfe = int(getattr(model, "nfe", 0))
            tag = f"{solver[0]}x{solver[1]}_tol{solver[2]:g}" if is_cunet else "unet"
            for sampler in samplers:
                for n in steps:
                    n_steps = T if n is None else int(n)
                    s = sweep_eval.settings({"eval": {**settings_in, "fid_steps": n_steps, "fid_sampler": sampler},
                                             "data": data})
                    res = sweep_eval.fid_of_checkpoint(sm, s, out_dir / tag / f"{sampler}_{n_steps}", cache_dir,
                                                       progress)
                    rows.append({"checkpoint": str(checkpoint), "kind": sm.model_config.kind,
                                 "solver": solver[0] if is_cunet else None,
                                 "solver_steps": solver[1] if is_cunet else None,
                                 "tol": solver[2] if is_cunet else None, "nfe_per_forward": nfe,
                                 "sampler": sampler, "steps": n_steps, "steps_label": "all" if n is None else n_steps,
                                 "forward_flops": fwd, "sampling_flops": n_steps * fwd, **res})
    finally:
        if is_cunet:
            model.set_solver(trained.solver, trained.solver_steps, rtol=trained.rtol, atol=trained.atol)
    return rows
