"""Negative log-likelihood in bits/dim: the full variational bound of a diffusion model, exactly
or estimated from a few timesteps per image.

Bound of one image (Improved DDPM's ``calc_bpd_loop``): prior KL(q(x_T|x_0) || N(0, I)) + the KL
terms KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t = 1 .. T-1 + the discretized Gaussian decoder
NLL at t = 0, each divided by D log 2. Term t uses one draw x_t ~ q(x_t | x_0).

Noise. The noise of term t of image ``index`` comes from its own generator seeded by
``(seed, index, t)`` (:func:`pair_noise`), so the numbers do not depend on how the terms are
grouped into forward passes, on the batch size, on the device or on interruptions.

Two ways to compute the same numbers:

* :func:`bound_terms` ("batched"): the (image, t) pairs are flattened and cut into forward passes
  of ``batch_size`` pairs, so one image's timesteps share a forward pass;
* :func:`bound_terms_loop` ("loop"): improved-diffusion's order, t = T-1 .. 0, one forward pass of
  the images per t.

:func:`estimate_bound` draws K timesteps t >= 1 per image (uniform or from a proposal) and returns
an unbiased estimate of the same bound; the prior and the decoder term are always computed. The
terms shrink by orders of magnitude from t = 1 to T - 1, so uniform draws are heavy-tailed at small
K and their sample standard error is optimistic; a proposal proportional to the per-t RMS of a
pilot run (:func:`proposal`) cut the error 30-fold or more at T = 1000 and kept the standard error
honest (results/benchmarks/nll.csv).

:func:`evaluate` runs either on a checkpoint and a data source with resumable per-image output;
:class:`TrainingNLL` is a trainer callback logging the K-step estimate during training.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from iddpm_core.diffusion import GaussianDiffusion, mean_flat
from iddpm_core.io import save_npz, write_text
from iddpm_core.sample import seed_from

IMAGES_CSV = "nll_images.csv"
TERMS_CSV = "nll_terms.csv"
TERMS_PNG = "nll_terms.png"
SUMMARY_JSON = "nll.json"
SETTINGS_JSON = "nll_settings.json"
PARTS_DIR = "parts"
PILOT_CSV = "pilot_terms.csv"


class NLLError(ValueError):
    """Bad input to the bits/dim computation; the message names the file, shape or setting."""


# ----------------------------------------------------------------------------- noise and pairs

def pair_noise(seed: int, index: int, t: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise (float32, CPU) of term ``t`` of image ``index``, from a generator seeded
    by (seed, index, t)."""
    g = torch.Generator().manual_seed(seed_from(seed, index, t))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


NoiseFn = Callable[[int, int, tuple], torch.Tensor]


def _noise_fn(seed: int, noise_fn: NoiseFn | None) -> NoiseFn:
    """``noise_fn(index, t, shape)`` if given, else :func:`pair_noise` with ``seed``."""
    return noise_fn if noise_fn is not None else (lambda i, t, shape: pair_noise(seed, i, t, shape))


def _check_images(x0: torch.Tensor, indices: Sequence[int] | None) -> np.ndarray:
    if not isinstance(x0, torch.Tensor) or x0.ndim != 4:
        raise NLLError(f"images must be a tensor [N, C, H, W], got {getattr(x0, 'shape', type(x0).__name__)}")
    idx = np.arange(x0.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.shape[0] != x0.shape[0]:
        raise NLLError(f"got {x0.shape[0]} images but {idx.shape[0]} indices")
    return idx


def _kwargs_for(labels: torch.Tensor | None, rows: torch.Tensor, device) -> dict | None:
    return None if labels is None else {"y": labels.to(device)[rows.to(device)]}


@torch.no_grad()
def _pair_terms(diffusion: GaussianDiffusion, model: Callable, x0: torch.Tensor, rows: torch.Tensor,
                ts: torch.Tensor, keys: np.ndarray, noise_fn: NoiseFn, clip_denoised: bool, exact_cdf: bool,
                labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VLB term, x_0 MSE and epsilon MSE of the pairs (x0[rows[j]], ts[j]); ``keys[j]`` is the image
    index handed to ``noise_fn``. One forward pass."""
    shape = tuple(x0.shape[1:])
    noise = torch.stack([noise_fn(int(k), int(t), shape) for k, t in zip(keys, ts.tolist())])
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    start = x0[rows.to(x0.device)]
    t = ts.to(x0.device)
    x_t = diffusion.q_sample(start, t, noise=noise)
    out = diffusion.vb_terms_bpd(model, start, x_t, t, clip_denoised=clip_denoised,
                                 model_kwargs=_kwargs_for(labels, rows, x0.device), exact_cdf=exact_cdf)
    xstart_mse = mean_flat((out["pred_xstart"] - start) ** 2)
    eps = diffusion.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
    return out["output"], xstart_mse, mean_flat((eps - noise) ** 2)


def _run_pairs(diffusion, model, x0, rows: np.ndarray, ts: np.ndarray, idx: np.ndarray, noise_fn: NoiseFn,
               batch_size: int, clip_denoised: bool, exact_cdf: bool, labels, progress: bool, desc: str):
    """Evaluate all (rows[j], ts[j]) pairs in forward passes of ``batch_size``; arrays [P] float64."""
    if batch_size < 1:
        raise NLLError(f"batch_size must be >= 1, got {batch_size}")
    P = len(rows)
    vb, xm, em = (np.empty(P, np.float64) for _ in range(3))
    bar = tqdm(total=P, desc=desc, unit="term", disable=not progress, leave=False)
    for s in range(0, P, batch_size):
        e = min(s + batch_size, P)
        r = torch.from_numpy(rows[s:e])
        out = _pair_terms(diffusion, model, x0, r, torch.from_numpy(ts[s:e]), idx[rows[s:e]], noise_fn,
                          clip_denoised, exact_cdf, labels)
        for dst, src in zip((vb, xm, em), out):
            dst[s:e] = src.double().cpu().numpy()
        bar.update(e - s)
    bar.close()
    return vb, xm, em


# ----------------------------------------------------------------------------- the exact bound

def _totals(diffusion, x0, vb: np.ndarray) -> dict:
    prior = diffusion.prior_bpd(x0).double().cpu().numpy()
    decoder = vb[:, 0]
    kl = vb[:, 1:].sum(axis=1)
    return {"total_bpd": prior + decoder + kl, "prior_bpd": prior, "decoder_bpd": decoder, "kl_bpd": kl}


@torch.no_grad()
def bound_terms(diffusion: GaussianDiffusion, model: Callable, x0: torch.Tensor,
                indices: Sequence[int] | None = None, *, seed: int = 0, batch_size: int = 64,
                clip_denoised: bool = True, exact_cdf: bool = False, labels: torch.Tensor | None = None,
                progress: bool = False, noise_fn: NoiseFn | None = None) -> dict:
    """Every term of the bound of each image in ``x0`` ([N, C, H, W] in [-1, 1]), batched over
    (image, t) pairs: ``batch_size`` pairs per forward pass, each image's timesteps t = T-1 .. 0 in
    a row. ``indices`` (default 0..N-1) name the images for the noise seeds; ``noise_fn(index, t,
    shape)`` replaces :func:`pair_noise` (tests feed another path's noise).

    Returns float64 numpy arrays: "vb" [N, T] (bits/dim; column 0 is the decoder NLL),
    "xstart_mse" and "mse" (epsilon) [N, T], and per image "total_bpd", "prior_bpd",
    "decoder_bpd", "kl_bpd" (sum of the KL terms t >= 1) [N].
    """
    idx = _check_images(x0, indices)
    N, T = x0.shape[0], diffusion.num_timesteps
    rows = np.repeat(np.arange(N, dtype=np.int64), T)
    ts = np.tile(np.arange(T - 1, -1, -1, dtype=np.int64), N)
    vb, xm, em = _run_pairs(diffusion, model, x0, rows, ts, idx, _noise_fn(seed, noise_fn), batch_size,
                            clip_denoised, exact_cdf, labels, progress, "bpd terms")
    order = np.arange(T - 1, -1, -1)
    out = {k: np.empty((N, T)) for k in ("vb", "xstart_mse", "mse")}
    for k, v in zip(("vb", "xstart_mse", "mse"), (vb, xm, em)):
        out[k][:, order] = v.reshape(N, T)
    out.update(_totals(diffusion, x0, out["vb"]))
    return out


@torch.no_grad()
def bound_terms_loop(diffusion: GaussianDiffusion, model: Callable, x0: torch.Tensor,
                     indices: Sequence[int] | None = None, *, seed: int = 0, batch_size: int = 64,
                     clip_denoised: bool = True, exact_cdf: bool = False, labels: torch.Tensor | None = None,
                     progress: bool = False, noise_fn: NoiseFn | None = None) -> dict:
    """Same numbers as :func:`bound_terms`, one timestep at a time (improved-diffusion's
    ``calc_bpd_loop`` order): for t = T-1 .. 0, one forward pass per ``batch_size`` images."""
    idx = _check_images(x0, indices)
    N, T = x0.shape[0], diffusion.num_timesteps
    out = {k: np.empty((N, T)) for k in ("vb", "xstart_mse", "mse")}
    noise = _noise_fn(seed, noise_fn)
    for t in tqdm(range(T - 1, -1, -1), desc="bpd loop", disable=not progress, leave=False):
        for s in range(0, N, batch_size):
            rows = torch.arange(s, min(s + batch_size, N))
            ts = torch.full((len(rows),), t, dtype=torch.long)
            res = _pair_terms(diffusion, model, x0, rows, ts, idx[rows.numpy()], noise, clip_denoised,
                              exact_cdf, labels)
            for k, v in zip(("vb", "xstart_mse", "mse"), res):
                out[k][s:s + len(rows), t] = v.double().cpu().numpy()
    out.update(_totals(diffusion, x0, out["vb"]))
    return out


# ----------------------------------------------------------------------------- the K-step estimate

def proposal(num_timesteps: int, profile: np.ndarray | None = None, uniform_mix: float = 0.05) -> np.ndarray:
    """Sampling probabilities over t = 1 .. T-1 (array [T] with p[0] = 0): uniform without a profile,
    else proportional to ``profile`` (a per-t loss scale, e.g. the RMS of the term over images),
    mixed with ``uniform_mix`` of the uniform so that every t keeps a positive probability."""
    T = int(num_timesteps)
    if T < 2:
        raise NLLError(f"a {T}-step chain has no KL terms to sample")
    p = np.zeros(T, np.float64)
    if profile is None:
        p[1:] = 1.0 / (T - 1)
        return p
    prof = np.asarray(profile, np.float64).reshape(-1)
    if prof.shape != (T,):
        raise NLLError(f"the loss profile has {prof.shape[0]} entries but the diffusion has T = {T} steps")
    w = np.abs(prof[1:])
    if not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise NLLError("the loss profile must be finite and not all zero on t >= 1")
    if not 0.0 < uniform_mix <= 1.0:
        raise NLLError(f"uniform_mix must lie in (0, 1], got {uniform_mix}")
    p[1:] = (1.0 - uniform_mix) * w / w.sum() + uniform_mix / (T - 1)
    return p


def sample_timesteps(p: np.ndarray, k: int, seed: int, index: int) -> np.ndarray:
    """K timesteps drawn with replacement from ``p`` for image ``index`` (generator seeded by
    (seed, index, 0, 1), apart from the noise seeds)."""
    g = torch.Generator().manual_seed(seed_from(seed, index, 0, 1))
    return torch.multinomial(torch.from_numpy(p), k, replacement=True, generator=g).numpy().astype(np.int64)


@torch.no_grad()
def estimate_bound(diffusion: GaussianDiffusion, model: Callable, x0: torch.Tensor, k: int,
                   indices: Sequence[int] | None = None, *, p: np.ndarray | None = None, seed: int = 0,
                   sample_seed: int | None = None, batch_size: int = 64, clip_denoised: bool = True,
                   exact_cdf: bool = False, labels: torch.Tensor | None = None, progress: bool = False) -> dict:
    """Unbiased estimate of the bound of each image from ``k`` timesteps t >= 1 drawn from ``p``
    (default uniform; see :func:`proposal`): kl = mean_j L_{t_j} / p_{t_j}, plus the prior and the
    decoder term (t = 0), which are always computed. The terms use the same noise as
    :func:`bound_terms` with the same ``seed``; the timesteps come from ``sample_seed`` (default
    ``seed``).

    Returns float64 arrays [N]: "total_bpd", "prior_bpd", "decoder_bpd", "kl_bpd" and "kl_var",
    the estimated variance of "kl_bpd" over the timestep draws (sample variance / k); and
    "timesteps" [N, k].
    """
    idx = _check_images(x0, indices)
    N, T = x0.shape[0], diffusion.num_timesteps
    if k < 2:
        raise NLLError(f"--estimate needs K >= 2 timesteps per image to report a standard error, got {k}")
    p = proposal(T) if p is None else np.asarray(p, np.float64)
    if p.shape != (T,) or p[0] != 0 or np.any(p < 0) or not math.isclose(p.sum(), 1.0, rel_tol=1e-9):
        raise NLLError(f"p must be probabilities [T={T}] over t >= 1 (p[0] = 0) summing to 1")
    sseed = seed if sample_seed is None else sample_seed
    drawn = np.stack([sample_timesteps(p, k, sseed, int(i)) for i in idx])
    rows = np.repeat(np.arange(N, dtype=np.int64), k + 1)
    ts = np.concatenate([np.zeros((N, 1), np.int64), drawn], axis=1).reshape(-1)
    vb, _, _ = _run_pairs(diffusion, model, x0, rows, ts, idx, _noise_fn(seed, None), batch_size, clip_denoised,
                          exact_cdf, labels, progress, f"bpd estimate K={k}")
    vb = vb.reshape(N, k + 1)
    ratio = vb[:, 1:] / p[drawn]
    kl = ratio.mean(axis=1)
    prior = diffusion.prior_bpd(x0).double().cpu().numpy()
    return {"total_bpd": prior + vb[:, 0] + kl, "prior_bpd": prior, "decoder_bpd": vb[:, 0], "kl_bpd": kl,
            "kl_var": ratio.var(axis=1, ddof=1) / k, "timesteps": drawn}


def load_profile(path: str | os.PathLike, num_timesteps: int) -> np.ndarray:
    """A per-t loss profile [T] for :func:`proposal`, from a breakdown CSV written by a previous run
    (column ``vb_rms``, else ``vb``) or a training checkpoint with a warmed-up loss-second-moment
    sampler (sqrt of the mean squared recorded loss per t)."""
    path = Path(path)
    if not path.is_file():
        raise NLLError(f"loss profile not found: {path}")
    T = int(num_timesteps)
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        col = "vb_rms" if rows and "vb_rms" in rows[0] else "vb"
        if not rows or col not in rows[0] or "t" not in rows[0]:
            raise NLLError(f"{path}: expected a breakdown CSV with columns t and vb (or vb_rms)")
        prof = np.full(T, np.nan)
        for r in rows:
            t = int(r["t"])
            if not 0 <= t < T:
                raise NLLError(f"{path}: timestep {t} outside [0, {T}); the profile is for another T")
            prof[t] = float(r[col])
        if np.isnan(prof).any() or len(rows) != T:
            raise NLLError(f"{path}: has {len(rows)} timesteps, the diffusion has T = {T}")
        return prof
    from iddpm_core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    st = ckpt.get("sampler_state") or {}
    if "loss_history" not in st:
        raise NLLError(f"{path}: checkpoint holds no loss-second-moment sampler state (trained with a uniform "
                       "sampler?); give a breakdown CSV from a pilot run instead")
    hist = np.asarray(st["loss_history"], np.float64)
    counts = np.asarray(st["loss_counts"])
    if hist.shape[0] != T:
        raise NLLError(f"{path}: sampler state is for T = {hist.shape[0]} steps, the diffusion has T = {T}")
    if not (counts == hist.shape[1]).all():
        raise NLLError(f"{path}: the sampler has not recorded {hist.shape[1]} losses for every t yet")
    return np.sqrt((hist ** 2).mean(axis=1))


# ----------------------------------------------------------------------------- summaries and files

def mean_stderr(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard error (ddof = 1; NaN for one value)."""
    x = np.asarray(x, np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


def breakdown(vb: np.ndarray, xstart_mse: np.ndarray, mse: np.ndarray) -> dict:
    """Per-t means over images: vb (mean term), vb_stderr, vb_rms, xstart_mse, mse; arrays [T]."""
    n = vb.shape[0]
    se = vb.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full(vb.shape[1], np.nan)
    return {"t": np.arange(vb.shape[1]), "vb": vb.mean(axis=0), "vb_stderr": se,
            "vb_rms": np.sqrt((vb ** 2).mean(axis=0)), "xstart_mse": xstart_mse.mean(axis=0),
            "mse": mse.mean(axis=0)}


def write_breakdown(path: str | os.PathLike, table: dict) -> None:
    cols = ("t", "vb", "vb_stderr", "vb_rms", "xstart_mse", "mse")
    lines = [",".join(cols)]
    for j in range(len(table["t"])):
        lines.append(",".join(str(int(table["t"][j])) if c == "t" else repr(float(table[c][j])) for c in cols))
    write_text(path, "\n".join(lines) + "\n")


def plot_breakdown(path: str | os.PathLike, table: dict, title: str = "") -> Path:
    """Mean term per t (bits/dim) and the MSEs per t, log y axes, as a PNG."""
    from matplotlib.figure import Figure

    from iddpm_eval.plots import save_figure

    t = np.asarray(table["t"])
    fig = Figure(figsize=(9, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.semilogy(t[1:], np.maximum(table["vb"][1:], 1e-12), lw=1, label="KL term (t >= 1)")
    ax1.semilogy([0], [max(table["vb"][0], 1e-12)], "o", label="decoder NLL (t = 0)")
    ax1.set_xlabel("t")
    ax1.set_ylabel("bits/dim")
    ax1.legend(fontsize=8)
    ax2.semilogy(t, np.maximum(table["mse"], 1e-12), lw=1, label="epsilon MSE")
    ax2.semilogy(t, np.maximum(table["xstart_mse"], 1e-12), lw=1, label="x0 MSE")
    ax2.set_xlabel("t")
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- checkpoint + data runs

@dataclass
class Settings:
    """What determines the numbers of a run; stored in the output folder and checked on resume."""

    checkpoint_sha256: str
    data: str
    T: int
    seed: int
    cdf: str  # "tanh" or "exact"
    clip_denoised: bool
    ema_rate: float | None
    estimate: int | None = None
    proposal_sha256: str | None = None
    method: str = "batched"


def _slug(s: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
    return out.strip("_.")[:60] or "data"


def default_out_dir(checkpoint: str | os.PathLike, data: str, estimate: int | None) -> Path:
    """``<checkpoint folder>/nll-<checkpoint stem>-<data>-<exact|estK>``."""
    ck = Path(checkpoint)
    mode = "exact" if not estimate else f"est{estimate}"
    return ck.parent / f"nll-{ck.stem}-{_slug(Path(data).name if os.sep in data else data)}-{mode}"


IMAGE_COLUMNS = ("index", "bpd", "prior_bpd", "decoder_bpd", "kl_bpd", "kl_var")


def _read_images_csv(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and set(IMAGE_COLUMNS) - set(rows[0]):
        raise NLLError(f"{path}: not a per-image bits/dim file (columns {sorted(rows[0])})")
    return {int(r["index"]): {c: float(r[c]) for c in IMAGE_COLUMNS if c != "index"} for r in rows}


def _write_images_csv(path: Path, done: dict[int, dict]) -> None:
    lines = [",".join(IMAGE_COLUMNS)]
    for i in sorted(done):
        lines.append(",".join([str(i)] + [repr(float(done[i][c])) for c in IMAGE_COLUMNS[1:]]))
    write_text(path, "\n".join(lines) + "\n")


def _load_parts(folder: Path, want: set[int], T: int) -> dict[int, np.ndarray]:
    """Per-image [3, T] arrays (vb, xstart_mse, mse) of the images in ``want`` from parts/*.npz."""
    got: dict[int, np.ndarray] = {}
    for f in sorted((folder / PARTS_DIR).glob("terms_*.npz")):
        with np.load(f) as z:
            terms = z["terms"]
            if terms.shape[1:] != (3, T):
                raise NLLError(f"{f}: terms of shape {terms.shape}, expected (n, 3, {T})")
            for j, i in enumerate(z["indices"].tolist()):
                if i in want:
                    got[i] = terms[j]
    return got


def _settings_check(path: Path, settings: Settings) -> None:
    new = asdict(settings)
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise NLLError(f"{path.parent} holds a run with other settings ({', '.join(diff)} differ: "
                           f"{ {k: old.get(k) for k in diff} } vs { {k: new.get(k) for k in diff} }); "
                           "use another --out folder")
    else:
        write_text(path, json.dumps(new, indent=2, sort_keys=True) + "\n")


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
    from iddpm_core.sample import load_for_sampling
    from iddpm_core.provenance import file_sha256

    sm = load_for_sampling(checkpoint, ema_rate=ema, device=device)
    diffusion = build_diffusion(sm.diffusion_config, respacing="")
    return Loaded(sm.model, diffusion, sm.model_config, str(checkpoint), file_sha256(checkpoint), sm.ema_rate,
                  sm.step, sm.info)


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
    ``nll_terms.csv`` and its plot ``nll_terms.png``. Returns the summary also written to ``nll.json``.
    """
    from iddpm_core.data import load_source, to_model_range

    if method not in ("batched", "loop"):
        raise NLLError(f"method must be 'batched' or 'loop', got {method!r}")
    if estimate is not None and method != "batched":
        raise NLLError("--estimate runs the batched method only")
    if (profile is not None or pilot) and not estimate:
        raise NLLError("a loss profile or pilot run is used by --estimate only")
    if profile is not None and pilot:
        raise NLLError("give either a loss profile or a pilot run, not both")
    from iddpm_eval import distributed as dist

    dev = dist.device(device) or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = checkpoint if isinstance(checkpoint, Loaded) else load(checkpoint, ema=ema, device=dev)
    diffusion, model, T = lm.diffusion, lm.model, lm.diffusion.num_timesteps
    src = load_source(data)
    cfg = lm.model_config
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

    out = Path(out_dir) if out_dir is not None else default_out_dir(lm.path, str(data), estimate)
    p = None
    if estimate:
        prof = load_profile(profile, T) if profile is not None else None
        if pilot:  # one process computes (or reads) the pilot, under torchrun too
            prof = dist.broadcast(_pilot_profile(out / PILOT_CSV, diffusion, model, src, min(int(pilot), len(src)),
                                                 conditional, dev, seed=seed, batch_size=batch_size,
                                                 clip_denoised=clip_denoised, exact_cdf=exact_cdf, progress=progress)
                                  if dist.is_main() else None)
        p = proposal(T, prof, uniform_mix)
    settings = Settings(checkpoint_sha256=lm.sha256, data=str(data), T=T, seed=int(seed),
                        cdf="exact" if exact_cdf else "tanh", clip_denoised=bool(clip_denoised),
                        ema_rate=lm.ema_rate, estimate=int(estimate) if estimate else None,
                        proposal_sha256=hashlib.sha256(p.tobytes()).hexdigest() if p is not None else None,
                        method=method)
    error = None
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        try:
            _settings_check(out / SETTINGS_JSON, settings)
        except NLLError as exc:
            error = str(exc)
    error = dist.broadcast(error)  # every rank stops, not only the one that found it
    if error:
        raise NLLError(error)

    images_csv = out / IMAGES_CSV
    stored = _read_images_csv(images_csv)  # rows past --num stay in the file, outside this summary
    done = {i: r for i, r in stored.items() if i < n_total}
    terms: dict[int, np.ndarray] = {}
    if not estimate:
        terms = _load_parts(out, set(done), T)
        done = {i: r for i, r in done.items() if i in terms}  # a row without its terms is redone
    todo = [i for i in range(n_total) if i not in done]
    per_image = (k + 1) if (k := estimate) else T
    group = images_per_write or max(1, math.ceil(4 * batch_size / per_image))
    if method == "loop":
        group = images_per_write or batch_size
    fn = bound_terms if method == "batched" else bound_terms_loop
    t0, n_new = time.time(), 0
    bar = tqdm(total=n_total, initial=n_total - len(todo), desc="nll images", unit="img",
               disable=not progress or not dist.is_main())
    # Under torchrun rank r takes the r-th of each run of `world` groups (the groups one process
    # would form, so the same forward passes and numbers); every rank receives every group's
    # numbers and rank 0 writes them (resume works as with one process).
    span = group * dist.world()
    for g in range(0, len(todo), span):
        lo = g + dist.rank() * group
        ids = np.asarray(todo[lo:min(lo + group, g + span)], np.int64)
        part = None
        if len(ids):
            images, labels = src.batch(ids)
            x0 = to_model_range(images).to(dev)
            lab = torch.as_tensor(labels) if conditional else None
            if estimate:
                res = estimate_bound(diffusion, model, x0, estimate, ids, p=p, seed=seed, batch_size=batch_size,
                                     clip_denoised=clip_denoised, exact_cdf=exact_cdf, labels=lab)
                var, stacked = res["kl_var"], None
            else:
                res = fn(diffusion, model, x0, ids, seed=seed, batch_size=batch_size, clip_denoised=clip_denoised,
                         exact_cdf=exact_cdf, labels=lab)
                var = np.zeros(len(ids))
                stacked = np.stack([res["vb"], res["xstart_mse"], res["mse"]], axis=1)
            part = (ids, {"bpd": res["total_bpd"], "prior_bpd": res["prior_bpd"], "decoder_bpd": res["decoder_bpd"],
                          "kl_bpd": res["kl_bpd"], "kl_var": var}, stacked)
        for got in (dist.D.all_gather_object(part) if dist.active() else [part]):
            if got is None:
                continue
            gids, cols, stacked = got
            if stacked is not None:
                if dist.is_main():
                    save_npz(out / PARTS_DIR / f"terms_{gids[0]:08d}_{gids[-1]:08d}.npz", indices=gids, terms=stacked)
                terms.update({int(i): stacked[j] for j, i in enumerate(gids)})
            for j, i in enumerate(gids.tolist()):
                done[i] = stored[i] = {c: cols[c][j] for c in IMAGE_COLUMNS[1:]}
            n_new += len(gids)
            bar.update(len(gids))
        if dist.is_main():
            _write_images_csv(images_csv, stored)
    bar.close()
    elapsed = time.time() - t0

    keys = sorted(done)
    col = {c: np.array([done[i][c] for i in keys]) for c in IMAGE_COLUMNS[1:]}
    bpd, se = mean_stderr(col["bpd"])
    summary = {"bpd": bpd, "bpd_stderr": se, "n": len(keys), "T": T,
               "prior_bpd": float(col["prior_bpd"].mean()), "decoder_bpd": float(col["decoder_bpd"].mean()),
               "kl_bpd": float(col["kl_bpd"].mean()), "method": "estimate" if estimate else method,
               "estimate": settings.estimate, "cdf": settings.cdf, "clip_denoised": settings.clip_denoised,
               "seed": settings.seed, "num": num, "data": str(data), "checkpoint": lm.path,
               "checkpoint_sha256": lm.sha256, "checkpoint_step": lm.step, "ema_rate": lm.ema_rate,
               "out_dir": str(out), "images_csv": str(images_csv), "new_images": n_new,
               "seconds": elapsed, "images_per_sec": n_new / elapsed if n_new and elapsed > 0 else None}
    if estimate:
        summary["mc_stderr"] = float(math.sqrt(col["kl_var"].sum()) / len(keys))
        summary["profile"] = str(profile) if profile is not None else (str(out / PILOT_CSV) if pilot else None)
        summary["pilot"] = int(pilot) if pilot else None
        summary["uniform_mix"] = uniform_mix if (profile is not None or pilot) else None
    else:
        stack = np.stack([terms[i] for i in keys])
        table = breakdown(stack[:, 0], stack[:, 1], stack[:, 2])
        if dist.is_main():
            write_breakdown(out / TERMS_CSV, table)
            plot_breakdown(out / TERMS_PNG, table, f"{Path(lm.path).name} on {data}: {bpd:.4f} bits/dim, "
                                                  f"n = {len(keys)}, T = {T}")
        summary["terms_csv"] = str(out / TERMS_CSV)
        summary["terms_png"] = str(out / TERMS_PNG)
    from iddpm_core.provenance import json_clean, provenance

    summary["provenance"] = provenance()
    summary["processes"] = dist.world()
    if dist.is_main():
        write_text(out / SUMMARY_JSON, json.dumps(json_clean(summary), indent=2, sort_keys=True) + "\n")
    return summary


class TrainingNLL:
    """A ``callback`` for :func:`iddpm_core.train.train`: every ``every`` steps, the K-step estimate of
    the bound on the first ``num`` images of ``data`` (same images and noise each time, so the curve
    shows the model's change, not resampling). Returns ``{"bpd_estK": ..., "bpd_estK_mc_stderr": ...}``,
    which the trainer logs to TensorBoard and ``callback_metrics.csv``. ``ema_rate`` None = the raw
    weights; runs on rank 0 only."""

    def __init__(self, data: str = "digits", num: int = 16, k: int = 8, every: int = 100, seed: int = 0,
                 ema_rate: float | None = None, batch_size: int = 64, profile: np.ndarray | None = None):
        from iddpm_core.data import load_source, to_model_range

        if every < 1 or num < 1:
            raise NLLError(f"every and num must be >= 1, got {every}, {num}")
        src = load_source(data)
        if num > len(src):
            raise NLLError(f"data {data!r} holds {len(src)} images, asked for {num}")
        images, labels = src.batch(np.arange(num))
        self.x0, self.labels = to_model_range(images), torch.as_tensor(labels)
        self.k, self.every, self.seed, self.ema_rate = int(k), int(every), int(seed), ema_rate
        self.batch_size, self.profile = int(batch_size), profile

    def __call__(self, step: int, model, ema, info: dict) -> dict | None:
        if step % self.every or info.get("rank", 0) != 0:
            return None
        diffusion = info["diffusion"]
        net = ema.copy_model(model, self.ema_rate) if self.ema_rate is not None else model
        was_training = net.training
        net.eval()
        try:
            dev = next(net.parameters()).device
            p = proposal(diffusion.num_timesteps, self.profile) if self.profile is not None else None
            labels = self.labels if getattr(getattr(net, "config", None), "num_classes", None) else None
            res = estimate_bound(diffusion, net, self.x0.to(dev), self.k, p=p, seed=self.seed,
                                 batch_size=self.batch_size, labels=labels)
        finally:
            net.train(was_training)
        n = len(res["total_bpd"])
        return {f"bpd_est{self.k}": float(res["total_bpd"].mean()),
                f"bpd_est{self.k}_mc_stderr": float(math.sqrt(res["kl_var"].sum()) / n)}


def _pilot_profile(path: Path, diffusion, model, src, m: int, conditional: bool, dev, **kw) -> np.ndarray:
    """Per-t RMS of the exact terms of the first ``m`` images (read from ``path`` if a previous run
    of this folder wrote it, else computed and written there)."""
    from iddpm_core.data import to_model_range

    T = diffusion.num_timesteps
    if path.exists():
        return load_profile(path, T)
    images, labels = src.batch(np.arange(m))
    res = bound_terms(diffusion, model, to_model_range(images).to(dev), np.arange(m),
                      labels=torch.as_tensor(labels) if conditional else None, **kw)
    write_breakdown(path, breakdown(res["vb"], res["xstart_mse"], res["mse"]))
    return load_profile(path, T)

