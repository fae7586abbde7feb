"""Feature statistics: streaming float64 mean and covariance, reference-statistics files.

:class:`RunningStats` merges batches with Chan et al.'s pairwise update (float64 mean and
centred co-moment), so the result equals ``np.cov(all_features, rowvar=False)`` (ddof = 1)
without keeping the features. :func:`extract` streams a source through a feature extractor,
one batch in memory at a time, and returns an :class:`Extraction` (statistics, optionally the
features, count and a sha256 fingerprint of the image bytes that went in).

Files: :func:`save_stats` writes ``mu``, ``sigma``, ``count``, ``mode``, ``weights_sha256``,
``fingerprint``, ``source``, ``detector`` (and ``mu_s``/``sigma_s`` for sFID, ``pool`` features on request).
:func:`load_stats` also reads pytorch-fid and clean-fid ``mu``/``sigma`` files and ADM reference
batches (``mu``, ``sigma``, ``mu_s``, ``sigma_s``).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iddpm_core.io import open_npz, save_npz


class StatsError(ValueError):
    """Statistics or features that cannot be used; the message names the file."""


INCEPTION = "inception-2015-12-05"  # the detector of FID (legacy-tf and clean modes)


def implied_detector(detector: str | None, mode: str | None, dim: int | None = None) -> str | None:
    """The recorded detector, or the Inception network for files that predate the field and say
    they were made in an Inception mode, or hold 2048-dimensional pool_3 statistics without any
    mode (ADM reference batches, pytorch-fid and clean-fid files)."""
    if detector:
        return detector
    if mode in ("legacy-tf", "clean") or (not mode and dim == 2048):
        return INCEPTION
    return None


class RunningStats:
    """Float64 running mean and covariance (ddof = 1) over rows of feature batches."""

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.n = 0
        self.mean = None if dim is None else np.zeros(dim)
        self.m2 = None if dim is None else np.zeros((dim, dim))

    def update(self, feats: np.ndarray) -> "RunningStats":
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2:
            raise StatsError(f"features must be [N, D], got shape {x.shape}")
        if self.dim is None:
            self.dim, self.mean, self.m2 = x.shape[1], np.zeros(x.shape[1]), np.zeros((x.shape[1],) * 2)
        if x.shape[1] != self.dim:
            raise StatsError(f"features have {x.shape[1]} dimensions, expected {self.dim}")
        if not np.isfinite(x).all():
            raise StatsError("features contain NaN or infinite values")
        nb = x.shape[0]
        if nb == 0:
            return self
        mb = x.mean(axis=0)
        xc = x - mb
        m2b = xc.T @ xc
        n = self.n + nb
        delta = mb - self.mean
        self.m2 += m2b + np.outer(delta, delta) * (self.n * nb / n)
        self.mean = self.mean + delta * (nb / n)
        self.n = n
        return self

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise StatsError(f"a covariance needs at least 2 feature vectors, have {self.n}")
        return self.m2 / (self.n - 1)


@dataclass
class FeatureStats:
    """Mean and covariance of features, with provenance (None where the file did not say)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    mode: str | None = None
    weights_sha256: str | None = None
    fingerprint: str | None = None
    source: str | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    origin: str = "computed"  # "computed", or the file format it was read from
    detector: str | None = None  # the feature network (INCEPTION, "dinov2-vitl14", ...)

    def __post_init__(self):
        self.mu, self.sigma = check_stats(self.mu, self.sigma, self.source or "statistics")
        if self.mu_s is not None:
            self.mu_s, self.sigma_s = check_stats(self.mu_s, self.sigma_s, f"{self.source or 'statistics'} (sFID)")


def check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return float64 ``mu`` [D] and ``sigma`` [D, D]; clear error on wrong shapes or non-finite values."""
    if mu is None or sigma is None:
        raise StatsError(f"{name}: needs both mu and sigma")
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise StatsError(f"{name}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StatsError(f"{name}: statistics contain NaN or infinite values")
    return mu, sigma


def stats_from_features(feats: np.ndarray, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Float64 mean and covariance (ddof = 1) of [N, D] features."""
    rs = RunningStats()
    try:
        rs.update(feats)
        return rs.mean.copy(), rs.cov
    except StatsError as exc:
        raise StatsError(f"{name}: {exc}") from None


def bootstrap_draws(n1: int | None, n2: int | None, rounds: int, seed: int | None) -> list[tuple]:
    """Bootstrap resamples shared by every metric of one feature pass: per round, indices drawn
    with replacement from ``default_rng(seed)`` for side 1 then side 2 (None for a side without
    features)."""
    rng = np.random.default_rng(seed)
    return [tuple(None if n is None else rng.integers(0, n, n) for n in (n1, n2)) for _ in range(rounds)]


# ----------------------------------------------------------------------------- files

def _meta(value):
    return str(value) if value is not None else ""


def save_stats(path: str | os.PathLike, stats: FeatureStats, features: np.ndarray | None = None,
               spatial: np.ndarray | None = None) -> None:
    """Write statistics (and optionally the pool / spatial features) to ``path`` atomically (under
    torchrun, rank 0 writes; every rank holds the same statistics)."""
    from iddpm_eval import distributed as dist

    if not dist.is_main():
        return
    arrays = dict(mu=stats.mu, sigma=stats.sigma, count=np.int64(stats.count or 0),
                  mode=np.str_(_meta(stats.mode)), weights_sha256=np.str_(_meta(stats.weights_sha256)),
                  fingerprint=np.str_(_meta(stats.fingerprint)), source=np.str_(_meta(stats.source)),
                  detector=np.str_(_meta(implied_detector(stats.detector, stats.mode))))
    if stats.mu_s is not None:
        arrays.update(mu_s=stats.mu_s, sigma_s=stats.sigma_s)
    if features is not None:
        arrays["pool"] = np.asarray(features, np.float32)
    if spatial is not None:
        arrays["spatial"] = np.asarray(spatial, np.float32)
    try:
        save_npz(path, **arrays)
    except OSError as exc:  # computed statistics are never thrown away: keep a copy and say where
        fallback = Path(tempfile.gettempdir()) / f"iddpm-stats-{os.getpid()}-{Path(path).stem}.npz"
        try:
            save_npz(fallback, **arrays)
        except OSError:
            raise StatsError(f"cannot write {path} ({exc}), nor a copy to {fallback}") from None
        raise StatsError(f"cannot write {path} ({exc}); the computed statistics were saved to {fallback} "
                         f"instead (move them into place, or pass that file as a source)") from None


def npz_keys(path: str | os.PathLike) -> set[str]:
    """Names of the arrays in an ``.npz`` without loading them."""
    try:
        with zipfile.ZipFile(path) as zf:
            return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile) as exc:
        raise StatsError(f"cannot read {path} as .npz: {exc}") from exc


def _str(z, key):
    if key not in z.files:
        return None
    v = str(z[key])
    return v or None


def load_stats(path: str | os.PathLike) -> FeatureStats:
    """Read ``mu``/``sigma`` (+ ``mu_s``/``sigma_s``) from our files, pytorch-fid / clean-fid
    statistics or an ADM reference batch; statistics are checked (shape, finite)."""
    path = Path(path)
    keys = npz_keys(path)
    if not {"mu", "sigma"} <= keys:
        raise StatsError(f"{path}: no 'mu' and 'sigma' arrays (has {sorted(keys)})")
    with open_npz(path, StatsError) as z:
        ours = "fingerprint" in keys
        origin = "iddpm" if ours else ("adm" if "arr_0" in keys else "mu/sigma file (pytorch-fid, clean-fid)")
        count = int(z["count"]) if "count" in keys else None
        return FeatureStats(
            mu=z["mu"], sigma=z["sigma"], count=count or None, mode=_str(z, "mode"),
            weights_sha256=_str(z, "weights_sha256"), fingerprint=_str(z, "fingerprint"),
            source=str(path), origin=origin,
            detector=implied_detector(_str(z, "detector"), _str(z, "mode"), z["mu"].shape[-1]),
            mu_s=z["mu_s"] if {"mu_s", "sigma_s"} <= keys else None,
            sigma_s=z["sigma_s"] if {"mu_s", "sigma_s"} <= keys else None)


@dataclass
class FeatureFile:
    """Cached features: ``pool`` [N, D] (and ``spatial``) with the provenance they were saved with."""

    pool: np.ndarray
    spatial: np.ndarray | None = None
    mode: str | None = None
    weights_sha256: str | None = None
    fingerprint: str | None = None
    source: str | None = None
    detector: str | None = None


def load_features(path: str | os.PathLike) -> FeatureFile:
    """Read features saved by :func:`save_stats` (``pool``) or clean-fid (``feats``)."""
    path = Path(path)
    keys = npz_keys(path)
    key = "pool" if "pool" in keys else "feats" if "feats" in keys else None
    if key is None:
        raise StatsError(f"{path}: no 'pool' or 'feats' features array (has {sorted(keys)})")
    with open_npz(path, StatsError) as z:
        pool = z[key]
        spatial = z["spatial"] if "spatial" in keys else None
        meta = dict(mode=_str(z, "mode"), weights_sha256=_str(z, "weights_sha256"),
                    fingerprint=_str(z, "fingerprint"),
                    detector=implied_detector(_str(z, "detector"), _str(z, "mode"), pool.shape[-1]))
    for name, arr in (("pool", pool), ("spatial", spatial)):
        if arr is None:
            continue
        if arr.ndim != 2 or arr.shape[0] < 2 or not np.issubdtype(arr.dtype, np.floating):
            raise StatsError(f"{path}: {name} features must be float [N >= 2, D], got {arr.dtype} {arr.shape}")
        if not np.isfinite(arr).all():
            raise StatsError(f"{path}: {name} features contain NaN or infinite values")
    return FeatureFile(pool=pool, spatial=spatial, source=str(path), **meta)


# ----------------------------------------------------------------------------- extraction

@dataclass
class Extraction:
    """What one streaming pass over a source produced."""

    stats: FeatureStats
    pool: np.ndarray | None = None       # kept features [N, D] float32 (keep_features=True)
    spatial: np.ndarray | None = None
    count: int = 0
    fingerprint: str = ""
    indices: np.ndarray | None = field(default=None, repr=False)


def choose_indices(n_total: int, num: int | None, seed: int | None, name: str = "") -> np.ndarray | None:
    """All images (None) when ``num`` is None or covers the source; else ``num`` distinct indices
    drawn with ``np.random.default_rng(seed)`` (seed None -> 0) and sorted, for sequential reads.
    ``name`` names the source in errors."""
    if num is None or num >= n_total:
        if num is not None and num > n_total:
            raise StatsError(f"--num {num} is larger than the source{' ' + name if name else ''} ({n_total} images)")
        return None
    if num < 2:
        raise StatsError(f"--num must be at least 2, got {num}")
    rng = np.random.default_rng(0 if seed is None else seed)
    return np.sort(rng.choice(n_total, size=num, replace=False))


def extract(source, extractor, *, num: int | None = None, seed: int | None = None, batch_size: int = 64,
            keep_features: bool = False, progress: bool = True, desc: str = "features") -> Extraction:
    """Stream ``source`` (an :class:`iddpm_core.data.ImageSource`) through ``extractor`` and
    accumulate float64 statistics of ``pool`` (and ``spatial`` when the extractor gives it).

    The fingerprint is the sha256 of the image shape (H, W, C) and of all image bytes in order,
    so the same pixels give the same fingerprint whatever the file format or batch size.

    Under torchrun each rank extracts its shard and the statistics, features and fingerprint are
    those of the whole source (see :mod:`iddpm_eval.distributed`).
    """
    from tqdm.auto import tqdm

    from iddpm_eval import distributed as dist

    idx = choose_indices(len(source), num, seed, source.name)
    total = len(source) if idx is None else len(idx)
    if total < 2:
        raise StatsError(f"{source.name}: needs at least 2 images for a covariance, has {total}")
    mine = idx
    if dist.active():  # this rank's shard, cut where one process's batches (and sample shards) end
        align = math.lcm(batch_size, int(getattr(source, "shard_size", batch_size)))
        lo, hi = dist.shard(total, align)
        mine = (np.arange(total) if idx is None else idx)[lo:hi]
    bar = tqdm(total=total if mine is None else len(mine), desc=desc, unit="img",
               disable=not progress or not dist.is_main(), leave=False)
    batches = source.iter_batches(batch_size, indices=mine) if mine is None or len(mine) else iter(())
    acc = _Accumulated(keep_features, gather_bytes=dist.active())
    for images, _ in batches:
        acc.add(images, extractor(images))
        bar.update(len(images))
    bar.close()
    if dist.active():
        acc.gather()
    pool_rs, spatial_rs = acc.pool_rs, acc.spatial_rs
    stats = FeatureStats(mu=pool_rs.mean, sigma=pool_rs.cov, count=pool_rs.n,
                         mode=getattr(extractor, "mode", None),
                         weights_sha256=getattr(extractor, "weights_sha256", None),
                         fingerprint=acc.fingerprint, source=source.name,
                         mu_s=spatial_rs.mean if spatial_rs else None,
                         sigma_s=spatial_rs.cov if spatial_rs else None)
    return Extraction(stats=stats, pool=acc.pool if keep_features else None,
                      spatial=acc.spatial if keep_features else None, count=pool_rs.n, fingerprint=acc.fingerprint,
                      indices=idx)


class _Accumulated:
    """What the batches of one pass add up to: running statistics of the pool (and spatial)
    features, the features when kept, and the sha256 of the image bytes in order (under torchrun
    the bytes are kept and digested in rank order by :meth:`gather`)."""

    def __init__(self, keep_features: bool, gather_bytes: bool = False):
        self.keep_features, self.gather_bytes = keep_features, gather_bytes
        self.pool_rs, self.spatial_rs = RunningStats(), None
        self.kept_pool, self.kept_spatial, self.kept_bytes = [], [], []
        self.digest, self.head = hashlib.sha256(), b""
        self._gathered_fp = ""

    def add(self, images: np.ndarray, out: dict) -> None:
        if self.pool_rs.n == 0:
            self.head = str(tuple(images.shape[1:])).encode()
            self.digest.update(self.head)
        if self.gather_bytes:
            self.kept_bytes.append(np.ascontiguousarray(images).tobytes())
        else:
            self.digest.update(np.ascontiguousarray(images).tobytes())
        self.pool_rs.update(out["pool"])
        if self.keep_features:
            self.kept_pool.append(np.asarray(out["pool"], np.float32))
        if out.get("spatial") is not None:
            self.spatial_rs = self.spatial_rs or RunningStats()
            self.spatial_rs.update(out["spatial"])
            if self.keep_features:
                self.kept_spatial.append(np.asarray(out["spatial"], np.float32))

    @property
    def pool(self) -> np.ndarray | None:
        return np.concatenate(self.kept_pool) if self.kept_pool else None

    @property
    def spatial(self) -> np.ndarray | None:
        return np.concatenate(self.kept_spatial) if self.kept_spatial else None

    @property
    def fingerprint(self) -> str:
        return self.digest.hexdigest() if not self.gather_bytes else self._gathered_fp

    def gather(self) -> None:
        """Every rank's statistics, features and image digest together (see iddpm_eval.distributed)."""
        from iddpm_eval import distributed as dist

        self._gathered_fp = dist.ordered_digest(self.head, b"".join(self.kept_bytes))
        self.pool_rs = _reduced(self.pool_rs)
        has_spatial = any(dist.D.all_gather_object(self.spatial_rs is not None))
        self.spatial_rs = _reduced(self.spatial_rs or RunningStats()) if has_spatial else None
        if self.keep_features:
            pool, spatial = dist.gather_rows(self.pool), dist.gather_rows(self.spatial)
            self.kept_pool = [pool] if pool is not None else []
            self.kept_spatial = [spatial] if spatial is not None else []


def _reduced(rs: RunningStats) -> RunningStats:
    """The statistics of every rank's rows together (float64 sums; see iddpm_eval.distributed)."""
    from iddpm_eval import distributed as dist

    out = RunningStats()
    out.n, out.mean, out.m2 = dist.reduce_stats(rs.n, rs.mean, rs.m2)
    out.dim = None if out.mean is None else out.mean.shape[0]
    return out
