"""Evaluation hook of the Missing-U comparison (``benchmarks/missing_u/*.toml``, issue 17): the sweep's
own columns (FID with a bootstrap interval, bits/dim with its standard error) at every checkpoint,
and at a run's last checkpoint the inference measurements of "The Missing U" claims:

* ``latency``: seconds per image of one forward pass at each of ``mu_latency_batches``, median of
  ``mu_latency_repeats`` timed passes on ``mu_threads`` threads (the individual times are kept, so
  the report can put an interval on the median);
* ``solvers`` (continuous U-Net only): for each of ``mu_solvers`` ([solver, steps, tolerance]) the
  ODE evaluations per forward, FLOPs and latency at batch 1 and the largest latency batch, all on
  the same weights;
* ``fid_steps``: FID of ``mu_steps_num`` samples at each of ``mu_steps`` sampling steps (0 = all
  steps of the chain), ancestral and DDIM (``mu_samplers``); for a continuous U-Net also FID of
  every other solver at DDIM ``mu_solver_fid_steps`` steps. ``mu_steps_num`` 0 skips both;
* ``denoising``: one-step denoising of ``mu_denoise_num`` held-out images at each noise level
  ``mu_sigmas`` (PSNR / SSIM with intervals, :mod:`iddpm_eval.denoising`).

Each measurement is a list of rows stored as JSON in a column of its own (``mu_latency``,
``mu_solvers``, ``mu_fid_steps``, ``mu_denoising``) and cached beside the checkpoint's evaluation
(one file per measurement, one per FID cell), so an interrupted evaluation resumes where it
stopped. Every checkpoint's row also carries ``forward_flops`` and ``nfe`` (ODE evaluations per
forward). The report is :mod:`iddpm_eval.experiment.report_missing_u`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from iddpm_core.io import write_text
from iddpm_eval import sweep_eval

OWN = {"mu_final_only": True, "mu_latency_batches": [1, 64], "mu_latency_repeats": 15, "mu_threads": 2,
       "mu_steps": [25, 50, 100, 0], "mu_samplers": ["ddpm", "ddim"], "mu_steps_num": 0,
       "mu_solvers": [["euler", 1, 1e-3], ["midpoint", 1, 1e-3], ["rk4", 1, 1e-3], ["dopri5", 1, 1e-3],
                      ["dopri5", 1, 1e-5]],
       "mu_solver_fid_steps": 25, "mu_solver_repeats": 5, "mu_denoise_num": 500,
       "mu_sigmas": [0.03, 0.05, 0.1, 0.2, 0.3]}
STUDIES = ("latency", "solvers", "fid_steps", "denoising")
SOLVERS = ("euler", "midpoint", "rk4", "dopri5")


def _int_list(v, positive: bool) -> bool:
    return isinstance(v, list) and bool(v) and all(
        isinstance(k, int) and not isinstance(k, bool) and (k >= 1 if positive else k >= 0) for k in v)


def check_settings(given: dict) -> None:
    """Refuse unknown keys and wrong types; the sweep's own keys go to
    :func:`iddpm_eval.sweep_eval.check_settings`. The error names the key."""
    mine = {k: v for k, v in given.items() if k in OWN}
    sweep_eval.check_settings({k: v for k, v in given.items() if k not in OWN})
    s = {**OWN, **mine}
    if not isinstance(s["mu_final_only"], bool):
        raise ValueError(f"mu_final_only: expected true or false, got {s['mu_final_only']!r}")
    for k, positive in (("mu_latency_batches", True), ("mu_steps", False)):
        if not _int_list(s[k], positive):
            raise ValueError(f"{k}: expected a non-empty array of integers >= {int(positive)}, got {s[k]!r}")
    for k in ("mu_latency_repeats", "mu_threads", "mu_solver_fid_steps", "mu_solver_repeats"):
        if not _int_list([s[k]], True):
            raise ValueError(f"{k}: expected an integer >= 1, got {s[k]!r}")
    for k in ("mu_steps_num", "mu_denoise_num"):
        if not _int_list([s[k]], False) or s[k] == 1:
            raise ValueError(f"{k}: expected 0 (skip) or an integer >= 2, got {s[k]!r}")
    if not (isinstance(s["mu_samplers"], list) and s["mu_samplers"] and set(s["mu_samplers"]) <= {"ddpm", "ddim"}):
        raise ValueError(f"mu_samplers: expected a non-empty array of 'ddpm' / 'ddim', got {s['mu_samplers']!r}")
    for sv in s["mu_solvers"]:
        ok = (isinstance(sv, list) and len(sv) == 3 and sv[0] in SOLVERS and _int_list([sv[1]], True)
              and isinstance(sv[2], (int, float)) and not isinstance(sv[2], bool) and sv[2] > 0)
        if not ok:
            raise ValueError(f"mu_solvers: expected [solver, steps >= 1, tolerance > 0] entries with solver one of "
                             f"{list(SOLVERS)}, got {sv!r}")
    if not (isinstance(s["mu_sigmas"], list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                                                     for x in s["mu_sigmas"])):
        raise ValueError(f"mu_sigmas: expected an array of noise levels > 0, got {s['mu_sigmas']!r}")


def _split(run_info: dict) -> tuple[dict, dict]:
    ev = dict(run_info.get("eval") or {})
    mine = {**OWN, **{k: v for k, v in ev.items() if k in OWN}}
    base = {**run_info, "eval": {k: v for k, v in ev.items() if k not in OWN}}
    return base, mine


def _is_last(run_info: dict) -> bool:
    """Whether ``run_info``'s step is its run's last checkpoint (the run folder's run.json lists them)."""
    meta = json.loads((Path(run_info["run_dir"]) / "run.json").read_text())
    return int(run_info["step"]) == max(int(s) for s in meta["steps"])


def _cached(path: Path, compute):
    """The JSON at ``path``, or ``compute()`` written there first (one measurement, resumable)."""
    if path.exists():
        return json.loads(path.read_text())
    got = compute()
    write_text(path, json.dumps(got, sort_keys=True, default=float) + "\n")
    return got


def _latency(model, mine: dict, seed: int) -> list[dict]:
    from iddpm_core.models.latency import latency

    rows = []
    for batch in mine["mu_latency_batches"]:
        r = latency(model, batch=int(batch), repeats=int(mine["mu_latency_repeats"]), threads=int(mine["mu_threads"]),
                    seed=seed)
        rows.append({**r, "load_avg_1min": round(os.getloadavg()[0], 2)})
    return rows


def _solvers(model, mine: dict, seed: int) -> list[dict]:
    from iddpm_core.models.latency import solver_study

    rows = []
    plain = [(s, int(n)) for s, n, _ in mine["mu_solvers"] if s != "dopri5"]
    tols = tuple(float(t) for s, _, t in mine["mu_solvers"] if s == "dopri5")
    solvers = plain + ([("dopri5", 1)] if tols else [])
    for batch in sorted({1, max(int(b) for b in mine["mu_latency_batches"])}):
        rows += solver_study(model, solvers, tols or (1e-3,), batch=batch, repeats=int(mine["mu_solver_repeats"]),
                             threads=int(mine["mu_threads"]), seed=seed)
    return rows


def _fid_cells(checkpoint: str, s: dict, mine: dict, cell_dir: Path, trained: tuple | None) -> list[dict]:
    """FID per (solver, sampler, steps) cell, each cached: the trained solver at every step count and
    sampler, then (continuous U-Net) every other solver at DDIM ``mu_solver_fid_steps``."""
    from iddpm_eval.sampling_steps import fid_by_sampling_steps

    cells = [(None, sampler, k) for sampler in mine["mu_samplers"] for k in mine["mu_steps"]]
    if trained is not None:
        cells += [(tuple(sv), "ddim", int(mine["mu_solver_fid_steps"])) for sv in mine["mu_solvers"]
                  if (sv[0], int(sv[1])) != trained[:2] or (sv[0] == "dopri5" and float(sv[2]) != trained[2])]
    ev = {k: s[k] for k in ("fid_num", "fid_bootstrap", "fid_ref", "fid_ref_num", "fid_mode", "fid_weights",
                            "fid_batch_size", "sample_batch_size", "seed", "device")}
    ev["fid_num"] = int(mine["mu_steps_num"])
    rows = []
    for solver, sampler, k in cells:
        tag = f"{'trained' if solver is None else f'{solver[0]}x{solver[1]}_tol{float(solver[2]):g}'}_{sampler}_{k or 'all'}"

        def one(solver=solver, sampler=sampler, k=k):
            got = fid_by_sampling_steps(checkpoint, cell_dir, steps=[k or None], samplers=[sampler],
                                        solvers=None if solver is None else [tuple(solver)], eval_settings=ev)
            return got[0]
        rows.append({"trained_solver": solver is None, **_cached(cell_dir / f"{tag}.json", one)})
    return rows


def measure_inference(checkpoint: str, s: dict, mine: dict, step_dir: Path) -> dict:
    """The four measurements of one checkpoint ({"latency", "solvers", "fid_steps", "denoising"}: row
    lists), cached under ``step_dir/missing_u``. ``s``: the sweep evaluation settings (FID reference,
    seed, ...: :func:`iddpm_eval.sweep_eval.settings`); ``mine``: this module's settings (:data:`OWN`
    with overrides); the denoising images are the FID reference set (held-out images)."""
    from iddpm_core.checkpoint import load_model
    from iddpm_eval.denoising import denoising_of_checkpoint

    sm = load_model(checkpoint)
    seed = int(s["seed"])
    cfg = sm.model_config
    cunet = cfg.kind == "cunet"
    d = step_dir / "missing_u"
    out = {"latency": _cached(d / "latency.json", lambda: _latency(sm.model, mine, seed)),
           "solvers": _cached(d / "solvers.json", lambda: _solvers(sm.model, mine, seed)) if cunet else []}
    trained = (cfg.solver, int(cfg.solver_steps), float(cfg.rtol)) if cunet else None
    out["fid_steps"] = _fid_cells(checkpoint, s, mine, d / "fid", trained) if int(mine["mu_steps_num"]) else []
    data = s["fid_ref"]
    out["denoising"] = (_cached(d / "denoising.json", lambda: denoising_of_checkpoint(
        checkpoint, data, num=int(mine["mu_denoise_num"]), sigmas=[float(x) for x in mine["mu_sigmas"]], seed=seed))
        if int(mine["mu_denoise_num"]) else [])
    return out


def evaluate_checkpoint(checkpoint: str, run_info: dict) -> dict:
    """The sweep's FID / bits/dim columns, ``forward_flops`` and ``nfe``, and at the run's last
    checkpoint (every checkpoint with ``mu_final_only = false``) the four inference measurements as
    JSON columns ``mu_<name>``."""
    from iddpm_core.checkpoint import load_model
    from iddpm_core.models.cost import forward_flops, function_evaluations

    base, mine = _split(run_info)
    row = sweep_eval.evaluate_checkpoint(checkpoint, base)
    model = load_model(checkpoint).model
    row.update(forward_flops=forward_flops(model), nfe=function_evaluations(model))
    if not mine["mu_final_only"] or _is_last(run_info):
        s = sweep_eval.settings(base)
        step_dir = Path(run_info["run_dir"]) / "eval" / f"step_{int(run_info['step']):06d}"
        got = measure_inference(checkpoint, s, mine, step_dir)
        row.update({f"mu_{k}": json.dumps(got[k], sort_keys=True, default=float) for k in STUDIES})
    return row
