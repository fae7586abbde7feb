"""Turn a command-line source (A or B of ``iddpm-eval fid``) into features or statistics.

A spec is resolved by the first resolver in :data:`RESOLVERS` that accepts it:

* ``.npz`` with ``pool`` (ours) or ``feats`` (clean-fid): cached features;
* ``.npz`` with ``arr_0``: an image batch (ADM reference batches too; their ``mu``/``sigma`` are
  used instead of recomputing when the run needs statistics only, in ``legacy-tf`` mode);
* ``.npz`` with ``mu`` and ``sigma``: statistics (ours, pytorch-fid, clean-fid);
* a trainer checkpoint (``.pt``, ``.pth``, ``.ckpt``): ``--num`` images sampled on the fly, shard by
  shard, exactly as :func:`iddpm_core.sample.sample_images` with the same seed, batch size, steps
  and sampler would give them;
* anything :func:`iddpm_core.data.load_source` opens: folders, ``fashion-mnist:train|test``,
  ``digits``, ``cifar10:SPLIT:FOLDER``.

Resolvers get ``(spec, options)``; ``options`` holds ``num``, ``seed``, ``batch_size``,
``sample_steps``, ``sampler`` and ``device`` for sources that need them.

:func:`measure` then produces a :class:`Measured`: statistics always, features when asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from iddpm_core.data import DataError, ImageSource, load_source
from iddpm_eval.stats import (INCEPTION, FeatureFile, FeatureStats, StatsError, extract, load_features,
                              load_stats, npz_keys, stats_from_features)


@dataclass
class Resolved:
    """A source as found: exactly one of ``images``, ``features``, ``stats`` is the primary data
    (``stats`` may also accompany ``images`` for ADM reference batches)."""

    spec: str
    kind: str  # "images", "features" or "stats"
    images: ImageSource | None = None
    features: FeatureFile | None = None
    stats: FeatureStats | None = None


Resolver = Callable[[str, dict], "Resolved | None"]


def _resolve_npz(spec: str, options: dict) -> Resolved | None:
    path = Path(spec)
    if path.suffix != ".npz" or not path.is_file():
        return None
    keys = npz_keys(path)
    if "pool" in keys or "feats" in keys:
        return Resolved(spec, "features", features=load_features(path))
    if "arr_0" in keys:
        stats = load_stats(path) if {"mu", "sigma"} <= keys else None
        from iddpm_core.data import NpzSource

        return Resolved(spec, "images", images=NpzSource(path), stats=stats)
    if {"mu", "sigma"} <= keys:
        return Resolved(spec, "stats", stats=load_stats(path))
    raise StatsError(f"{path}: not an image batch (arr_0), statistics (mu, sigma) or features (pool, feats); "
                     f"has {sorted(keys)}")


class CheckpointSource(ImageSource):
    """``num`` images sampled from a trainer checkpoint, one shard of ``batch_size`` at a time
    (shard k seeded from (seed, k) by :mod:`iddpm_core.sample`); the last shard is cached."""

    def __init__(self, path: str | os.PathLike, num: int, seed: int = 0, batch_size: int = 64,
                 steps: int | None = None, sampler: str = "ddpm", device: str | None = None):
        from iddpm_core.diffusion import build_diffusion
        from iddpm_core.checkpoint import load_model
        from iddpm_core.sample import respacing_for

        if num is None or num < 2:
            raise DataError(f"{path}: sampling from a checkpoint needs --num (at least 2 images)")
        try:
            self.sm = load_model(path, device=device or "cpu")
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise DataError(f"cannot load checkpoint {path}: {exc}") from exc
        cfg = self.sm.model_config
        self.diffusion = build_diffusion(self.sm.diffusion_config,
                                         respacing_for(steps, sampler, self.sm.diffusion_config.steps))
        self.name = f"{path} (sampled: {num} images, seed {seed}, steps {steps or 'all'}, {sampler})"
        self.num, self.seed, self.shard_size, self.sampler = num, seed, batch_size, sampler
        self.shape = (int(cfg.image_size), int(cfg.image_size), int(cfg.in_channels))
        self.has_labels = bool(getattr(cfg, "num_classes", None))
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num

    def _shard(self, k: int):
        from iddpm_core.sample import sample_shard

        if self._cache is None or self._cache[0] != k:
            n = min(self.shard_size, self.num - k * self.shard_size)
            imgs, labels = sample_shard(self.sm, self.diffusion, n, self.seed, k, self.sampler)
            labels = np.full(n, -1, np.int64) if labels is None else labels
            self._cache = (k, imgs, labels)
        return self._cache[1], self._cache[2]

    def _read(self, i):
        imgs, labels = self._shard(i // self.shard_size)
        return imgs[i % self.shard_size], int(labels[i % self.shard_size])

    def iter_batches(self, batch_size: int = 64, indices=None):
        if indices is not None:
            yield from super().iter_batches(batch_size, indices)
            return
        for k in range(-(-self.num // self.shard_size)):
            imgs, labels = self._shard(k)
            for start in range(0, len(imgs), batch_size):
                yield imgs[start:start + batch_size], labels[start:start + batch_size]


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def _resolve_checkpoint(spec: str, options: dict) -> Resolved | None:
    path = Path(spec)
    if path.suffix not in CHECKPOINT_SUFFIXES or not path.is_file():
        return None
    from iddpm_eval import distributed as dist

    src = CheckpointSource(path, options.get("num"), seed=options.get("seed") or 0,
                           batch_size=options.get("batch_size") or 64, steps=options.get("sample_steps"),
                           sampler=options.get("sampler") or "ddpm", device=dist.device(options.get("device")))
    return Resolved(spec, "images", images=src)


def _resolve_pkl(spec: str, options: dict) -> Resolved | None:
    """EDM2 reference statistics (``.pkl``, read without running code): the entry of the run's detector."""
    path = Path(spec)
    if path.suffix != ".pkl" or not path.is_file():
        return None
    from iddpm_eval.refstats import load_edm2_pkl

    return Resolved(spec, "stats", stats=load_edm2_pkl(path, options.get("detector") or INCEPTION))


def _resolve_data(spec: str, options: dict) -> Resolved | None:
    return Resolved(spec, "images", images=load_source(spec))


RESOLVERS: list[Resolver] = [_resolve_npz, _resolve_pkl, _resolve_checkpoint, _resolve_data]


def resolve(spec: str | os.PathLike, **options) -> Resolved:
    """Resolve ``spec`` with the resolvers of :data:`RESOLVERS`; errors name the spec."""
    spec = str(spec)
    for fn in RESOLVERS:
        out = fn(spec, options)
        if out is not None:
            return out
    raise DataError(f"{spec}: no resolver accepts this source")


def _stats_only(spec: str) -> StatsError:
    return StatsError(f"{spec} holds statistics only; KID, precision/recall and --bootstrap need "
                      "features (give images or a features .npz)")


def check_counts(resolved: list[Resolved], num: int | None = None, k: int | None = None,
                 need_features: bool = False) -> None:
    """Checks that need no feature pass, run on every side before the first one: ``--num`` within
    each source, features where KID or precision/recall need them, and more than ``k`` images per
    side for k-nearest-neighbour radii. Errors name the source."""
    for res in resolved:
        if res.kind == "stats":
            if need_features:
                raise _stats_only(res.spec)
            continue
        n = len(res.images) if res.kind == "images" else len(res.features.pool)
        if num is not None and num > n:
            raise StatsError(f"--num {num} is larger than the source {res.spec} ({n} images)")
        used = n if num is None else num
        if k is not None and used <= k:
            raise StatsError(f"{res.spec}: precision/recall with --k {k} needs more than {k} images, "
                             f"it has {used}")


def make_extractor(mode: str = "legacy-tf", weights: str | None = None, batch_size: int = 64,
                   sfid: bool = False, device: str | None = None):
    """The Inception extractor (imported lazily, so runs on cached statistics need no torch model)."""
    from iddpm_eval import distributed as dist
    from iddpm_eval.features import FeatureExtractor

    return FeatureExtractor(weights=weights, mode=mode, device=dist.device(device), batch_size=batch_size, sfid=sfid,
                            progress=False)


def make_feature_extractor(detector: str = INCEPTION, mode: str = "legacy-tf", weights: str | None = None,
                           batch_size: int = 64, sfid: bool = False, device: str | None = None,
                           dinov2_weights: str | None = None, dinov2_sha256: str | None = None):
    """The extractor of ``detector``: Inception (``mode``, ``weights``, spatial features with
    ``sfid``) or a DINOv2 model (``dinov2_weights``, pinned by ``dinov2_sha256``)."""
    if detector == INCEPTION:
        return make_extractor(mode, weights, batch_size, sfid, device)
    from iddpm_eval.dinov2 import DinoV2Extractor  # needs timm

    return DinoV2Extractor(detector, weights=dinov2_weights, device=device, batch_size=batch_size,
                           expected_sha256=dinov2_sha256)


@dataclass
class Measured:
    """Statistics (and optionally features) of one source, with what they were computed from."""

    spec: str
    kind: str
    stats: FeatureStats
    pool: np.ndarray | None = None
    spatial: np.ndarray | None = None
    n: int | None = None
    mode: str | None = None
    weights_sha256: str | None = None
    fingerprint: str | None = None
    from_stored_stats: bool = False
    detector: str | None = None


def _check_mode(name: str, got_mode, mode) -> None:
    if got_mode and mode and got_mode != mode:
        raise StatsError(f"{name} was computed in FID mode {got_mode!r}, but this run uses --mode {mode}")


def _check_detector(name: str, recorded, detector) -> None:
    if recorded and detector and recorded != detector:
        raise StatsError(f"{name} holds {recorded} statistics, but this run uses the {detector} detector")


def _check_same(measured, attr: str, what: str, show=str) -> str | None:
    """The one value of ``attr`` the measured sides share (None if none recorded); an error naming
    every side and its value if they differ."""
    known = {(getattr(m, attr), m.spec) for m in measured if getattr(m, attr)}
    if len({v for v, _ in known}) > 1:
        parts = ", ".join(f"{spec}: {show(v)}" for v, spec in sorted(known, key=lambda t: t[1]))
        raise StatsError(f"sources were computed with different {what} ({parts})")
    return next(iter(known))[0] if known else None


def check_same_detector(*measured: "Measured") -> str | None:
    """The one detector the measured sides share (None if none recorded); error naming both if they differ."""
    return _check_same(measured, "detector", "detectors")


def check_same_weights(*measured: "Measured") -> str | None:
    """The one weights sha256 the measured sides share (None if none recorded); error if they differ."""
    return _check_same(measured, "weights_sha256", "weights", lambda sha: f"{sha[:12]}...")


def measure(res: Resolved, extractor_fn: Callable[[], object], *, mode: str, need_features: bool,
            need_spatial: bool = False, num: int | None = None, seed: int | None = None,
            batch_size: int = 64, progress: bool = True, detector: str | None = None) -> Measured:
    """Statistics (and features when ``need_features``) of ``res``. ``extractor_fn`` is called
    only when images must go through the network. ``num`` subsamples images or cached features
    (seeded, see :func:`iddpm_eval.stats.choose_indices`); statistics files cannot be subsampled.
    ``detector``: the run's feature network; stored statistics or features of another are refused."""
    from iddpm_eval.stats import choose_indices

    if res.kind == "stats":
        st = res.stats
        if need_features:
            raise _stats_only(res.spec)
        if num is not None and st.count is not None and num != st.count:
            raise StatsError(f"{res.spec} holds statistics of {st.count} images; --num {num} cannot subsample them")
        if need_spatial and st.mu_s is None:
            raise StatsError(f"{res.spec} has no sFID statistics (mu_s, sigma_s)")
        _check_detector(res.spec, st.detector, detector)
        _check_mode(res.spec, st.mode, mode)
        return Measured(res.spec, "stats", st, n=st.count, mode=st.mode or mode,
                        weights_sha256=st.weights_sha256, fingerprint=st.fingerprint,
                        from_stored_stats=True, detector=st.detector or detector)
    if res.kind == "features":
        ff = res.features
        _check_detector(res.spec, ff.detector, detector)
        _check_mode(res.spec, ff.mode, mode)
        if need_spatial and ff.spatial is None:
            raise StatsError(f"{res.spec} has no spatial features for sFID")
        idx = choose_indices(len(ff.pool), num, seed, res.spec)
        pool = ff.pool if idx is None else ff.pool[idx]
        spatial = None if ff.spatial is None else (ff.spatial if idx is None else ff.spatial[idx])
        mu, sigma = stats_from_features(pool, res.spec)
        mu_s, sigma_s = stats_from_features(spatial, res.spec) if need_spatial else (None, None)
        st = FeatureStats(mu, sigma, count=len(pool), mode=ff.mode or mode, weights_sha256=ff.weights_sha256,
                          fingerprint=ff.fingerprint if idx is None else None, source=res.spec,
                          mu_s=mu_s, sigma_s=sigma_s, detector=ff.detector or detector)
        return Measured(res.spec, "features", st, pool=pool, spatial=spatial, n=len(pool), mode=st.mode,
                        weights_sha256=ff.weights_sha256, fingerprint=st.fingerprint, detector=st.detector)
    # images
    st = res.stats
    if (st is not None and not need_features and num is None and mode == "legacy-tf"
            and (not need_spatial or st.mu_s is not None) and (detector or INCEPTION) == (st.detector or INCEPTION)):
        return Measured(res.spec, "stats", st, n=len(res.images), mode=mode, weights_sha256=st.weights_sha256,
                        from_stored_stats=True, detector=st.detector or INCEPTION)
    fx = extractor_fn()
    ex = extract(res.images, fx, num=num, seed=seed, batch_size=batch_size, keep_features=need_features,
                 progress=progress, desc=f"features {res.spec}")
    if need_spatial and ex.stats.mu_s is None:
        raise StatsError("the feature extractor gave no spatial features for sFID")
    ex.stats.detector = getattr(fx, "detector", INCEPTION)
    return Measured(res.spec, "images", ex.stats, pool=ex.pool, spatial=ex.spatial, n=ex.count,
                    mode=getattr(fx, "mode", mode), weights_sha256=getattr(fx, "weights_sha256", None),
                    fingerprint=ex.fingerprint, detector=ex.stats.detector)


def _check_statistics_output(out, detector: str, mode: str, sfid: bool, save_features: bool,
                             adm_batch: bool) -> None:
    """What the output of :func:`source_statistics` cannot hold, refused before any image is processed."""
    if detector != INCEPTION and sfid:
        raise StatsError("sFID statistics need the Inception detector; drop --sfid with DINOv2 features")
    pkl = str(out).endswith(".pkl")
    if pkl and (save_features or adm_batch):
        raise StatsError(f"{out}: an EDM2 .pkl holds mu/sigma only; write features or an ADM batch to an .npz")
    if pkl:
        from iddpm_eval.refstats import check_edm2_writable

        check_edm2_writable(out, detector, mode)
    if adm_batch and (detector != INCEPTION or mode != "legacy-tf"):
        raise StatsError("ADM reference batches hold Inception legacy-tf statistics: use --mode legacy-tf, "
                         "--detector inception")


def _write_adm_batch(out, res: Resolved, st: FeatureStats, num: int | None, seed: int | None) -> None:
    """The images of ``res`` (the ``num`` drawn with ``seed``, grey made RGB) beside their statistics."""
    from iddpm_eval.refstats import save_adm_batch
    from iddpm_eval.stats import choose_indices

    if res.kind != "images":
        raise StatsError(f"{res.spec}: an ADM reference batch needs the images, this source holds {res.kind}")
    idx = choose_indices(len(res.images), num, seed)
    images, _ = res.images.batch(range(len(res.images)) if idx is None else idx)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, -1)
    save_adm_batch(out, images, st)


def source_statistics(spec: str, out: str | os.PathLike, *, mode: str = "legacy-tf", weights: str | None = None,
                      num: int | None = None, seed: int | None = None, batch_size: int = 64, sfid: bool = False,
                      save_features: bool = False, progress: bool = True, device: str | None = None,
                      sample_steps: int | None = None, sampler: str = "ddpm", features: str = "inception",
                      dinov2_weights: str | None = None, dinov2_sha256: str | None = None,
                      adm_batch: bool = False) -> FeatureStats:
    """Compute the statistics of ``spec`` and write them to ``out`` (atomically): ``mu``, ``sigma``,
    ``count``, ``mode``, ``weights_sha256``, ``detector``, ``fingerprint`` and ``source``;
    ``mu_s``/``sigma_s`` with ``sfid``; the ``pool`` (and ``spatial``) features with ``save_features``.
    ``features``: "inception" or a DINOv2 model (mode "edm2"). ``out`` ending in ``.pkl``: an EDM2
    reference file (:func:`iddpm_eval.refstats.save_edm2_pkl`); ``adm_batch``: an ADM evaluator
    reference batch (the images as ``arr_0`` beside the statistics)."""
    from iddpm_eval.stats import save_stats

    detector = INCEPTION if features == "inception" else features
    mode = mode if detector == INCEPTION else "edm2"
    _check_statistics_output(out, detector, mode, sfid, save_features, adm_batch)
    res = resolve(spec, num=num, seed=seed, batch_size=batch_size, sample_steps=sample_steps, sampler=sampler,
                  device=device, detector=detector)
    m = measure(res, lambda: make_feature_extractor(detector, mode, weights, batch_size, sfid or adm_batch, device,
                                                    dinov2_weights, dinov2_sha256),
                mode=mode, need_features=save_features, need_spatial=sfid or adm_batch, num=num, seed=seed,
                batch_size=batch_size, progress=progress, detector=detector)
    st = m.stats
    st.count, st.mode, st.weights_sha256, st.fingerprint = m.n, m.mode, m.weights_sha256, m.fingerprint
    st.source, st.detector = spec, m.detector
    if str(out).endswith(".pkl"):
        from iddpm_eval.refstats import save_edm2_pkl

        save_edm2_pkl(out, st)
    elif adm_batch:
        _write_adm_batch(out, res, st, num, seed)
    else:
        save_stats(out, st, features=m.pool if save_features else None,
                   spatial=m.spatial if save_features else None)
    return st
