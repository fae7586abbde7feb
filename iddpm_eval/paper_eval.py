"""Evaluation hooks of the paper experiments that are not plain sweeps (``benchmarks/paper/``):
each is an ``--eval-hook`` of the sweep engine, so its runs train, resume and record provenance as
any sweep does; settings come from the spec's ``[eval]`` table.

* :func:`evaluate_sampling_steps` (Improved DDPM fig. 8, fast sampling): FID of one checkpoint
  sampled with each of ``ss_steps`` sampling steps (0 = every step of the chain) and each sampler
  variant listed for the run's objective in ``ss_variants``. Variants: ``ddpm`` (ancestral, the
  model's own variance: learned for L_hybrid, sigma^2 = beta for L_simple), ``ddpm-fixed_large``
  (sigma^2 = beta), ``ddpm-fixed_small`` (sigma^2 = beta-tilde), ``ddim`` (eta 0). Columns
  ``fid_<variant>_<steps>`` (and ``_ci_low``/``_ci_high``); each cell is kept as JSON beside the
  checkpoint's evaluation, so an interrupted evaluation resumes cell by cell.
* :func:`evaluate_gradient_noise` (Improved DDPM fig. 2 and the learning curves of sec. 3.3):
  the default hook's bits/dim (and FID if asked) plus the gradient noise scale of the run's own
  training objective at the checkpoint's raw weights, with its timestep sampler's saved state
  (:mod:`iddpm_eval.gradient_noise`). Columns ``b_simple``, ``b_simple_low``/``_high``,
  ``trace_cov``, ``grad_sq`` and their standard errors.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from iddpm_core.io import write_text
from iddpm_eval import sweep_eval

VARIANTS = ("ddpm", "ddpm-fixed_large", "ddpm-fixed_small", "ddim")
OWN = {"ss_steps": [25, 50, 100, 200, 400, 0],
       "ss_variants": {"simple": ["ddpm-fixed_large", "ddpm-fixed_small", "ddim"], "hybrid": ["ddpm"],
                       "vlb": ["ddpm"]},
       "gn_groups": 8, "gn_group_size": 32, "gn_examples": 64, "gn_pool": 4096}


def check_settings(given: dict) -> None:
    """Refuse unknown keys and wrong types (the sweep's own keys are checked by
    :func:`iddpm_eval.sweep_eval.check_settings`); the error names the key."""
    mine = {k: v for k, v in given.items() if k in OWN}
    sweep_eval.check_settings({k: v for k, v in given.items() if k not in OWN})
    steps = mine.get("ss_steps", OWN["ss_steps"])
    if not (isinstance(steps, list) and steps and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0
                                                      for k in steps)):
        raise ValueError(f"ss_steps: expected a non-empty array of integers >= 0 (0 = all steps), got {steps!r}")
    var = mine.get("ss_variants", OWN["ss_variants"])
    if not isinstance(var, dict) or not all(isinstance(v, list) for v in var.values()):
        raise ValueError(f"ss_variants: expected a table objective -> array of variants, got {var!r}")
    bad = sorted({x for v in var.values() for x in v} - set(VARIANTS))
    if bad:
        raise ValueError(f"ss_variants: unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    for k in ("gn_groups", "gn_group_size", "gn_examples", "gn_pool"):
        v = mine.get(k, OWN[k])
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{k}: expected an integer >= 0, got {v!r}")
    if mine.get("gn_groups", OWN["gn_groups"]) and mine.get("gn_groups", OWN["gn_groups"]) < 3:
        raise ValueError("gn_groups: the |G|^2 estimate needs at least 3 groups (0 = skip)")


def _split(run_info: dict) -> tuple[dict, dict]:
    ev = dict(run_info.get("eval") or {})
    mine = {**OWN, **{k: v for k, v in ev.items() if k in OWN}}
    base = sweep_eval.settings({**run_info, "eval": {k: v for k, v in ev.items() if k not in OWN}})
    return base, mine


def _variant_model(checkpoint: str, variant: str, device):
    from iddpm_core.checkpoint import load_model

    sm = load_model(checkpoint, device=device or "cpu")
    if variant.startswith("ddpm-"):
        sm.diffusion_config = dataclasses.replace(sm.diffusion_config, var_type=variant.split("-", 1)[1])
    return sm, ("ddim" if variant == "ddim" else "ddpm")


def evaluate_sampling_steps(checkpoint: str, run_info: dict) -> dict:
    s, mine = _split(run_info)
    objective = str(run_info.get("objective"))
    variants = mine["ss_variants"].get(objective, [])
    if not variants:
        raise ValueError(f"ss_variants lists no sampler variant for objective {objective!r}")
    step_dir = Path(run_info["run_dir"]) / "eval" / f"step_{int(run_info['step']):06d}"
    cache_dir = Path(run_info["out_dir"]) / "eval_cache"
    row: dict = {}
    for variant in variants:
        for k in mine["ss_steps"]:
            name = f"{variant}_{k or 'all'}"
            cell = step_dir / "sampling" / f"{name}.json"
            if cell.exists():
                got = json.loads(cell.read_text())
            else:
                sm, sampler = _variant_model(checkpoint, variant, s["device"])
                steps = int(k) or int(sm.diffusion_config.steps)  # 0 = every step of the chain
                got = sweep_eval.fid_of_checkpoint(sm, {**s, "fid_sampler": sampler, "fid_steps": steps},
                                                   cell.parent / name, cache_dir, bool(run_info.get("progress")))
                got = {c: got.get(c) for c in ("fid", "fid_ci_low", "fid_ci_high", "fid_n", "sample_seconds")}
                write_text(cell, json.dumps(got, sort_keys=True) + "\n")
            for c, v in got.items():
                row[c.replace("fid", f"fid_{name}", 1) if c.startswith("fid") else f"{c}_{name}"] = v
    return row


def _gradient_noise_of_checkpoint(checkpoint: str, data: str, data_root, mine: dict, seed: int) -> dict:
    import numpy as np

    from iddpm_core.checkpoint import load_checkpoint
    from iddpm_core.data import load_source, to_model_range
    from iddpm_core.diffusion import build_diffusion, create_sampler
    from iddpm_core.diffusion.config import DiffusionConfig
    from iddpm_core.checkpoint import load_model
    from iddpm_eval import gradient_noise

    ck = load_checkpoint(checkpoint)
    sm = load_model(checkpoint, ema="raw")
    dcfg = DiffusionConfig.from_dict(ck["diffusion_config"])
    diffusion = build_diffusion(dcfg)
    tsampler = create_sampler(ck["train_config"]["timestep_sampler"], diffusion.num_timesteps)
    tsampler.load_state_dict(ck["sampler_state"])
    src = load_source(data, root=data_root)
    rng = np.random.default_rng(seed)
    pool = min(int(mine["gn_pool"]) or len(src), len(src))
    idx = np.sort(rng.choice(len(src), pool, replace=False))
    images = to_model_range(src.batch(idx)[0])
    res = gradient_noise.measure_diffusion(sm.model, diffusion, tsampler, images, groups=int(mine["gn_groups"]),
                                           group_size=int(mine["gn_group_size"]), examples=int(mine["gn_examples"]),
                                           seed=seed)
    res["gn_sampler"] = ck["train_config"]["timestep_sampler"]
    res["gn_sampler_warmed_up"] = bool(getattr(tsampler, "warmed_up", lambda: True)())
    return res


def evaluate_gradient_noise(checkpoint: str, run_info: dict) -> dict:
    s, mine = _split(run_info)
    row = sweep_eval.evaluate_checkpoint(checkpoint, {**run_info, "eval": {k: v for k, v in s.items()
                                                                          if k in sweep_eval.DEFAULTS}})
    if int(mine["gn_groups"]):
        row.update(_gradient_noise_of_checkpoint(checkpoint, run_info["data"], run_info.get("data_root"), mine,
                                                 int(s["seed"])))
    return row
