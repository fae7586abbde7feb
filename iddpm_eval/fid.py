"""Frechet distance between Gaussians fitted to features (FID, and sFID on spatial features).

``frechet_distance`` follows the TF-compatible convention: float64, ``scipy.linalg.sqrtm`` of
sigma1 @ sigma2, retried with 1e-6 * I added to both covariances when the square root is not
finite, real part taken (a large imaginary part is an error). ``frechet_distance_eig`` is the
independent cross-check: tr sqrt(sigma1 sigma2) = sum of sqrt(eigenvalues of
sqrt(sigma1) sigma2 sqrt(sigma1)), a symmetric PSD matrix, via ``eigh``.

The distance is never negative, but round-off can make it so (-7e-5 was seen for two identical
sets of Inception features): a value in [-1e-5 * (tr sigma1 + tr sigma2), 0) is returned as 0
(see :func:`clamp_round_off`); a more negative value, a sign of broken statistics, is returned as
it is.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from iddpm_eval.stats import bootstrap_draws, check_stats, stats_from_features


class FIDError(ValueError):
    """Statistics that cannot be compared (dimensions, non-finite values, complex square root)."""


def _checked(mu1, sigma1, mu2, sigma2):
    mu1, sigma1 = check_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise FIDError(f"statistics have different dimensions: {mu1.shape[0]} vs {mu2.shape[0]}")
    return mu1, sigma1, mu2, sigma2


def _sqrtm(m: np.ndarray) -> np.ndarray:
    # scipy < 1.16 prints a note for singular input unless disp=False; newer versions deprecate disp.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            out = linalg.sqrtm(m, disp=False)
        except TypeError:
            out = linalg.sqrtm(m)
    return out[0] if isinstance(out, tuple) else out  # scipy returns a bare array for 1x1 input


ROUND_OFF = 1e-5  # relative to tr(sigma1) + tr(sigma2): far above sqrtm's round-off, far below any real FID


def clamp_round_off(value: float, trace_sum: float) -> float:
    """0.0 for a round-off negative ``value`` (>= -ROUND_OFF * ``trace_sum``), else ``value``."""
    return 0.0 if -ROUND_OFF * abs(trace_sum) <= value <= 0 else float(value)  # -0.0 too


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), float64."""
    mu1, sigma1, mu2, sigma2 = _checked(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FIDError(f"matrix square root has a large imaginary part ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    traces = np.trace(sigma1) + np.trace(sigma2)
    return clamp_round_off(diff @ diff + traces - 2 * np.trace(covmean), traces)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_eig(mu1, sigma1, mu2, sigma2) -> float:
    """Same distance through symmetric eigendecompositions (negative round-off eigenvalues -> 0)."""
    mu1, sigma1, mu2, sigma2 = _checked(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    s1 = _psd_sqrt(sigma1)
    m = s1 @ sigma2 @ s1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(w, 0, None)).sum()
    traces = np.trace(sigma1) + np.trace(sigma2)
    return clamp_round_off(diff @ diff + traces - 2 * tr_covmean, traces)


def fid_lowrank(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FID of two feature sets computed in the span of the images: exact, and fast when there are
    fewer images than feature dimensions. With centred features A1 (n1 x d), A2 and
    S_i = A_i^T A_i / (n_i - 1), the non-zero eigenvalues of S1 S2 are those of M M^T / c with
    M = A1 A2^T and c = (n1 - 1)(n2 - 1), so tr sqrt(S1 S2) = (sum of singular values of M) / sqrt(c).
    No 1e-6 regularisation is needed (or applied)."""
    a1 = np.asarray(feats1, np.float64)
    a2 = np.asarray(feats2, np.float64)
    if a1.ndim != 2 or a2.ndim != 2 or a1.shape[1] != a2.shape[1] or min(len(a1), len(a2)) < 2:
        raise FIDError(f"features must be (N >= 2, D) arrays of one D, got {a1.shape} and {a2.shape}")
    if not (np.isfinite(a1).all() and np.isfinite(a2).all()):
        raise FIDError("features hold NaN or infinite values")
    mu1, mu2 = a1.mean(0), a2.mean(0)
    a1, a2 = a1 - mu1, a2 - mu2
    n1, n2 = len(a1), len(a2)
    tr1, tr2 = (a1 * a1).sum() / (n1 - 1), (a2 * a2).sum() / (n2 - 1)
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return clamp_round_off(diff @ diff + tr1 + tr2 - 2 * nuclear, tr1 + tr2)


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    mu1, s1 = stats_from_features(feats1, "first features")
    mu2, s2 = stats_from_features(feats2, "second features")
    return frechet_distance(mu1, s1, mu2, s2)


def bootstrap_fid(feats1: np.ndarray | None, feats2: np.ndarray | None, rounds: int, *, stats1=None, stats2=None,
                  seed: int | None = 0, confidence: float = 0.95, progress: bool = False,
                  method: str = "auto", estimate: float | None = None, draws: list | None = None) -> dict:
    """Percentile bootstrap interval of FID: each round draws N images with replacement from
    every side that has features (a side given only as ``stats`` = (mu, sigma) stays fixed) and
    recomputes its statistics and the distance. Returns low, high, the rounds' values, which
    sides were resampled and the method used per round. ``method`` "auto": :func:`fid_lowrank`
    when both sides have features and fewer images than dimensions (the same number as sqrtm at
    a fraction of the cost: one 2048 sqrtm per round would take tens of seconds on a CPU), else
    "sqrtm"; "sqrtm", "eig" and "lowrank" force one.

    A resample repeats images, which inflates FID: at a few hundred images the whole bootstrap
    distribution can lie above the estimate, so the plain percentile interval (``pct_low``,
    ``pct_high``) can miss it. With ``estimate`` (the FID of the full sets), ``low``/``high`` are
    that interval shifted by the bootstrap's bias (mean of the rounds minus the estimate): the
    bootstrap's spread placed around the estimate. Without it they are the plain percentiles.

    ``draws``: the resamples (:func:`iddpm_eval.stats.bootstrap_draws`, shared with other metrics
    of the same pass); default drawn from ``seed``."""
    from tqdm.auto import tqdm

    if rounds < 2:
        raise ValueError(f"bootstrap needs at least 2 rounds, got {rounds}")
    if feats1 is None and feats2 is None:
        raise ValueError("bootstrap needs the features of at least one side, not only statistics")
    if method == "auto":
        both = feats1 is not None and feats2 is not None
        method = "lowrank" if both and max(len(feats1), len(feats2)) < feats1.shape[1] else "sqrtm"
    if method == "lowrank" and (feats1 is None or feats2 is None):
        raise ValueError("the lowrank bootstrap needs the features of both sides")
    if draws is None:
        draws = bootstrap_draws(None if feats1 is None else len(feats1), None if feats2 is None else len(feats2),
                                rounds, seed)
    if len(draws) != rounds:
        raise ValueError(f"got {len(draws)} resamples for {rounds} bootstrap rounds")
    values = np.empty(rounds)
    for r in tqdm(range(rounds), desc="bootstrap", disable=not progress, leave=False):
        i1, i2 = draws[r]
        if method == "lowrank":
            values[r] = fid_lowrank(feats1[i1], feats2[i2])
            continue
        sides = []
        for feats, stats, idx in ((feats1, stats1, i1), (feats2, stats2, i2)):
            if feats is None:
                sides.append(stats)
            else:
                sides.append(stats_from_features(feats[idx]))
        distance = frechet_distance if method == "sqrtm" else frechet_distance_eig
        values[r] = distance(sides[0][0], sides[0][1], sides[1][0], sides[1][1])
    alpha = (1 - confidence) / 2
    pct_low, pct_high = (float(q) for q in np.quantile(values, [alpha, 1 - alpha]))
    bias = float(values.mean() - estimate) if estimate is not None else 0.0
    return dict(low=pct_low - bias, high=pct_high - bias, pct_low=pct_low, pct_high=pct_high, bias=bias,
                values=values, confidence=confidence, method=method,
                resampled=[name for name, f in (("a", feats1), ("b", feats2)) if f is not None])


def compare(a: str, b: str, *, mode: str = "legacy-tf", weights: str | None = None, num: int | None = None,
            batch_size: int = 64, seed: int = 0, bootstrap: int = 0, kid: bool = False, sfid: bool = False,
            pr: bool = False, k: int = 3, kid_subsets: int = 100, kid_subset_size: int = 1000,
            save_features: str | None = None, extractor=None, device: str | None = None,
            progress: bool = True, sample_steps: int | None = None, sampler: str = "ddpm",
            method: str = "sqrtm", fd_inf: bool = False, fd_inf_points: int = 15, fd_inf_min_fraction: float = 0.2,
            fd_inf_bootstrap: int | None = 0, features: str = "inception", dinov2_weights: str | None = None,
            dinov2_sha256: str | None = None) -> dict:
    """FID between sources ``a`` and ``b`` (specs, see :mod:`iddpm_eval.sources`), with one feature
    pass per source feeding every requested metric: KID (``kid``), sFID (``sfid``), precision/recall/
    density/coverage with ``a`` as the reference set (``pr``), a bootstrap interval (``bootstrap``
    rounds). ``method``: "sqrtm" (the convention) or "eig" (the eigenvalue form: the same value to
    about 1e-7, faster; recorded as ``fid_method``). A checkpoint source draws ``num`` images with
    ``sample_steps`` and ``sampler``. ``save_features``: a folder that receives ``a.npz``/``b.npz``
    (statistics + features) for sources that were images. ``fd_inf``: also FD-infinity
    (:mod:`iddpm_eval.fd_inf`) from ``fd_inf_points`` subset sizes, with a regression interval, or a
    bootstrap one with ``fd_inf_bootstrap`` rounds (None: 50 when both sides have fewer images than
    feature dimensions, where each round is cheap, else the regression interval). ``features``: "inception" (FID) or a DINOv2
    model ("dinov2-vitl14", "dinov2-vitb14": FD_DINOv2 with EDM2's preprocessing, recorded as mode
    "edm2"; weights ``dinov2_weights``, pinned by ``dinov2_sha256``). Returns a JSON-ready dict with
    provenance, including the ``detector``."""
    from iddpm_core import __version__
    from iddpm_eval import sources
    from iddpm_eval.stats import save_stats

    if method not in ("sqrtm", "eig"):
        raise ValueError(f"method must be 'sqrtm' or 'eig', got {method!r}")
    distance = frechet_distance if method == "sqrtm" else frechet_distance_eig
    if bootstrap and bootstrap < 2:
        raise ValueError(f"--bootstrap needs at least 2 rounds, got {bootstrap}")
    need_features = bool(kid or pr or bootstrap or save_features or fd_inf)
    cache = {}
    from iddpm_eval.stats import INCEPTION

    if features == "inception":
        detector = INCEPTION
    elif features.startswith("dinov2-"):
        detector, mode = features, "edm2"
        if sfid:
            raise FIDError("sFID is defined on Inception's mixed_6/conv features; drop --sfid with DINOv2 features")
    else:
        raise FIDError(f"unknown features {features!r}; choose inception, dinov2-vitb14 or dinov2-vitl14")

    def get_extractor():
        if "fx" not in cache:
            if extractor is not None:
                cache["fx"] = extractor
            elif detector == INCEPTION:
                cache["fx"] = sources.make_extractor(mode, weights, batch_size, sfid, device)
            else:
                cache["fx"] = sources.make_dinov2_extractor(detector, dinov2_weights, batch_size, device, dinov2_sha256)
        return cache["fx"]

    sides = []
    resolved = [sources.resolve(spec, num=num, seed=seed, batch_size=batch_size, sample_steps=sample_steps,
                                sampler=sampler, device=device, detector=detector)
                for spec in (a, b)]  # checked before extracting
    sources.check_counts(resolved, num, k if pr else None, need_features=bool(kid or pr))
    for res in resolved:
        # KID and precision/recall need features from both sides; a statistics file still serves
        # plain FID, the other side's bootstrap, and is not re-saved by save_features.
        need = bool(kid or pr) or (need_features and res.kind != "stats")
        sides.append(sources.measure(res, get_extractor, mode=mode, need_features=need, need_spatial=sfid,
                                     num=num, seed=seed, batch_size=batch_size, progress=progress, detector=detector))
    ma, mb = sides
    sources.check_same_detector(ma, mb)
    sha = sources.check_same_weights(ma, mb)
    if "fx" in cache and getattr(cache["fx"], "weights_sha256", None):
        sha = sources.check_same_weights(ma, mb, sources.Measured("this run's extractor", "extractor", ma.stats,
                                                                  weights_sha256=cache["fx"].weights_sha256))
    modes = {m.mode for m in sides if m.mode}
    if len(modes) > 1:
        raise FIDError(f"sources use different FID modes: {a}: {ma.mode}, {b}: {mb.mode}")
    sa, sb = ma.stats, mb.stats
    if sa.mu.shape != sb.mu.shape:
        raise FIDError(f"{a} has {sa.mu.shape[0]}-dimensional statistics "
                       f"but {b} has {sb.mu.shape[0]}-dimensional statistics")
    out = dict(fid=distance(sa.mu, sa.sigma, sb.mu, sb.sigma), fid_method=method, n_a=ma.n, n_b=mb.n,
               mode=mode, detector=detector, weights_sha256=sha, seed=seed, num=num, iddpm_version=__version__,
               a=a, b=b, a_kind=ma.kind, b_kind=mb.kind, a_fingerprint=ma.fingerprint, b_fingerprint=mb.fingerprint)
    draws = None
    if bootstrap:
        draws = bootstrap_draws(None if ma.pool is None else len(ma.pool), None if mb.pool is None else len(mb.pool),
                                bootstrap, seed)
        bs = bootstrap_fid(ma.pool, mb.pool, bootstrap, stats1=(sa.mu, sa.sigma), stats2=(sb.mu, sb.sigma),
                           seed=seed, progress=progress, method="eig" if method == "eig" else "auto",
                           estimate=out["fid"], draws=draws)
        out.update(fid_ci_low=bs["low"], fid_ci_high=bs["high"], bootstrap_rounds=bootstrap,
                   bootstrap_method=bs["method"], bootstrap_bias=bs["bias"], bootstrap_pct_low=bs["pct_low"],
                   bootstrap_pct_high=bs["pct_high"], fid_ci_method="bootstrap percentile, bias-shifted",
                   bootstrap_confidence=bs["confidence"], bootstrap_resampled=bs["resampled"])
    if fd_inf:
        from iddpm_eval.fd_inf import fd_infinity

        if fd_inf_bootstrap is None:
            pools = [p for p in (ma.pool, mb.pool) if p is not None]
            fd_inf_bootstrap = 50 if len(pools) == 2 and max(len(p) for p in pools) < pools[0].shape[1] else 0
        r = fd_infinity(ma.pool, mb.pool, stats1=(sa.mu, sa.sigma), stats2=(sb.mu, sb.sigma), points=fd_inf_points,
                        min_fraction=fd_inf_min_fraction, seed=seed, method="eig" if method == "eig" else "auto",
                        bootstrap=fd_inf_bootstrap, progress=progress, names=(a, b))
        out.update(fd_inf=r["fd_inf"], fd_inf_ci_low=r["low"], fd_inf_ci_high=r["high"],
                   fd_inf_ci_method=r["ci_method"], fd_inf_se=r["se"], fd_inf_slope=r["slope"],
                   fd_inf_sizes=r["sizes"], fd_inf_fids=r["fids"], fd_inf_line_at_largest=r["line_at_largest"],
                   fd_inf_resid_std=r["resid_std"], fd_inf_fixed_sides=r["fixed_sides"], fd_inf_method=r["method"])
        if r["note"]:
            out["fd_inf_note"] = r["note"]
    if sfid:
        out["sfid"] = distance(sa.mu_s, sa.sigma_s, sb.mu_s, sb.sigma_s)
        if bootstrap and (ma.spatial is not None or mb.spatial is not None):  # the same resamples as FID's
            bs = bootstrap_fid(ma.spatial, mb.spatial, bootstrap, stats1=(sa.mu_s, sa.sigma_s),
                               stats2=(sb.mu_s, sb.sigma_s), method="eig" if method == "eig" else "auto",
                               estimate=out["sfid"], draws=draws, progress=progress)
            out.update(sfid_ci_low=bs["low"], sfid_ci_high=bs["high"])
    if kid:
        from iddpm_eval.kid import kid as kid_fn

        r = kid_fn(ma.pool, mb.pool, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed, progress=progress)
        out.update(kid_mean=r["kid_mean"], kid_std=r["kid_std"], kid_subset_size=r["subset_size"],
                   kid_subsets=r["subsets"])
    if pr:
        from iddpm_eval.prdc import compute_prdc

        r = compute_prdc(ma.pool, mb.pool, k=k)
        out.update({key: r[key] for key in ("precision", "recall", "density", "coverage", "k", "n_real", "n_fake")})
        out["reference"] = "a"
        if bootstrap:  # the same resamples as FID's interval: both sets have features here
            from iddpm_eval.prdc_boot import METRICS, bootstrap_prdc

            bp = bootstrap_prdc(ma.pool, mb.pool, bootstrap, k=k, draws=draws, progress=progress)
            for key in METRICS:
                out.update({f"{key}_ci_low": bp[f"{key}_ci_low"], f"{key}_ci_high": bp[f"{key}_ci_high"]})
            out["prdc_ci_method"] = bp["ci_method"]
    if save_features:
        import os

        for name, m in (("a", ma), ("b", mb)):
            if m.kind == "images" and m.pool is not None:
                st = m.stats
                st.mode, st.weights_sha256, st.fingerprint, st.source = m.mode, m.weights_sha256, m.fingerprint, m.spec
                st.detector = m.detector
                save_stats(os.path.join(save_features, f"{name}.npz"), st, features=m.pool, spatial=m.spatial)
    return out
