"""Bits/dim of a checkpoint on a data source, resumable: :func:`evaluate`.

The steps: check the options, load the model and open the data, choose the timestep proposal
(estimates only), claim the output folder (its settings must match), read what a previous run
finished, compute the missing images group by group (each group written at once; under torchrun
the groups are shared out and rank 0 writes), then the summary: mean bits/dim, its standard error
and 95% interval, the mean of each part of the bound, and for exact runs the per-t breakdown and
its plot. The summary is what every caller reports (the CLI, the sweep, the paper runs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from iddpm_core.diffusion import GaussianDiffusion
from iddpm_core.io import write_text
from iddpm_eval import distributed as dist
from iddpm_eval.nll.bound import TERMS, NLLError, bound_terms, breakdown, write_breakdown
from iddpm_eval.nll.estimate import estimate_bound, load_profile, proposal
from iddpm_eval.nll.files import (IMAGE_COLUMNS, IMAGES_CSV, PILOT_CSV, SETTINGS_JSON, SUMMARY_JSON, TERMS_CSV,
                                  TERMS_PNG, Settings, check_settings, default_out_dir, load_parts,
                                  read_images_csv, save_part, write_images_csv)

Z = 1.96  # the interval bpd +- Z * stderr, as the results tables have always held it


@dataclass
class Loaded:
    """A model with its diffusion, as :func:`evaluate` needs it."""

    model: torch.nn.Module
    diffusion: GaussianDiffusion
    model_config: object
    path: str
    sha256: str
    ema_rate: float | None
    step: int | None
    info: dict = field(default_factory=dict)


def load(checkpoint: str | os.PathLike, ema: str | float | None = None, device: str = "cpu") -> Loaded:
    """Load a training checkpoint (EMA weights by default; ``ema="raw"`` for the raw weights) and
    build its full diffusion (no respacing)."""
    from iddpm_core.diffusion import build_diffusion
    from iddpm_core.io import file_sha256
    from iddpm_core.checkpoint import load_model

    sm = load_model(checkpoint, ema=ema, device=device)
    diffusion = build_diffusion(sm.diffusion_config, respacing="")
    return Loaded(sm.model, diffusion, sm.model_config, str(checkpoint), file_sha256(checkpoint), sm.ema_rate,
                  sm.step, sm.info)


def check_options(method: str, estimate: int | None, profile, pilot: int | None) -> None:
    """Refuse option combinations that do not make a run (the CLI reports these as usage errors)."""
    if method not in ("batched", "loop"):
        raise NLLError(f"method must be 'batched' or 'loop', got {method!r}")
    if (profile is not None or pilot) and not estimate:
        raise NLLError("--profile and --pilot need --estimate K")
    if profile is not None and pilot:
        raise NLLError("give --profile or --pilot, not both")
    if estimate and method != "batched":
        raise NLLError("--estimate uses the batched method; drop --method loop")


@dataclass
class _Job:
    """One run's fixed inputs, from the options and the loaded model and data."""

    lm: Loaded
    src: object
    data: str
    num: int | None
    n_total: int
    conditional: bool
    device: str
    out: Path
    seed: int
    batch_size: int
    clip_denoised: bool
    exact_cdf: bool
    progress: bool
    estimate: int | None
    method: str
    p: np.ndarray | None = None
    proposal_from: dict = field(default_factory=dict)  # profile, pilot, uniform_mix of an estimate

    def settings(self) -> Settings:
        lm = self.lm
        return Settings(checkpoint_sha256=lm.sha256, data=self.data, T=lm.diffusion.num_timesteps,
                        seed=int(self.seed), cdf="exact" if self.exact_cdf else "tanh",
                        clip_denoised=bool(self.clip_denoised), ema_rate=lm.ema_rate,
                        estimate=int(self.estimate) if self.estimate else None,
                        proposal_sha256=hashlib.sha256(self.p.tobytes()).hexdigest() if self.p is not None else None,
                        method=self.method)

    def bound_kwargs(self, labels) -> dict:
        return dict(seed=self.seed, batch_size=self.batch_size, clip_denoised=self.clip_denoised,
                    exact_cdf=self.exact_cdf, labels=labels)

    def images(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        from iddpm_core.data import to_model_range

        images, labels = self.src.batch(ids)
        return to_model_range(images).to(self.device), torch.as_tensor(labels) if self.conditional else None


def _open_data(data: str, lm: Loaded, num: int | None):
    """The data source, whether the model takes its labels, and the number of images to use."""
    from iddpm_core.data import load_source

    src, cfg = load_source(data), lm.model_config
    want_shape = (cfg.image_size, cfg.image_size, cfg.in_channels)
    if tuple(src.shape) != want_shape:
        raise NLLError(f"data {data!r} holds images of shape {tuple(src.shape)} (H, W, C), the model expects "
                       f"{want_shape}")
    conditional = bool(getattr(cfg, "num_classes", None))
    if conditional and not src.has_labels:
        raise NLLError(f"the model is class-conditional but data {data!r} has no labels")
    n_total = len(src) if num is None else int(num)
    if not 1 <= n_total <= len(src):
        raise NLLError(f"--num {num}: data {data!r} holds {len(src)} images")
    return src, conditional, n_total


def _pilot_profile(job: _Job, m: int) -> np.ndarray:
    """Per-t RMS of the exact terms of the first ``m`` images (read from the folder's pilot file if a
    previous run wrote it, else computed and written there)."""
    path, T = job.out / PILOT_CSV, job.lm.diffusion.num_timesteps
    if path.exists():
        return load_profile(path, T)
    x0, labels = job.images(np.arange(m))
    res = bound_terms(job.lm.diffusion, job.lm.model, x0, np.arange(m), progress=job.progress,
                      **job.bound_kwargs(labels))
    write_breakdown(path, breakdown(res["vb"], res["xstart_mse"], res["mse"]))
    return load_profile(path, T)


def _proposal(job: _Job) -> np.ndarray:
    """The timestep proposal of an estimate: uniform, or shaped by the loss profile or the pilot."""
    T = job.lm.diffusion.num_timesteps
    profile, pilot, uniform_mix = (job.proposal_from[k] for k in ("profile", "pilot", "uniform_mix"))
    prof = load_profile(profile, T) if profile is not None else None
    if pilot:  # one process computes (or reads) the pilot, under torchrun too
        prof = dist.broadcast(_pilot_profile(job, min(int(pilot), len(job.src))) if dist.is_main() else None)
    return proposal(T, prof, uniform_mix)


def _claim_folder(out: Path, settings: Settings) -> None:
    """Create the folder and check its settings; every rank stops, not only the one that found a clash."""
    error = None
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        try:
            check_settings(out / SETTINGS_JSON, settings)
        except NLLError as exc:
            error = str(exc)
    error = dist.broadcast(error)
    if error:
        raise NLLError(error)


@dataclass
class _State:
    """The per-image rows in the file (``stored``, rows past --num included), those of this run
    (``done``) and the per-t terms of exact runs (``terms``)."""

    stored: dict
    done: dict
    terms: dict


def _resume(job: _Job) -> _State:
    stored = read_images_csv(job.out / IMAGES_CSV)
    done = {i: r for i, r in stored.items() if i < job.n_total}
    terms: dict[int, np.ndarray] = {}
    if not job.estimate:
        terms = load_parts(job.out, set(done), job.lm.diffusion.num_timesteps)
        done = {i: r for i, r in done.items() if i in terms}  # a row without its terms is redone
    return _State(stored, done, terms)


def _group_terms(job: _Job, ids: np.ndarray) -> tuple:
    """(ids, per-image columns, per-t terms [n, 3, T] or None) of one group of images."""
    x0, labels = job.images(ids)
    kw = job.bound_kwargs(labels)
    if job.estimate:
        res = estimate_bound(job.lm.diffusion, job.lm.model, x0, job.estimate, ids, p=job.p, **kw)
        var, stacked = res["kl_var"], None
    else:
        res = bound_terms(job.lm.diffusion, job.lm.model, x0, ids, by_timestep=job.method == "loop", **kw)
        var, stacked = np.zeros(len(ids)), np.stack([res[k] for k in TERMS], axis=1)
    cols = {"bpd": res["total_bpd"], "prior_bpd": res["prior_bpd"], "decoder_bpd": res["decoder_bpd"],
            "kl_bpd": res["kl_bpd"], "kl_var": var}
    return ids, cols, stacked


def _keep(job: _Job, state: _State, got: tuple) -> int:
    gids, cols, stacked = got
    if stacked is not None:
        if dist.is_main():
            save_part(job.out, gids, stacked)
        state.terms.update({int(i): stacked[j] for j, i in enumerate(gids)})
    for j, i in enumerate(gids.tolist()):
        state.done[i] = state.stored[i] = {c: cols[c][j] for c in IMAGE_COLUMNS[1:]}
    return len(gids)


def _compute(job: _Job, state: _State, images_per_write: int | None) -> int:
    """Compute every image not done, in groups; returns how many were computed."""
    todo = [i for i in range(job.n_total) if i not in state.done]
    per_image = (job.estimate + 1) if job.estimate else job.lm.diffusion.num_timesteps
    group = images_per_write or max(1, math.ceil(4 * job.batch_size / per_image))
    if job.method == "loop":
        group = images_per_write or job.batch_size
    bar = tqdm(total=job.n_total, initial=job.n_total - len(todo), desc="nll images", unit="img",
               disable=not job.progress or not dist.is_main())
    # Under torchrun rank r takes the r-th of each run of `world` groups (the groups one process
    # would form, so the same forward passes and numbers); every rank receives every group's
    # numbers and rank 0 writes them (resume works as with one process).
    span, n_new = group * dist.world(), 0
    for g in range(0, len(todo), span):
        lo = g + dist.rank() * group
        ids = np.asarray(todo[lo:min(lo + group, g + span)], np.int64)
        part = _group_terms(job, ids) if len(ids) else None
        for got in (dist.D.all_gather_object(part) if dist.active() else [part]):
            if got is not None:
                kept = _keep(job, state, got)
                n_new += kept
                bar.update(kept)
        if dist.is_main():
            write_images_csv(job.out / IMAGES_CSV, state.stored)
    bar.close()
    return n_new


def _mean_stderr(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard error (ddof = 1; NaN for one value)."""
    x = np.asarray(x, np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


def _summary(job: _Job, state: _State, n_new: int, elapsed: float) -> dict:
    keys, lm, st = sorted(state.done), job.lm, job.settings()
    col = {c: np.array([state.done[i][c] for i in keys]) for c in IMAGE_COLUMNS[1:]}
    bpd, se = _mean_stderr(col["bpd"])
    ok = math.isfinite(se)
    return {"bpd": bpd, "bpd_stderr": se, "bpd_ci_low": bpd - Z * se if ok else None,
            "bpd_ci_high": bpd + Z * se if ok else None, "n": len(keys), "T": st.T,
            "prior_bpd": float(col["prior_bpd"].mean()), "decoder_bpd": float(col["decoder_bpd"].mean()),
            "kl_bpd": float(col["kl_bpd"].mean()), "method": "estimate" if job.estimate else job.method,
            "estimate": st.estimate, "cdf": st.cdf, "clip_denoised": st.clip_denoised, "seed": st.seed,
            "num": job.num, "data": job.data, "checkpoint": lm.path, "checkpoint_sha256": lm.sha256,
            "checkpoint_step": lm.step, "ema_rate": lm.ema_rate, "out_dir": str(job.out),
            "images_csv": str(job.out / IMAGES_CSV), "new_images": n_new, "seconds": elapsed,
            "images_per_sec": n_new / elapsed if n_new and elapsed > 0 else None}


def _estimate_fields(job: _Job, state: _State, summary: dict) -> None:
    """The Monte Carlo standard error of an estimate and where its proposal came from."""
    kl_var = np.array([state.done[i]["kl_var"] for i in sorted(state.done)])
    summary["mc_stderr"] = float(math.sqrt(kl_var.sum()) / len(kl_var))
    profile, pilot, mix = (job.proposal_from.get(k) for k in ("profile", "pilot", "uniform_mix"))
    summary["profile"] = str(profile) if profile is not None else (str(job.out / PILOT_CSV) if pilot else None)
    summary["pilot"] = int(pilot) if pilot else None
    summary["uniform_mix"] = mix if (profile is not None or pilot) else None


def _breakdown_files(job: _Job, state: _State, summary: dict) -> None:
    """The per-t breakdown of an exact run: CSV and plot (rank 0), named in the summary."""
    from iddpm_eval.plots import plot_breakdown

    stack = np.stack([state.terms[i] for i in sorted(state.done)])
    table = breakdown(stack[:, 0], stack[:, 1], stack[:, 2])
    if dist.is_main():
        write_breakdown(job.out / TERMS_CSV, table)
        plot_breakdown(job.out / TERMS_PNG, table, f"{Path(job.lm.path).name} on {job.data}: {summary['bpd']:.4f} "
                                                   f"bits/dim, n = {summary['n']}, T = {summary['T']}")
    summary["terms_csv"] = str(job.out / TERMS_CSV)
    summary["terms_png"] = str(job.out / TERMS_PNG)


def _finish(job: _Job, state: _State, n_new: int, elapsed: float) -> dict:
    from iddpm_core.provenance import json_clean, provenance

    summary = _summary(job, state, n_new, elapsed)
    if job.estimate:
        _estimate_fields(job, state, summary)
    else:
        _breakdown_files(job, state, summary)
    summary["provenance"] = provenance()
    summary["processes"] = dist.world()
    if dist.is_main():
        write_text(job.out / SUMMARY_JSON, json.dumps(json_clean(summary), indent=2, sort_keys=True) + "\n")
    return summary


def evaluate(checkpoint: str | os.PathLike | Loaded, data: str, *, out_dir: str | os.PathLike | None = None,
             num: int | None = None, batch_size: int = 64, seed: int = 0, exact_cdf: bool = False,
             clip_denoised: bool = True, estimate: int | None = None, profile: str | os.PathLike | None = None,
             uniform_mix: float = 0.05, pilot: int | None = None, method: str = "batched",
             ema: str | float | None = None, device: str | None = None, progress: bool = True,
             images_per_write: int | None = None) -> dict:
    """Bits/dim of the first ``num`` images of ``data`` (all by default) under ``checkpoint``.

    Exact bound (default) or ``estimate`` = K sampled timesteps per image, uniform or importance-
    sampled from ``profile`` (a breakdown CSV or a checkpoint whose loss-second-moment state shapes
    the proposal) or from a ``pilot`` run: the exact terms of the first ``pilot`` images, saved as
    ``pilot_terms.csv`` and reused on reruns. Per-image rows go to
    ``out_dir/nll_images.csv`` (rewritten atomically after every group of images; a rerun skips the
    images already there); exact runs also write per-t terms to ``parts/``, the breakdown
    ``nll_terms.csv`` and its plot ``nll_terms.png``. Returns the summary also written to ``nll.json``:
    "bpd", "bpd_stderr", the 95% interval "bpd_ci_low" .. "bpd_ci_high", the parts of the bound.
    """
    check_options(method, estimate, profile, pilot)
    dev = dist.device(device) or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = checkpoint if isinstance(checkpoint, Loaded) else load(checkpoint, ema=ema, device=dev)
    src, conditional, n_total = _open_data(data, lm, num)
    out = Path(out_dir) if out_dir is not None else default_out_dir(lm.path, str(data), estimate)
    job = _Job(lm, src, str(data), num, n_total, conditional, dev, out, seed=seed, batch_size=batch_size,
               clip_denoised=clip_denoised, exact_cdf=exact_cdf, progress=progress, estimate=estimate, method=method)
    if estimate:
        job.proposal_from = {"profile": profile, "pilot": pilot, "uniform_mix": uniform_mix}
        job.p = _proposal(job)
    _claim_folder(out, job.settings())
    state = _resume(job)
    t0 = time.time()
    n_new = _compute(job, state, images_per_write)
    return _finish(job, state, n_new, time.time() - t0)


def results_row(summary: dict, experiment: str = "nll") -> dict:
    """The results-table row of a run's summary: metric "bpd" (or "bpd_estK"), its 95% interval,
    and the settings that define the number."""
    from iddpm_core.provenance import config_hash
    from iddpm_eval.tables import result_row

    est = summary["estimate"]
    extra = {k: summary[k] for k in ("T", "prior_bpd", "decoder_bpd", "kl_bpd", "method", "estimate",
                                     "clip_denoised", "data", "checkpoint", "checkpoint_step", "ema_rate")}
    extra.update({k: summary[k] for k in ("mc_stderr", "profile", "pilot") if summary.get(k) is not None})
    return result_row(experiment=experiment, metric="bpd" if not est else f"bpd_est{est}", value=summary["bpd"],
                      ci_low=summary["bpd_ci_low"], ci_high=summary["bpd_ci_high"], n=summary["n"],
                      mode=summary["cdf"], seed=summary["seed"], checkpoint_hash=summary["checkpoint_sha256"],
                      config_hash=config_hash({k: summary[k] for k in ("T", "cdf", "clip_denoised", "estimate",
                                                                         "data")}),
                      extra=extra)
