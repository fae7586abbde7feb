"""One feature pass, then every requested metric.

The two sides of a comparison go through the feature network once each (or are read from stored
features or statistics); every metric is then computed from what that pass gave, by
:func:`metrics`, as a :class:`Request` asks:

* FID in the form :func:`iddpm_eval.fid.choose_method` picks, with a bootstrap interval;
* FD-infinity (:mod:`iddpm_eval.fd_inf`), sFID, KID (:mod:`iddpm_eval.kid`);
* precision, recall, density and coverage (:mod:`iddpm_eval.prdc`, intervals from
  :mod:`iddpm_eval.prdc_boot`), with the request's ``reference`` side as the real set.

One set of bootstrap resamples serves FID, sFID and precision/recall, so their intervals come
from the same draws. Two pipelines feed :func:`metrics`:

* :func:`compare`: ``iddpm-eval fid`` and ``iddpm-eval recall``. Sources (folders, datasets,
  ``.npz`` batches, statistics, features, checkpoints; see :mod:`iddpm_eval.sources`) are resolved
  and checked before any image is processed, measured, and checked to have been measured alike
  (detector, weights, preprocessing mode, dimensions); features can be saved for reuse.
* the sweep evaluation (:func:`iddpm_eval.sweep_eval.fid_of_checkpoint`): images sampled from a
  checkpoint (:func:`sample_features`) against reference features computed once per sweep
  (:func:`reference_features`), with one extractor per setting kept for the process
  (:func:`cached_extractor`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iddpm_eval.fid import FIDError, bootstrap_fid, choose_method, fid_of
from iddpm_eval import sources
from iddpm_eval.sources import Measured
from iddpm_eval.stats import INCEPTION, FeatureStats, bootstrap_draws, stats_from_features

PRDC = ("precision", "recall", "density", "coverage")


@dataclass
class Request:
    """Which metrics :func:`metrics` computes, and their settings."""

    method: str = "sqrtm"  # FID's form: "sqrtm", "eig" or "auto" (iddpm_eval.fid.choose_method)
    seed: int = 0  # bootstrap resamples, KID subsets, FD-infinity subsets
    bootstrap: int = 0  # rounds for 95% intervals; 0: none
    intervals: tuple = ("fid", "sfid", "prdc")  # the metrics that get a bootstrap interval
    sfid: bool = False
    kid: bool = False
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr: bool = False
    k: int = 3  # neighbours for precision/recall
    fd_inf: bool = False
    fd_inf_points: int = 15
    fd_inf_min_fraction: float = 0.2
    fd_inf_bootstrap: int | None = 0  # None: 50 rounds where they are cheap (the low-rank form), else 0
    reference: str = "a"  # the real set of precision/recall, the first side of FD-infinity
    device: str | None = None  # precision/recall's device (None: CUDA when available)
    progress: bool = False

    @property
    def both_features(self) -> bool:
        """KID and precision/recall need the features of both sides."""
        return bool(self.kid or self.pr)

    @property
    def features(self) -> bool:
        """Some metric resamples or subsamples features (statistics alone serve plain FID and sFID)."""
        return bool(self.both_features or self.bootstrap or self.fd_inf)

    @property
    def resample_method(self) -> str:
        """The form for resampled sets (bootstrap, FD-infinity): "eig" with FID's "eig", else "auto"."""
        return "eig" if self.method == "eig" else "auto"


def features_side(name: str, pool: np.ndarray) -> Measured:
    """A side given as features [N, D] in memory, its statistics computed from them."""
    mu, sigma = stats_from_features(pool, name)
    return Measured(name, "features", FeatureStats(mu, sigma, count=len(pool), source=name), pool=pool, n=len(pool))


def _fid(ma: Measured, mb: Measured, req: Request) -> dict:
    """FID in the form :func:`iddpm_eval.fid.choose_method` picks: the low-rank form on the
    features, or else the statistics of the pass (streamed, so not recomputed from the features)."""
    sa, sb = ma.stats, mb.stats
    form = choose_method(ma.pool, mb.pool, req.method)
    if form == "lowrank":
        return dict(fid=fid_of(ma.pool, mb.pool, method=form), fid_method=form)
    return dict(fid=fid_of(None, None, (sa.mu, sa.sigma), (sb.mu, sb.sigma), form), fid_method=form)


def _fid_interval(ma: Measured, mb: Measured, req: Request, estimate: float, draws: list) -> dict:
    sa, sb = ma.stats, mb.stats
    bs = bootstrap_fid(ma.pool, mb.pool, req.bootstrap, stats1=(sa.mu, sa.sigma), stats2=(sb.mu, sb.sigma),
                       seed=req.seed, progress=req.progress, method=req.resample_method, estimate=estimate, draws=draws)
    return dict(fid_ci_low=bs["low"], fid_ci_high=bs["high"], bootstrap_rounds=req.bootstrap,
                bootstrap_method=bs["method"], bootstrap_bias=bs["bias"], bootstrap_pct_low=bs["pct_low"],
                bootstrap_pct_high=bs["pct_high"], fid_ci_method="bootstrap percentile, bias-shifted",
                bootstrap_confidence=bs["confidence"], bootstrap_resampled=bs["resampled"])


def _sides(ma: Measured, mb: Measured, req: Request) -> tuple[Measured, Measured, dict]:
    """(reference side, other side, their names "a"/"b")."""
    if req.reference == "a":
        return ma, mb, {"a": "a", "b": "b"}
    return mb, ma, {"a": "b", "b": "a"}


def fd_inf_metrics(ma: Measured, mb: Measured, req: Request) -> dict:
    """FD-infinity of the two sides, the reference side first, with its interval and fit."""
    from iddpm_eval.fd_inf import fd_infinity

    ref, other, names = _sides(ma, mb, req)
    rounds = req.fd_inf_bootstrap
    if rounds is None:
        rounds = 50 if choose_method(ref.pool, other.pool) == "lowrank" else 0
    r = fd_infinity(ref.pool, other.pool, stats1=(ref.stats.mu, ref.stats.sigma),
                    stats2=(other.stats.mu, other.stats.sigma), points=req.fd_inf_points,
                    min_fraction=req.fd_inf_min_fraction, seed=req.seed, method=req.resample_method, bootstrap=rounds,
                    progress=req.progress, names=(ref.spec, other.spec))
    out = dict(fd_inf=r["fd_inf"], fd_inf_ci_low=r["low"], fd_inf_ci_high=r["high"], fd_inf_ci_method=r["ci_method"],
               fd_inf_se=r["se"], fd_inf_slope=r["slope"], fd_inf_sizes=r["sizes"], fd_inf_fids=r["fids"],
               fd_inf_line_at_largest=r["line_at_largest"], fd_inf_resid_std=r["resid_std"],
               fd_inf_fixed_sides=[names[s] for s in r["fixed_sides"]], fd_inf_method=r["method"])
    if r["note"]:
        out["fd_inf_note"] = r["note"]
    return out


def _sfid(ma: Measured, mb: Measured, req: Request, draws: list | None) -> dict:
    sa, sb = ma.stats, mb.stats
    stats_a, stats_b = (sa.mu_s, sa.sigma_s), (sb.mu_s, sb.sigma_s)
    value = fid_of(None, None, stats_a, stats_b, "eig" if req.method == "eig" else "sqrtm")
    out = dict(sfid=value)
    if draws is not None and "sfid" in req.intervals and (ma.spatial is not None or mb.spatial is not None):
        bs = bootstrap_fid(ma.spatial, mb.spatial, req.bootstrap, stats1=stats_a, stats2=stats_b,
                           method=req.resample_method, estimate=value, draws=draws, progress=req.progress)
        out.update(sfid_ci_low=bs["low"], sfid_ci_high=bs["high"])
    return out


def _kid(ma: Measured, mb: Measured, req: Request) -> dict:
    from iddpm_eval.kid import kid

    r = kid(ma.pool, mb.pool, subsets=req.kid_subsets, subset_size=req.kid_subset_size, seed=req.seed,
            progress=req.progress)
    return dict(kid_mean=r["kid_mean"], kid_std=r["kid_std"], kid_subset_size=r["subset_size"],
                kid_subsets=r["subsets"])


def _prdc(ma: Measured, mb: Measured, req: Request, draws: list | None) -> dict:
    from iddpm_eval.prdc import compute_prdc

    real, fake, _ = _sides(ma, mb, req)
    r = compute_prdc(real.pool, fake.pool, k=req.k, device=req.device)
    out = {key: r[key] for key in PRDC + ("k", "n_real", "n_fake")}
    out["reference"] = req.reference
    if draws is not None and "prdc" in req.intervals:  # the same resamples as FID's interval
        from iddpm_eval.prdc_boot import METRICS, bootstrap_prdc

        if req.reference != "a":
            draws = [(i2, i1) for i1, i2 in draws]
        bp = bootstrap_prdc(real.pool, fake.pool, req.bootstrap, k=req.k, draws=draws, progress=req.progress)
        for key in METRICS:
            out.update({f"{key}_ci_low": bp[f"{key}_ci_low"], f"{key}_ci_high": bp[f"{key}_ci_high"]})
        out["prdc_ci_method"] = bp["ci_method"]
    return out


def metrics(ma: Measured, mb: Measured, req: Request) -> dict:
    """Every metric ``req`` asks for, from the two measured sides (keys as :func:`compare` returns
    them): ``fid`` and ``fid_method`` always; the rest on request."""
    out = _fid(ma, mb, req)
    draws = None
    if req.bootstrap:
        draws = bootstrap_draws(None if ma.pool is None else len(ma.pool), None if mb.pool is None else len(mb.pool),
                                req.bootstrap, req.seed)
        if "fid" in req.intervals:
            out.update(_fid_interval(ma, mb, req, out["fid"], draws))
    if req.fd_inf:
        out.update(fd_inf_metrics(ma, mb, req))
    if req.sfid:
        out.update(_sfid(ma, mb, req, draws))
    if req.kid:
        out.update(_kid(ma, mb, req))
    if req.pr:
        out.update(_prdc(ma, mb, req, draws))
    return out


# ----------------------------------------------------------------------------- iddpm-eval fid / recall

def _detector_and_mode(features: str, mode: str, sfid: bool = False) -> tuple[str, str]:
    """The feature network of ``features`` ("inception" or a DINOv2 model, whose preprocessing is
    EDM2's: mode "edm2") and the preprocessing mode it runs with."""
    if features == "inception":
        return INCEPTION, mode
    if features.startswith("dinov2-"):
        if sfid:
            raise FIDError("sFID is defined on Inception's mixed_6/conv features; drop --sfid with DINOv2 features")
        return features, "edm2"
    raise FIDError(f"unknown features {features!r}; choose inception, dinov2-vitb14 or dinov2-vitl14")


class _LazyExtractor:
    """The feature network, built on the first call (runs on stored features or statistics need none)."""

    def __init__(self, make):
        self.make, self.built = make, None

    def __call__(self):
        if self.built is None:
            self.built = self.make()
        return self.built


def _feature_pass(specs, fx: _LazyExtractor, req: Request, *, mode: str, detector: str, num: int | None,
                  batch_size: int, sample_steps: int | None, sampler: str, device: str | None,
                  keep_features: bool) -> list[Measured]:
    """Resolve every source and check what needs no network (counts, features where required),
    then measure each: statistics, and features where a metric (or ``keep_features``) needs them."""
    resolved = [sources.resolve(spec, num=num, seed=req.seed, batch_size=batch_size, sample_steps=sample_steps,
                                sampler=sampler, device=device, detector=detector) for spec in specs]
    sources.check_counts(resolved, num, req.k if req.pr else None, need_features=req.both_features)
    # a statistics file still serves plain FID and the other side's bootstrap
    return [sources.measure(res, fx, mode=mode,
                            need_features=req.both_features or (keep_features and res.kind != "stats"),
                            need_spatial=req.sfid, num=num, seed=req.seed, batch_size=batch_size,
                            progress=req.progress, detector=detector)
            for res in resolved]


def _check_alike(ma: Measured, mb: Measured, fx: _LazyExtractor) -> str | None:
    """Refuse sides measured differently (detector, weights, also this run's extractor's, mode,
    dimensions); return the weights sha256 they share."""
    sources.check_same_detector(ma, mb)
    sha = sources.check_same_weights(ma, mb)
    if fx.built is not None and getattr(fx.built, "weights_sha256", None):
        sha = sources.check_same_weights(ma, mb, Measured("this run's extractor", "extractor", ma.stats,
                                                          weights_sha256=fx.built.weights_sha256))
    if ma.mode and mb.mode and ma.mode != mb.mode:
        raise FIDError(f"sources use different FID modes: {ma.spec}: {ma.mode}, {mb.spec}: {mb.mode}")
    if ma.stats.mu.shape != mb.stats.mu.shape:
        raise FIDError(f"{ma.spec} has {ma.stats.mu.shape[0]}-dimensional statistics "
                       f"but {mb.spec} has {mb.stats.mu.shape[0]}-dimensional statistics")
    return sha


def _write_features(folder: str | os.PathLike, ma: Measured, mb: Measured) -> None:
    """``a.npz`` / ``b.npz`` (statistics and features) in ``folder`` for the sides that were images."""
    from iddpm_eval.stats import save_stats

    for name, m in (("a", ma), ("b", mb)):
        if m.kind == "images" and m.pool is not None:
            st = m.stats
            st.mode, st.weights_sha256, st.fingerprint, st.source = m.mode, m.weights_sha256, m.fingerprint, m.spec
            st.detector = m.detector
            save_stats(os.path.join(folder, f"{name}.npz"), st, features=m.pool, spatial=m.spatial)


def compare(a: str, b: str, *, mode: str = "legacy-tf", weights: str | None = None, num: int | None = None,
            batch_size: int = 64, seed: int = 0, bootstrap: int = 0, kid: bool = False, sfid: bool = False,
            pr: bool = False, k: int = 3, kid_subsets: int = 100, kid_subset_size: int = 1000,
            save_features: str | None = None, extractor=None, device: str | None = None,
            progress: bool = True, sample_steps: int | None = None, sampler: str = "ddpm",
            method: str = "sqrtm", fd_inf: bool = False, fd_inf_points: int = 15, fd_inf_min_fraction: float = 0.2,
            fd_inf_bootstrap: int | None = 0, features: str = "inception", dinov2_weights: str | None = None,
            dinov2_sha256: str | None = None) -> dict:
    """FID between sources ``a`` and ``b`` (specs, see :mod:`iddpm_eval.sources`) and every metric
    asked for, from one feature pass per source: KID (``kid``), sFID (``sfid``), precision/recall/
    density/coverage with ``a`` as the reference set (``pr``, ``k``), a bootstrap interval for each
    (``bootstrap`` rounds), FD-infinity (``fd_inf``; ``fd_inf_bootstrap`` None: 50 rounds when both
    sides have fewer images than feature dimensions, else the regression interval). ``method``:
    "sqrtm" (the convention) or "eig" (the same value to about 1e-7, faster). A checkpoint source
    draws ``num`` images with ``sample_steps`` and ``sampler``. ``save_features``: a folder that
    receives ``a.npz``/``b.npz`` for sources that were images. ``features``: "inception" (FID) or a
    DINOv2 model ("dinov2-vitl14", "dinov2-vitb14": FD_DINOv2, recorded as mode "edm2"; weights
    ``dinov2_weights``, pinned by ``dinov2_sha256``). Returns a JSON-ready dict with provenance."""
    from iddpm_core import __version__
    if method not in ("sqrtm", "eig"):
        raise ValueError(f"method must be 'sqrtm' or 'eig', got {method!r}")
    if bootstrap and bootstrap < 2:
        raise ValueError(f"--bootstrap needs at least 2 rounds, got {bootstrap}")
    detector, mode = _detector_and_mode(features, mode, sfid)
    req = Request(method=method, seed=seed, bootstrap=bootstrap, sfid=sfid, kid=kid, kid_subsets=kid_subsets,
                  kid_subset_size=kid_subset_size, pr=pr, k=k, fd_inf=fd_inf, fd_inf_points=fd_inf_points,
                  fd_inf_min_fraction=fd_inf_min_fraction, fd_inf_bootstrap=fd_inf_bootstrap, progress=progress)
    fx = _LazyExtractor(lambda: extractor if extractor is not None else sources.make_feature_extractor(
        detector, mode, weights, batch_size, sfid, device, dinov2_weights, dinov2_sha256))
    ma, mb = _feature_pass((a, b), fx, req, mode=mode, detector=detector, num=num, batch_size=batch_size,
                          sample_steps=sample_steps, sampler=sampler, device=device,
                          keep_features=req.features or bool(save_features))
    sha = _check_alike(ma, mb, fx)
    out = metrics(ma, mb, req)
    out.update(n_a=ma.n, n_b=mb.n, mode=mode, detector=detector, weights_sha256=sha, seed=seed, num=num,
               iddpm_version=__version__, a=a, b=b, a_kind=ma.kind, b_kind=mb.kind, a_fingerprint=ma.fingerprint,
               b_fingerprint=mb.fingerprint)
    if save_features:
        _write_features(save_features, ma, mb)
    return out


# ----------------------------------------------------------------------------- the sweep's pipeline

_EXTRACTORS: dict = {}


def cached_extractor(mode: str, weights: str | None, batch_size: int, device: str | None):
    """The Inception extractor of these settings, built once per process (a sweep evaluates many
    checkpoints with it)."""
    key = (mode, weights, batch_size, device)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = sources.make_extractor(mode, weights, batch_size, False, device)
    return _EXTRACTORS[key]


def reference_features(spec: str, num: int | None, seed: int, extractor, cache_dir: Path,
                       progress: bool = False) -> np.ndarray:
    """Pool features of the reference images (subset ``num`` drawn with ``seed``, as ``iddpm-eval
    fid --num N --seed S`` draws it), cached in ``cache_dir`` under a name that hashes the source,
    subset, mode and weights. One process computes them; others sharing the folder wait and read."""
    from iddpm_core.provenance import file_lock
    from iddpm_eval.stats import load_features, save_stats

    key = json.dumps([str(spec), num, seed, extractor.mode, extractor.weights_sha256])
    path = Path(cache_dir) / f"ref_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    with file_lock(path.with_suffix(".lock")):
        if path.exists():
            return load_features(path).pool
        m = sources.measure(sources.resolve(spec), lambda: extractor, mode=extractor.mode, need_features=True,
                            num=num, seed=seed, progress=progress)
        st = FeatureStats(m.stats.mu, m.stats.sigma, count=m.n, mode=m.mode, weights_sha256=m.weights_sha256,
                          fingerprint=m.fingerprint, source=str(spec))
        save_stats(path, st, features=m.pool)
        return m.pool


def sample_features(checkpoint, extractor, *, num: int, steps: int, sampler: str, eta: float, seed: int,
                    batch_size: int, device: str | None, samples_path: Path,
                    progress: bool = False) -> tuple[np.ndarray, dict]:
    """``num`` images sampled from ``checkpoint`` (a path or loaded weights), kept at
    ``samples_path``, and their pool features; with ``sample_seconds`` and ``feature_seconds``."""
    from iddpm_core.io import save_npz
    from iddpm_core.sample import sample_images

    t0 = time.time()
    images = sample_images(checkpoint, num, steps, sampler=sampler, eta=eta, seed=seed, batch_size=batch_size,
                           progress=progress, device=device)
    seconds = {"sample_seconds": time.time() - t0}
    save_npz(samples_path, arr_0=images)
    t0 = time.time()
    pool = extractor(images)["pool"]
    seconds["feature_seconds"] = time.time() - t0
    return pool, seconds
