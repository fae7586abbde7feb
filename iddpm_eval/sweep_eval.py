"""Evaluation of one sweep checkpoint: FID (with a bootstrap interval) and bits/dim, as the columns
of the sweep table. :func:`evaluate_checkpoint` is the default ``--eval-hook`` of
``iddpm-train sweep``. This module holds the settings and names the columns; sampling, features,
the cached reference and every metric are :mod:`iddpm_eval.measure`'s, as for ``iddpm-eval fid``.

FID. ``fid_num`` images are sampled from the checkpoint's EMA weights with ``fid_steps`` steps of
``fid_sampler`` (seeded by ``seed``) and compared with ``fid_ref_num`` images of the reference
data (``fid_ref``, default the training data; the subset is drawn as ``iddpm-eval fid --num N
--seed S`` draws it). The reference features are computed once per sweep and cached in
``OUT/eval_cache/``. The interval comes from a bootstrap over images on both sides
(``fid_bootstrap`` rounds), shifted by the bootstrap's own bias (see
:func:`iddpm_eval.fid.bootstrap_fid`). With ``fid_fd_inf`` the row also gets FD-infinity
(:mod:`iddpm_eval.fd_inf`; columns ``fd_inf``, ``fd_inf_ci_low``/``high``).
With fewer images than feature dimensions (2048) the distance is computed in the span of the
images (:func:`iddpm_eval.fid.choose_method` picks :func:`iddpm_eval.fid.fid_lowrank`: exact, no
1e-6 regularisation, and milliseconds instead of the minute a 2048 x 2048 ``sqrtm`` takes on a
busy CPU); column ``fid_method`` says which form was used. The samples are kept as
``<run>/eval/step_XXXXXX/samples.npz``, so ``iddpm-eval fid`` can recompute the number.

Bits/dim. :func:`iddpm_eval.nll.evaluate` on the first ``nll_num`` images of ``nll_data``
(default the training data): the exact bound (``nll_estimate`` 0) or the unbiased estimate from
K timesteps per image (``nll_estimate`` K); ``nll_stderr`` is the standard error over images
(which includes the timestep noise of the estimate). Per-image results stay in
``<run>/eval/step_XXXXXX/nll/``; a rerun reuses them.

Precision/recall. With ``fid_pr`` 1, precision, recall, density and coverage (k = 3,
:func:`iddpm_eval.prdc.compute_prdc`) of the FID samples against the FID reference, from the same
Inception features (no second pass).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iddpm_core.checks import refuse_unknown

# Defaults of the settings read from run_info["eval"]; the CLI passes all of them.
DEFAULTS = {
    "fid_num": 256, "fid_steps": 25, "fid_sampler": "ddim", "fid_eta": 0.0, "fid_ref": None, "fid_ref_num": None,
    "fid_bootstrap": 200, "fid_pr": 0, "fid_mode": "legacy-tf", "fid_weights": None, "fid_batch_size": 64,
    "sample_batch_size": 256, "nll_num": 64, "nll_estimate": 16, "nll_data": None, "nll_batch_size": 256,
    "seed": 0, "device": None, "fid_fd_inf": False, "fid_fd_inf_points": 15, "fid_fd_inf_min_fraction": 0.2,
    "fid_fd_inf_bootstrap": 50,
}

# Types a spec's [eval] values must have (None = use the default / the training data).
_STR_KEYS = ("fid_sampler", "fid_ref", "fid_mode", "fid_weights", "nll_data", "device")


def check_settings(given: dict) -> None:
    """Refuse unknown keys and values of the wrong type (called by ``iddpm-train sweep`` before it
    submits anything); the error names the key."""
    refuse_unknown(given, set(DEFAULTS))
    for k, v in given.items():
        if v is None:
            continue
        if k in _STR_KEYS:
            ok, want = isinstance(v, str), "a string"
        elif k == "fid_eta":
            ok, want = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
        else:
            ok, want = isinstance(v, int) and not isinstance(v, bool), "an integer"
        if not ok:
            raise ValueError(f"{k}: expected {want}, got {type(v).__name__} {v!r}")
    settings({"eval": given})


def settings(run_info: dict) -> dict:
    """The evaluation settings of ``run_info["eval"]`` with defaults filled in; unknown keys refused."""
    given = dict(run_info.get("eval") or {})
    refuse_unknown(given, set(DEFAULTS), "sweep evaluation settings")
    s = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    s["fid_ref"] = s["fid_ref"] or run_info.get("data")
    s["nll_data"] = s["nll_data"] or run_info.get("data")
    for k in ("fid_num", "nll_num"):
        if int(s[k]) < 0:
            raise ValueError(f"{k} must be >= 0 (0 = skip), got {s[k]}")
    if s["fid_num"] == 1:
        raise ValueError("fid_num must be 0 (skip) or at least 2 (a covariance needs 2 images)")
    return s


def request(s: dict):
    """The :class:`iddpm_eval.measure.Request` of the settings: FID of the samples (side a) against
    the reference (side b, the real set), in the form :func:`iddpm_eval.fid.choose_method` picks,
    with a bootstrap interval, FD-infinity and precision/recall (k = 3) as set."""
    from iddpm_eval.measure import Request

    return Request(method="auto", seed=int(s["seed"]), bootstrap=int(s["fid_bootstrap"]), intervals=("fid",),
                   pr=bool(int(s["fid_pr"])), k=3, fd_inf=bool(s["fid_fd_inf"]),
                   fd_inf_points=int(s["fid_fd_inf_points"]), fd_inf_min_fraction=float(s["fid_fd_inf_min_fraction"]),
                   fd_inf_bootstrap=int(s["fid_fd_inf_bootstrap"]), reference="b", device=s["device"])


def fid_of_checkpoint(checkpoint, s: dict, out_dir: Path, cache_dir: Path, progress: bool = False) -> dict:
    """Sample ``checkpoint`` (a path or loaded weights), extract features, and the columns of every
    metric the settings ask for against the cached reference features."""
    from iddpm_eval import measure

    fx = measure.cached_extractor(s["fid_mode"], s["fid_weights"], int(s["fid_batch_size"]), s["device"])
    ref = measure.reference_features(s["fid_ref"], s["fid_ref_num"], int(s["seed"]), fx, cache_dir, progress)
    gen, seconds = measure.sample_features(checkpoint, fx, num=int(s["fid_num"]), steps=int(s["fid_steps"]),
                                           sampler=s["fid_sampler"], eta=float(s["fid_eta"]), seed=int(s["seed"]),
                                           batch_size=int(s["sample_batch_size"]), device=s["device"],
                                           samples_path=Path(out_dir) / "samples.npz", progress=progress)
    out = measure.metrics(measure.features_side("samples", gen), measure.features_side(str(s["fid_ref"]), ref),
                          request(s))
    cols = {"fid": out["fid"], "fid_method": out["fid_method"], "fid_n": len(gen), "fid_ref_n": len(ref),
            "fid_steps": int(s["fid_steps"]), "fid_sampler": s["fid_sampler"], "fid_mode": fx.mode,
            "fid_ref": str(s["fid_ref"]), "weights_sha256": fx.weights_sha256, **seconds}
    if int(s["fid_bootstrap"]):
        cols.update(fid_ci_low=out["fid_ci_low"], fid_ci_high=out["fid_ci_high"], fid_boot_bias=out["bootstrap_bias"],
                    fid_boot_pct_low=out["bootstrap_pct_low"], fid_boot_pct_high=out["bootstrap_pct_high"],
                    fid_bootstrap=int(s["fid_bootstrap"]), fid_ci_method="bootstrap-percentile-bias-shifted")
    if s["fid_fd_inf"]:
        cols.update(_fd_inf_columns(out))
    if int(s["fid_pr"]):
        cols.update({k: out[k] for k in measure.PRDC}, pr_k=out["k"])
    return cols


def _fd_inf_columns(out: dict) -> dict:
    cols = {k: out[k] for k in ("fd_inf", "fd_inf_ci_low", "fd_inf_ci_high", "fd_inf_ci_method", "fd_inf_slope")}
    cols["fd_inf_min_n"] = out["fd_inf_sizes"][0]
    return cols


def fd_inf_columns(gen: np.ndarray, ref: np.ndarray, s: dict) -> dict:
    """The FD-infinity columns of sample features against reference features (settings
    ``fid_fd_inf_*``), as :func:`fid_of_checkpoint` gives them; e.g. from saved features."""
    from iddpm_eval import measure

    sides = measure.features_side("samples", gen), measure.features_side(str(s["fid_ref"]), ref)
    return _fd_inf_columns(measure.fd_inf_metrics(*sides, request(s)))


def nll_of_checkpoint(checkpoint: str, s: dict, out_dir: Path, progress: bool = False) -> dict:
    """Bits/dim of the first ``nll_num`` images (exact bound or the K-timestep estimate)."""
    from iddpm_eval import nll

    k = int(s["nll_estimate"]) or None
    r = nll.evaluate(checkpoint, s["nll_data"], out_dir=out_dir, num=int(s["nll_num"]),
                     batch_size=int(s["nll_batch_size"]), seed=int(s["seed"]), estimate=k, device=s["device"],
                     progress=progress)
    return {"nll": r["bpd"], "nll_stderr": r["bpd_stderr"], "nll_ci_low": r.get("bpd_ci_low"),
            "nll_ci_high": r.get("bpd_ci_high"), "nll_n": r["n"], "nll_T": r["T"],
            "nll_method": f"estimate{k}" if k else "exact", "nll_data": str(s["nll_data"]), "nll_seconds": r["seconds"]}


def evaluate_checkpoint(checkpoint: str, run_info: dict) -> dict:
    """FID and bits/dim columns for one checkpoint of a sweep (settings in ``run_info["eval"]``;
    ``fid_num`` or ``nll_num`` 0 skips that metric)."""
    s = settings(run_info)
    progress = bool(run_info.get("progress", False))
    step = int(run_info["step"])
    out_dir = Path(run_info["run_dir"]) / "eval" / f"step_{step:06d}"
    cache_dir = Path(run_info["out_dir"]) / "eval_cache"
    row: dict = {}
    if int(s["fid_num"]):
        row.update(fid_of_checkpoint(checkpoint, s, out_dir, cache_dir, progress))
    if int(s["nll_num"]):
        row.update(nll_of_checkpoint(checkpoint, s, out_dir / "nll", progress))
    return row
